//! The SDK's control session with its sidecar: learns the sidecar's state and keeps the latest
//! endpoint snapshot of every service the app calls.
//!
//! One background task holds a `LocalControl.Session` stream open and reconnects with backoff
//! when it drops. It stops when the [`crate::Client`] that owns it is dropped. What it hears
//! feeds the SDK's link: `ready` lets the link recover; `draining`, a stream that ends or
//! breaks, and a session that cannot be opened make it leave the mesh at once. `handing_over`
//! (the sidecar is being upgraded) is no fault: the SDK stops reusing its connections to that
//! process and reconnects at once — to its successor, which took the sockets over. Snapshots are also written to a file (when configured) so an app that
//! starts while its sidecar is down can still call directly; the file also keeps which
//! services the sidecar switched off the mesh (a gray rule or a rollback), so an app restarted
//! while its sidecar is away keeps calling them direct until the sidecar says otherwise.

use detour_proto::sync::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use detour_proto::control::control_event::Event as Pb;
use detour_proto::control::local_control_client::LocalControlClient;
use detour_proto::control::{SessionRequest, SidecarState as PbState};
use detour_proto::{AppProtocol, CONTROL_AUTHORITY, Endpoint, ServiceName, SidecarState};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use detour_core::body::{BoxBody, BoxError, boxed};
use detour_core::link::{Event, LinkConfig, LinkState, Reason};
use detour_core::link_handle::{LinkHandle, StateNames};
use detour_core::route::{ServiceRoutes, ZonePreference};
use detour_core::{Dial, Pool};

/// The names of a per-service mesh switch's states.
const SERVICE_NAMES: StateNames = StateNames {
    scope: "sdk_service",
    primary: "mesh",
    fallback: "direct",
};

/// The endpoints of one service as the sidecar last reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The sidecar's revision counter for this service.
    pub revision: u64,
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// The service's routes by version and label, applied on the direct path as the CA
    /// applies them on the mesh path.
    pub routes: Option<Arc<ServiceRoutes>>,
}

struct Shared {
    snapshots: RwLock<HashMap<ServiceName, Arc<Snapshot>>>,
    interest: Mutex<BTreeSet<ServiceName>>,
    /// The open session's request sender, to announce newly used services.
    tx: Mutex<Option<mpsc::UnboundedSender<SessionRequest>>>,
    /// The link fed by what the session hears.
    link: Arc<LinkHandle>,
    /// Every pool with connections to the sidecar (forgotten when it hands over).
    pools: Vec<Arc<Pool>>,
    /// Per service the sidecar switched, whether its calls take the mesh (a gray rule or a
    /// rollback): off at once, back on through the link's ramp.
    switches: RwLock<HashMap<ServiceName, Arc<LinkHandle>>>,
    /// The ramp of a switched service's way back.
    switch_cfg: LinkConfig,
    /// Where snapshots are kept across restarts of the app.
    snapshot_file: Option<PathBuf>,
    /// The sidecar's zone, as its status said (the direct path prefers it).
    zone: RwLock<Option<ZonePreference>>,
}

/// The snapshot file: every service's last endpoints, and the services switched off the mesh.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SnapshotFile {
    format: u32,
    services: BTreeMap<ServiceName, Vec<Endpoint>>,
    /// Services the sidecar last switched off the mesh (absent in files of older SDKs).
    #[serde(default)]
    mesh_off: BTreeSet<ServiceName>,
    /// Each service's routes, as the sidecar sent them (absent in files of older SDKs).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    routes: BTreeMap<ServiceName, String>,
}

/// What a snapshot file holds, as read.
#[derive(Debug, Default)]
struct Kept {
    snapshots: HashMap<ServiceName, Arc<Snapshot>>,
    mesh_off: BTreeSet<ServiceName>,
}

/// `service`'s routes from their JSON text (empty: none); routes that do not parse are
/// reported, counted and ignored (the direct path then uses every endpoint).
fn routes_of(service: &ServiceName, json: &str) -> Option<Arc<ServiceRoutes>> {
    if json.is_empty() {
        return None;
    }
    match ServiceRoutes::parse(json) {
        Ok(r) => Some(Arc::new(r)),
        Err(e) => {
            tracing::warn!(%service, error = %e, "ignoring routes that do not parse");
            metrics::counter!("detour_sdk_routes_invalid_total").increment(1);
            None
        }
    }
}

