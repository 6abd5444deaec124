//! The SDK's control session with its sidecar: learns the sidecar's state and keeps the latest
//! endpoint snapshot of every service the app calls.
//!
//! One background task holds a `LocalControl.Session` stream open and reconnects with backoff
//! when it drops. It stops when the [`crate::Client`] that owns it is dropped.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use detour_proto::control::control_event::Event;
use detour_proto::control::local_control_client::LocalControlClient;
use detour_proto::control::{SessionRequest, SidecarState as PbState};
use detour_proto::{AppProtocol, CONTROL_AUTHORITY, Endpoint, ServiceName, SidecarState};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::body::{BoxBody, BoxError, boxed};
use crate::transport::{Dial, Pool};

/// The endpoints of one service as the sidecar last reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The sidecar's revision counter for this service.
    pub revision: u64,
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
}

#[derive(Default)]
struct Shared {
    snapshots: RwLock<HashMap<ServiceName, Arc<Snapshot>>>,
    interest: Mutex<BTreeSet<ServiceName>>,
    /// The open session's request sender, to announce newly used services.
    tx: Mutex<Option<mpsc::UnboundedSender<SessionRequest>>>,
}

/// A running control session; dropping it stops the task.
pub(crate) struct ControlSession {
    shared: Arc<Shared>,
    state: watch::Receiver<Option<SidecarState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlSession {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ControlSession {
    pub(crate) fn spawn(pool: Arc<Pool>, sidecar: Dial, app: String) -> Self {
        let shared = Arc::new(Shared::default());
        let (state_tx, state) = watch::channel(None);
        let channel = SidecarChannel { pool, sidecar };
        let task = tokio::spawn(run(channel, app, shared.clone(), state_tx));
        Self {
            shared,
            state,
            task,
        }
    }

    pub(crate) fn sidecar_state(&self) -> Option<SidecarState> {
        *self.state.borrow()
    }

    pub(crate) async fn wait_ready(&self, within: Duration) -> bool {
        let mut rx = self.state.clone();
        tokio::time::timeout(within, rx.wait_for(|s| *s == Some(SidecarState::Ready)))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub(crate) fn snapshot(&self, service: &ServiceName) -> Option<Arc<Snapshot>> {
        let snaps = self
            .shared
            .snapshots
            .read()
            .unwrap_or_else(|p| p.into_inner());
        snaps.get(service).cloned()
    }

    /// Notes that the app calls `service`; the first time, tells the sidecar.
    pub(crate) fn interest(&self, service: &ServiceName) {
        {
            let interest = self
                .shared
                .interest
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if interest.contains(service) {
                return;
            }
        }
        self.shared
            .interest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.clone());
        if let Some(tx) = &*self.shared.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = tx.send(SessionRequest {
                app: String::new(),
                services: vec![service.to_string()],
            });
        }
    }
}

async fn run(
    channel: SidecarChannel,
    app: String,
    shared: Arc<Shared>,
    state: watch::Sender<Option<SidecarState>>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match session(&channel, &app, &shared, &state).await {
            Ok(()) => tracing::debug!(sidecar = %channel.sidecar, "control session ended"),
            Err(e) => {
                tracing::debug!(sidecar = %channel.sidecar, error = %e, "control session failed")
            }
        }
        *shared.tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
        state.send_replace(None);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn session(
    channel: &SidecarChannel,
    app: &str,
    shared: &Shared,
    state: &watch::Sender<Option<SidecarState>>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    {
        // Announce everything known so far, then let `interest` add to it.
        let interest = shared.interest.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(SessionRequest {
            app: app.to_owned(),
            services: interest.iter().map(ToString::to_string).collect(),
        });
        *shared.tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }
    let mut client = LocalControlClient::new(channel.clone());
    let mut events = client
        .session(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(ev) = events.message().await? {
        match ev.event {
            Some(Event::Status(s)) => {
                let st = match PbState::try_from(s.state) {
                    Ok(PbState::Ready) => SidecarState::Ready,
                    Ok(PbState::Draining) => SidecarState::Draining,
                    Ok(PbState::Stopped) => SidecarState::Stopped,
                    _ => SidecarState::Starting,
                };
                state.send_replace(Some(st));
            }
            Some(Event::Snapshot(snap)) => {
                let Ok(service) = ServiceName::new(snap.service.clone()) else {
                    continue;
                };
                let endpoints = snap
                    .endpoints
                    .iter()
                    .filter_map(|e| e.to_endpoint(&service))
                    .collect();
                shared
                    .snapshots
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        service,
                        Arc::new(Snapshot {
                            revision: snap.revision,
                            endpoints,
                        }),
                    );
            }
            Some(Event::Mesh(_)) | None => {}
        }
    }
    Ok(())
}

/// Carries control RPCs straight to the sidecar over HTTP/2 (never through path selection).
#[derive(Clone)]
struct SidecarChannel {
    pool: Arc<Pool>,
    sidecar: Dial,
}

impl tower::Service<Request<tonic::body::Body>> for SidecarChannel {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let pool = self.pool.clone();
        let sidecar = self.sidecar.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let pq = parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/"));
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(CONTROL_AUTHORITY)
                .path_and_query(pq)
                .build()?;
            let req = Request::from_parts(parts, boxed(body));
            pool.send(&sidecar, AppProtocol::Http2, req)
                .await
                .map_err(|f| f.error.into())
        })
    }
}
