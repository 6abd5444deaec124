//! Phase *route* of a start: the registry documents followed (gray rules, policy, routes), the CA
//! (`Outbound`) with its pools and links, the PA (`Inbound`) with its local providers, and the
//! admin API, wired to the registry and catalog phase *open* gave.

use std::sync::Arc;

use detour_core::{Pool, PoolOptions};
use detour_proto::SidecarAddresses;
use detour_registry::docs::{self, DocStore};
use detour_registry::health::NetCheck;
use detour_registry::{Catalog, DocName, Registry};
use tokio::task::JoinHandle;

use super::{Opened, StartError, prune_links};
use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::config::Config;
use crate::http::server::ConnOptions;
use crate::inbound::Inbound;
use crate::inbound::providers::LocalProviders;
use crate::outbound::control::ControlService;
use crate::outbound::gray::Gray;
use crate::outbound::links::{CA_NAMES, Links};
use crate::outbound::routes::Routes;
use crate::outbound::{Documents, Outbound, Upstreams};
use crate::policy::Policies;
use crate::process::lifecycle::Lifecycle;
use crate::tls::TlsState;
use crate::tls::connect::{PaConnect, PaHosts};
use crate::tls::guard::HandshakeGuard;
use detour_core::trace::Tracer;

/// What serves, once routed.
pub(super) struct Routing {
    pub outbound: Arc<Outbound>,
    pub inbound: Arc<Inbound>,
    pub admin: Arc<Admin>,
    pub providers: Arc<LocalProviders>,
    /// Connection options of the outbound listeners (no TLS) and of the inbound one.
    pub outbound_opts: Arc<ConnOptions>,
    pub inbound_opts: Arc<ConnOptions>,
    /// Following and saving the documents, pruning the links.
    pub tasks: Vec<JoinHandle<()>>,
}

/// Builds the CA, the PA and the admin API.
pub(super) fn route(
    cfg: &Arc<Config>,
    opened: &Opened,
    tls: Option<Arc<TlsState>>,
    bound: &SidecarAddresses,
    lifecycle: &Arc<Lifecycle>,
) -> Result<Routing, StartError> {
    let (documents, mut tasks) = follow_documents(cfg, &opened.registry, &opened.catalog);
    let access_log = AccessLog::start(&cfg.access_log).map(Arc::new);
    let tracer = cfg.tracing.clone().map_or_else(Tracer::off, Tracer::start);
    let control = ControlService::new(
        lifecycle.clone(),
        opened.catalog.clone(),
        (cfg.host.clone(), cfg.zone.clone()),
        documents.clone(),
    );
    let (pool_opts, to_pas, links) = links_to_pas(cfg, opened, tls.as_ref());
    tasks.push(tokio::spawn(prune_links(
        links.clone(),
        opened.catalog.clone(),
    )));
    let providers = Arc::new(LocalProviders::new(
        cfg,
        bound.inbound,
        opened.registry.clone(),
        Arc::new(NetCheck),
    ));
    let outbound = Arc::new(
        Outbound::new(
            cfg.clone(),
            opened.catalog.clone(),
            Upstreams {
                providers: Pool::new(pool_opts),
                pas: to_pas,
            },
            links.clone(),
            documents.clone(),
            lifecycle.clone(),
            control,
        )
        .with_access_log(access_log.clone())
        .with_tracer(tracer.clone()),
    );
    let inbound = Arc::new(
        Inbound::new(
            cfg.clone(),
            Pool::new(pool_opts),
            lifecycle.clone(),
            providers.clone(),
            documents.policies.clone(),
        )
        .with_access_log(access_log)
        .with_tracer(tracer),
    );
    let admin = admin(cfg, opened, links, &providers, documents, bound, lifecycle)?;
    let (outbound_opts, inbound_opts) = conn_options(cfg, tls);
    Ok(Routing {
        outbound,
        inbound,
        admin,
        providers,
        outbound_opts,
        inbound_opts,
        tasks,
    })
}

