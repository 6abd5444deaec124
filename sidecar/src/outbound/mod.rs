//! The outbound side (CA): requests from local callers, routed by service name to a provider
//! host's PA over pooled HTTP/2 — or straight to the provider (C→CA→P) while the link to that
//! host is on its fallback, or when the host has no sidecar. Requests for the `detour.control`
//! authority go to the local control API (and its `/detour/ping`) instead.
//!
//! Every failed attempt goes through the one retry decision (`detour_core::decide`): a request
//! the PA did not take goes straight to the provider; one no provider received (the provider
//! refused, or its PA says it could not reach it) goes to another endpoint, whatever its
//! method; one lost after it left goes elsewhere only when idempotent and its body was kept
//! (`proxy.max_replay_bytes`).
//!
//! Each service's policy ([`Policies`]: timeouts, retry budget, outlier ejection, in-flight
//! limit per endpoint) is read per request, so a change in the registry applies at once.
//!
//! Trust: the PA's `x-detour-error` is read (it is a sidecar), then every `x-detour-*` header
//! of the upstream's answer is removed; an error this CA gives up with is its own.

mod attempt;
pub mod balance;
pub mod budget;
pub mod control;
pub mod ewma;
pub mod gray;
pub mod links;
pub mod retry;
pub mod routes;
mod state;

use attempt::Try;
use detour_proto::fastmap::FastMap;
pub use state::{Documents, Upstreams};
use state::{PerService, PerState};

use detour_proto::sync::Mutex;
use std::sync::Arc;
use tokio::time::Instant;

use detour_core::body::{boxed, watched, with_guard};
use detour_core::failure::{MeshErrorKind, PATH_NAME, take_mesh_headers};
use detour_core::replay::{Held, PrepareError, is_idempotent, prepare};
use detour_core::route::RequestView;
use detour_core::trace::{Span, SpanKind, Tracer};
use detour_core::transport::{ConnectTimeout, Target};
use detour_core::{BoxBody, PathTaken};
use detour_proto::control::local_control_server::LocalControlServer;
use detour_proto::{CONTROL_AUTHORITY, Endpoint, InstanceId, ServiceName};
use detour_registry::Catalog;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;
use tracing::Instrument;

use crate::access_log::{AccessLog, Pending, Routed};
use crate::config::Config;
use crate::http::forward::{AttemptFailed, next_hop, not_a_target};
use crate::http::headers::{authority, service_name, strip_hop_by_hop, valid_service};
use crate::http::respond::{MeshError, is_grpc};
use crate::http::server::{ConnInfo, Handler, ping_response};
use crate::outbound::balance::{Balancer, InFlight, NoPick};
use crate::outbound::budget::RetryBudget;
use crate::outbound::control::ControlService;
use crate::outbound::gray::Gray;
use crate::outbound::links::Links;
use crate::outbound::retry::Step;
use crate::outbound::routes::Routes;
use crate::policy::{Policies, ServicePolicy};
use crate::process::lifecycle::Lifecycle;
use crate::telemetry::{Direction, PathLabel, ServiceMetrics, close_hop, record_request};

/// The outbound proxy.
pub struct Outbound {
    /// Validated config (limits, replay size).
    cfg: Arc<Config>,
    /// Each service's traffic policy.
    policies: Arc<Policies>,
    /// Where endpoints come from.
    catalog: Arc<Catalog>,
    /// Connections to providers (the direct path) and to PAs.
    pools: Upstreams,
    /// One selector and retry budget per service, created on first use.
    services: Mutex<FastMap<ServiceName, Arc<PerService>>>,
    /// The CA half of the link state machine, per remote host.
    links: Arc<Links>,
    /// The gray rules (a service switched off goes straight to its providers).
    gray: Arc<Gray>,
    /// Each service's routes by version and label.
    routes: Arc<Routes>,
    /// Whether this sidecar is ready (for `/detour/ping`).
    lifecycle: Arc<Lifecycle>,
    /// The local control API, reached with authority `detour.control`.
    control: LocalControlServer<ControlService>,
    /// The access log, when one is kept.
    access_log: Option<Arc<AccessLog>>,
    /// Spans of the hop and its attempts.
    tracer: Tracer,
}

/// What routing learnt of a request, for its metrics and its access-log line.
#[derive(Default)]
struct RouteInfo {
    per: Option<Arc<PerService>>,
    log: Routed,
}

impl RouteInfo {
    /// Attempt `n` goes to `ep` (named in the access-log line when one is `logged`).
    fn attempt(&mut self, n: u32, ep: &Endpoint, logged: bool) {
        self.log.attempts = n;
        if logged {
            self.log.endpoint = Some(ep.instance.to_string());
        }
    }
}

