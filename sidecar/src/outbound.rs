//! The outbound side (CA): requests from local callers, routed by service name to a provider
//! host's PA over pooled HTTP/2 — or straight to the provider (C→CA→P) while the link to that
//! host is on its fallback, or when the host has no sidecar. Requests for the `detour.control`
//! authority go to the local control API (and its `/detour/ping`) instead.
//!
//! A request that never left for the PA (connect refused, connection closed before writing,
//! `REFUSED_STREAM`) is sent straight to the provider; one that left and was lost is sent there
//! only when idempotent and its body was kept (`proxy.max_replay_bytes`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detour_proto::control::local_control_server::LocalControlServer;
use detour_proto::{
    AppProtocol, CONTROL_AUTHORITY, Endpoint, InstanceId, PATH_HEADER, ServiceName,
};
use detour_registry_sync::Catalog;
use detour_thin_sdk::body::{boxed, with_guard};
use detour_thin_sdk::link::{Event, Reason};
use detour_thin_sdk::replay::{Replay, is_idempotent, prepare};
use detour_thin_sdk::{BoxBody, Dial, Pool};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::balance::Balancer;
use crate::config::Config;
use crate::control::ControlService;
use crate::forward::{AttemptError, attempt};
use crate::headers::{authority, head_size, strip_hop_by_hop};
use crate::lifecycle::Lifecycle;
use crate::links::Links;
use crate::respond::{MeshError, is_grpc};
use crate::server::{Handler, ping_response};
use crate::telemetry::status_class;

/// The outbound proxy.
pub struct Outbound {
    /// Validated config (timeouts, limits, policy).
    cfg: Arc<Config>,
    /// Where endpoints come from.
    catalog: Arc<Catalog>,
    /// Upstream connections (to PAs and providers).
    pool: Arc<Pool>,
    /// One selector per service, created on first use.
    balancers: Mutex<HashMap<ServiceName, Arc<Balancer>>>,
    /// The CA half of the link state machine, per remote host.
    links: Arc<Links>,
    /// Whether this sidecar is ready (for `/detour/ping`).
    lifecycle: Arc<Lifecycle>,
    /// The local control API, reached with authority `detour.control`.
    control: LocalControlServer<ControlService>,
}

/// The path a routed request took, for metrics and the `x-detour-path` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Mesh,
    CaDirect,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Mesh => "mesh",
            Path::CaDirect => "ca_direct",
        }
    }

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Path::Mesh => "mesh",
            Path::CaDirect => "ca-direct",
        })
    }
}

/// One request being routed: the request itself (when still held) and its replayable copy.
struct InFlightReq {
    req: Option<Request<BoxBody>>,
    replay: Option<Replay>,
    idempotent: bool,
}

impl InFlightReq {
    /// The request for the next attempt: the original if still held, else a replayed copy.
    fn take(&mut self) -> Option<Request<BoxBody>> {
        self.req
            .take()
            .or_else(|| self.replay.as_ref().map(Replay::request))
    }
}

impl Outbound {
    /// Builds the outbound proxy.
    pub fn new(
        cfg: Arc<Config>,
        catalog: Arc<Catalog>,
        pool: Arc<Pool>,
        links: Arc<Links>,
        lifecycle: Arc<Lifecycle>,
        control: ControlService,
    ) -> Self {
        Self {
            cfg,
            catalog,
            pool,
            balancers: Mutex::new(HashMap::new()),
            links,
            lifecycle,
            control: LocalControlServer::new(control),
        }
    }

    fn balancer(&self, service: &ServiceName) -> Arc<Balancer> {
        let mut map = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(service) {
            return b.clone();
        }
        map.entry(service.clone())
            .or_insert_with(|| Arc::new(Balancer::new(self.cfg.balance)))
            .clone()
    }

