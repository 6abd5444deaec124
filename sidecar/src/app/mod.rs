//! Assembling a sidecar: bind every listener (or take them over from a predecessor), open the
//! registry, route, serve, register local providers — named phases, each a function of its
//! own (`route.rs` and `serve.rs` hold the two largest). The two ways it ends — a graceful
//! stop and a hand-off to a successor — are in `process/stop.rs`.

mod route;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use detour_proto::{ADDRESS_FILE, HostStatus, SidecarAddresses, SidecarState};
use detour_registry::cache::DiskCache;
use detour_registry::catalog::CatalogOptions;
use detour_registry::{Catalog, Registry, RegistryError, now_unix_ms};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::inbound::providers::LocalProviders;
use crate::outbound::links::Links;
use crate::process::delegate::Delegated;
use crate::process::handover::{HandoverError, Predecessor};
use crate::process::lifecycle::Lifecycle;
use crate::process::listeners::{BindError, HANDOVER_SOCKET, Listeners};
use crate::tls::TlsState;
use route::route;
use serve::Serving;

/// A sidecar that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The sockets could not be taken over from the running sidecar.
    #[error("take-over: {0}")]
    TakeOver(#[from] HandoverError),
    /// The run directory could not be prepared.
    #[error("run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics listener's token file could not be read.
    #[error("metrics.token_file {path}: {source}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be opened or written.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The TLS material could not be used (mTLS is on unless `tls.mode = "plaintext"`).
    #[error("mutual TLS (set tls.mode = \"plaintext\" to run without): {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A running sidecar.
pub struct Sidecar {
    pub(crate) cfg: Arc<Config>,
    pub(crate) lifecycle: Arc<Lifecycle>,
    pub(crate) registry: Arc<dyn Registry>,
    /// Set when publishing goes through a watchdog (stopped at a hand-off).
    pub(crate) delegated: Option<Arc<Delegated>>,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) bound: SidecarAddresses,
    /// Tasks that serve (stopped at the end).
    pub(crate) tasks: Vec<JoinHandle<()>>,
    /// Tasks that publish (stopped first at a hand-off: the successor publishes).
    pub(crate) publishers: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Binds, registers and starts serving. Returns once the sidecar is ready.
    pub async fn start(cfg: Config) -> Result<Sidecar, StartError> {
        prepare_run_dir(&cfg)?;
        let listeners = Listeners::bind(&cfg)?;
        Self::assemble(cfg, listeners, None).await
    }

    /// Takes the listening sockets over from the sidecar running with the same run directory,
    /// starts serving on them, and tells the predecessor once ready (it then hands off and
    /// exits). Returns once ready.
    pub async fn take_over(cfg: Config) -> Result<Sidecar, StartError> {
        prepare_run_dir(&cfg)?;
        let (mut listeners, predecessor) =
            crate::process::handover::take_over(&cfg.run_dir.join(HANDOVER_SOCKET)).await?;
        listeners.settle_metrics(&cfg)?;
        Self::assemble(cfg, listeners, Some(predecessor)).await
    }

    /// Puts a sidecar together in named phases: load (the TLS material), bind (the addresses
    /// of the listeners it holds), open (the registry and the catalog), route (the documents
    /// followed, the CA, the PA and the admin API), serve (accept on the listeners; a
    /// successor only once ready), ready (register, publish, tell a predecessor).
    async fn assemble(
        cfg: Config,
        listeners: Listeners,
        predecessor: Option<Predecessor>,
    ) -> Result<Sidecar, StartError> {
        let tls = load_tls(&cfg)?;
        let cfg = Arc::new(cfg);
        let lifecycle = Lifecycle::new();
        let (bound, health) = bound_addresses(&cfg, &listeners)?;
        let opened = open(&cfg, &bound, predecessor.is_some()).await?;
        let routing = route(&cfg, &opened, tls.clone(), &bound, &lifecycle)?;
        let mut serving = Serving::start(listeners, routing, tls, health, &lifecycle)?;
        if predecessor.is_none() {
            serving.accept();
        }
        let publishers = ready(&cfg, &opened, &serving.providers, &bound).await?;
        lifecycle.set(SidecarState::Ready);
        tracing::info!(host = %cfg.host, inbound = %bound.inbound, admin = %bound.admin,
            outbound = ?bound.outbound_tcp, unix = ?bound.outbound_unix, "sidecar ready");
        if let Some(mut p) = predecessor {
            serving.accept();
            if let Err(e) = p.ready().await {
                tracing::warn!(error = %e, "could not tell the predecessor; it may serve on");
            }
            serving.tasks.push(tokio::spawn(take_cache_when_gone(
                p.gone(),
                opened.catalog.clone(),
                cfg.catalog_cache.clone(),
            )));
        }
        Ok(Sidecar {
            cfg,
            lifecycle,
            registry: opened.registry,
            delegated: opened.delegated,
            catalog: opened.catalog,
            bound,
            tasks: serving.tasks,
            publishers,
        })
    }

    /// Where the listeners are (ports chosen by the OS when configured as 0).
    pub fn bound(&self) -> &SidecarAddresses {
        &self.bound
    }

    /// The lifecycle (to request a drain or watch the state).
    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }
}

