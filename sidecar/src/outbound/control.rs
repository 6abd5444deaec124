//! The local control API (`detour.control.v1.LocalControl`) the thin SDK subscribes to: the
//! sidecar's state, and endpoint snapshots of every service the app says it calls.
//!
//! A session ends right after announcing `draining` (a drain) or `handing_over` (an upgrade:
//! the SDK reconnects, to the successor), so neither waits on it. A snapshot marks every
//! endpoint of a service whose traffic policy forbids paths around its PAs `no_direct`, so the
//! SDK never calls it directly; it is sent again when the policy changes. A snapshot carries the
//! service's routes by version and label too (the SDK's direct path applies them), and is sent
//! again when they change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use detour_proto::control::control_event::Event;
use detour_proto::control::local_control_server::LocalControl;
use detour_proto::control::{
    ControlEvent, EndpointInfo, EndpointSnapshot, MeshSwitch, SessionRequest, SidecarStatus,
};
use detour_proto::{Endpoint, HostId, ServiceName, SidecarState};
use detour_registry::Catalog;
use detour_registry::catalog::Follow;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::config::ZonePreference;
use crate::outbound::Documents;
use crate::outbound::gray::Gray;
use crate::outbound::routes::Routes;
use crate::policy::Policies;
use crate::process::lifecycle::Lifecycle;

/// Serves control sessions.
#[derive(Clone)]
pub struct ControlService {
    /// Whose state is reported.
    lifecycle: Arc<Lifecycle>,
    /// Where snapshots come from.
    catalog: Arc<Catalog>,
    /// This host, reported in status events.
    host: HostId,
    /// This host's zone, reported in status events.
    zone: Option<ZonePreference>,
    /// The gray rules: which services the SDK calls straight (`MeshSwitch`).
    gray: Arc<Gray>,
    /// The traffic policy: which services allow no path around their PAs.
    policies: Arc<Policies>,
    /// The routes by version and label, sent with each snapshot.
    routes: Arc<Routes>,
}

impl ControlService {
    /// A control service over `catalog` reporting `lifecycle` and the `gray` rules.
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        catalog: Arc<Catalog>,
        (host, zone): (HostId, Option<ZonePreference>),
        documents: Documents,
    ) -> Self {
        Self {
            lifecycle,
            catalog,
            host,
            zone,
            gray: documents.gray,
            policies: documents.policies,
            routes: documents.routes,
        }
    }

    fn switch(service: &ServiceName, mesh_on: bool) -> ControlEvent {
        ControlEvent {
            event: Some(Event::Mesh(MeshSwitch {
                service: service.to_string(),
                mesh_on,
            })),
        }
    }

    fn status(&self, state: SidecarState) -> ControlEvent {
        self.event(state.into())
    }

    /// The last event of a session whose sidecar hands its sockets to a successor.
    fn handing_over(&self) -> ControlEvent {
        self.event(detour_proto::control::SidecarState::HandingOver)
    }

    fn event(&self, pb: detour_proto::control::SidecarState) -> ControlEvent {
        ControlEvent {
            event: Some(Event::Status(SidecarStatus {
                state: pb as i32,
                host: self.host.to_string(),
                version: crate::VERSION.to_owned(),
                zone: self
                    .zone
                    .as_ref()
                    .map(|z| z.zone.clone())
                    .unwrap_or_default(),
                zone_min_healthy_percent: self
                    .zone
                    .as_ref()
                    .map_or(0, |z| u32::from(z.min_healthy_percent)),
            })),
        }
    }
}

type Tx = mpsc::Sender<Result<ControlEvent, Status>>;

#[tonic::async_trait]
impl LocalControl for ControlService {
    type SessionStream = ReceiverStream<Result<ControlEvent, Status>>;