/// The pools' settings, the pool of connections to PAs (mutual TLS when on) and the CA half
/// of the link machine over it (whose states a watchdog reports, when under one).
fn links_to_pas(
    cfg: &Arc<Config>,
    opened: &Opened,
    tls: Option<&Arc<TlsState>>,
) -> (PoolOptions, Arc<Pool>, Arc<Links>) {
    let pool_opts = PoolOptions {
        connect_timeout: cfg.connect_timeout,
        max_conns_per_target: cfg.limits.max_connections_per_endpoint,
        max_pending_per_target: cfg.limits.max_pending_per_endpoint,
        ..PoolOptions::default()
    };
    let pa_hosts = Arc::new(PaHosts::default());
    let to_pas = match tls {
        Some(t) => Pool::with_connector(
            pool_opts,
            Arc::new(PaConnect::new(t.clone(), pa_hosts.clone())),
        ),
        None => Pool::new(pool_opts),
    };
    let links = Links::new(
        cfg.clone(),
        opened.registry.watch_hosts(),
        &to_pas,
        pa_hosts,
    );
    if let Some(d) = &opened.delegated {
        let l = links.clone();
        d.set_links(Box::new(move || {
            l.states()
                .into_iter()
                .filter(|(_, state)| *state != CA_NAMES.primary)
                .map(|(host, state)| (host, state.to_owned()))
                .collect()
        }));
    }
    (pool_opts, to_pas, links)
}

/// The admin API over what was built, with a new admin token and the metrics listener's.
fn admin(
    cfg: &Arc<Config>,
    opened: &Opened,
    links: Arc<Links>,
    providers: &Arc<LocalProviders>,
    documents: Documents,
    bound: &SidecarAddresses,
    lifecycle: &Arc<Lifecycle>,
) -> Result<Arc<Admin>, StartError> {
    Ok(Arc::new(Admin {
        cfg: cfg.clone(),
        lifecycle: lifecycle.clone(),
        catalog: opened.catalog.clone(),
        links,
        providers: providers.clone(),
        gray: documents.gray,
        policies: documents.policies,
        routes: documents.routes,
        bound: bound.clone(),
        token: crate::admin::guard::Token::create(&cfg.run_dir).map_err(|source| {
            StartError::RunDir {
                path: cfg.run_dir.clone(),
                source,
            }
        })?,
        metrics_token: cfg
            .metrics
            .token_file
            .as_deref()
            .map(|path| {
                crate::admin::guard::Token::read(path).map_err(|source| StartError::TokenFile {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?,
    }))
}

/// The gray rules, the policy and the route documents, followed from the registry and saved
/// in the state directory (a start while the registry is unreachable applies the last ones
/// known); gray rules only for services the catalog knows.
fn follow_documents(
    cfg: &Config,
    registry: &Arc<dyn Registry>,
    catalog: &Arc<Catalog>,
) -> (Documents, Vec<JoinHandle<()>>) {
    let store = Some(DocStore::new(&cfg.state_dir));
    let follow = |name: DocName, accept: fn(&[u8]) -> bool| {
        docs::follow(name, registry.watch_doc(name), store.clone(), accept)
    };
    let (rules, saving_rules) = follow(DocName::GrayRules, |b| {
        detour_registry::gray::RuleSet::parse(b).is_ok()
    });
    let (policy_doc, saving_policy) = follow(DocName::Policy, |b| {
        detour_registry::policy::PolicyDoc::parse(b).is_ok()
    });
    let (route_doc, saving_routes) = follow(DocName::Routes, |b| {
        detour_core::route::RouteDoc::parse(b).is_ok()
    });
    let gray = Gray::new(cfg.host.clone());
    let known = catalog.clone();
    gray.keep_only_if(move |s| known.has(s));
    let policies = Policies::new(cfg);
    let routes = Routes::new();
    let tasks = vec![
        gray.follow(rules),
        policies.follow(policy_doc),
        routes.follow(route_doc),
        saving_rules,
        saving_policy,
        saving_routes,
    ];
    let documents = Documents {
        gray,
        policies,
        routes,
    };
    (documents, tasks)
}

/// Connection options of the outbound listeners and of the inbound one (mutual TLS, the
/// handshake guard and each connection's share of the providers on the inbound only). The
/// outbound Unix socket takes the outbound options without half-close (`ConnOptions`).
fn conn_options(cfg: &Config, tls: Option<Arc<TlsState>>) -> (Arc<ConnOptions>, Arc<ConnOptions>) {
    let opts = ConnOptions {
        max_header_bytes: cfg.max_header_bytes,
        head_timeout: cfg.limits.head_timeout,
        proxy: cfg.host.to_string(),
        limits: cfg.limits.clone(),
        tls: None,
        handshakes: None,
        provider_share: false,
        half_close: true,
    };
    let inbound = ConnOptions {
        tls,
        handshakes: Some(Arc::new(HandshakeGuard::new(
            cfg.handshake,
            tokio::time::Instant::now(),
        ))),
        provider_share: true,
        ..opts.clone()
    };
    (Arc::new(opts), Arc::new(inbound))
}
