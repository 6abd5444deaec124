//! The admin API, on loopback only:
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /live` | 200 while the process runs |
//! | `GET /ready` | 200 when ready to route, 503 while starting or draining |
//! | `GET /metrics` | Prometheus text |
//! | `GET /state` | JSON: host, version, roles (`ca`; `pa` when it has providers), state, draining, listeners, local providers (with their health), CA links per remote host, the gray rules in force and this host's mesh decisions, the registry's traffic policy overrides in force (`policy_overrides`), the routes by version and label in force with the requests each subset took since they last changed (`routes`), where each followed registry document came from (`documents`: `registry`, `disk` or `default`, and its revision), the registry's state (`registry`: `synced`, and `applied`: the last revision whose changes this sidecar applied and when, 0 on a directory registry), catalog per service (endpoints, source, staleness, protection) |
//! | `POST /drain` | starts a graceful stop (as SIGTERM) |
//! | `POST /protection/end?service=NAME` | ends a service's registry self-protection |
//!
//! Every request must name a loopback `Host` (else 403); the `POST`s also need the token of
//! `{run_dir}/admin.token` as `Authorization: Bearer TOKEN` (else 401) — see
//! [`crate::admin::guard`]. A client has 5 s to send a request head and 60 s for its whole
//! connection; at most 64 connections are served at once, and accept errors back off.
//!
//! `GET /live` and `GET /ready` are also served on this process's own liveness socket,
//! `{run_dir}/health-{pid}.sock` (mode 0600, named in `sidecar.json`), with connection slots of
//! its own: the watchdog probes there, so a local user holding every admin connection slot
//! cannot make it take a healthy sidecar for a hung one.

pub mod guard;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use detour_core::BoxBody;
use detour_core::body::full;
use detour_proto::{Endpoint, SidecarAddresses, SidecarState};
use detour_registry::Catalog;
use detour_registry::catalog::DataSource;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::inbound::providers::LocalProviders;
use crate::outbound::links::Links;
use crate::process::lifecycle::Lifecycle;

/// What the admin API reads.
pub struct Admin {
    /// Config, for `/state`.
    pub cfg: Arc<Config>,
    /// Readiness and drain.
    pub lifecycle: Arc<Lifecycle>,
    /// Catalog, for `/state`.
    pub catalog: Arc<Catalog>,
    /// CA links per remote host, for `/state`.
    pub links: Arc<Links>,
    /// Local providers and their health, for `/state`.
    pub providers: Arc<LocalProviders>,
    /// The gray rules in force, for `/state`.
    pub gray: Arc<crate::outbound::gray::Gray>,
    /// The traffic policy, for `/state` (the registry's overrides in force).
    pub policies: Arc<crate::policy::Policies>,
    /// The routes by version and label, for `/state` (those in force and requests per subset).
    pub routes: Arc<crate::outbound::routes::Routes>,
    /// Bound addresses, for `/state`.
    pub bound: SidecarAddresses,
    /// The credential of mutating requests.
    pub token: crate::admin::guard::Token,
    /// The bearer token of the metrics listener, when one is asked.
    pub metrics_token: Option<crate::admin::guard::Token>,
}

/// What one listener of the admin API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every endpoint (loopback).
    All,
    /// `/live` and `/ready` (the liveness socket).
    Health,
    /// `GET /metrics` (the scrapeable metrics listener).
    Metrics,
}

/// Most admin connections served at once (more wait in the accept queue).
const MAX_CONNECTIONS: usize = 64;

/// Connections the metrics listener serves at once.
const METRICS_CONNECTIONS: usize = 16;

/// Connections the liveness socket serves at once (its only client is the watchdog).
const HEALTH_CONNECTIONS: usize = 8;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest an admin connection is kept.
const CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Admin {
    /// Serves the admin API on `listener` until the task is aborted, or until a successor that
    /// took the sockets over is ready (it answers from then on).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.serve_on(
            crate::http::server::Listener::Tcp(listener),
            MAX_CONNECTIONS,
            Scope::All,
        )
        .await;
    }

    /// Serves `GET /metrics` (nothing else, no `Host` check; the bearer token when one is
    /// configured) on the scrapeable metrics listener.
    pub async fn serve_metrics(self: Arc<Self>, listener: TcpListener) {
        self.serve_on(
            crate::http::server::Listener::Tcp(listener),
            METRICS_CONNECTIONS,
            Scope::Metrics,
        )
        .await;
    }

    /// Serves `/live` and `/ready` (nothing else) on the liveness socket.
    pub async fn serve_health(self: Arc<Self>, listener: tokio::net::UnixListener) {
        self.serve_on(
            crate::http::server::Listener::Unix(listener),
            HEALTH_CONNECTIONS,
            Scope::Health,
        )
        .await;
    }

    /// Serves `scope` on `listener` with `slots` connections at once.
    async fn serve_on(
        self: Arc<Self>,
        listener: crate::http::server::Listener,
        slots: usize,
        scope: Scope,
    ) {
        use crate::http::server::Listener;
        let slots = Arc::new(tokio::sync::Semaphore::new(slots));
        loop {
            let accepted = tokio::select! {
                r = async {
                    let permit = slots.clone().acquire_owned().await;
                    let stream: std::io::Result<Box<dyn detour_core::Io>> = match &listener {
                        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Box::new(s) as _),
                        Listener::Unix(l) => l.accept().await.map(|(s, _)| Box::new(s) as _),
                    };
                    (permit, stream)
                } => r,
                () = self.lifecycle.handover_requested() => return,
            };
            let (Ok(permit), Ok(stream)) = accepted else {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let svc = service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move {
                        Ok::<_, Infallible>(match scope {
                            Scope::All => admin.handle(req),
                            Scope::Health
                                if matches!(req.uri().path(), "/live" | "/ready")
                                    && req.method() == Method::GET =>
                            {
                                admin.handle(req)
                            }
                            Scope::Health => {
                                text(StatusCode::NOT_FOUND, "only /live and /ready here\n")
                            }
                            Scope::Metrics => admin.handle_metrics(&req),
                        })
                    }
                });
                let conn = http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    }

    /// A request on the scrapeable metrics listener.
    fn handle_metrics(&self, req: &Request<Incoming>) -> Response<BoxBody> {
        if req.uri().path() != "/metrics" {
            return text(StatusCode::NOT_FOUND, "only /metrics here\n");
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        if let Some(token) = &self.metrics_token
            && !token.matches(req.headers())
        {
            metrics::counter!("detour_admin_refused_total", "reason" => "metrics-token")
                .increment(1);
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "refused: send the token of metrics.token_file as `Authorization: Bearer TOKEN`\n",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        metrics_text()
    }

    fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        use crate::admin::guard::{Refusal, check};
        let mutates = req.method() == Method::POST;
        match check(req.headers(), mutates, &self.token) {
            Ok(()) => {}
            Err(Refusal::ForeignHost) => {
                metrics::counter!("detour_admin_refused_total", "reason" => "host").increment(1);
                return text(
                    StatusCode::FORBIDDEN,
                    "refused: Host must name a loopback host\n",
                );
            }
            Err(Refusal::Unauthorized) => {
                metrics::counter!("detour_admin_refused_total", "reason" => "token").increment(1);
                let mut r = text(
                    StatusCode::UNAUTHORIZED,
                    "refused: send the token of the run directory's admin.token as `Authorization: Bearer TOKEN`\n",
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => match self.lifecycle.state() {
                SidecarState::Ready => text(StatusCode::OK, "ready\n"),
                s => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{}\n", s.as_str()),
                ),
            },
            (&Method::GET, "/metrics") => metrics_text(),
            (&Method::GET, "/state") => {
                let mut r = Response::new(full(self.state_json()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::POST, "/protection/end") => {
                let service = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("service=")))
                    .and_then(|s| detour_proto::ServiceName::new(s).ok());
                match service {
                    Some(s) if self.catalog.end_protection(&s) => {
                        tracing::info!(service = %s, "protection ended by operator");
                        text(StatusCode::OK, "protection ended\n")
                    }
                    Some(_) => text(StatusCode::CONFLICT, "not protected\n"),
                    None => text(StatusCode::BAD_REQUEST, "expected ?service=NAME\n"),
                }
            }
            (&Method::POST, "/drain") => {
                tracing::info!("drain requested on the admin API");
                self.lifecycle.request_drain();
                text(StatusCode::ACCEPTED, "draining\n")
            }
            (_, "/live" | "/ready" | "/metrics" | "/state" | "/drain") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// `/state` as JSON bytes. The catalog part is serialized straight from the shared sets
    /// (no intermediate JSON tree: a catalog of 100,000 endpoints would need hundreds of MB).
    fn state_json(&self) -> Vec<u8> {
        let snapshot = self.catalog.snapshot();
        let now = detour_registry::now_unix_ms();
        let services: BTreeMap<&str, ServiceState<'_>> = snapshot
            .iter()
            .map(|(name, v)| {
                let view = ServiceState {
                    known: v.set.known,
                    endpoints: &v.set.endpoints,
                    source: v.source,
                    updated_unix_ms: v.updated_unix_ms,
                    stale_ms: now.saturating_sub(v.updated_unix_ms),
                    protected: v.protected,
                };
                (name.as_str(), view)
            })
            .collect();
        let providers = self.providers.states();
        let roles: &[&str] = if self.cfg.provide.is_empty() {
            &["ca"]
        } else {
            &["ca", "pa"]
        };
        let head = json!({
            "host": self.cfg.host,
            "version": crate::VERSION,
            "roles": roles,
            "state": self.lifecycle.state().as_str(),
            "draining": self.lifecycle.is_draining(),
            "listeners": self.bound,
            "open_connections": self.lifecycle.open_connections(),
            "providers": providers,
            "links": self.links.states(),
            "gray": self.gray.state(),
            "policy_overrides": *self.policies.registry_overrides(),
            "routes": self.routes.state(),
            "registry": {
                "synced": self.catalog.registry().synced(),
                "applied": self.catalog.registry().applied(),
            },
            "documents": {
                detour_registry::RULES_DOC: self.gray.state().document,
                detour_registry::POLICY_DOC: self.policies.document(),
                detour_registry::ROUTES_DOC: self.routes.document(),
            },
        });
        let state = State { head, services };
        serde_json::to_vec(&state).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes())
    }
}

/// `/state`: the small fields, then every service.
#[derive(Serialize)]
struct State<'a> {
    #[serde(flatten)]
    head: serde_json::Value,
    services: BTreeMap<&'a str, ServiceState<'a>>,
}

/// One service in `/state`.
#[derive(Serialize)]
struct ServiceState<'a> {
    known: bool,
    endpoints: &'a [Endpoint],
    source: DataSource,
    updated_unix_ms: u64,
    stale_ms: u64,
    protected: bool,
}

/// The Prometheus text of this process's metrics.
fn metrics_text() -> Response<BoxBody> {
    let mut r = text(StatusCode::OK, &detour_registry::telemetry::render());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn text(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = status;
    r
}