impl Outbound {
    /// Builds the outbound proxy.
    pub fn new(
        cfg: Arc<Config>,
        catalog: Arc<Catalog>,
        pools: Upstreams,
        links: Arc<Links>,
        documents: Documents,
        lifecycle: Arc<Lifecycle>,
        control: ControlService,
    ) -> Self {
        let Documents {
            gray,
            policies,
            routes,
        } = documents;
        Self {
            cfg,
            policies,
            catalog,
            pools,
            services: Mutex::new(FastMap::default()),
            links,
            gray,
            routes,
            lifecycle,
            control: LocalControlServer::new(control),
            access_log: None,
            tracer: Tracer::off(),
        }
    }

    /// Records spans with `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = tracer;
        self
    }

    /// Keeps an access log of the requests routed.
    pub fn with_access_log(mut self, log: Option<Arc<AccessLog>>) -> Self {
        self.access_log = log;
        self
    }

    fn service(&self, service: &ServiceName) -> Arc<PerService> {
        let mut map = self.services.lock();
        if let Some(b) = map.get(service) {
            return b.clone();
        }
        map.entry(service.clone())
            .or_insert_with(|| {
                let generation = self.policies.generation();
                let policy = Arc::new(self.policies.of(service));
                Arc::new(PerService {
                    name: service.clone(),
                    target: Target::new(service.as_str()).ok(),
                    balancer: Balancer::new(self.cfg.balance),
                    metrics: ServiceMetrics::new(Direction::Outbound, service),
                    state: Mutex::new(PerState {
                        budget: RetryBudget::new(policy.budget, Instant::now()),
                        policy,
                        generation,
                    }),
                })
            })
            .clone()
    }

    /// Routes one request, which arrived at `start`; returns the response and the path it
    /// took.
    async fn route(
        &self,
        (parts, body): (http::request::Parts, Incoming),
        start: Instant,
        info: &mut RouteInfo,
        hop: &mut Span,
    ) -> Result<(Response<BoxBody>, PathTaken), MeshError> {
        let name = service_name(&parts, self.cfg.max_header_bytes)?;
        // A service routed before is found by the request's text, with its name: no name is
        // allocated, and none validated again.
        let known = self.services.lock().get(name).cloned();
        let new_name;
        let service = match &known {
            Some(per) => &per.name,
            None => {
                new_name = valid_service(name)?;
                &new_name
            }
        };
        let logged = self.note_service(service, hop, info);
        let set = self.endpoints_of(service).await?;
        let per = known.clone().unwrap_or_else(|| self.service(service));
        info.per = Some(per.clone());
        let target = (per.target.as_ref()).ok_or_else(|| not_a_target(service))?;
        let policy = per.begin(&self.policies, service, start);
        let (deadline, balancer) = (start + policy.request_timeout, &per.balancer);
        balancer.retain(&set);
        let routed = self.routes.route(service, &RequestView::of(&parts), &set);
        let mut flight = self.flight(parts, body, &policy).await?;
        let mut tried: Vec<InstanceId> = Vec::new();
        let zone = self.cfg.zone.as_ref();
        let pick = |tried: &[InstanceId]| routed.pick(balancer, &set, tried, &policy, zone);
        let (mut ep, mut in_flight) = (pick(&tried))
            .map_err(|why| no_pick(service, policy.max_concurrent_per_endpoint, why))?;
        // Switched off by a gray rule or a rollback: straight to the providers (C→CA→P) —
        // except those reached through their PA only (the endpoint says so, or the service's
        // policy forbids paths that skip the PA): those always go through their PA.
        let mesh_on = self.gray.mesh_on(service);
        let direct_ok = |ep: &Endpoint| policy.direct && ep.direct_allowed();
        let path_for = |ep: &Endpoint| !direct_ok(ep) || (mesh_on && self.via_pa_chosen(ep));
        let mut via_pa = path_for(ep);
        let mut attempts: u32 = 0;
        loop {
            let left = (deadline.checked_duration_since(Instant::now()))
                .filter(|left| !left.is_zero())
                .ok_or_else(|| timed_out(service, &policy))?;
            attempts += 1;
            info.attempt(attempts, ep, logged);
            let t = Try {
                service,
                target,
                ep,
                n: attempts,
                timeout: policy.try_timeout.map_or(left, |t| t.min(left)),
                via_pa,
                direct_ok: direct_ok(ep),
            };
            let failed = match self.one_attempt(&t, &mut flight, hop).await {
                Ok((resp, path)) => {
                    let eps = set.endpoints.len();
                    let resp = answered(resp, balancer, in_flight, eps, &policy, (service, ep));
                    return Ok((resp, path));
                }
                Err(f) => f,
            };
            // The caller's own broken body says nothing of the endpoint.
            if flight.caller_body_failed().is_none() {
                balancer.record_failure(&in_flight);
            }
            let options = retry::Options {
                around_pa: via_pa && t.direct_ok,
                other_endpoint: tried.len() + 1 < set.endpoints.len(),
            };
            let step = next_step(&per, &failed, flight.kind(), options, deadline);
            retry_event(hop, &step, attempts, &failed);
            match step {
                Step::Again => {}
                Step::OtherPath => via_pa = false,
                Step::NextEndpoint { eject } => {
                    if eject {
                        balancer.eject(&ep.instance, self.cfg.eject);
                    }
                    tried.push(ep.instance.clone());
                    let Ok(next) = pick(&tried) else {
                        return Err(failed.error);
                    };
                    (ep, in_flight) = next;
                    via_pa = path_for(ep);
                }
                Step::Return => return Err(failed.error),
                Step::GiveUp(f) => return Err(MeshError::gave_up(f, failed.error.detail)),
            }
        }
    }

    /// Names the hop's span and the access-log line after `service`; whether an access log is
    /// kept.
    fn note_service(&self, service: &ServiceName, hop: &mut Span, info: &mut RouteInfo) -> bool {
        if hop.is_recording() {
            hop.rename(format!("ca {service}"));
            hop.attr("detour.service", service.to_string());
        }
        let logged = self.access_log.is_some();
        if logged {
            info.log.service = Some(service.to_string());
        }
        logged
    }

    /// The endpoints of `service`, known to the registry.
    async fn endpoints_of(
        &self,
        service: &ServiceName,
    ) -> Result<Arc<detour_proto::EndpointSet>, MeshError> {
        let set = self
            .catalog
            .endpoints(service)
            .await
            .map_err(|e| MeshError::new(MeshErrorKind::RegistryUnavailable, e.to_string()))?;
        match set.known {
            true => Ok(set),
            false => Err(MeshError::new(
                MeshErrorKind::UnknownService,
                service.as_str(),
            )),
        }
    }

    /// The request as it leaves this CA, held for its attempts: hop-by-hop and mesh headers
    /// removed (an app's `x-detour-*` are not the mesh's word: `x-detour-caller` is set by a PA
    /// from a verified identity only), the service's connect timeout when it is not the
    /// sidecar's, and a small body kept so that a failed attempt can be sent again.
    async fn flight(
        &self,
        parts: http::request::Parts,
        body: Incoming,
        policy: &ServicePolicy,
    ) -> Result<Held, MeshError> {
        let (body, body_fault) = watched(body);
        let mut req = Request::from_parts(parts, body);
        strip_hop_by_hop(req.headers_mut());
        let hops = take_mesh_headers(req.headers_mut());
        next_hop(hops, req.headers_mut())?;
        if policy.connect_timeout != self.cfg.connect_timeout {
            req.extensions_mut()
                .insert(ConnectTimeout(policy.connect_timeout));
        }
        let idempotent = is_idempotent(&req);
        let (req, replay) = prepare(req, self.cfg.max_replay_bytes, policy.request_timeout)
            .await
            .map_err(|e| match e {
                PrepareError::TimedOut(_) => {
                    MeshError::new(MeshErrorKind::BodyTimeout, e.to_string())
                }
                PrepareError::Body(_) => {
                    MeshError::new(MeshErrorKind::MalformedRequest, e.to_string())
                }
            })?;
        Ok(Held::new(req, replay, idempotent, body_fault))
    }

    /// Whether this request to `ep` goes through its PA (the link to its host decides).
    fn via_pa_chosen(&self, ep: &Endpoint) -> bool {
        ep.pa_address
            .is_some_and(|pa| self.links.get(&ep.host, pa).choose_primary())
    }

    async fn serve_control(&self, req: Request<Incoming>) -> Response<BoxBody> {
        if req.uri().path() == detour_proto::PING_PATH {
            return ping_response(&self.lifecycle);
        }
        match self.control.clone().oneshot(req).await {
            Ok(resp) => resp.map(boxed),
            Err(never) => match never {},
        }
    }
}