/// Reads a snapshot file; a missing file is empty, a corrupt one is reported and ignored.
fn load_snapshot_file(path: &Path) -> Kept {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Kept::default(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the snapshot file");
            return Kept::default();
        }
    };
    match serde_json::from_slice::<SnapshotFile>(&bytes) {
        Ok(f) if f.format == 1 => Kept {
            snapshots: f
                .services
                .into_iter()
                .map(|(k, endpoints)| {
                    let routes = f.routes.get(&k).and_then(|j| routes_of(&k, j));
                    let snap = Snapshot {
                        revision: 0,
                        endpoints,
                        routes,
                    };
                    (k, Arc::new(snap))
                })
                .collect(),
            mesh_off: f.mesh_off,
        },
        Ok(f) => {
            tracing::warn!(file = %path.display(), format = f.format, "ignoring a snapshot file of an unknown format");
            Kept::default()
        }
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring a corrupt snapshot file");
            metrics::counter!("detour_sdk_snapshot_file_errors_total").increment(1);
            Kept::default()
        }
    }
}

/// Writes every snapshot and the switched-off services to `path` atomically (write, fsync,
/// rename).
fn write_snapshot_file(
    path: &Path,
    snaps: &HashMap<ServiceName, Arc<Snapshot>>,
    mesh_off: BTreeSet<ServiceName>,
) -> std::io::Result<()> {
    let file = SnapshotFile {
        format: 1,
        services: snaps
            .iter()
            .map(|(k, v)| (k.clone(), v.endpoints.clone()))
            .collect(),
        mesh_off,
        routes: snaps
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.routes.as_ref()?.json.to_string())))
            .collect(),
    };
    detour_proto::files::write_atomic(path, &serde_json::to_vec(&file)?, 0o644)
}

