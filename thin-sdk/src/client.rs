//! The SDK client: sends requests for a named service through the local sidecar, and falls back
//! to calling providers directly when the link to the sidecar says so.
//!
//! Safe retries: a request that never left is always sent on the other path; one that left and
//! then lost its connection is sent again only when idempotent (by method or marked
//! [`crate::Idempotent`]) and its body was small enough to keep (see [`crate::replay`]); else the
//! app gets [`Error::OutcomeUnknown`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_proto::{AppProtocol, PATH_HEADER, PROXY_HEADER, ServiceName, SidecarState};
use http::{Request, Response};

use crate::body::{BoxBody, BoxError, boxed};
use crate::control::{ControlSession, Snapshot};
use crate::direct::{Direct, DirectError};
use crate::error::Error;
use crate::grpc::GrpcChannel;
use crate::link::{Event, LinkConfig, LinkState, Reason};
use crate::link_handle::{LinkHandle, SDK_NAMES};
use crate::outcome::{ErrorWindow, PathTaken, mesh_error, path_taken};
use crate::replay::{Replay, is_idempotent, prepare};
use crate::transport::{Dial, Failed, Pool, PoolOptions, set_target};

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    sidecar: Dial,
    protocol: AppProtocol,
    app: String,
    timeout: Option<Duration>,
    control: bool,
    pool: PoolOptions,
    snapshot_file: Option<PathBuf>,
    max_replay_bytes: u64,
    link: LinkConfig,
    probe_interval: Duration,
    probe_timeout: Duration,
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

    /// Time allowed for a call, fallback included (none by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Whether to hold a control session with the sidecar, probe it and fall back to direct
    /// calls (on by default). Off, the client only ever talks to the sidecar.
    pub fn control(mut self, on: bool) -> Self {
        self.control = on;
        self
    }

    /// Connection pool tuning.
    pub fn pool(mut self, pool: PoolOptions) -> Self {
        self.pool = pool;
        self
    }

    /// Keeps endpoint snapshots in this file, so that an app started while its sidecar is
    /// down can call directly.
    pub fn snapshot_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.snapshot_file = Some(path.into());
        self
    }

    /// Request bodies up to this size are kept so the request can be retried (64 KiB default).
    pub fn max_replay_bytes(mut self, bytes: u64) -> Self {
        self.max_replay_bytes = bytes;
        self
    }

    /// Link thresholds and the ramp back to the mesh.
    pub fn link(mut self, link: LinkConfig) -> Self {
        self.link = link;
        self
    }

    /// How often and how patiently the sidecar is probed (200 ms / 250 ms by default).
    pub fn probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.probe_interval = interval;
        self.probe_timeout = timeout;
        self
    }

    /// Builds the client. With the control session on, this must run inside a tokio runtime.
    pub fn build(self) -> Client {
        let pool = Pool::new(self.pool);
        let link = Arc::new(LinkHandle::new(
            SDK_NAMES,
            self.sidecar.to_string(),
            self.link,
            // Start on the mesh: if the sidecar is down, the first call's refused connect (a
            // request that never left) moves the link to direct and the call goes there.
            false,
        ));
        let (control, prober) = if self.control {
            let c = ControlSession::spawn(
                pool.clone(),
                self.sidecar.clone(),
                self.app.clone(),
                link.clone(),
                self.snapshot_file.clone(),
            );
            let p = tokio::spawn(crate::probe::probe_loop(
                Pool::new(self.pool),
                self.sidecar.clone(),
                AppProtocol::Http1,
                link.clone(),
                self.probe_interval,
                self.probe_timeout,
            ));
            (Some(c), Some(p))
        } else {
            (None, None)
        };
        Client {
            inner: Arc::new(Inner {
                sidecar: self.sidecar,
                protocol: self.protocol,
                timeout: self.timeout,
                max_replay: self.max_replay_bytes,
                direct: Direct::new(pool.clone()),
                pool,
                control,
                prober,
                link,
                errors: ErrorWindow::default(),
            }),
        }
    }
}

struct Inner {
    sidecar: Dial,
    protocol: AppProtocol,
    timeout: Option<Duration>,
    max_replay: u64,
    pool: Arc<Pool>,
    direct: Direct,
    control: Option<ControlSession>,
    prober: Option<tokio::task::JoinHandle<()>>,
    link: Arc<LinkHandle>,
    errors: ErrorWindow,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(p) = &self.prober {
            p.abort();
        }
    }
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