/// Phase *load*: logs the config's warnings and loads this host's TLS material (`None`:
/// plaintext, said loudly).
fn load_tls(cfg: &Config) -> Result<Option<Arc<TlsState>>, StartError> {
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(match cfg.tls.files() {
        Some(files) => {
            let state = TlsState::load(files.clone(), &cfg.host)?;
            tracing::info!(identity = %state.own(), "mutual TLS between sidecars");
            Some(state)
        }
        None => {
            tracing::warn!(
                "tls.mode = \"plaintext\": traffic between sidecars is not encrypted and callers are not authenticated"
            );
            None
        }
    })
}

/// Phase *bind*: the addresses of the listeners held (bound or taken over) and the health
/// socket, bound now.
fn bound_addresses(
    cfg: &Config,
    listeners: &Listeners,
) -> Result<(SidecarAddresses, UnixListener), StartError> {
    let local = |l: &TcpListener, listener| {
        l.local_addr().map_err(|source| BindError {
            listener,
            addr: "?".into(),
            source,
        })
    };
    let (health_path, health) = crate::process::listeners::bind_health(&cfg.run_dir)?;
    let bound = SidecarAddresses {
        pid: std::process::id(),
        outbound_tcp: listeners
            .outbound_tcp
            .as_ref()
            .map(|l| local(l, "outbound"))
            .transpose()?,
        outbound_unix: cfg.outbound_unix.clone(),
        inbound: local(&listeners.inbound, "inbound")?,
        admin: local(&listeners.admin, "admin")?,
        health: Some(health_path),
        metrics: listeners
            .metrics
            .as_ref()
            .map(|l| local(l, "metrics"))
            .transpose()?,
    };
    Ok((bound, health))
}

/// What phase *open* gives the others.
struct Opened {
    /// Where registrations and the host status go (the watchdog's socket under one).
    registry: Arc<dyn Registry>,
    delegated: Option<Arc<Delegated>>,
    catalog: Arc<Catalog>,
}

/// Phase *open*: the registry (through the watchdog when under one), the status `starting`
/// (not for a successor: its predecessor is still serving), and the catalog with its disk
/// cache preloaded, so a start while the registry is down routes.
async fn open(
    cfg: &Config,
    bound: &SidecarAddresses,
    successor: bool,
) -> Result<Opened, StartError> {
    let reads = open_registry(cfg).await?;
    let delegated = cfg.watchdog_socket.as_ref().map(|socket| {
        Arc::new(Delegated::new(
            reads.clone(),
            cfg.host.clone(),
            socket.clone(),
            cfg.watchdog_takeover,
        ))
    });
    let registry: Arc<dyn Registry> = match &delegated {
        Some(d) => d.clone(),
        None => reads,
    };
    if !successor {
        publish_status(&*registry, cfg, bound, SidecarState::Starting).await?;
    }
    // One process at a time has the disk cache: a successor takes it once its predecessor has
    // gone (`take_cache_when_gone`).
    let cache = match (successor, cfg.catalog_cache.clone()) {
        (false, Some(path)) => tokio::task::spawn_blocking(move || DiskCache::open(&path))
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    let catalog_opts = CatalogOptions {
        policy: Arc::new(cfg.protection.clone()),
        cache,
        ..CatalogOptions::default()
    };
    let catalog = Arc::new(Catalog::with_options(registry.clone(), catalog_opts));
    if let Err(e) = catalog.preload().await {
        tracing::warn!(error = %e, "catalog disk cache not loaded");
    }
    Ok(Opened {
        registry,
        delegated,
        catalog,
    })
}

/// Phase *ready*: providers registered with the verdict of a first health check (then
/// watched: the tasks returned), the status `ready`, the address file written.
async fn ready(
    cfg: &Config,
    opened: &Opened,
    providers: &Arc<LocalProviders>,
    bound: &SidecarAddresses,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    providers.register_all().await?;
    let publishers = providers.spawn_checks();
    publish_status(&*opened.registry, cfg, bound, SidecarState::Ready).await?;
    write_address_file(&cfg.run_dir, bound).map_err(|source| StartError::RunDir {
        path: cfg.run_dir.clone(),
        source,
    })?;
    Ok(publishers)
}

/// Every 30 s, forgets the links and PA address claims of hosts no service in the catalog has
/// an endpoint on any more.
async fn prune_links(links: Arc<Links>, catalog: Arc<Catalog>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        let keep: std::collections::HashSet<_> = catalog
            .snapshot()
            .values()
            .flat_map(|v| v.set.endpoints.iter().map(|e| e.host.clone()))
            .collect();
        links.prune(&keep);
    }
}

