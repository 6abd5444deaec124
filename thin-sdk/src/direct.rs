//! The direct path: calling a provider straight from the last endpoint snapshot the sidecar
//! sent, used while the sidecar is restarting or sick.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use detour_proto::ServiceName;
use http::{Request, Response};

use crate::body::BoxBody;
use crate::control::Snapshot;
use crate::transport::{Dial, Failed, Pool, set_target};

/// How long a provider that refused a connection is passed over.
const EJECT_FOR: Duration = Duration::from_secs(2);

/// Why the direct path gave no response.
#[derive(Debug)]
pub(crate) enum DirectError {
    /// No endpoint is known for the service; the request is handed back.
    NoRoute(String, Box<Request<BoxBody>>),
    /// Every endpoint refused, or the exchange failed after sending.
    Failed(Box<Failed>),
}

/// Direct calls, round-robin over the snapshot's endpoints.
#[derive(Debug)]
pub(crate) struct Direct {
    pool: Arc<Pool>,
    next: AtomicUsize,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Direct {
    pub(crate) fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            next: AtomicUsize::new(0),
            ejected: Mutex::new(HashMap::new()),
        }
    }

    fn is_ejected(&self, addr: &SocketAddr, now: Instant) -> bool {
        let ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        ejected.get(addr).is_some_and(|until| *until > now)
    }

    /// Sends `req` to one of `snapshot`'s providers, trying the next one when a provider
    /// refuses the connection (the request never left).
    pub(crate) async fn send(
        &self,
        service: &ServiceName,
        snapshot: Option<Arc<Snapshot>>,
        mut req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, DirectError> {
        let endpoints = snapshot.map(|s| s.endpoints.clone()).unwrap_or_default();
        if endpoints.is_empty() {
            let cause = format!(
                "no endpoint of {service} is known (no snapshot from the sidecar, none in the snapshot file)"
            );
            return Err(DirectError::NoRoute(cause, Box::new(req)));
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<_> = (0..endpoints.len())
            .map(|i| &endpoints[(start + i) % endpoints.len()])
            .collect();
        // Healthy ones first; ejected ones last rather than never.
        order.sort_by_key(|e| self.is_ejected(&e.app_address, now));
        let mut last = None;
        for ep in order {
            let prepared = match set_target(service.as_str(), ep.protocol, req) {
                Ok(r) => r,
                Err(e) => {
                    let cause = format!("cannot address {service}: {e}");
                    return Err(DirectError::NoRoute(
                        cause,
                        Box::new(Request::new(crate::body::empty())),
                    ));
                }
            };
            match self
                .pool
                .send(&Dial::Tcp(ep.app_address), ep.protocol, prepared)
                .await
            {
                Ok(resp) => return Ok(resp),
                Err(Failed {
                    error,
                    request: Some(back),
                }) => {
                    self.ejected
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(ep.app_address, Instant::now() + EJECT_FOR);
                    tracing::debug!(%service, provider = %ep.app_address, %error, "provider refused; trying the next");
                    last = Some(error);
                    req = back;
                }
                Err(f) => return Err(DirectError::Failed(Box::new(f))),
            }
        }
        match last {
            Some(error) => Err(DirectError::Failed(Box::new(Failed {
                error,
                request: Some(req),
            }))),
            None => Err(DirectError::NoRoute(
                format!("no endpoint of {service}"),
                Box::new(req),
            )),
        }
    }
}