impl Handler for Outbound {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, _conn: ConnInfo) -> Response<BoxBody> {
        let (mut parts, body) = req.into_parts();
        if authority(&parts) == Some(CONTROL_AUTHORITY) {
            return self.serve_control(Request::from_parts(parts, body)).await;
        }
        let start = Instant::now();
        let mut hop = self
            .tracer
            .begin(&mut parts.headers, "ca", SpanKind::Server);
        let grpc = is_grpc(&parts.headers);
        let span = tracing::debug_span!("request", direction = "outbound", method = %parts.method,
            service = tracing::field::Empty, trace_id = tracing::field::Empty);
        if let Some(t) = hop.trace_id()
            && !span.is_disabled()
        {
            span.record("trace_id", tracing::field::display(t));
        }
        let pending = (self.access_log.as_ref())
            .filter(|l| l.wants())
            .map(|_| Pending::of("outbound", &parts, None, hop.trace_id()));
        let mut info = RouteInfo::default();
        let method = hop.is_recording().then(|| parts.method.to_string());
        let routed = (self.route((parts, body), start, &mut info, &mut hop))
            .instrument(span)
            .await;
        let (resp, path, error) = match routed {
            Ok((mut resp, path)) => {
                resp.headers_mut().insert(PATH_NAME, path.header_value());
                let label = match path {
                    PathTaken::Mesh => PathLabel::Mesh,
                    _ => PathLabel::CaDirect,
                };
                (resp, label, None)
            }
            Err(e) => {
                tracing::debug!(error = %e, "outbound request failed in the mesh");
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
        record_request(Direction::Outbound, path, resp.status(), took);
        if let Some(per) = &info.per {
            per.metrics.record(path, resp.status(), took, error);
        }
        if let (Some(log), Some(p)) = (&self.access_log, pending) {
            let kind = error.map(|k| k.reason());
            log.log(&p.finish(info.log, &resp, kind, path.as_str(), took));
        }
        resp
    }
}

/// The rule after a failed attempt (`retry.rs`: the retry decision, the try timeout) with
/// the service's retry budget.
fn next_step(
    per: &PerService,
    failed: &AttemptFailed,
    kind: detour_core::decide::RequestKind,
    options: retry::Options,
    deadline: Instant,
) -> Step {
    let plan = retry::plan(
        retry::Failed {
            outcome: failed.outcome,
            time_left: Instant::now() < deadline,
            untrusted: failed.error.kind == MeshErrorKind::UntrustedPeer,
        },
        kind,
        options,
    );
    let step = per.budgeted(plan);
    tracing::debug!(outcome = ?failed.outcome, ?step, "attempt failed");
    step
}

/// An endpoint's answer: recorded for outlier ejection (among `eps` endpoints; an ejection is
/// logged and counted), its body holding the endpoint's in-flight slot until it ends.
fn answered(
    resp: Response<BoxBody>,
    balancer: &Balancer,
    in_flight: InFlight,
    eps: usize,
    policy: &ServicePolicy,
    (service, ep): (&ServiceName, &Endpoint),
) -> Response<BoxBody> {
    let err = resp.status().is_server_error();
    if balancer.record_answer(&in_flight, err, eps, policy.outlier) {
        tracing::warn!(%service, instance = %ep.instance, "ejected as an outlier: server errors in a row");
        metrics::counter!("detour_outlier_ejections_total").increment(1);
    }
    resp.map(|b| with_guard(b, in_flight))
}

/// The hop span's event for the step after failed attempt `n`.
fn retry_event(hop: &mut Span, step: &Step, n: u32, failed: &AttemptFailed) {
    hop.event(retry::event_name(step), || {
        vec![
            ("detour.attempt", n.into()),
            ("detour.error", failed.error.kind.reason().into()),
            ("detour.outcome", format!("{:?}", failed.outcome).into()),
        ]
    });
}

/// The error of a request whose time ran out.
fn timed_out(service: &ServiceName, policy: &ServicePolicy) -> MeshError {
    MeshError::new(
        MeshErrorKind::Timeout,
        format!(
            "{service}: no answer within {} ms",
            policy.request_timeout.as_millis()
        ),
    )
}

/// The error when no endpoint of `service` can be picked (`limit`: requests in flight per
/// endpoint).
fn no_pick(service: &ServiceName, limit: usize, why: NoPick) -> MeshError {
    match why {
        NoPick::None => MeshError::new(MeshErrorKind::NoEndpoint, service.as_str()),
        NoPick::AllBusy => {
            metrics::counter!("detour_overloaded_total").increment(1);
            MeshError::new(
                MeshErrorKind::Overloaded,
                format!("{service}: every endpoint has {limit} requests in flight"),
            )
        }
    }
}

#[cfg(test)]
mod tests;
