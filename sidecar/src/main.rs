//! `detour-sidecar --config FILE [--take-over]`: reads the config, starts the sidecar (or takes
//! the sockets over from the one running, an upgrade), and stops it gracefully on SIGTERM,
//! SIGINT or `POST /drain` — or hands off when a successor took the sockets over.
//!
//! Signals: SIGTERM and SIGINT drain (stop accepting, finish in-flight requests within
//! `lifecycle.drain_timeout_ms`) and exit 0; a second SIGINT exits at once; SIGHUP reopens the
//! access log file and nothing else. A hand-off also exits 0. A bad config exits 64, a failed start 70.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use detour_sidecar::app::Sidecar;
use detour_sidecar::config::Config;
use detour_sidecar::telemetry;
use tokio::signal::unix::{SignalKind, signal};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Detour sidecar.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; every key can also be set as DETOUR_SIDECAR__<SECTION>__<KEY>.
    #[arg(long, env = "DETOUR_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Take the listening sockets over from the sidecar running with the same run directory
    /// (an upgrade without loss; see docs/upgrade.md).
    #[arg(long)]
    take_over: bool,
}

fn main() -> ExitCode {
    // Transparent huge pages would back each of mimalloc's fresh regions with 2 MiB of memory
    // (four times the sidecar's resident set, measured); regular pages are enough.
    #[cfg(feature = "mimalloc")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let args = Args::parse();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("detour-sidecar: {e}");
            return ExitCode::from(64);
        }
    };
    detour_registry::telemetry::init_logging_as(cfg.log_format, "info");
    detour_registry::telemetry::raise_open_files_limit();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour-sidecar: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    rt.block_on(run(cfg, args.take_over))
}

async fn run(cfg: Config, take_over: bool) -> ExitCode {
    telemetry::prometheus();
    detour_registry::telemetry::build_info("detour-sidecar", detour_sidecar::VERSION);
    telemetry::spawn_upkeep();
    detour_sidecar::process::heap::spawn_trim();
    // SIGHUP (logrotate) reopens the access log (its writer listens too) and never stops the
    // sidecar, with or without an access log.
    if let Ok(mut hup) = signal(SignalKind::hangup()) {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::debug!("SIGHUP");
            }
        });
    }
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("detour-sidecar: cannot install signal handlers");
            return ExitCode::from(70);
        }
    };
    let started = if take_over {
        Sidecar::take_over(cfg).await
    } else {
        Sidecar::start(cfg).await
    };
    let sidecar = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("detour-sidecar: {e}");
            return ExitCode::from(70);
        }
    };
    let lifecycle = sidecar.lifecycle().clone();
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining (again to exit at once)"),
        _ = lifecycle.drain_requested() => {}
        _ = lifecycle.handover_requested() => {
            let report = sidecar.hand_off().await;
            tracing::info!(clean = report.clean, left_open = report.left_open, "handed off");
            return ExitCode::SUCCESS;
        }
    }
    let report = tokio::select! {
        r = sidecar.drain() => r,
        _ = int.recv() => {
            tracing::warn!("second SIGINT: exiting without finishing the drain");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        clean = report.clean,
        left_open = report.left_open,
        "stopped"
    );
    ExitCode::SUCCESS
}
