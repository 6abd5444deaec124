//! Assembling a sidecar: bind every listener, open the registry, register local providers,
//! serve; and the graceful stop that undoes it in order.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use detour_core::{LISTEN_BACKLOG, Pool, PoolOptions, listen_tcp};
use detour_proto::{ADDRESS_FILE, HostStatus, SidecarAddresses, SidecarState};
use detour_registry_sync::cache::DiskCache;
use detour_registry_sync::catalog::CatalogOptions;
use detour_registry_sync::dir::{DirOptions, DirRegistry};
use detour_registry_sync::etcd::{EtcdOptions, EtcdRegistry};
use detour_registry_sync::health::NetCheck;
use detour_registry_sync::{Catalog, Registry, RegistryError, RegistrySpec, now_unix_ms};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::control::ControlService;
use crate::inbound::Inbound;
use crate::lifecycle::Lifecycle;
use crate::links::Links;
use crate::outbound::Outbound;
use crate::providers::LocalProviders;
use crate::server::{ConnOptions, Listener, accept_loop};

/// A sidecar that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        /// Which listener.
        listener: &'static str,
        /// Where.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The run directory could not be prepared.
    #[error("run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The registry could not be opened or written.
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// A running sidecar.
pub struct Sidecar {
    cfg: Arc<Config>,
    lifecycle: Arc<Lifecycle>,
    registry: Arc<dyn Registry>,
    catalog: Arc<Catalog>,
    bound: SidecarAddresses,
    tasks: Vec<JoinHandle<()>>,
}

/// How a graceful stop went.
#[derive(Debug, Clone, Copy)]
pub struct DrainReport {
    /// Whether every connection closed within the drain timeout.
    pub clean: bool,
    /// Connections still open when the sidecar gave up waiting.
    pub left_open: usize,
}

