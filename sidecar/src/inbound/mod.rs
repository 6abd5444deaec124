//! The inbound side (PA): requests from remote sidecars, forwarded to the local provider of the
//! service named by `:authority` / `Host`, in that provider's protocol. `GET /detour/ping`
//! under authority `detour.control` answers the probes of remote CAs.
//!
//! Callers: with mutual TLS, the calling sidecar's verified identity is checked against the
//! provider's allow-list (`denied`, 403, otherwise) and handed to the provider in
//! `x-detour-caller`, which this PA always sets or removes itself.
//!
//! Trust: every `x-detour-*` header of a provider's answer is removed, so the only mesh headers
//! a CA reads from this PA are the PA's own. A request the provider never received (it refused
//! the connection) is answered `upstream-connect`, which tells the CA it may send the request
//! to another endpoint whatever its method; it also wakes that provider's health check.

pub mod providers;

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::time::Instant;

use detour_core::body::watched;
use detour_core::decide::{Alternatives, Next, Outcome, Part, RequestKind, decide};
use detour_core::failure::{
    CALLER_NAME, HOPS_NAME, MeshErrorKind, hops_of, strip_mesh_headers, strip_mesh_headers_but,
};
use detour_core::replay::is_idempotent;
use detour_core::trace::{Span, SpanKind, Tracer};
use detour_core::transport::Target;
use detour_core::{BoxBody, Dial, Pool};
use detour_proto::fastmap::FastMap;
use detour_proto::{CONTROL_AUTHORITY, PING_PATH, ServiceName};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use crate::access_log::{AccessLog, Pending, Routed};
use crate::config::{Config, Provide};
use crate::http::forward::{AttemptFailed, Upstream, attempt, next_hop, not_a_target};
use crate::http::headers::{authority, service_name, strip_hop_by_hop, valid_service};
use crate::http::respond::{MeshError, is_grpc};
use crate::http::server::{Caller, ConnInfo, Handler, ping_response};
use crate::inbound::providers::LocalProviders;
use crate::policy::Policies;
use crate::process::lifecycle::Lifecycle;
use crate::ratelimit::TokenBucket;
use crate::telemetry::{Direction, PathLabel, ServiceMetrics, close_hop, record_request};

/// The inbound proxy.
pub struct Inbound {
    /// Validated config (timeouts, limits).
    cfg: Arc<Config>,
    /// Local providers by service.
    providers: FastMap<ServiceName, Served>,
    /// Their health checks (woken when traffic finds one refusing).
    health: Arc<LocalProviders>,
    /// Connections to local providers.
    pool: Arc<Pool>,
    /// Whether this sidecar is ready (for `/detour/ping`).
    lifecycle: Arc<Lifecycle>,
    /// The traffic policy (the rate limits the registry sets).
    policies: Arc<Policies>,
    /// Rate limits of the providers that have one, as of a generation of the policies.
    limits: RwLock<Limits>,
    /// The access log, when one is kept.
    access_log: Option<Arc<AccessLog>>,
    /// Spans of the hop and its attempt.
    tracer: Tracer,
}

/// A local provider as the PA serves it.
struct Served {
    /// Its config.
    provide: Provide,
    /// Its golden metrics.
    metrics: Arc<ServiceMetrics>,
    /// Its service's name as requests carry it to the provider, parsed once (`None` for a name
    /// that is no authority, which its requests then fail on).
    target: Option<Target>,
}

/// The PA's token buckets.
#[derive(Default)]
struct Limits {
    generation: Option<u64>,
    buckets: HashMap<ServiceName, Arc<Mutex<Bucket>>>,
}

/// One provider's bucket and the (rate, burst) it was made with.
struct Bucket {
    bucket: TokenBucket,
    made_with: (u32, u32),
}

impl Inbound {
    /// Builds the inbound proxy for the configured providers.
    pub fn new(
        cfg: Arc<Config>,
        pool: Arc<Pool>,
        lifecycle: Arc<Lifecycle>,
        health: Arc<LocalProviders>,
        policies: Arc<Policies>,
    ) -> Self {
        let providers = (cfg.provide.iter())
            .map(|p| {
                let served = Served {
                    provide: p.clone(),
                    metrics: Arc::new(ServiceMetrics::new(Direction::Inbound, &p.service)),
                    target: Target::new(p.service.as_str()).ok(),
                };
                (p.service.clone(), served)
            })
            .collect();
        Self {
            cfg,
            providers,
            health,
            pool,
            lifecycle,
            policies,
            limits: RwLock::new(Limits::default()),
            access_log: None,
            tracer: Tracer::off(),
        }
    }