    async fn session(
        &self,
        request: tonic::Request<Streaming<SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move { this.run(request.into_inner(), tx).await });
        metrics::counter!("detour_control_sessions_total").increment(1);
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

impl ControlService {
    async fn run(self, mut incoming: Streaming<SessionRequest>, tx: Tx) {
        let mut state = self.lifecycle.subscribe();
        let mut rules = self.gray.subscribe();
        let mut watchers = JoinSet::new();
        let mut seen: HashSet<ServiceName> = HashSet::new();
        let unknown_slots = Arc::new(tokio::sync::Semaphore::new(MAX_UNKNOWN_FOLLOWED));
        // The mesh switch last sent for each service (`None`: none sent, the rules being
        // unknown then — an SDK keeps the switches it has until they are known).
        let mut switched: HashMap<ServiceName, Option<bool>> = HashMap::new();
        let first = *state.borrow_and_update();
        if tx.send(Ok(self.status(first))).await.is_err()
            || matches!(first, SidecarState::Draining | SidecarState::Stopped)
        {
            return;
        }
        loop {
            tokio::select! {
                msg = incoming.message() => match msg {
                    Ok(Some(req)) => {
                        if !req.app.is_empty() {
                            tracing::debug!(app = %req.app, "control session opened");
                        }
                        for name in req.services {
                            let Ok(service) = ServiceName::new(name) else { continue };
                            if seen.len() >= MAX_FOLLOWED && !seen.contains(&service) {
                                metrics::counter!("detour_control_names_ignored_total").increment(1);
                                continue;
                            }
                            if seen.insert(service.clone()) {
                                // Sent on or off: an SDK that reconnects learns a switch lifted meanwhile.
                                let mut sent = None;
                                if self.gray.known() {
                                    let on = self.gray.mesh_on(&service);
                                    if tx.send(Ok(Self::switch(&service, on))).await.is_err() { break; }
                                    sent = Some(on);
                                }
                                switched.insert(service.clone(), sent);
                                watchers.spawn(forward_snapshots(self.clone(), service, tx.clone(), unknown_slots.clone()));
                            }
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
                changed = state.changed() => {
                    if changed.is_err() { break; }
                    let s = *state.borrow_and_update();
                    if tx.send(Ok(self.status(s))).await.is_err() { break; }
                    if matches!(s, SidecarState::Draining | SidecarState::Stopped) { break; }
                }
                changed = rules.changed() => {
                    if changed.is_err() { break; }
                    rules.borrow_and_update();
                    if !self.gray.known() { continue; }
                    for (service, last) in switched.iter_mut() {
                        let on = self.gray.mesh_on(service);
                        if Some(on) != *last {
                            *last = Some(on);
                            if tx.send(Ok(Self::switch(service, on))).await.is_err() { break; }
                        }
                    }
                }
                () = self.lifecycle.handover_announced() => {
                    let _ = tx.send(Ok(self.handing_over())).await;
                    break;
                }
                _ = tx.closed() => break,
            }
        }
        watchers.abort_all();
    }
}

/// Most names no service has that one control session follows (waiting for them to appear);
/// more get one empty snapshot and are not followed.
const MAX_UNKNOWN_FOLLOWED: usize = 256;

/// Most services one control session follows; names past it are ignored (and counted).
const MAX_FOLLOWED: usize = 4096;

/// Sends `service`'s snapshot now and after every change (of its endpoints, of the policy or
/// of the routes), until the session ends.
async fn forward_snapshots(
    docs: ControlService,
    service: ServiceName,
    tx: Tx,
    unknown_slots: Arc<tokio::sync::Semaphore>,
) {
    let mut revision = 0u64;
    // A name no service has gets an empty snapshot and is followed in the registry alone (no
    // catalog state) until it exists.
    let mut rx = loop {
        match docs.catalog.follow(&service).await {
            Ok(Follow::Routed(rx)) => break rx,
            Ok(Follow::Unknown(mut unknown)) => {
                revision += 1;
                let ev = snapshot_event(&service, &[], revision, "");
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
                // A session follows a bounded number of names that do not exist.
                let Ok(_slot) = unknown_slots.try_acquire() else {
                    tracing::debug!(%service, "not following another unknown name in this session");
                    return;
                };
                loop {
                    if unknown.changed().await.is_err() {
                        return;
                    }
                    if unknown.borrow_and_update().known {
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%service, error = %e, "no snapshot for control session");
                return;
            }
        }
    };
    let mut policy = docs.policies.subscribe();
    let mut routes = docs.routes.subscribe();
    loop {
        let set = rx.borrow_and_update().clone();
        policy.borrow_and_update();
        routes.borrow_and_update();
        revision += 1;
        let json = docs.routes.of(&service).map(|r| r.json.clone());
        let json = json.as_deref().unwrap_or("");
        let ev = if docs.policies.of(&service).direct {
            snapshot_event(&service, &set.endpoints, revision, json)
        } else {
            let pa_only: Vec<Endpoint> = set
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    no_direct: true,
                    ..e.clone()
                })
                .collect();
            snapshot_event(&service, &pa_only, revision, json)
        };
        if tx.send(Ok(ev)).await.is_err() {
            return;
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = policy.changed() => if r.is_err() { return },
            r = routes.changed() => if r.is_err() { return },
        }
    }
}

fn snapshot_event(
    service: &ServiceName,
    endpoints: &[Endpoint],
    revision: u64,
    routes: &str,
) -> ControlEvent {
    let snap = EndpointSnapshot {
        service: service.to_string(),
        endpoints: endpoints.iter().map(EndpointInfo::from).collect(),
        revision,
        routes: routes.to_owned(),
    };
    ControlEvent {
        event: Some(Event::Snapshot(snap)),
    }
}
