//! `detour-watchdog --config FILE`: the host agent. Starts (or adopts) the host's sidecar and
//! keeps it alive, holds the host's registrations while the sidecar is away, and runs upgrades.
//!
//! Signals: SIGTERM and SIGINT stop the watchdog alone — the sidecar runs on and the
//! registrations stay, for the next watchdog to adopt (restarting the watchdog never touches the
//! mesh). `detourctl shutdown` drains the sidecar, withdraws the host's registrations and stops
//! the watchdog. A bad config exits 64, a failed start 70.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use detour_registry::docs::{self, DocStore};
use detour_registry::telemetry;
use detour_registry::{DocName, gray::RuleSet};
use detour_watchdog::agent::{Agent, Stopped};
use detour_watchdog::agent_config::Config;
use detour_watchdog::api::{Api, Status};
use detour_watchdog::held::Held;
use tokio::signal::unix::{SignalKind, signal};

/// The Detour watchdog.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; every key can also be set as DETOUR_WATCHDOG__<SECTION>__<KEY>.
    #[arg(long, env = "DETOUR_WATCHDOG_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    telemetry::init_logging();
    telemetry::raise_open_files_limit();
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("detour-watchdog: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour-watchdog: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    rt.block_on(run(cfg))
}

async fn run(cfg: Config) -> ExitCode {
    telemetry::prometheus();
    telemetry::build_info("detour-watchdog", env!("CARGO_PKG_VERSION"));
    telemetry::spawn_upkeep();
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("detour-watchdog: cannot install signal handlers");
            return ExitCode::from(70);
        }
    };
    let run_dir = cfg.sidecar.run_dir.clone();
    let state_dir = cfg.sidecar.state_dir.clone();
    for dir in [&run_dir, &state_dir] {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("detour-watchdog: directory {}: {e}", dir.display());
            return ExitCode::from(70);
        }
    }
    let host = cfg.sidecar.host.clone();
    let registry = match cfg.sidecar.registry.open(host.clone()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("detour-watchdog: registry: {e}");
            return ExitCode::from(70);
        }
    };
    // The rules are saved in the state directory: a watchdog restarted while the registry is
    // unreachable keeps the host on the binary the last rules it knew chose.
    let (rules, _saving_rules) = docs::follow(
        DocName::GrayRules,
        registry.watch_doc(DocName::GrayRules),
        Some(DocStore::new(&state_dir)),
        |b| RuleSet::parse(b).is_ok(),
    );
    let held = Arc::new(
        Held::restore(
            registry,
            host.clone(),
            state_dir.join("watchdog-publication.json"),
        )
        .await,
    );
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let status = Arc::new(Mutex::new(Status::default()));
    let api = Arc::new(Api {
        host,
        held: held.clone(),
        status: status.clone(),
        cmds: tx,
        open: Arc::new(tokio::sync::watch::channel(0).0),
    });
    let served = detour_core::listen_tcp(cfg.admin_listen).and_then(|tcp| {
        let addr = tcp.local_addr()?;
        api.clone().serve(tcp, &cfg.admin_unix)?;
        Ok(addr)
    });
    let admin = match served {
        Ok(a) => a,
        Err(e) => {
            eprintln!("detour-watchdog: admin API: {e}");
            return ExitCode::from(70);
        }
    };
    let info = serde_json::json!({
        "pid": std::process::id(),
        "admin": admin,
        "unix": cfg.admin_unix,
    });
    let info_file = run_dir.join("watchdog.json");
    let tmp = run_dir.join(".watchdog.json.tmp");
    if std::fs::write(&tmp, info.to_string())
        .and_then(|()| std::fs::rename(&tmp, &info_file))
        .is_err()
    {
        tracing::warn!("cannot write watchdog.json");
    }
    tracing::info!(%admin, unix = %cfg.admin_unix.display(), "watchdog running");
    let unix = cfg.admin_unix.clone();
    let agent = Agent::new(Arc::new(cfg), held, status, rx, rules);
    let stop = async {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the watchdog; the sidecar runs on"),
            _ = int.recv() => tracing::info!("SIGINT: stopping the watchdog; the sidecar runs on"),
        }
    };
    let stopped = agent.run(stop).await;
    if stopped == Stopped::Shutdown {
        // The caller is still reading the answer to its shutdown.
        api.quiesce(std::time::Duration::from_secs(2)).await;
    }
    let _ = std::fs::remove_file(&info_file);
    let _ = std::fs::remove_file(&unix);
    tracing::info!(?stopped, "watchdog stopped");
    match stopped {
        Stopped::Left | Stopped::Shutdown => ExitCode::SUCCESS,
    }
}