    /// Routes one request; returns the response and the path it took.
    async fn route(
        &self,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<(Response<BoxBody>, Path), MeshError> {
        let size = head_size(&parts);
        if size > self.cfg.max_header_bytes {
            return Err(MeshError::HeaderTooLarge {
                size,
                limit: self.cfg.max_header_bytes,
            });
        }
        let name = authority(&parts)
            .ok_or_else(|| MeshError::Malformed("no Host or :authority names a service".into()))?;
        let service = ServiceName::new(name).map_err(|e| MeshError::Malformed(e.to_string()))?;
        let set = self
            .catalog
            .endpoints(&service)
            .await
            .map_err(|e| MeshError::RegistryUnavailable(e.to_string()))?;
        if !set.known {
            return Err(MeshError::UnknownService(service.to_string()));
        }
        let balancer = self.balancer(&service);
        balancer.retain(&set);
        let mut req = Request::from_parts(parts, boxed(body));
        strip_hop_by_hop(req.headers_mut());
        let idempotent = is_idempotent(&req);
        let (req, replay) = prepare(req, self.cfg.max_replay_bytes)
            .await
            .map_err(|e| MeshError::Malformed(format!("reading the request body: {e}")))?;
        let mut flight = InFlightReq {
            req: Some(req),
            replay,
            idempotent,
        };
        let mut tried: Vec<InstanceId> = Vec::new();
        let mut last = None;
        while let Some((ep, in_flight)) = balancer.pick(&set.endpoints, &tried) {
            match self.to_endpoint(&service, ep, &mut flight).await {
                Ok((resp, path)) => return Ok((resp.map(|b| with_guard(b, in_flight)), path)),
                Err(Some(e)) => return Err(e),
                Err(None) => {
                    balancer.eject(&ep.instance, self.cfg.eject);
                    tried.push(ep.instance.clone());
                    let refused = MeshError::UpstreamConnect(format!("{} refused", ep.app_address));
                    if flight.req.is_none() && flight.replay.is_none() {
                        return Err(refused);
                    }
                    last = Some(refused);
                }
            }
        }
        Err(last.unwrap_or_else(|| MeshError::NoEndpoint(service.to_string())))
    }

    /// Tries one endpoint: via its PA when the link allows, else (or when the PA did not take
    /// the request) straight to the provider. `Err(None)`: the provider refused too and the
    /// request can go to another endpoint.
    async fn to_endpoint(
        &self,
        service: &ServiceName,
        ep: &Endpoint,
        flight: &mut InFlightReq,
    ) -> Result<(Response<BoxBody>, Path), Option<MeshError>> {
        let timeout = self.cfg.request_timeout;
        if let Some(pa) = ep.pa_address {
            let link = self.links.get(&ep.host, pa);
            if link.choose_primary() {
                let Some(req) = flight.take() else {
                    return Err(Some(MeshError::UpstreamConnect(
                        "request already consumed".into(),
                    )));
                };
                match attempt(
                    &self.pool,
                    &Dial::Tcp(pa),
                    AppProtocol::Http2,
                    service.as_str(),
                    req,
                    timeout,
                )
                .await
                {
                    Ok(resp) => return Ok((resp, Path::Mesh)),
                    Err(AttemptError::NeverLeft { error, request }) => {
                        tracing::debug!(%service, host = %ep.host, %error, "PA did not take the request; going to the provider");
                        link.event(Event::Fault(Reason::ConnectFailed));
                        flight.req = Some(*request);
                    }
                    Err(AttemptError::Refused(e)) => {
                        link.event(Event::Fault(Reason::DrainAnnounced));
                        if flight.replay.is_none() {
                            return Err(Some(e));
                        }
                    }
                    Err(AttemptError::Fatal(e)) => {
                        if matches!(e, MeshError::UpstreamReset(_)) {
                            link.event(Event::Fault(Reason::ConnectFailed));
                        }
                        if !(flight.idempotent
                            && flight.replay.is_some()
                            && matches!(e, MeshError::UpstreamReset(_)))
                        {
                            return Err(Some(e));
                        }
                    }
                }
            }
        }
        let Some(req) = flight.take() else {
            return Err(Some(MeshError::UpstreamConnect(
                "request already consumed".into(),
            )));
        };
        let dial = Dial::Tcp(ep.app_address);
        match attempt(
            &self.pool,
            &dial,
            ep.protocol,
            service.as_str(),
            req,
            timeout,
        )
        .await
        {
            Ok(resp) => Ok((resp, Path::CaDirect)),
            Err(AttemptError::NeverLeft { request, .. }) => {
                flight.req = Some(*request);
                Err(None)
            }
            Err(AttemptError::Fatal(e) | AttemptError::Refused(e)) => Err(Some(e)),
        }
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
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<BoxBody> {
        let (parts, body) = req.into_parts();
        if authority(&parts) == Some(CONTROL_AUTHORITY) {
            return self.serve_control(Request::from_parts(parts, body)).await;
        }
        let start = Instant::now();
        let grpc = is_grpc(&parts.headers);
        let (resp, path) = match self.route(parts, body).await {
            Ok((mut resp, path)) => {
                resp.headers_mut().insert(PATH_HEADER, path.header());
                (resp, path.label())
            }
            Err(e) => {
                tracing::debug!(error = %e, "outbound request failed in the mesh");
                (e.respond(grpc, self.cfg.host.as_str()), "none")
            }
        };
        record("outbound", path, &resp, start.elapsed());
        resp
    }
}

/// Counts one finished request head.
pub fn record(
    direction: &'static str,
    path: &'static str,
    resp: &Response<BoxBody>,
    took: Duration,
) {
    metrics::counter!(
        "detour_requests_total",
        "direction" => direction,
        "path" => path,
        "class" => status_class(resp.status())
    )
    .increment(1);
    metrics::histogram!("detour_response_head_seconds", "direction" => direction)
        .record(took.as_secs_f64());
}
