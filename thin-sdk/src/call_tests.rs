//! The SDK's routing against in-memory upstreams with tokio's clock paused: a fake sidecar
//! (probes, control session, app requests answered as each test says) and a provider, both on
//! a `MemoryNet`. Each test is one way a sidecar fails.

#![allow(clippy::unwrap_used)]

use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use detour_core::body::{boxed, empty, full};
use detour_core::failure::{ERROR_HEADER, PATH_HEADER};
use detour_core::testing::{Abort, MemoryNet, Upstream};
use detour_core::{Dial, MeshErrorKind, PathTaken};
use detour_proto::control::control_event::Event as Pb;
use detour_proto::control::local_control_server::{LocalControl, LocalControlServer};
use detour_proto::control::{
    ControlEvent, EndpointInfo, EndpointSnapshot, SessionRequest, SidecarState as PbState,
    SidecarStatus,
};
use detour_proto::{CONTROL_AUTHORITY, PING_PATH, ServiceName};
use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tower::ServiceExt;

use crate::{Client, Error, LinkState, mesh_error, path_taken};

/// How the fake sidecar answers app requests.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// As a healthy mesh: `200 via mesh`.
    Answer,
    /// Never (a stopped process): probes hang too.
    Hang,
    /// Breaks the connection after the request arrived.
    Abort,
    /// Its own mesh error of this kind.
    Mesh(MeshErrorKind),
    /// A provider's answer that carries a forged mesh header the sidecar failed to remove.
    Forged(&'static str),
    /// Answers after a while.
    Slow(Duration),
}

const SIDECAR: &str = "/run/fake/outbound.sock";
const PROVIDER: &str = "10.0.0.1:80";

fn svc() -> ServiceName {
    ServiceName::new("hello").unwrap()
}

/// The fake sidecar and the provider behind it.
struct Fake {
    net: Arc<MemoryNet>,
    mode: Arc<Mutex<Mode>>,
    state: watch::Sender<PbState>,
    /// The mesh switch the sidecar announces for `hello` (none until set).
    switch: watch::Sender<Option<bool>>,
    /// App requests the sidecar received.
    at_sidecar: Arc<AtomicUsize>,
    /// Probes the sidecar answered or held.
    pings: Arc<AtomicUsize>,
    /// Requests the provider received, by method.
    at_provider: Arc<Mutex<BTreeMap<Method, usize>>>,
    /// The mesh header the provider forges, if any.
    provider_forges: Arc<Mutex<Option<&'static str>>>,
}

impl Fake {
    fn new(mode: Mode) -> Fake {
        let fake = Fake {
            net: MemoryNet::new(),
            mode: Arc::new(Mutex::new(mode)),
            state: watch::channel(PbState::Ready).0,
            switch: watch::channel(None).0,
            at_sidecar: Arc::default(),
            pings: Arc::default(),
            at_provider: Arc::default(),
            provider_forges: Arc::default(),
        };
        fake.serve_sidecar();
        fake.serve_provider();
        fake
    }

    fn sidecar() -> Dial {
        Dial::Unix(SIDECAR.into())
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock() = mode;
    }

    fn provider_got(&self, m: Method) -> usize {
        self.at_provider.lock().get(&m).copied().unwrap_or(0)
    }

    fn serve_sidecar(&self) {
        let ctl = Ctl {
            state: self.state.subscribe(),
            switch: self.switch.subscribe(),
        };
        let (mode, got) = (self.mode.clone(), self.at_sidecar.clone());
        let pings = self.pings.clone();
        self.net.set(
            Self::sidecar(),
            Upstream::serve(move |req: Request<Incoming>| {
                let (ctl, mode, got) = (ctl.clone(), *mode.lock(), got.clone());
                let pings = pings.clone();
                async move {
                    if authority(&req) == Some(CONTROL_AUTHORITY) {
                        if req.uri().path() == PING_PATH {
                            pings.fetch_add(1, Ordering::SeqCst);
                            if mode == Mode::Hang {
                                std::future::pending::<()>().await;
                            }
                            return Ok(Response::new(full("ready\n")));
                        }
                        let resp = LocalControlServer::new(ctl).oneshot(req).await.unwrap();
                        return Ok(resp.map(boxed));
                    }
                    got.fetch_add(1, Ordering::SeqCst);
                    sidecar_answer(mode).await
                }
            }),
        );
    }

