//! `detour-registry-sync`, the agent: a legacy source, the mirror loop into etcd, the admin API,
//! and a clean stop on SIGTERM/SIGINT (resigning, leaving the entries for a standby to adopt).

use detour_proto::sync::Mutex;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::legacy::dirsrc::DirSource;
use crate::legacy::zk::{ZkOptions, ZkSource};
use crate::legacy::{LegacySource, SourceView};
use crate::mirror::run::{RunOptions, SharedStatus, Status, run};
use crate::mirror::target::EtcdTarget;
use detour_registry::health::NetCheck;

pub mod admin;
pub mod config;

use config::{Config, SourceSpec};

/// The agent failed to start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr} (admin): {source}")]
    Admin {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin address file could not be written.
    #[error("cannot write {path}: {source}")]
    AddressFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

pub use detour_registry::telemetry::prometheus;

struct Shared {
    cfg: Config,
    describe: String,
    source: watch::Receiver<SourceView>,
    status: SharedStatus,
}

impl admin::StateSource for Shared {
    fn ready(&self) -> bool {
        let s = self.status.lock();
        s.role == "leader" || s.role == "standby"
    }

    fn state(&self) -> serde_json::Value {
        let status: Status = self.status.lock().clone();
        let view = self.source.borrow().clone();
        let endpoints: usize = view.providers.values().map(|m| m.len()).sum();
        serde_json::json!({
            "name": self.cfg.name,
            "replica": self.cfg.replica,
            "role": status.role,
            "leader": status.leader,
            "elected": status.elected,
            "source": {
                "describe": self.describe,
                "connected": view.connected,
                "listed": view.listed,
                "problem": view.problem,
                "services": view.providers.len(),
                "endpoints": endpoints,
            },
            "target": {
                "etcd": self.cfg.etcd,
                "prefix": self.cfg.prefix,
                "entries": status.entries,
                "services": status.services,
                "conflicts": status.conflicts,
                "last_error": status.last_error,
            },
            "held_deletions": status.held_deletions,
            "protected": status.protected,
            "lag_ms": status.lag_ms,
        })
    }
}

/// The admin listener, bound; its address written to `admin_address_file` when set.
async fn bind_admin(cfg: &Config) -> Result<(TcpListener, std::net::SocketAddr), StartError> {
    let addr = cfg.admin_listen;
    let admin = |source| StartError::Admin { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(admin)?;
    let admin_addr = listener.local_addr().map_err(admin)?;
    if let Some(path) = &cfg.admin_address_file {
        detour_proto::files::write_atomic(path, format!("{admin_addr}\n").as_bytes(), 0o644)
            .map_err(|source| StartError::AddressFile {
                path: path.clone(),
                source,
            })?;
    }
    Ok((listener, admin_addr))
}

/// The legacy registry the config names.
fn legacy_source(cfg: &Config) -> Box<dyn LegacySource> {
    match &cfg.source {
        SourceSpec::ZooKeeper {
            servers,
            root,
            session_timeout,
            mapping,
            max_per_interface,
        } => Box::new(ZkSource::new(ZkOptions {
            servers: servers.clone(),
            root: root.clone(),
            session_timeout: *session_timeout,
            mapping: mapping.clone(),
            max_per_interface: *max_per_interface,
        })),
        SourceSpec::Dir {
            path,
            poll_interval,
        } => Box::new(DirSource {
            path: path.clone(),
            poll_interval: *poll_interval,
            legacy: cfg.name.clone(),
        }),
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run_agent(cfg: Config) -> Result<(), StartError> {
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let prom = prometheus().clone();
    detour_registry::telemetry::build_info("detour-registry-sync", env!("CARGO_PKG_VERSION"));
    let (listener, admin_addr) = bind_admin(&cfg).await?;
    let source = legacy_source(&cfg);
    let describe = source.describe();
    tracing::info!(name = %cfg.name, replica = %cfg.replica, source = %describe, admin = %admin_addr, etcd = ?cfg.etcd, "detour-registry-sync starting");
    let (view_tx, view_rx) = watch::channel(SourceView::default());
    let source_task = tokio::spawn(source.run(view_tx));
    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        describe,
        source: view_rx.clone(),
        status: status.clone(),
    });
    let admin_task = tokio::spawn(admin::serve(listener, shared, prom));
    let target = Arc::new(EtcdTarget::new(
        cfg.etcd.clone(),
        &cfg.prefix,
        &cfg.name,
        cfg.request_timeout,
        cfg.etcd_security.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = RunOptions {
        replica: cfg.replica.clone(),
        election_ttl: cfg.election_ttl,
        lease_ttl: cfg.lease_ttl,
        resync_interval: cfg.resync_interval,
        check_interval: cfg.check_interval,
        policy: cfg.protection.clone(),
        settle: cfg.settle,
    };
    let mut mirror = tokio::spawn(run(
        opts,
        target,
        view_rx,
        Arc::new(NetCheck),
        status,
        stop_rx,
    ));
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping: resigning the election; the mirrored entries stay for a standby");
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(cfg.request_timeout * 2, &mut mirror).await;
        }
        _ = &mut mirror => tracing::error!("the mirror loop ended"),
    }
    source_task.abort();
    admin_task.abort();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
