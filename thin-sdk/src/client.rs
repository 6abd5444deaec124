//! The SDK client: sends requests for a named service to the local sidecar.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_proto::{AppProtocol, ERROR_HEADER, ServiceName, SidecarState};
use http::{Request, Response};

use crate::body::{BoxBody, BoxError, boxed};
use crate::control::{ControlSession, Snapshot};
use crate::error::Error;
use crate::grpc::GrpcChannel;
use crate::transport::{Dial, Pool, PoolOptions};

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    sidecar: Dial,
    protocol: AppProtocol,
    app: String,
    timeout: Option<Duration>,
    control: bool,
    pool: PoolOptions,
}

impl ClientBuilder {
    /// The protocol spoken to the sidecar (HTTP/1.1 by default; gRPC always uses HTTP/2).
    pub fn protocol(mut self, protocol: AppProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The application's name, shown in the sidecar's logs.
    pub fn app(mut self, app: impl Into<String>) -> Self {
        self.app = app.into();
        self
    }

    /// Time allowed until the response head arrives (none by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether to hold a control session with the sidecar (on by default).
    pub fn control(mut self, on: bool) -> Self {
        self.control = on;
        self
    }

    /// Connection pool tuning.
    pub fn pool(mut self, pool: PoolOptions) -> Self {
        self.pool = pool;
        self
    }

    /// Builds the client. With the control session on, this must run inside a tokio runtime.
    pub fn build(self) -> Client {
        let pool = Pool::new(self.pool);
        let control = self
            .control
            .then(|| ControlSession::spawn(pool.clone(), self.sidecar.clone(), self.app.clone()));
        Client {
            inner: Arc::new(Inner {
                sidecar: self.sidecar,
                protocol: self.protocol,
                timeout: self.timeout,
                pool,
                control,
            }),
        }
    }
}

struct Inner {
    sidecar: Dial,
    protocol: AppProtocol,
    timeout: Option<Duration>,
    pool: Arc<Pool>,
    control: Option<ControlSession>,
}

/// Calls services through the local sidecar. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("sidecar", &self.inner.sidecar)
            .field("protocol", &self.inner.protocol)
            .finish()
    }
}

impl Client {
    /// Starts building a client for the sidecar at `sidecar`.
    pub fn builder(sidecar: Dial) -> ClientBuilder {
        ClientBuilder {
            sidecar,
            protocol: AppProtocol::Http1,
            app: "app".into(),
            timeout: None,
            control: true,
            pool: PoolOptions::default(),
        }
    }

    /// Sends `req` to `service` and returns the response head; the body streams.
    ///
    /// Errors the mesh produced come back as responses carrying `x-detour-error` (see
    /// [`mesh_error`]); `Err` means no response arrived at all.
    pub async fn send<B>(
        &self,
        service: &ServiceName,
        req: Request<B>,
    ) -> Result<Response<BoxBody>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.send_via(service, self.inner.protocol, req.map(boxed))
            .await
    }

    /// A gRPC channel to `service` for tonic-generated clients.
    pub fn grpc(&self, service: ServiceName) -> GrpcChannel {
        GrpcChannel::new(self.clone(), service)
    }

    /// The sidecar's state as last reported on the control session; `None` while there is no
    /// session.
    pub fn sidecar_state(&self) -> Option<SidecarState> {
        self.inner.control.as_ref().and_then(|c| c.sidecar_state())
    }

    /// Waits until the control session reports the sidecar ready, up to `within`.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        match &self.inner.control {
            Some(c) => c.wait_ready(within).await,
            None => false,
        }
    }

    /// The last endpoint snapshot the sidecar sent for `service`.
    pub fn snapshot(&self, service: &ServiceName) -> Option<Arc<Snapshot>> {
        self.inner
            .control
            .as_ref()
            .and_then(|c| c.snapshot(service))
    }

    pub(crate) async fn send_via(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        if let Some(c) = &self.inner.control {
            c.interest(service);
        }
        let req = crate::transport::set_target(service.as_str(), protocol, req)
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let fut = self.inner.pool.send(&self.inner.sidecar, protocol, req);
        let res = match self.inner.timeout {
            Some(after) => match tokio::time::timeout(after, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(Error::Timeout {
                        service: service.clone(),
                        after,
                    });
                }
            },
            None => fut.await,
        };
        res.map_err(|failed| {
            let source = failed.error;
            if source.never_left() {
                Error::SidecarUnavailable {
                    sidecar: self.inner.sidecar.clone(),
                    source,
                }
            } else {
                Error::OutcomeUnknown {
                    service: service.clone(),
                    source,
                }
            }
        })
    }
}

/// The mesh error a response carries (`x-detour-error`), if the mesh produced it.
pub fn mesh_error<B>(resp: &Response<B>) -> Option<&str> {
    resp.headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn addresses_by_protocol() {
        let svc = ServiceName::new("echo").unwrap();
        let req = Request::post("/a?b=1").body(crate::body::empty()).unwrap();
        let h1 = crate::transport::set_target(svc.as_str(), AppProtocol::Http1, req).unwrap();
        assert_eq!(h1.uri(), "/a?b=1");
        assert_eq!(h1.headers()[header::HOST], "echo");
        let req = Request::get("http://elsewhere/x")
            .header(header::HOST, "elsewhere")
            .body(crate::body::empty())
            .unwrap();
        let h2 = crate::transport::set_target(svc.as_str(), AppProtocol::Http2, req).unwrap();
        assert_eq!(h2.uri(), "http://echo/x");
        assert!(h2.headers().get(header::HOST).is_none());
    }
}