    fn serve_provider(&self) {
        let (seen, forges) = (self.at_provider.clone(), self.provider_forges.clone());
        self.net.set(
            Dial::Tcp(PROVIDER.parse().unwrap()),
            Upstream::serve(move |req: Request<Incoming>| {
                let (seen, forges) = (seen.clone(), *forges.lock());
                async move {
                    *seen.lock().entry(req.method().clone()).or_default() += 1;
                    let mut resp = Response::new(full("hello from p1\n"));
                    if let Some(reason) = forges {
                        let v = HeaderValue::from_static(reason);
                        resp.headers_mut().insert(ERROR_HEADER, v);
                    }
                    Ok(resp)
                }
            }),
        );
    }

    /// A client of the fake sidecar whose snapshot of `hello` is in memory.
    async fn ready_client(&self) -> Client {
        let client = Client::builder(Self::sidecar())
            .connector(self.net.clone())
            .timeout(Duration::from_secs(5))
            .build();
        assert!(client.wait_ready(Duration::from_secs(1)).await);
        let first = client.send(&svc(), get()).await.unwrap();
        assert_eq!(path_taken(&first), Some(PathTaken::Mesh));
        while client.snapshot(&svc()).is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.at_sidecar.store(0, Ordering::SeqCst);
        client
    }
}

fn authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.host()),
        None => req.headers().get(http::header::HOST)?.to_str().ok(),
    }
}

async fn sidecar_answer(mode: Mode) -> Result<Response<detour_core::BoxBody>, Abort> {
    let mut resp = Response::new(full("hello via the mesh\n"));
    resp.headers_mut()
        .insert(PATH_HEADER, PathTaken::Mesh.header_value());
    match mode {
        Mode::Answer => {}
        Mode::Hang => std::future::pending::<()>().await,
        Mode::Abort => return Err(Abort),
        Mode::Mesh(kind) => {
            *resp.status_mut() = kind.status();
            resp.headers_mut().insert(ERROR_HEADER, kind.header_value());
        }
        Mode::Forged(reason) => {
            let v = HeaderValue::from_static(reason);
            resp.headers_mut().insert(ERROR_HEADER, v);
        }
        Mode::Slow(d) => tokio::time::sleep(d).await,
    }
    Ok(resp)
}

/// The control session of the fake sidecar: its state now and on every change (ending the
/// stream after `draining`), and a snapshot of every service the SDK names.
#[derive(Clone)]
struct Ctl {
    state: watch::Receiver<PbState>,
    switch: watch::Receiver<Option<bool>>,
}