impl Sidecar {
    /// Binds, registers and starts serving. Returns once the sidecar is ready.
    pub async fn start(cfg: Config) -> Result<Sidecar, StartError> {
        let cfg = Arc::new(cfg);
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| StartError::RunDir {
            path: cfg.run_dir.clone(),
            source,
        })?;
        let lifecycle = Lifecycle::new();
        let bind = |listener: &'static str, addr: SocketAddr| async move {
            listen_tcp(addr).map_err(|source| StartError::Bind {
                listener,
                addr: addr.to_string(),
                source,
            })
        };
        let admin_l = bind("admin", cfg.admin).await?;
        let inbound_l = bind("inbound", cfg.inbound).await?;
        let outbound_l = match cfg.outbound_tcp {
            Some(a) => Some(bind("outbound", a).await?),
            None => None,
        };
        let unix_l = match &cfg.outbound_unix {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };
        let local = |l: &TcpListener, listener| {
            l.local_addr().map_err(|source| StartError::Bind {
                listener,
                addr: "?".into(),
                source,
            })
        };
        let bound = SidecarAddresses {
            pid: std::process::id(),
            outbound_tcp: outbound_l
                .as_ref()
                .map(|l| local(l, "outbound"))
                .transpose()?,
            outbound_unix: cfg.outbound_unix.clone(),
            inbound: local(&inbound_l, "inbound")?,
            admin: local(&admin_l, "admin")?,
        };

        let registry: Arc<dyn Registry> = match &cfg.registry {
            RegistrySpec::Dir(dir) => {
                let opts = DirOptions {
                    ttl: cfg.registry_ttl,
                    poll_interval: cfg.registry_poll,
                };
                Arc::new(DirRegistry::open(dir, cfg.host.clone(), opts).await?)
            }
            RegistrySpec::Etcd(endpoints) => {
                let opts = EtcdOptions {
                    endpoints: endpoints.clone(),
                    prefix: cfg.etcd_prefix.clone(),
                    ttl: cfg.etcd_ttl,
                    request_timeout: cfg.etcd_request_timeout,
                };
                Arc::new(EtcdRegistry::open(cfg.host.clone(), opts).await?)
            }
        };
        publish_status(&*registry, &cfg, SidecarState::Starting).await?;
        let catalog_opts = CatalogOptions {
            policy: Arc::new(cfg.protection.clone()),
            cache: cfg.catalog_cache.as_deref().and_then(DiskCache::open),
            ..CatalogOptions::default()
        };
        let catalog = Arc::new(Catalog::with_options(registry.clone(), catalog_opts));
        // Every service known to the disk cache is routable before the first request: a start
        // while the registry is down serves from here.
        if let Err(e) = catalog.preload().await {
            tracing::warn!(error = %e, "catalog disk cache not loaded");
        }
        let pool_opts = PoolOptions {
            connect_timeout: cfg.connect_timeout,
            ..PoolOptions::default()
        };
        let opts = Arc::new(ConnOptions {
            max_header_bytes: cfg.max_header_bytes,
            head_timeout: Duration::from_secs(30),
            proxy: cfg.host.to_string(),
        });
        let control = ControlService::new(lifecycle.clone(), catalog.clone(), cfg.host.clone());
        let data = Pool::new(pool_opts);
        let links = Links::new(cfg.clone(), registry.watch_hosts(), &data);
        let providers = Arc::new(LocalProviders::new(
            &cfg,
            bound.inbound,
            registry.clone(),
            Arc::new(NetCheck),
        ));
        let outbound = Arc::new(Outbound::new(
            cfg.clone(),
            catalog.clone(),
            data,
            links.clone(),
            lifecycle.clone(),
            control,
        ));
        let inbound = Arc::new(Inbound::new(
            cfg.clone(),
            Pool::new(pool_opts),
            lifecycle.clone(),
            providers.clone(),
        ));
        let admin = Arc::new(Admin {
            cfg: cfg.clone(),
            lifecycle: lifecycle.clone(),
            catalog: catalog.clone(),
            links,
            providers: providers.clone(),
            bound: bound.clone(),
        });

        let mut tasks = vec![tokio::spawn(admin.serve(admin_l))];
        let lc = &lifecycle;
        tasks.push(tokio::spawn(accept_loop(
            Listener::Tcp(inbound_l),
            "inbound",
            inbound,
            lc.clone(),
            opts.clone(),
        )));
        if let Some(l) = outbound_l {
            tasks.push(tokio::spawn(accept_loop(
                Listener::Tcp(l),
                "outbound",
                outbound.clone(),
                lc.clone(),
                opts.clone(),
            )));
        }
        if let Some(l) = unix_l {
            tasks.push(tokio::spawn(accept_loop(
                Listener::Unix(l),
                "outbound-unix",
                outbound,
                lc.clone(),
                opts,
            )));
        }

        // Providers are registered with the verdict of a first health check, then watched.
        providers.register_all().await?;
        tasks.extend(providers.spawn_checks());
        publish_status(&*registry, &cfg, SidecarState::Ready).await?;
        write_address_file(&cfg.run_dir, &bound).map_err(|source| StartError::RunDir {
            path: cfg.run_dir.clone(),
            source,
        })?;
        lifecycle.set(SidecarState::Ready);
        tracing::info!(host = %cfg.host, inbound = %bound.inbound, admin = %bound.admin,
            outbound = ?bound.outbound_tcp, unix = ?bound.outbound_unix, "sidecar ready");
        Ok(Sidecar {
            cfg,
            lifecycle,
            registry,
            catalog,
            bound,
            tasks,
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

    /// Stops gracefully, losing nothing:
    /// 1. announce: state `draining` (control sessions tell their SDKs, `/detour/ping` answers
    ///    503) and host status `draining` in the registry (remote CAs go straight to this host's
    ///    providers), while still serving normally for `lifecycle.announce_ms`;
    /// 2. close the listeners; HTTP/1.1 connections close after their current response, HTTP/2
    ///    ones get GOAWAY; wait for in-flight requests (bounded by the drain timeout);
    /// 3. publish `stopped`. The local providers stay registered: they keep serving while this
    ///    sidecar is away (callers reach them C→CA→P), and the record expires after its TTL
    ///    unless a new sidecar takes it over.
    pub async fn drain(self) -> DrainReport {
        tracing::info!(announce = ?self.cfg.announce, timeout = ?self.cfg.drain_timeout, "draining");
        let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
        self.lifecycle.set(SidecarState::Draining);
        if let Err(e) = publish_status(&*self.registry, &self.cfg, SidecarState::Draining).await {
            tracing::warn!(error = %e, "could not announce the drain in the registry");
        }
        tokio::time::sleep_until((tokio::time::Instant::now() + self.cfg.announce).min(deadline))
            .await;
        self.lifecycle.close();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let clean = self.lifecycle.wait_connections_closed(left).await;
        let left_open = self.lifecycle.open_connections();
        if !clean {
            tracing::warn!(
                left_open,
                "drain timeout reached with connections still open"
            );
        }
        self.lifecycle.set(SidecarState::Stopped);
        if let Err(e) = publish_status(&*self.registry, &self.cfg, SidecarState::Stopped).await {
            tracing::warn!(error = %e, "could not publish the stop in the registry");
        }
        if let Some(p) = &self.bound.outbound_unix {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.cfg.run_dir.join(ADDRESS_FILE));
        self.catalog.flush_cache();
        for t in &self.tasks {
            t.abort();
        }
        DrainReport { clean, left_open }
    }
}

async fn publish_status(
    registry: &dyn Registry,
    cfg: &Config,
    state: SidecarState,
) -> Result<(), RegistryError> {
    registry
        .set_host_status(HostStatus {
            host: cfg.host.clone(),
            sidecar: state,
            version: crate::VERSION.to_owned(),
            updated_unix_ms: now_unix_ms(),
        })
        .await
}

/// Binds the Unix socket, replacing a stale socket file left by a dead process.
fn bind_unix(path: &Path) -> Result<UnixListener, StartError> {
    let err = |source| StartError::Bind {
        listener: "outbound-unix",
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process serves this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let socket = tokio::net::UnixSocket::new_stream().map_err(err)?;
    socket.bind(path).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// Writes the bound addresses atomically for tools and tests to read.
fn write_address_file(run_dir: &Path, bound: &SidecarAddresses) -> std::io::Result<()> {
    let tmp = run_dir.join(format!(".{ADDRESS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(bound)?)?;
    std::fs::rename(tmp, run_dir.join(ADDRESS_FILE))
}
