//! Assembling a sidecar: bind every listener (or take them over from a predecessor), open the
//! registry, register local providers, serve. The two ways it ends — a graceful stop and a
//! hand-off to a successor — are in `stop.rs`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use detour_core::{Pool, PoolOptions};
use detour_proto::{ADDRESS_FILE, HostStatus, SidecarAddresses, SidecarState};
use detour_registry::cache::DiskCache;
use detour_registry::catalog::CatalogOptions;
use detour_registry::docs::{self, DocStore};
use detour_registry::health::NetCheck;
use detour_registry::{Catalog, DocName, Registry, RegistryError, now_unix_ms};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::Config;
use crate::http::server::{ConnOptions, Listener, accept_loop};
use crate::inbound::Inbound;
use crate::inbound::providers::LocalProviders;
use crate::outbound::control::ControlService;
use crate::outbound::gray::Gray;
use crate::outbound::links::Links;
use crate::outbound::{Documents, Outbound, Upstreams};
use crate::policy::Policies;
use crate::process::delegate::Delegated;
use crate::process::handover::{HandoverError, Predecessor};
use crate::process::lifecycle::Lifecycle;
use crate::process::listeners::{BindError, HANDOVER_SOCKET, Listeners};
use crate::tls::TlsState;
use crate::tls::connect::{PaConnect, PaHosts};

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
        let (listeners, predecessor) =
            crate::process::handover::take_over(&cfg.run_dir.join(HANDOVER_SOCKET)).await?;
        Self::assemble(cfg, listeners, Some(predecessor)).await
    }

    async fn assemble(
        cfg: Config,
        listeners: Listeners,
        predecessor: Option<Predecessor>,
    ) -> Result<Sidecar, StartError> {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let tls = match cfg.tls.files() {
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
        };
        let cfg = Arc::new(cfg);
        let lifecycle = Lifecycle::new();
        let handover_fds = listeners.dup().map_err(|source| BindError {
            listener: "handover",
            addr: "duplicate".into(),
            source,
        })?;
        let local = |l: &TcpListener, listener| {
            l.local_addr().map_err(|source| BindError {
                listener,
                addr: "?".into(),
                source,
            })
        };
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
            health: None,
        };
        let (health_path, health) = crate::process::listeners::bind_health(&cfg.run_dir)?;
        let bound = SidecarAddresses {
            health: Some(health_path),
            ..bound
        };

        let reads = open_registry(&cfg).await?;
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
        // A successor says nothing until it is ready: its predecessor is, meanwhile.
        if predecessor.is_none() {
            publish_status(&*registry, &cfg, SidecarState::Starting).await?;
        }
        let catalog_opts = CatalogOptions {
            policy: Arc::new(cfg.protection.clone()),
            // sled allows one process per cache: a successor takes it once its predecessor
            // has gone (below).
            cache: match predecessor {
                Some(_) => None,
                None => cfg.catalog_cache.as_deref().and_then(DiskCache::open),
            },
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
            max_conns_per_target: cfg.limits.max_connections_per_endpoint,
            max_pending_per_target: cfg.limits.max_pending_per_endpoint,
            ..PoolOptions::default()
        };
        let opts = Arc::new(ConnOptions {
            max_header_bytes: cfg.max_header_bytes,
            head_timeout: cfg.limits.head_timeout,
            proxy: cfg.host.to_string(),
            limits: cfg.limits.clone(),
            tls: None,
            handshakes: None,
        });
        let inbound_opts = Arc::new(ConnOptions {
            tls: tls.clone(),
            handshakes: Some(Arc::new(crate::tls::guard::HandshakeGuard::new(
                cfg.handshake,
                std::time::Instant::now(),
            ))),
            ..(*opts).clone()
        });
        // The documents this sidecar follows, saved in its state directory: a start while the
        // registry is unreachable applies the last ones it knew.
        let store = Some(DocStore::new(&cfg.state_dir));
        let (rules, saving_rules) = docs::follow(
            DocName::GrayRules,
            registry.watch_doc(DocName::GrayRules),
            store.clone(),
            |b| detour_registry::gray::RuleSet::parse(b).is_ok(),
        );
        let (policy_doc, saving_policy) = docs::follow(
            DocName::Policy,
            registry.watch_doc(DocName::Policy),
            store,
            |b| detour_registry::policy::PolicyDoc::parse(b).is_ok(),
        );
        let gray = Gray::new(cfg.host.clone());
        let known = catalog.clone();
        gray.keep_only_if(move |s| known.has(s));
        let following = gray.follow(rules);
        let policies = Policies::new(&cfg);
        let following_policy = policies.follow(policy_doc);
        let control = ControlService::new(
            lifecycle.clone(),
            catalog.clone(),
            cfg.host.clone(),
            gray.clone(),
            policies.clone(),
        );
        let data = Pool::new(pool_opts);
        let pa_hosts = Arc::new(PaHosts::default());
        let to_pas = match &tls {
            Some(t) => Pool::with_connector(
                pool_opts,
                Arc::new(PaConnect::new(t.clone(), pa_hosts.clone())),
            ),
            None => Pool::new(pool_opts),
        };
        let links = Links::new(cfg.clone(), registry.watch_hosts(), &to_pas, pa_hosts);
        let pruning = tokio::spawn(prune_links(links.clone(), catalog.clone()));
        if let Some(d) = &delegated {
            let l = links.clone();
            d.set_links(Box::new(move || {
                l.states()
                    .into_iter()
                    .filter(|(_, state)| *state != crate::outbound::links::CA_NAMES.primary)
                    .map(|(host, state)| (host, state.to_owned()))
                    .collect()
            }));
        }
        let providers = Arc::new(LocalProviders::new(
            &cfg,
            bound.inbound,
            registry.clone(),
            Arc::new(NetCheck),
        ));
        let outbound = Arc::new(Outbound::new(
            cfg.clone(),
            catalog.clone(),
            Upstreams {
                providers: data,
                pas: to_pas,
            },
            links.clone(),
            Documents {
                gray: gray.clone(),
                policies: policies.clone(),
            },
            lifecycle.clone(),
            control,
        ));
        let inbound = Arc::new(Inbound::new(
            cfg.clone(),
            Pool::new(pool_opts),
            lifecycle.clone(),
            providers.clone(),
            policies.clone(),
        ));
        let admin = Arc::new(Admin {
            cfg: cfg.clone(),
            lifecycle: lifecycle.clone(),
            catalog: catalog.clone(),
            links,
            providers: providers.clone(),
            gray,
            policies,
            bound: bound.clone(),
            token: crate::admin::guard::Token::create(&cfg.run_dir).map_err(|source| {
                StartError::RunDir {
                    path: cfg.run_dir.clone(),
                    source,
                }
            })?,
        });

        let lc = &lifecycle;
        let mut tasks = vec![
            pruning,
            following,
            following_policy,
            saving_rules,
            saving_policy,
            tokio::spawn(async move {
                if let Some(t) = tls {
                    t.watch().await;
                }
            }),
            tokio::spawn(admin.clone().serve_health(health)),
            tokio::spawn(crate::process::handover::serve(
                listeners.handover,
                handover_fds,
                lc.clone(),
            )),
        ];
        // Accepting on the shared listeners. A successor starts it only once it is ready, just
        // before it tells its predecessor: one that fails before then has taken no connection
        // its predecessor would have served.
        let mut accepting: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = vec![
            Box::pin(admin.serve(listeners.admin)),
            Box::pin(accept_loop(
                Listener::Tcp(listeners.inbound),
                "inbound",
                inbound,
                lc.clone(),
                inbound_opts,
            )),
        ];
        if let Some(l) = listeners.outbound_tcp {
            accepting.push(Box::pin(accept_loop(
                Listener::Tcp(l),
                "outbound",
                outbound.clone(),
                lc.clone(),
                opts.clone(),
            )));
        }
        if let Some(l) = listeners.outbound_unix {
            accepting.push(Box::pin(accept_loop(
                Listener::Unix(l),
                "outbound-unix",
                outbound,
                lc.clone(),
                opts,
            )));
        }
        if predecessor.is_none() {
            tasks.extend(accepting.drain(..).map(tokio::spawn));
        }

        // Providers are registered with the verdict of a first health check, then watched.
        providers.register_all().await?;
        let publishers = providers.spawn_checks();
        publish_status(&*registry, &cfg, SidecarState::Ready).await?;
        write_address_file(&cfg.run_dir, &bound).map_err(|source| StartError::RunDir {
            path: cfg.run_dir.clone(),
            source,
        })?;
        lifecycle.set(SidecarState::Ready);
        tracing::info!(host = %cfg.host, inbound = %bound.inbound, admin = %bound.admin,
            outbound = ?bound.outbound_tcp, unix = ?bound.outbound_unix, "sidecar ready");
        if let Some(mut p) = predecessor {
            tasks.extend(accepting.drain(..).map(tokio::spawn));
            if let Err(e) = p.ready().await {
                tracing::warn!(error = %e, "could not tell the predecessor; it may serve on");
            }
            tasks.push(tokio::spawn(take_cache_when_gone(
                p,
                catalog.clone(),
                cfg.catalog_cache.clone(),
            )));
        }
        Ok(Sidecar {
            cfg,
            lifecycle,
            registry,
            delegated,
            catalog,
            bound,
            tasks,
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
/// and the sockets), and the state directory. When the outbound Unix socket's group is set and
/// the socket is in the run directory, the run directory belongs to that group: its members can
/// reach the socket (the files they must not read are mode 0600).
fn prepare_run_dir(cfg: &Config) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [&cfg.run_dir, &cfg.state_dir] {
        let err = |source| StartError::RunDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
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
async fn take_cache_when_gone(p: Predecessor, catalog: Arc<Catalog>, path: Option<PathBuf>) {
    p.gone().await;
    tracing::info!("the predecessor is gone");
    if let Some(path) = path
        && let Some(cache) = DiskCache::open(&path)
    {
        catalog.attach_cache(cache);
    }
}

pub(crate) async fn publish_status(
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
            watchdog: None,
        })
        .await
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