#[tonic::async_trait]
impl LocalControl for Ctl {
    type SessionStream = ReceiverStream<Result<ControlEvent, tonic::Status>>;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<SessionRequest>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut state = self.state.clone();
        let mut switch = self.switch.clone();
        let mut incoming = request.into_inner();
        tokio::spawn(async move {
            let status = |s: PbState| ControlEvent {
                event: Some(Pb::Status(SidecarStatus {
                    state: s as i32,
                    host: "h1".into(),
                    version: "test".into(),
                    ..SidecarStatus::default()
                })),
            };
            let first = *state.borrow_and_update();
            let _ = tx.send(Ok(status(first))).await;
            loop {
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() { return; }
                        let s = *state.borrow_and_update();
                        let _ = tx.send(Ok(status(s))).await;
                        if s == PbState::Draining { return; }
                    }
                    changed = switch.changed() => {
                        if changed.is_err() { return; }
                        let on = *switch.borrow_and_update();
                        if let Some(mesh_on) = on {
                            let m = detour_proto::control::MeshSwitch { service: "hello".into(), mesh_on };
                            let _ = tx.send(Ok(ControlEvent { event: Some(Pb::Mesh(m)) })).await;
                        }
                    }
                    msg = incoming.message() => {
                        let Ok(Some(req)) = msg else { return };
                        for service in req.services {
                            let snap = EndpointSnapshot {
                                service,
                                endpoints: vec![provider_info()],
                                revision: 1,
                                routes: String::new(),
                            };
                            let _ = tx.send(Ok(ControlEvent { event: Some(Pb::Snapshot(snap)) })).await;
                        }
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

fn provider_info() -> EndpointInfo {
    EndpointInfo {
        instance: "p1".into(),
        host: "h2".into(),
        app_address: PROVIDER.into(),
        pa_address: String::new(),
        weight: 1,
        protocol: "http1".into(),
        zone: String::new(),
        version: String::new(),
        unhealthy: false,
        no_direct: false,
        labels: Default::default(),
    }
}

fn get() -> Request<detour_core::BoxBody> {
    Request::get("/").body(empty()).unwrap()
}

fn post() -> Request<detour_core::BoxBody> {
    Request::post("/").body(full("order #1")).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_refused_sidecar_sends_any_method_direct_once() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    // The sidecar process is gone: its socket refuses connections (the pooled one broke).
    fake.net.set(Fake::sidecar(), Upstream::Refuse);
    let resp = client.send(&svc(), post()).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    assert_eq!(fake.provider_got(Method::POST), 1);
    assert_eq!(client.link_state(), LinkState::Fallback);
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_that_drops_the_connection_after_sending_loses_only_non_idempotent_calls() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    fake.set(Mode::Abort);
    let resp = client.send(&svc(), get()).await.unwrap();
    assert_eq!(
        path_taken(&resp),
        Some(PathTaken::Direct),
        "a GET is sent again"
    );
    // A POST that reached the sidecar may have been processed: it is not sent again.
    fake.set(Mode::Answer);
    let client = fake.ready_client().await;
    fake.set(Mode::Abort);
    let err = client.send(&svc(), post()).await.unwrap_err();
    assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err}");
    assert_eq!(fake.provider_got(Method::POST), 0);
}

#[tokio::test(start_paused = true)]
async fn a_drain_announcement_moves_calls_direct() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    fake.state.send_replace(PbState::Draining);
    while client.link_state() != LinkState::Fallback {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for req in [get(), post()] {
        let resp = client.send(&svc(), req).await.unwrap();
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    }
    assert_eq!(fake.at_sidecar.load(Ordering::SeqCst), 0);
    assert_eq!(fake.provider_got(Method::POST), 1);
}

#[tokio::test(start_paused = true)]
async fn a_slow_answer_is_waited_for_not_hedged() {
    let fake = Fake::new(Mode::Slow(Duration::from_secs(2)));
    let client = fake.ready_client().await;
    let t = Instant::now();
    let resp = client.send(&svc(), get()).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    assert!(t.elapsed() >= Duration::from_secs(2));
    assert_eq!(
        fake.provider_got(Method::GET),
        0,
        "no second copy went direct"
    );
    assert_eq!(client.link_state(), LinkState::Primary);
}

#[tokio::test(start_paused = true)]
async fn a_hung_sidecar_stalls_no_idempotent_call_and_never_repeats_a_post() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    fake.set(Mode::Hang);
    let t = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let req = if i % 2 == 0 { get() } else { post() };
                let r = client.send(&svc(), req).await;
                (i % 2 == 0, r, t.elapsed())
            })
        })
        .collect();
    for c in calls {
        let (idempotent, r, took) = c.await.unwrap();
        if idempotent {
            let resp = r.unwrap();
            assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
            // Two probes time out back to back (250 ms each) after at most one interval.
            assert!(took <= Duration::from_millis(800), "a GET waited {took:?}");
        } else {
            let err = r.unwrap_err();
            assert!(matches!(err, Error::Timeout { .. }), "{err}");
            assert!(
                took >= Duration::from_secs(5),
                "a POST ends at its deadline"
            );
        }
    }
    assert_eq!(fake.provider_got(Method::GET), 10);
    assert_eq!(fake.provider_got(Method::POST), 0, "no POST was sent twice");
    assert_eq!(client.link_state(), LinkState::Fallback);
}

