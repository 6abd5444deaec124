//! The outbound side (CA): requests from local callers, routed by service name to a provider
//! host's PA over pooled HTTP/2 (or straight to the provider when its host has no sidecar).
//! Requests for the `detour.control` authority go to the local control API instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detour_proto::control::local_control_server::LocalControlServer;
use detour_proto::{AppProtocol, CONTROL_AUTHORITY, InstanceId, ServiceName};
use detour_registry_sync::Catalog;
use detour_thin_sdk::body::{boxed, with_guard};
use detour_thin_sdk::{BoxBody, Dial, Pool};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::ServiceExt;

use crate::balance::Balancer;
use crate::config::Config;
use crate::control::ControlService;
use crate::forward::{AttemptError, attempt};
use crate::headers::{authority, head_size, strip_hop_by_hop};
use crate::respond::{MeshError, is_grpc};
use crate::server::Handler;
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
    /// The local control API, reached with authority `detour.control`.
    control: LocalControlServer<ControlService>,
}

impl Outbound {
    /// Builds the outbound proxy.
    pub fn new(
        cfg: Arc<Config>,
        catalog: Arc<Catalog>,
        pool: Arc<Pool>,
        control: ControlService,
    ) -> Self {
        Self {
            cfg,
            catalog,
            pool,
            balancers: Mutex::new(HashMap::new()),
            control: LocalControlServer::new(control),
        }
    }

    fn balancer(&self, service: &ServiceName) -> Arc<Balancer> {
        let mut map = self.balancers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(service.clone())
            .or_insert_with(|| Arc::new(Balancer::new(self.cfg.balance)))
            .clone()
    }

    /// Routes one request; returns the response and the path label it took.
    async fn route(
        &self,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<(Response<BoxBody>, &'static str), MeshError> {
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
        balancer.retain(&set.endpoints);
        let mut req = Request::from_parts(parts, boxed(body));
        strip_hop_by_hop(req.headers_mut());
        let mut tried: Vec<InstanceId> = Vec::new();
        let mut last = MeshError::NoEndpoint(service.to_string());
        while let Some((ep, in_flight)) = balancer.pick(&set.endpoints, &tried) {
            let (dial, protocol, path) = match ep.pa_address {
                Some(pa) => (Dial::Tcp(pa), AppProtocol::Http2, "mesh"),
                None => (Dial::Tcp(ep.app_address), ep.protocol, "ca_direct"),
            };
            let timeout = self.cfg.request_timeout;
            match attempt(&self.pool, &dial, protocol, service.as_str(), req, timeout).await {
                Ok(resp) => return Ok((resp.map(|b| with_guard(b, in_flight)), path)),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::NeverLeft { error, request }) => {
                    tracing::info!(%service, endpoint = %ep.instance, %error, "endpoint refused; trying another");
                    balancer.eject(&ep.instance, self.cfg.eject);
                    tried.push(ep.instance.clone());
                    req = *request;
                    last = error;
                }
            }
        }
        Err(last)
    }

    async fn serve_control(&self, req: Request<Incoming>) -> Response<BoxBody> {
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
            Ok(r) => r,
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
