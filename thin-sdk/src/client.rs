//! The SDK client and its builder: where the sidecar is, how patient to be, and the background
//! parts every client runs (the control session and the probes of its sidecar). Routing one
//! call is [`crate::call`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_core::body::{BoxBody, BoxError, boxed};
use detour_core::connect::{Connect, NetConnect};
use detour_core::link::{LinkConfig, LinkState};
use detour_core::link_handle::{LinkHandle, SDK_NAMES};
use detour_core::probe::ProbePace;
use detour_core::trace::{SpanKind, TraceConfig, Tracer};
use detour_core::{Dial, PathTaken, Pool, PoolOptions};
use detour_proto::{AppProtocol, ServiceName, SidecarState};
use http::{Request, Response};

use crate::control::{ControlSession, Snapshot};
use crate::direct::Direct;
use crate::error::Error;
use crate::outcome::{ErrorWindow, path_taken};

/// The default deadline of a call, fallback included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds a [`Client`].
#[derive(Clone)]
pub struct ClientBuilder {
    sidecar: Dial,
    protocol: AppProtocol,
    app: String,
    timeout: Duration,
    control: bool,
    pool: PoolOptions,
    snapshot_file: Option<PathBuf>,
    max_replay_bytes: u64,
    link: LinkConfig,
    probe_pace: ProbePace,
    probe_timeout: Duration,
    connector: Arc<dyn Connect>,
    tracing: Option<TraceConfig>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("sidecar", &self.sidecar)
            .field("protocol", &self.protocol)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
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

    /// The deadline of a call until its response head, fallback included (30 s by default).
    /// A call that misses it ends with [`Error::Timeout`]: its outcome is unknown.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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

    /// How often and how patiently the sidecar is probed while the client makes calls (200 ms
    /// / 250 ms by default).
    pub fn probe(mut self, interval: Duration, timeout: Duration) -> Self {
        self.probe_pace.interval = interval;
        self.probe_timeout = timeout;
        self
    }

    /// How often the sidecar is probed once no call went to it for `after` (every 30 s after
    /// 10 s by default; never less often than [`ClientBuilder::probe`]'s interval). The next
    /// call probes at once and brings the fast pace back.
    pub fn idle_probe(mut self, after: Duration, interval: Duration) -> Self {
        self.probe_pace.idle_after = after;
        self.probe_pace.idle_interval = interval;
        self
    }

    /// Records a span per call and per attempt and exports them over OTLP/HTTP
    /// ([`TraceConfig::from_env`] reads the usual `OTEL_*` variables); a call without a
    /// `traceparent` then starts a trace. Without it, the client touches no trace header.
    pub fn tracing(mut self, cfg: TraceConfig) -> Self {
        self.tracing = Some(cfg);
        self
    }

    /// Opens connections (to the sidecar and, on the direct path, to providers) through
    /// `connector` instead of real sockets: in-memory networks in tests, or a connector of
    /// the application's own.
    pub fn connector(mut self, connector: Arc<dyn Connect>) -> Self {
        self.connector = connector;
        self
    }

    /// Builds the client. With the control session on, this must run inside a tokio runtime
    /// (trace export runs on a thread of its own).
    pub fn build(self) -> Client {
        let tracer = self.tracing.clone().map_or_else(Tracer::off, Tracer::start);
        let pool = Pool::with_connector(self.pool, self.connector.clone());
        let link = Arc::new(LinkHandle::new(
            SDK_NAMES,
            self.sidecar.to_string(),
            self.link,
            // Start on the mesh: if the sidecar is down, the first call's refused connect (a
            // request that never left) moves the link to direct and the call goes there.
            false,
        ));
        let (control, prober) = if self.control {
            let probes = pool.fresh(self.pool);
            let c = ControlSession::spawn(
                vec![pool.clone(), probes.clone()],
                self.sidecar.clone(),
                self.app.clone(),
                link.clone(),
                self.link,
                self.snapshot_file.clone(),
            );
            let p = tokio::spawn(detour_core::probe::probe_loop(
                probes,
                self.sidecar.clone(),
                AppProtocol::Http1,
                link.clone(),
                self.probe_pace,
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
                direct: Direct::default(),
                pool,
                control,
                prober,
                link,
                errors: ErrorWindow::default(),
                tracer,
            }),
        }
    }
}

