//! `detour-sidecar --config FILE`: reads the config, starts the sidecar, and stops it gracefully
//! on SIGTERM, SIGINT or `POST /drain`.
//!
//! Signals: SIGTERM and SIGINT drain (stop accepting, finish in-flight requests within
//! `lifecycle.drain_timeout_ms`, leave the registry) and exit 0; a second SIGINT exits at once.
//! A bad config exits 64, a failed start 70.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use detour_sidecar::app::Sidecar;
use detour_sidecar::config::Config;
use detour_sidecar::telemetry;
use tokio::signal::unix::{SignalKind, signal};

/// The Detour sidecar.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; every key can also be set as DETOUR_<SECTION>__<KEY>.
    #[arg(long, env = "DETOUR_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init_logging();
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("detour-sidecar: {e}");
            return ExitCode::from(64);
        }
    };
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
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    telemetry::prometheus();
    telemetry::spawn_upkeep();
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
    let sidecar = match Sidecar::start(cfg).await {
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