impl Shared {
    /// The services switched off the mesh now.
    fn mesh_off(&self) -> BTreeSet<ServiceName> {
        self.switches
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, l)| l.state() == LinkState::Fallback)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Writes the snapshot file, when there is one.
    fn save(&self) {
        let Some(path) = &self.snapshot_file else {
            return;
        };
        let snaps = self
            .snapshots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Err(e) = write_snapshot_file(path, &snaps, self.mesh_off()) {
            tracing::warn!(file = %path.display(), error = %e, "cannot write the snapshot file");
        }
    }

    /// A switch for `service`, made on first use.
    fn switch(&self, service: &ServiceName) -> Arc<LinkHandle> {
        let mut switches = self.switches.write().unwrap_or_else(|p| p.into_inner());
        switches
            .entry(service.clone())
            .or_insert_with(|| {
                Arc::new(LinkHandle::new(
                    SERVICE_NAMES,
                    service.to_string(),
                    self.switch_cfg,
                    false,
                ))
            })
            .clone()
    }
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
    /// Starts the session over `pools[0]`; every pool in `pools` holds connections to the
    /// sidecar and is told to forget them when the sidecar hands over.
    pub(crate) fn spawn(
        pools: Vec<Arc<Pool>>,
        sidecar: Dial,
        app: String,
        link: Arc<LinkHandle>,
        link_cfg: LinkConfig,
        snapshot_file: Option<PathBuf>,
    ) -> Self {
        let pool = pools[0].clone();
        let kept = snapshot_file
            .as_deref()
            .map(load_snapshot_file)
            .unwrap_or_default();
        let shared = Arc::new(Shared {
            snapshots: RwLock::new(kept.snapshots),
            interest: Mutex::new(BTreeSet::new()),
            tx: Mutex::new(None),
            link,
            pools,
            switches: RwLock::new(HashMap::new()),
            // A switch is the sidecar's own word: no probes to wait for before the ramp.
            switch_cfg: LinkConfig {
                recover_after: 0,
                ..link_cfg
            },
            snapshot_file,
            zone: RwLock::new(None),
        });
        // Switches kept from an earlier run hold until the sidecar decides again.
        for service in &kept.mesh_off {
            shared.switch(service).event(Event::MeshOff);
        }
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

    /// Whether this call to `service` takes the mesh, as far as the sidecar's switches say.
    pub(crate) fn mesh_switched_on(&self, service: &ServiceName) -> bool {
        let switches = self
            .shared
            .switches
            .read()
            .unwrap_or_else(|p| p.into_inner());
        switches.get(service).is_none_or(|l| l.choose_primary())
    }

    /// The state of `service`'s switch, if the sidecar ever switched it.
    pub(crate) fn mesh_switch(&self, service: &ServiceName) -> Option<LinkState> {
        let switches = self
            .shared
            .switches
            .read()
            .unwrap_or_else(|p| p.into_inner());
        switches.get(service).map(|l| l.state())
    }

    /// The sidecar's zone, as its last status said.
    pub(crate) fn zone(&self) -> Option<ZonePreference> {
        self.shared
            .zone
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
            let interest = self.shared.interest.lock();
            if interest.contains(service) {
                return;
            }
        }
        self.shared.interest.lock().insert(service.clone());
        if let Some(tx) = &*self.shared.tx.lock() {
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
            Ok(Ended::HandedOver) => {
                tracing::info!(sidecar = %channel.sidecar, "the sidecar hands over to its successor: reconnecting");
                *shared.tx.lock() = None;
                backoff = Duration::from_millis(50);
                continue;
            }
            Ok(Ended::Closed) => {
                tracing::debug!(sidecar = %channel.sidecar, "control session ended")
            }
            Err(e) => {
                tracing::debug!(sidecar = %channel.sidecar, error = %e, "control session failed")
            }
        }
        *shared.tx.lock() = None;
        state.send_replace(None);
        // Without a session the SDK cannot hear a drain announcement: leave the mesh until the
        // sidecar is back and ready (its probes and a new session bring the link back).
        shared.link.event(Event::Fault(Reason::ControlDropped));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// How a session that did not fail ended.
enum Ended {
    /// The stream ended.
    Closed,
    /// The sidecar said it hands over to a successor.
    HandedOver,
}

async fn session(
    channel: &SidecarChannel,
    app: &str,
    shared: &Shared,
    state: &watch::Sender<Option<SidecarState>>,
) -> Result<Ended, tonic::Status> {
    let (tx, rx) = mpsc::unbounded_channel();
    {
        // Announce everything known so far, then let `interest` add to it.
        let interest = shared.interest.lock();
        let _ = tx.send(SessionRequest {
            app: app.to_owned(),
            services: interest.iter().map(ToString::to_string).collect(),
        });
        *shared.tx.lock() = Some(tx);
    }
    let mut client = LocalControlClient::new(channel.clone());
    let mut events = client
        .session(UnboundedReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(ev) = events.message().await? {
        match ev.event {
            Some(Pb::Status(s)) if s.state == PbState::HandingOver as i32 => {
                for pool in &shared.pools {
                    pool.forget(&channel.sidecar);
                }
                return Ok(Ended::HandedOver);
            }
            Some(Pb::Status(s)) => on_status(shared, state, &s),
            Some(Pb::Snapshot(snap)) => on_snapshot(shared, &snap),
            Some(Pb::Mesh(m)) => on_mesh(shared, m),
            None => {}
        }
    }
    Ok(Ended::Closed)
}

/// The sidecar's state: published, its zone kept, the link told.
fn on_status(
    shared: &Shared,
    state: &watch::Sender<Option<SidecarState>>,
    s: &detour_proto::control::SidecarStatus,
) {
    let st = match PbState::try_from(s.state) {
        Ok(PbState::Ready) => SidecarState::Ready,
        Ok(PbState::Draining) => SidecarState::Draining,
        Ok(PbState::Stopped) => SidecarState::Stopped,
        _ => SidecarState::Starting,
    };
    state.send_replace(Some(st));
    let zone = (!s.zone.is_empty()).then(|| ZonePreference {
        zone: s.zone.clone(),
        min_healthy_percent: u8::try_from(s.zone_min_healthy_percent.min(100)).unwrap_or(100),
    });
    *shared.zone.write().unwrap_or_else(|p| p.into_inner()) = zone;
    shared.link.event(match st {
        SidecarState::Ready => Event::PeerReady,
        SidecarState::Draining | SidecarState::Stopped | SidecarState::Failed => {
            Event::Fault(Reason::DrainAnnounced)
        }
        SidecarState::Starting => Event::PeerNotReady,
    });
}

/// A service's endpoints and routes, kept (and saved) for the direct path.
fn on_snapshot(shared: &Shared, snap: &detour_proto::control::EndpointSnapshot) {
    let Ok(service) = ServiceName::new(snap.service.clone()) else {
        return;
    };
    let endpoints: Vec<Endpoint> = (snap.endpoints.iter())
        .filter_map(|e| e.to_endpoint(&service))
        .collect();
    let mut snaps = shared.snapshots.write().unwrap_or_else(|p| p.into_inner());
    // The snapshot exists for the direct path, used when the sidecar is sick: an empty set
    // from it must not erase the last providers known to work (if they are really gone, they
    // refuse connections and the call fails just the same).
    if endpoints.is_empty() && snaps.get(&service).is_some_and(|s| !s.endpoints.is_empty()) {
        tracing::debug!(%service, "keeping the last non-empty snapshot for the direct path");
        return;
    }
    let routes = routes_of(&service, &snap.routes);
    let revision = snap.revision;
    let kept = Snapshot {
        revision,
        endpoints,
        routes,
    };
    snaps.insert(service, Arc::new(kept));
    drop(snaps);
    shared.save();
}

/// A service's mesh switch (a gray rule or a rollback), saved when it moved the link.
fn on_mesh(shared: &Shared, m: detour_proto::control::MeshSwitch) {
    let Ok(service) = ServiceName::new(m.service) else {
        return;
    };
    let link = shared.switch(&service);
    let was_off = link.state() == LinkState::Fallback;
    link.event(if m.mesh_on {
        Event::MeshOn
    } else {
        Event::MeshOff
    });
    if was_off != (link.state() == LinkState::Fallback) {
        shared.save();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_files_round_trip_and_garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        assert!(
            load_snapshot_file(&path).snapshots.is_empty(),
            "a missing file is empty"
        );
        let ep: Endpoint = serde_json::from_str(
            r#"{"service":"hello","instance":"i1","host":"h1","app_address":"127.0.0.1:9","pa_address":null}"#,
        )
        .unwrap();
        let mut snaps = HashMap::new();
        snaps.insert(
            ServiceName::new("hello").unwrap(),
            Arc::new(Snapshot {
                revision: 3,
                endpoints: vec![ep.clone()],
                routes: routes_of(
                    &ServiceName::new("hello").unwrap(),
                    r#"{"subsets":{"v2":{"version":"2"}},"default":"v2"}"#,
                ),
            }),
        );
        let off: BTreeSet<ServiceName> = [ServiceName::new("payments").unwrap()].into();
        write_snapshot_file(&path, &snaps, off.clone()).unwrap();
        let back = load_snapshot_file(&path);
        assert_eq!(
            back.snapshots[&ServiceName::new("hello").unwrap()].endpoints,
            vec![ep]
        );
        assert_eq!(back.mesh_off, off);
        let routes = back.snapshots[&ServiceName::new("hello").unwrap()]
            .routes
            .clone()
            .unwrap();
        assert_eq!(
            routes.subsets[0].name, "v2",
            "routes are kept with the endpoints"
        );
        assert!(routes_of(&ServiceName::new("hello").unwrap(), "{bad").is_none());
        // A file of an SDK from before the switches were kept still reads.
        std::fs::write(&path, br#"{"format":1,"services":{}}"#).unwrap();
        assert!(load_snapshot_file(&path).mesh_off.is_empty());
        std::fs::write(&path, b"\x00garbage{").unwrap();
        assert!(
            load_snapshot_file(&path).snapshots.is_empty(),
            "a corrupt file is ignored"
        );
        std::fs::write(&path, br#"{"format":9,"services":{}}"#).unwrap();
        assert!(
            load_snapshot_file(&path).snapshots.is_empty(),
            "an unknown format is ignored"
        );
    }
}
