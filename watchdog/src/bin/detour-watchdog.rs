//! `detour-watchdog --config FILE`: the host agent. Starts (or adopts) the host's sidecar and
//! keeps it alive, holds the host's registrations while the sidecar is away, and runs upgrades.
//!
//! Signals: SIGTERM and SIGINT stop the watchdog alone — the sidecar runs on and the
//! registrations stay, for the next watchdog to adopt (restarting the watchdog never touches the
//! mesh). `detourctl shutdown` drains the sidecar, withdraws the host's registrations and stops
//! the watchdog. A bad config exits 64, a failed start 70.

use detour_proto::sync::Mutex;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use detour_registry::docs::Followed;
use detour_registry::docs::{self, DocStore};
use detour_registry::etcd::Follows;
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

/// The gray rules document followed, and the task that follows it.
type Rules = (
    tokio::sync::watch::Receiver<Followed>,
    tokio::task::JoinHandle<()>,
);

/// A start that failed: the message printed before exiting 70.
struct Failed(String);

async fn run(cfg: Config) -> ExitCode {
    telemetry::prometheus();
    telemetry::build_info("detour-watchdog", env!("CARGO_PKG_VERSION"));
    telemetry::spawn_upkeep();
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    match start(cfg).await {
        Ok(stopped) => {
            tracing::info!(?stopped, "watchdog stopped");
            match stopped {
                Stopped::Left | Stopped::Shutdown => ExitCode::SUCCESS,
            }
        }
        Err(Failed(e)) => {
            eprintln!("detour-watchdog: {e}");
            ExitCode::from(70)
        }
    }
}

/// Starts the agent and its API, and runs them until the watchdog stops.
async fn start(cfg: Config) -> Result<Stopped, Failed> {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => return Err(Failed("cannot install signal handlers".into())),
    };
    let run_dir = cfg.sidecar.run_dir.clone();
    for dir in [&run_dir, &cfg.sidecar.state_dir] {
        detour_proto::files::own_dir(dir)
            .map_err(|e| Failed(format!("directory {}: {e}", dir.display())))?;
    }
    let (rules, held) = open_registry(&cfg).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let status = Arc::new(Mutex::new(Status::default()));
    let api = Arc::new(Api {
        host: cfg.sidecar.host.clone(),
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
    let admin = served.map_err(|e| Failed(format!("admin API: {e}")))?;
    let info_file = write_info(&run_dir, admin, &cfg.admin_unix);
    tracing::info!(%admin, unix = %cfg.admin_unix.display(), "watchdog running");
    let unix = cfg.admin_unix.clone();
    let agent = Agent::new(Arc::new(cfg), held, status, rx, rules.0);
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
    drop(rules.1);
    let _ = std::fs::remove_file(&info_file);
    let _ = std::fs::remove_file(&unix);
    Ok(stopped)
}

/// The gray rules followed (and the task that follows them), and the host's publication as
/// the last watchdog left it, from the registry the config names.
async fn open_registry(cfg: &Config) -> Result<(Rules, Arc<Held>), Failed> {
    let host = cfg.sidecar.host.clone();
    let state_dir = &cfg.sidecar.state_dir;
    // The watchdog writes its host's keys and reads only the gray rules: its etcd watch is not
    // told of the fleet's endpoints and host statuses.
    let registry = (cfg.sidecar.registry)
        .open_following(host.clone(), Follows::GrayRules)
        .await
        .map_err(|e| Failed(format!("registry: {e}")))?;
    // The rules are saved in the state directory: a watchdog restarted while the registry is
    // unreachable keeps the host on the binary the last rules it knew chose.
    let rules = docs::follow(
        DocName::GrayRules,
        registry.watch_doc(DocName::GrayRules),
        Some(DocStore::new(state_dir)),
        |b| RuleSet::parse(b).is_ok(),
    );
    let publication = state_dir.join("watchdog-publication.json");
    let held = Arc::new(Held::restore(registry, host, publication).await);
    Ok((rules, held))
}

/// Writes `watchdog.json` (pid and admin addresses) in `run_dir`; its path.
fn write_info(run_dir: &Path, admin: SocketAddr, unix: &Path) -> PathBuf {
    let info = serde_json::json!({
        "pid": std::process::id(),
        "admin": admin,
        "unix": unix,
    });
    let info_file = run_dir.join("watchdog.json");
    let tmp = run_dir.join(".watchdog.json.tmp");
    if std::fs::write(&tmp, info.to_string())
        .and_then(|()| std::fs::rename(&tmp, &info_file))
        .is_err()
    {
        tracing::warn!("cannot write watchdog.json");
    }
    info_file
}