    /// Records spans with `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Keeps an access log of the requests handed to local providers.
    pub fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = log;
        self
    }

    /// The bucket of `provider`'s service, if it has a rate limit; the buckets are made again
    /// when the policies changed (a bucket whose rate and burst stay is kept, tokens and all).
    fn bucket(&self, provider: &Provide) -> Option<Arc<Mutex<Bucket>>> {
        let generation = self.policies.generation();
        {
            let limits = self.limits.read().unwrap_or_else(|p| p.into_inner());
            if limits.generation == Some(generation) {
                return limits.buckets.get(&provider.service).cloned();
            }
        }
        let mut limits = self.limits.write().unwrap_or_else(|p| p.into_inner());
        if limits.generation != Some(generation) {
            let now = Instant::now();
            let mut buckets = HashMap::new();
            for p in self.providers.values().map(|s| &s.provide) {
                let Some(made_with) = self.policies.rate_limit(&p.service, p.rate_limit) else {
                    continue;
                };
                let kept = limits
                    .buckets
                    .remove(&p.service)
                    .filter(|b| b.lock().made_with == made_with);
                let bucket = kept.unwrap_or_else(|| {
                    Arc::new(Mutex::new(Bucket {
                        bucket: TokenBucket::new(made_with.0, made_with.1, now),
                        made_with,
                    }))
                });
                buckets.insert(p.service.clone(), bucket);
            }
            *limits = Limits {
                generation: Some(generation),
                buckets,
            };
        }
        limits.buckets.get(&provider.service).cloned()
    }

    /// The provider's allow-list and rate limit: whether `caller` may call `service` now.
    fn admit(
        &self,
        service: &ServiceName,
        provider: &Provide,
        caller: Option<&Caller>,
    ) -> Result<(), MeshError> {
        let caller = caller.map(|c| &c.0);
        if let Some(allow) = &provider.allow
            && !caller.is_some_and(|c| allow.contains(c))
        {
            let who = caller.map_or("an unidentified caller", |c| c.as_str());
            metrics::counter!("detour_denied_total", "service" => detour_registry::labels::service(service)).increment(1);
            tracing::info!(%service, caller = who, "call refused by the allow-list");
            return Err(MeshError::new(
                MeshErrorKind::Denied,
                format!("{who} may not call {service} on {}", self.cfg.host),
            ));
        }
        if let Some(bucket) = self.bucket(provider)
            && !bucket.lock().bucket.try_take(Instant::now())
        {
            metrics::counter!("detour_rate_limited_total", "service" => detour_registry::labels::service(service))
                .increment(1);
            return Err(MeshError::new(
                MeshErrorKind::RateLimited,
                format!("{service} is over its rate limit on {}", self.cfg.host),
            ));
        }
        Ok(())
    }

    /// This caller connection's share of the providers: waits for a place (within the
    /// request's time) rather than take them all; `None` when the connection has no share.
    async fn share_of(
        &self,
        conn: &ConnInfo,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, MeshError> {
        Ok(match &conn.share {
            Some(s) => match s.0.clone().try_acquire_owned() {
                // A permit at hand: no timer.
                Ok(p) => Some(p),
                Err(_) => match tokio::time::timeout(
                    self.cfg.request_timeout,
                    s.0.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => Some(p),
                    _ => {
                        metrics::counter!("detour_connection_share_exhausted_total").increment(1);
                        return Err(MeshError::new(
                            MeshErrorKind::Overloaded,
                            format!(
                                "this connection has {} requests with the providers of {}",
                                self.cfg.limits.max_in_flight_per_connection, self.cfg.host
                            ),
                        ));
                    }
                },
            },
            None => None,
        })
    }

    async fn route(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        conn: &ConnInfo,
        metrics: &mut Option<Arc<ServiceMetrics>>,
        hop: &mut Span,
    ) -> Result<Response<BoxBody>, MeshError> {
        let name = service_name(&parts, self.cfg.max_header_bytes)?;
        let Some(served) = self.providers.get(name) else {
            let service = valid_service(name)?;
            name_hop(hop, &service);
            return Err(MeshError::new(
                MeshErrorKind::UnknownService,
                format!("{service} is not provided on {}", self.cfg.host),
            ));
        };
        let service = &served.provide.service;
        let hops = hops_of(&parts.headers);
        name_hop(hop, service);
        *metrics = Some(served.metrics.clone());
        let provider = &served.provide;
        let target = (served.target.as_ref()).ok_or_else(|| not_a_target(service))?;
        let caller = conn.caller.as_ref();
        self.admit(service, provider, caller)?;
        let caller = caller.map(|c| &c.0);
        let share = self.share_of(conn).await?;
        let caller_value = caller.and_then(|c| HeaderValue::from_str(c.as_str()).ok());
        let (body, body_fault) = watched(body);
        let mut req = to_provider(Request::from_parts(parts, body), caller_value);
        next_hop(hops, req.headers_mut())?;
        let idempotent = is_idempotent(&req);
        let mut try_span = hop.child("attempt", SpanKind::Client);
        try_span.inject(req.headers_mut());
        if try_span.is_recording() {
            try_span.attr("detour.attempt", 1u32);
            try_span.attr("detour.path", "local");
            try_span.attr("detour.instance", provider.instance.to_string());
        }
        let dial = Dial::Tcp(provider.address);
        let timeout = self.cfg.request_timeout;
        let proto = provider.protocol;
        let to = Upstream {
            pool: &self.pool,
            dial: &dial,
            protocol: proto,
            target,
        };
        let failed = match attempt(to, req, timeout, Part::Provider, body_fault.as_ref()).await {
            Ok(mut resp) => {
                strip_mesh_headers(resp.headers_mut());
                return Ok(match share {
                    Some(p) => resp.map(|b| detour_core::body::with_guard(b, p)),
                    None => resp,
                });
            }
            Err(f) => f,
        };
        try_span.fail(|| failed.error.to_string());
        if let Outcome::NeverReached(_) = failed.outcome {
            self.health.suspect(service);
        }
        Err(gave_up(failed, idempotent))
    }
}