/// What every clone of a client shares.
pub(crate) struct Inner {
    /// Where the local sidecar listens.
    pub(crate) sidecar: Dial,
    /// The protocol spoken to the sidecar.
    pub(crate) protocol: AppProtocol,
    /// The deadline of a call.
    pub(crate) timeout: Duration,
    /// Bodies up to this size are kept for a second attempt.
    pub(crate) max_replay: u64,
    /// Connections to the sidecar and, on the direct path, to providers.
    pub(crate) pool: Arc<Pool>,
    /// The direct path's provider order.
    pub(crate) direct: Direct,
    /// The control session (state and snapshots); `None` when control is off.
    pub(crate) control: Option<ControlSession>,
    /// The probe task, stopped with the client.
    prober: Option<tokio::task::JoinHandle<()>>,
    /// The SDK half of the link state machine.
    pub(crate) link: Arc<LinkHandle>,
    /// Recent errors the sidecar blamed on itself.
    pub(crate) errors: ErrorWindow,
    /// Spans of calls and attempts.
    pub(crate) tracer: Tracer,
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
    pub(crate) inner: Arc<Inner>,
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
            timeout: DEFAULT_TIMEOUT,
            control: true,
            pool: PoolOptions::default(),
            snapshot_file: None,
            max_replay_bytes: 64 * 1024,
            link: LinkConfig::default(),
            probe_pace: ProbePace {
                interval: Duration::from_millis(200),
                idle_interval: Duration::from_secs(30),
                idle_after: Duration::from_secs(10),
            },
            probe_timeout: Duration::from_millis(250),
            connector: Arc::new(NetConnect),
            tracing: None,
        }
    }

    /// Sends `req` to `service` and returns the response head; the body streams.
    ///
    /// Errors the mesh produced come back as responses that [`crate::mesh_error`] recognises;
    /// `Err` means no response arrived at all. [`path_taken`] tells which path answered.
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

    /// The sidecar's state as last reported on the control session; `None` while there is no
    /// session.
    pub fn sidecar_state(&self) -> Option<SidecarState> {
        self.inner.control.as_ref().and_then(|c| c.sidecar_state())
    }

    /// The SDK's link to its sidecar: `mesh` (primary), `direct` (fallback) or `recovering`.
    pub fn link_state(&self) -> LinkState {
        self.inner.link.state()
    }

    /// The mesh switch of `service` (a gray rule or a rollback, as the sidecar told): `mesh`
    /// (primary: on), `direct` (off: calls go to the providers) or `recovering` (ramping back
    /// on); `None` when the sidecar never switched it (on).
    pub fn mesh_switch(&self, service: &ServiceName) -> Option<LinkState> {
        self.inner
            .control
            .as_ref()
            .and_then(|c| c.mesh_switch(service))
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

    /// Routes one call under the client's deadline, and counts it by the path that answered.
    pub(crate) async fn send_via(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        mut req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Error> {
        let after = self.inner.timeout;
        let start = tokio::time::Instant::now();
        let mut span = (self.inner.tracer).begin(req.headers_mut(), "call", SpanKind::Client);
        if span.is_recording() {
            span.rename(format!("call {service}"));
            span.attr("detour.service", service.to_string());
            span.attr("http.request.method", req.method().to_string());
        }
        let routed = tokio::time::timeout(after, self.route(service, protocol, req, &mut span))
            .await
            .map_err(|_| Error::Timeout {
                service: service.clone(),
                after,
            })
            .and_then(|r| r);
        let (path, class) = match &routed {
            Ok(resp) => {
                let path = path_taken(resp).unwrap_or(PathTaken::Mesh).as_str();
                metrics::counter!("detour_sdk_requests_total", "path" => path).increment(1);
                (path, status_class(resp.status()))
            }
            Err(_) => ("none", "error"),
        };
        if span.is_recording() {
            span.attr("detour.path", path);
            match &routed {
                Ok(resp) => span.attr("http.response.status_code", resp.status().as_u16()),
                Err(e) => span.fail(|| e.to_string()),
            }
        }
        let label = detour_proto::labels::service(service);
        metrics::counter!("detour_sdk_service_requests_total",
            "service" => label.clone(), "path" => path, "class" => class)
        .increment(1);
        metrics::histogram!("detour_sdk_service_response_seconds",
            "service" => label, "path" => path)
        .record(start.elapsed().as_secs_f64());
        routed
    }
}

/// The class label of `status`: `1xx` … `5xx`.
fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