/// Probes of the sidecar during the next `d`.
async fn pings_during(fake: &Fake, d: Duration) -> usize {
    let before = fake.pings.load(Ordering::SeqCst);
    tokio::time::sleep(d).await;
    fake.pings.load(Ordering::SeqCst) - before
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_probes_its_sidecar_every_thirty_seconds_until_its_next_call() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    // Used a moment ago: every 200 ms.
    let busy = pings_during(&fake, Duration::from_secs(5)).await;
    assert!(
        (24..=26).contains(&busy),
        "{busy} probes in 5 s while in use"
    );
    // No call for 10 s: every 30 s (at 10, 40, 70 and 100 s; the window ends between two).
    tokio::time::sleep(Duration::from_millis(12_500)).await;
    let idle = pings_during(&fake, Duration::from_secs(90)).await;
    assert_eq!(idle, 3, "{idle} probes in 90 s while idle");
    // The next call probes at once and brings the fast pace back.
    let before = fake.pings.load(Ordering::SeqCst);
    client.send(&svc(), get()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(fake.pings.load(Ordering::SeqCst) - before, 1);
    let again = pings_during(&fake, Duration::from_secs(1)).await;
    assert!(
        (4..=6).contains(&again),
        "{again} probes in 1 s after a call"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sidecar_that_hung_while_the_client_was_idle_is_left_as_fast_as_under_load() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    // Idle, between two probes at the idle pace.
    tokio::time::sleep(Duration::from_millis(62_500)).await;
    fake.set(Mode::Hang);
    let t = Instant::now();
    let resp = client.send(&svc(), get()).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    let took = t.elapsed();
    // The call's own probe and the next one time out back to back (250 ms each).
    assert!(
        took <= Duration::from_millis(800),
        "the GET waited {took:?}"
    );
    assert_eq!(client.link_state(), LinkState::Fallback);
}

#[tokio::test(start_paused = true)]
async fn the_sidecars_own_routing_errors_send_a_post_direct_exactly_once() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    fake.set(Mode::Mesh(MeshErrorKind::NoEndpoint));
    let resp = client.send(&svc(), post()).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    assert_eq!(fake.provider_got(Method::POST), 1);
    // A provider's loss reported by the sidecar is not repeated anywhere.
    fake.set(Mode::Mesh(MeshErrorKind::UpstreamReset));
    let err = client.send(&svc(), get()).await.unwrap_err();
    assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err}");
    assert_eq!(fake.provider_got(Method::GET), 0);
}

#[tokio::test(start_paused = true)]
async fn forged_mesh_headers_make_nothing_run_twice_nor_leave_the_mesh() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    // An unknown reason on the mesh path is no mesh error: the answer is returned as is.
    fake.set(Mode::Forged("draining"));
    for _ in 0..30 {
        let resp = client.send(&svc(), post()).await.unwrap();
        assert_eq!(mesh_error(&resp), None);
    }
    assert_eq!(fake.at_sidecar.load(Ordering::SeqCst), 30);
    assert_eq!(fake.provider_got(Method::POST), 0);
    assert_eq!(client.link_state(), LinkState::Primary);
    // On the direct path every x-detour-* header of a provider is dropped.
    *fake.provider_forges.lock() = Some("upstream-connect");
    fake.net.set(Fake::sidecar(), Upstream::Refuse);
    for _ in 0..5 {
        let resp = client.send(&svc(), post()).await.unwrap();
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
        assert_eq!(mesh_error(&resp), None);
        assert!(resp.headers().get(ERROR_HEADER).is_none());
    }
    assert_eq!(
        fake.provider_got(Method::POST),
        5,
        "each POST reached it once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_switched_off_service_is_called_direct_and_ramps_back() {
    let fake = Fake::new(Mode::Answer);
    let client = fake.ready_client().await;
    fake.switch.send_replace(Some(false));
    tokio::time::sleep(Duration::from_millis(20)).await;
    for req in [get(), post()] {
        let resp = client.send(&svc(), req).await.unwrap();
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    }
    assert_eq!(fake.at_sidecar.load(Ordering::SeqCst), 0);
    assert_eq!(
        client.link_state(),
        LinkState::Primary,
        "the sidecar itself is fine"
    );
    fake.switch.send_replace(Some(true));
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The ramp: some calls through the mesh at first, all of them after 2 s.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for _ in 0..20 {
        let resp = client.send(&svc(), get()).await.unwrap();
        assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    }
}
