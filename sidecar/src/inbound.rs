//! The inbound side (PA): requests from remote sidecars, forwarded to the local provider of the
//! service named by `:authority` / `Host`, in that provider's protocol. `GET /detour/ping`
//! under authority `detour.control` answers the probes of remote CAs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use detour_proto::{CONTROL_AUTHORITY, PING_PATH, ServiceName};
use detour_thin_sdk::body::boxed;
use detour_thin_sdk::{BoxBody, Dial, Pool};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::config::{Config, Provide};
use crate::forward::{AttemptError, attempt};
use crate::headers::{authority, head_size, strip_hop_by_hop};
use crate::lifecycle::Lifecycle;
use crate::outbound::record;
use crate::respond::{MeshError, is_grpc};
use crate::server::{Handler, ping_response};

/// The inbound proxy.
pub struct Inbound {
    /// Validated config (timeouts, limits).
    cfg: Arc<Config>,
    /// Local providers by service.
    providers: HashMap<ServiceName, Provide>,
    /// Connections to local providers.
    pool: Arc<Pool>,
    /// Whether this sidecar is ready (for `/detour/ping`).
    lifecycle: Arc<Lifecycle>,
}

impl Inbound {
    /// Builds the inbound proxy for the configured providers.
    pub fn new(cfg: Arc<Config>, pool: Arc<Pool>, lifecycle: Arc<Lifecycle>) -> Self {
        let providers = cfg
            .provide
            .iter()
            .map(|p| (p.service.clone(), p.clone()))
            .collect();
        Self {
            cfg,
            providers,
            pool,
            lifecycle,
        }
    }

    async fn route(
        &self,
        parts: http::request::Parts,
        body: Incoming,
    ) -> Result<Response<BoxBody>, MeshError> {
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
        let provider = self
            .providers
            .get(&service)
            .ok_or_else(|| MeshError::UnknownService(service.to_string()))?;
        let mut req = Request::from_parts(parts, boxed(body));
        strip_hop_by_hop(req.headers_mut());
        let dial = Dial::Tcp(provider.address);
        let timeout = self.cfg.request_timeout;
        attempt(
            &self.pool,
            &dial,
            provider.protocol,
            service.as_str(),
            req,
            timeout,
        )
        .await
        .map_err(|e| match e {
            AttemptError::Fatal(e)
            | AttemptError::Refused(e)
            | AttemptError::NeverLeft { error: e, .. } => e,
        })
    }
}

impl Handler for Inbound {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<BoxBody> {
        let start = Instant::now();
        let (parts, body) = req.into_parts();
        if authority(&parts) == Some(CONTROL_AUTHORITY) && parts.uri.path() == PING_PATH {
            return ping_response(&self.lifecycle);
        }
        let grpc = is_grpc(&parts.headers);
        let resp = match self.route(parts, body).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "inbound request failed in the mesh");
                e.respond(grpc, self.cfg.host.as_str())
            }
        };
        record("inbound", "local", &resp, start.elapsed());
        resp
    }
}