/// Names the hop's span after `service` (when it is recorded).
fn name_hop(hop: &mut Span, service: &ServiceName) {
    if hop.is_recording() {
        hop.rename(format!("pa {service}"));
        hop.attr("detour.service", service.to_string());
    }
}

/// The request as it goes to the local provider: hop-by-hop headers and every mesh header but
/// the hop count (which `next_hop` then sets one higher in place) removed, then the caller's
/// verified identity (`caller`) set. The provider learns who called
/// from this PA only, never from the caller.
fn to_provider(mut req: Request<BoxBody>, caller: Option<HeaderValue>) -> Request<BoxBody> {
    strip_hop_by_hop(req.headers_mut());
    // The hop count stays: `next_hop` sets it one higher in place.
    strip_mesh_headers_but(req.headers_mut(), Some(&HOPS_NAME));
    if let Some(v) = caller {
        req.headers_mut().insert(CALLER_NAME, v);
    }
    req
}

/// The error a failed attempt on the local provider ends the request with. There is one
/// provider here: the retry decision can only end the request, and says how.
fn gave_up(failed: AttemptFailed, idempotent: bool) -> MeshError {
    let kind = RequestKind {
        idempotent,
        resendable: failed.request.is_some(),
    };
    let none = Alternatives {
        other_path: false,
        other_endpoint: false,
    };
    match decide(failed.outcome, kind, none) {
        Next::Fail(f) => MeshError::gave_up(f, failed.error.detail),
        _ => failed.error,
    }
}

impl Handler for Inbound {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: ConnInfo) -> Response<BoxBody> {
        let start = Instant::now();
        let (mut parts, body) = req.into_parts();
        if authority(&parts) == Some(CONTROL_AUTHORITY) && parts.uri.path() == PING_PATH {
            return ping_response(&self.lifecycle);
        }
        let mut hop = self
            .tracer
            .begin(&mut parts.headers, "pa", SpanKind::Server);
        let grpc = is_grpc(&parts.headers);
        let span = tracing::debug_span!("request", direction = "inbound", method = %parts.method,
            service = tracing::field::Empty, trace_id = tracing::field::Empty);
        if let Some(t) = hop.trace_id()
            && !span.is_disabled()
        {
            span.record("trace_id", tracing::field::display(t));
        }
        let pending = (self.access_log.as_ref()).filter(|l| l.wants()).map(|_| {
            let caller = conn.caller.as_ref().map(|c| c.0.to_string());
            Pending::of("inbound", &parts, caller, hop.trace_id())
        });
        let mut metrics = None;
        let method = hop.is_recording().then(|| parts.method.to_string());
        let routed = (self.route(parts, body, &conn, &mut metrics, &mut hop))
            .instrument(span)
            .await;
        let (resp, path, error) = match routed {
            Ok(r) => (r, PathLabel::Local, None),
            Err(e) => {
                tracing::debug!(error = %e, "inbound request failed in the mesh");
                let kind = e.kind;
                (
                    e.respond(grpc, self.cfg.host.as_str()),
                    PathLabel::None,
                    Some(kind),
                )
            }
        };
        let took = start.elapsed();
        close_hop(&mut hop, method, &resp, path, error);
        record_request(Direction::Inbound, PathLabel::Local, resp.status(), took);
        if let Some(m) = &metrics {
            m.record(path, resp.status(), took, error);
        }
        if let (Some(log), Some(p)) = (&self.access_log, pending) {
            let service = metrics.as_ref().map(|m| m.service().to_owned());
            let routed = Routed {
                endpoint: service.as_ref().and_then(|s| self.instance_of(s)),
                service,
                attempts: 1,
            };
            let kind = error.map(|k| k.reason());
            log.log(&p.finish(routed, &resp, kind, path.as_str(), took));
        }
        resp
    }
}

impl Inbound {
    /// The instance id of the local provider of `service` (a metrics label: bounded).
    fn instance_of(&self, service: &str) -> Option<String> {
        let name = ServiceName::new(service).ok()?;
        Some(self.providers.get(&name)?.provide.instance.to_string())
    }
}