/// Creates the run directory, readable by its owner and group only (it holds the admin token
/// and the sockets), and the state directory; either must be this process's user's
/// (`files::own_dir`). When the outbound Unix socket's group is set and
/// the socket is in the run directory, the run directory belongs to that group: its members can
/// reach the socket (the files they must not read are mode 0600).
fn prepare_run_dir(cfg: &Config) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [&cfg.run_dir, &cfg.state_dir] {
        let err = |source| StartError::RunDir {
            path: dir.clone(),
            source,
        };
        detour_proto::files::own_dir(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).map_err(err)?;
    }
    let in_run_dir = cfg
        .outbound_unix
        .as_deref()
        .and_then(Path::parent)
        .is_some_and(|p| p == cfg.run_dir);
    if let Some(gid) = cfg.outbound_unix_group
        && in_run_dir
    {
        rustix::fs::chown(&cfg.run_dir, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(
            |e| StartError::RunDir {
                path: cfg.run_dir.clone(),
                source: e.into(),
            },
        )?;
    }
    Ok(())
}

/// Opens the registry back-end `cfg` names, for this host.
pub async fn open_registry(cfg: &Config) -> Result<Arc<dyn Registry>, RegistryError> {
    cfg.registry.open(cfg.host.clone()).await
}

/// Once the predecessor has exited (it held the catalog's disk cache), opens the cache and
/// gives it to the catalog.
async fn take_cache_when_gone(
    gone: impl std::future::Future<Output = ()>,
    catalog: Arc<Catalog>,
    path: Option<PathBuf>,
) {
    gone.await;
    tracing::info!("the predecessor is gone");
    let Some(path) = path else { return };
    // Opening checks the file and may wait out the predecessor's lock (its process can still
    // be exiting): off the runtime's thread, which serves every request meanwhile.
    if let Ok(Some(cache)) = tokio::task::spawn_blocking(move || DiskCache::open(&path)).await {
        catalog.attach_cache(cache);
    }
}

/// Publishes this host's status; `bound`: where its listeners are (the metrics listener is
/// published for `detourctl stat`).
pub(crate) async fn publish_status(
    registry: &dyn Registry,
    cfg: &Config,
    bound: &SidecarAddresses,
    state: SidecarState,
) -> Result<(), RegistryError> {
    registry
        .set_host_status(HostStatus {
            host: cfg.host.clone(),
            sidecar: state,
            version: crate::VERSION.to_owned(),
            updated_unix_ms: now_unix_ms(),
            watchdog: None,
            metrics: published_metrics(bound),
        })
        .await
}

/// The metrics listener's address as others reach it: bound to every address (`0.0.0.0`,
/// `::`), the host's inbound address with its port.
fn published_metrics(bound: &SidecarAddresses) -> Option<std::net::SocketAddr> {
    let m = bound.metrics?;
    Some(match m.ip().is_unspecified() {
        true => std::net::SocketAddr::new(bound.inbound.ip(), m.port()),
        false => m,
    })
}

/// Writes the bound addresses atomically for tools and tests to read (and for a watchdog:
/// its pid is the sign that this process is ready).
fn write_address_file(run_dir: &Path, bound: &SidecarAddresses) -> std::io::Result<()> {
    detour_proto::files::write_atomic(
        &run_dir.join(ADDRESS_FILE),
        &serde_json::to_vec_pretty(bound)?,
        0o644,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_registry::memory::MemoryRegistry;

    /// The predecessor can still hold the disk cache's lock when its hand-over connection
    /// closes: the successor's open waits for it, and every request it serves meanwhile runs on
    /// the same one thread. Here the lock is released only by a task of that thread: an open
    /// that blocked the thread would wait for it in vain and give up.
    #[test]
    fn a_successor_waits_for_the_disk_cache_without_holding_its_thread() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.redb");
        let held = DiskCache::open(&path).expect("the predecessor's cache");
        rt.block_on(async {
            let catalog = Arc::new(Catalog::new(Arc::new(MemoryRegistry::new())));
            let take = tokio::spawn(take_cache_when_gone(
                std::future::ready(()),
                catalog.clone(),
                Some(path.clone()),
            ));
            // The predecessor's process exits a moment after its connection closed.
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            drop(held);
            take.await.expect("the task ends");
            assert!(
                catalog.has_disk_cache(),
                "the successor took the cache over"
            );
        });
    }
}