/// What a response from the sidecar says about the mesh.
enum Verdict {
    /// A provider's answer (or no mesh error).
    Fine,
    /// An error the mesh produced.
    Mesh {
        /// Produced by the local sidecar (counts toward "sick sidecar").
        local: bool,
        /// It never reached a provider, so sending it elsewhere is safe.
        retry_safe: bool,
        /// The sidecar is draining.
        draining: bool,
        /// A connection broke after the request was sent on (`upstream-reset`).
        lost: bool,
    },
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
            snapshot_file: None,
            max_replay_bytes: 64 * 1024,
            link: LinkConfig::default(),
            probe_interval: Duration::from_millis(200),
            probe_timeout: Duration::from_millis(250),
        }
    }

    /// Sends `req` to `service` and returns the response head; the body streams.
    ///
    /// Errors the mesh produced come back as responses carrying `x-detour-error` (see
    /// [`mesh_error`]); `Err` means no response arrived at all. [`path_taken`] tells which
    /// path answered.
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

    /// The SDK's link to its sidecar: `mesh`, `direct` or `recovering`.
    pub fn link_state(&self) -> LinkState {
        self.inner.link.state()
    }

    /// Waits until the control session reports the sidecar ready, up to `within`.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        match &self.inner.control {
            Some(c) => c.wait_ready(within).await,
            None => false,
        }
    }

    /// The last endpoint snapshot the sidecar sent (or the snapshot file held) for `service`.
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
        let fut = self.route(service, protocol, req);
        let resp = match self.inner.timeout {
            Some(after) => {
                tokio::time::timeout(after, fut)
                    .await
                    .map_err(|_| Error::Timeout {
                        service: service.clone(),
                        after,
                    })??
            }
            None => fut.await?,
        };
        let path = path_taken(&resp).map_or("mesh", PathTaken::as_str);
        metrics::counter!("detour_sdk_requests_total", "path" => path).increment(1);
        Ok(resp)
    }

    async fn route(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        let Some(control) = &self.inner.control else {
            let req = address(service, protocol, req)?;
            return self
                .via_sidecar(protocol, req)
                .await
                .map_err(|f| self.sidecar_error(service, f));
        };
        control.interest(service);
        let idempotent = is_idempotent(&req);
        let (req, replay) = prepare(req, self.inner.max_replay)
            .await
            .map_err(|e| Error::InvalidRequest(format!("reading the request body: {e}")))?;
        if self.inner.link.choose_primary() {
            self.mesh_first(service, protocol, req, replay, idempotent)
                .await
        } else {
            self.direct_first(service, protocol, req).await
        }
    }

    async fn via_sidecar(
        &self,
        protocol: AppProtocol,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Failed> {
        let mut resp = self
            .inner
            .pool
            .send(&self.inner.sidecar, protocol, req)
            .await?;
        let path = match resp.headers().get(PATH_HEADER).map(|v| v.as_bytes()) {
            Some(b"ca-direct") => PathTaken::CaDirect,
            _ => PathTaken::Mesh,
        };
        resp.extensions_mut().insert(path);
        Ok(resp)
    }

    fn sidecar_error(&self, service: &ServiceName, failed: Failed) -> Error {
        if failed.error.never_left() {
            Error::SidecarUnavailable {
                sidecar: self.inner.sidecar.clone(),
                source: failed.error,
            }
        } else {
            Error::OutcomeUnknown {
                service: service.clone(),
                detail: failed.error.to_string(),
            }
        }
    }

    async fn mesh_first(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        req: Request<BoxBody>,
        replay: Option<Replay>,
        idempotent: bool,
    ) -> Result<Response<BoxBody>, Error> {
        let link = &self.inner.link;
        match self
            .via_sidecar(protocol, address(service, protocol, req)?)
            .await
        {
            Ok(resp) => match self.judge(&resp) {
                Verdict::Fine => {
                    self.inner.errors.record(false);
                    Ok(resp)
                }
                Verdict::Mesh {
                    local,
                    retry_safe,
                    draining,
                    lost,
                } => {
                    if draining {
                        link.event(Event::Fault(Reason::DrainAnnounced));
                    }
                    // While ramping back, one error of the sidecar's own is enough.
                    let ramping = matches!(link.state(), LinkState::Recovering { .. });
                    if local && (self.inner.errors.record(true) || ramping) {
                        link.event(Event::Fault(Reason::MeshErrors));
                    }
                    match replay {
                        Some(r) if retry_safe => self.direct_only(service, r.request(), resp).await,
                        _ if lost => Err(Error::OutcomeUnknown {
                            service: service.clone(),
                            detail: format!(
                                "the mesh lost the connection after sending ({})",
                                resp.headers()
                                    .get(PROXY_HEADER)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("?")
                            ),
                        }),
                        _ => Ok(resp),
                    }
                }
            },
            Err(Failed {
                error,
                request: Some(back),
            }) => {
                link.event(Event::Fault(Reason::ConnectFailed));
                self.direct_after_sidecar(service, back, error.to_string())
                    .await
            }
            Err(Failed {
                error,
                request: None,
            }) => {
                link.event(Event::Fault(Reason::ConnectFailed));
                match replay {
                    Some(r) if idempotent => {
                        self.direct_after_sidecar(service, r.request(), error.to_string())
                            .await
                    }
                    _ => Err(Error::OutcomeUnknown {
                        service: service.clone(),
                        detail: error.to_string(),
                    }),
                }
            }
        }
    }

    /// Direct, after the sidecar could not take the request.
    async fn direct_after_sidecar(
        &self,
        service: &ServiceName,
        req: Request<BoxBody>,
        sidecar_error: String,
    ) -> Result<Response<BoxBody>, Error> {
        match self
            .inner
            .direct
            .send(service, self.snapshot(service), req)
            .await
        {
            Ok(resp) => Ok(tag_direct(resp)),
            Err(DirectError::NoRoute(cause, _)) => Err(Error::NoRoute {
                service: service.clone(),
                cause: format!("the sidecar is unavailable ({sidecar_error}) and {cause}"),
            }),
            Err(DirectError::Failed(f)) => Err(self.provider_error(service, *f)),
        }
    }

    /// Direct, replacing a mesh error response; keeps that response if direct cannot do better.
    async fn direct_only(
        &self,
        service: &ServiceName,
        req: Request<BoxBody>,
        mesh_resp: Response<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        match self
            .inner
            .direct
            .send(service, self.snapshot(service), req)
            .await
        {
            Ok(resp) => Ok(tag_direct(resp)),
            Err(_) => Ok(mesh_resp),
        }
    }

    async fn direct_first(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        let back = match self
            .inner
            .direct
            .send(service, self.snapshot(service), req)
            .await
        {
            Ok(resp) => return Ok(tag_direct(resp)),
            Err(DirectError::NoRoute(_, back)) => *back,
            Err(DirectError::Failed(f)) => match *f {
                Failed {
                    request: Some(back),
                    ..
                } => back,
                lost => return Err(self.provider_error(service, lost)),
            },
        };
        // No provider could be reached directly and the request never left: the sidecar may
        // well be able to take it.
        self.via_sidecar(protocol, address(service, protocol, back)?)
            .await
            .map_err(|f| self.sidecar_error(service, f))
    }

    fn provider_error(&self, service: &ServiceName, failed: Failed) -> Error {
        if failed.error.never_left() {
            Error::NoRoute {
                service: service.clone(),
                cause: format!(
                    "no provider accepted a direct connection ({})",
                    failed.error
                ),
            }
        } else {
            Error::OutcomeUnknown {
                service: service.clone(),
                detail: failed.error.to_string(),
            }
        }
    }

    fn judge(&self, resp: &Response<BoxBody>) -> Verdict {
        let Some(reason) = mesh_error(resp) else {
            return Verdict::Fine;
        };
        let proxy = resp
            .headers()
            .get(PROXY_HEADER)
            .and_then(|v| v.to_str().ok());
        let local = match (&self.inner.control, proxy) {
            (Some(c), Some(p)) => c.sidecar_host().is_some_and(|h| h == p),
            _ => false,
        };
        let draining = reason == "draining";
        let before_any_provider = matches!(
            reason,
            "upstream-connect" | "no-endpoint" | "registry-unavailable"
        );
        Verdict::Mesh {
            local,
            retry_safe: draining || (local && before_any_provider),
            draining,
            lost: reason == "upstream-reset",
        }
    }
}

fn tag_direct(mut resp: Response<BoxBody>) -> Response<BoxBody> {
    resp.extensions_mut().insert(PathTaken::Direct);
    resp
}

fn address(
    service: &ServiceName,
    protocol: AppProtocol,
    req: Request<BoxBody>,
) -> Result<Request<BoxBody>, Error> {
    set_target(service.as_str(), protocol, req).map_err(|e| Error::InvalidRequest(e.to_string()))
}
