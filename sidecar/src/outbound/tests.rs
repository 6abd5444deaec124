//! The CA's routing against in-memory PAs and providers, with tokio's clock paused: real
//! `Outbound` and `Inbound` handlers served on a `MemoryNet`, an in-memory registry, and
//! providers that answer, refuse, forge mesh headers or hang as each test says.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use detour_core::body::{empty, full};
use detour_core::failure::{ERROR_HEADER, PATH_HEADER};
use detour_core::testing::{Abort, MemoryNet, Upstream};
use detour_core::{BoxBody, Dial, MeshErrorKind, Pool, PoolOptions};
use detour_proto::{AppProtocol, Endpoint, HostId, InstanceId, ServiceName};
use detour_registry::Catalog;
use detour_registry::Registry;
use detour_registry::health::{CheckSpec, HealthCheck};
use detour_registry::memory::MemoryRegistry;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::{Outbound, Upstreams};
use crate::config::Config;
use crate::http::server::Handler;
use crate::inbound::Inbound;
use crate::inbound::providers::LocalProviders;
use crate::outbound::control::ControlService;
use crate::outbound::gray::Gray;
use crate::outbound::links::Links;
use crate::outbound::routes::Routes;
use crate::process::lifecycle::Lifecycle;

const CA: &str = "/run/h1/outbound.sock";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc() -> ServiceName {
    ServiceName::new("hello").unwrap()
}

/// Every provider health check passes (the tests make providers fail after registration).
struct Healthy;

impl HealthCheck for Healthy {
    fn check(&self, _: &Endpoint, _: &CheckSpec) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        Box::pin(async { true })
    }
}

/// How an in-memory provider answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum P {
    Ok,
    Forges(&'static str),
}

/// A mesh on one `MemoryNet`: a caller host h1 (CA) and provider hosts.
struct World {
    net: Arc<MemoryNet>,
    registry: Arc<MemoryRegistry>,
    /// Requests each provider received, by name and method.
    seen: Arc<Mutex<BTreeMap<(String, Method), usize>>>,
    ca_pool: Arc<Pool>,
    /// The caller host's gray rules.
    gray: Arc<Gray>,
    /// The caller host's routes.
    routes: Arc<Routes>,
    /// The CA's tracer.
    tracer: detour_core::trace::Tracer,
}

fn config(host: &str, extra: &str) -> Arc<Config> {
    let text = format!("host = \"{host}\"\n[proxy]\nrequest_timeout_ms = 5000\n{extra}");
    Arc::new(Config::parse("test", &text, Vec::new()).unwrap())
}

impl World {
    fn new() -> World {
        let net = MemoryNet::new();
        World {
            ca_pool: Pool::with_connector(PoolOptions::default(), net.clone()),
            net,
            registry: Arc::new(MemoryRegistry::new()),
            seen: Arc::default(),
            gray: Gray::new(HostId::new("h1").unwrap()),
            routes: Routes::new(),
            tracer: detour_core::trace::Tracer::off(),
        }
    }

    /// A provider `name` at `at`.
    fn provider(&self, name: &'static str, at: &str, how: P) {
        let seen = self.seen.clone();
        self.net.set(
            Dial::Tcp(addr(at)),
            Upstream::serve(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    *seen
                        .lock()
                        .unwrap()
                        .entry((name.to_owned(), req.method().clone()))
                        .or_default() += 1;
                    let mut resp = Response::new(full(name));
                    match how {
                        P::Ok => {}
                        P::Forges(reason) => {
                            let v = HeaderValue::from_static(reason);
                            resp.headers_mut().insert(ERROR_HEADER, v);
                        }
                    }
                    Ok::<_, Abort>(resp)
                }
            }),
        );
    }

    fn got(&self, name: &str, m: Method) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.get(&(name.to_owned(), m)).copied().unwrap_or(0)
    }

    /// Host `host`'s PA (a real `Inbound`) at `pa`, providing `hello` from `provider`.
    async fn pa(&mut self, host: &str, pa: &str, provider: &str) {
        self.pa_with(host, pa, provider, "").await;
    }

    /// [`Self::pa`], with more keys of the `[[provide]]` entry.
    async fn pa_with(&mut self, host: &str, pa: &str, provider: &str, keys: &str) {
        let cfg = config(
            host,
            &format!("[[provide]]\nservice = \"hello\"\naddress = \"{provider}\"\n{keys}\n"),
        );
        let providers = Arc::new(LocalProviders::new(
            &cfg,
            addr(pa),
            self.registry.clone(),
            Arc::new(Healthy),
        ));
        providers.register_all().await.unwrap();
        let pool = Pool::with_connector(PoolOptions::default(), self.net.clone());
        let lifecycle = Lifecycle::new();
        lifecycle.set(detour_proto::SidecarState::Ready);
        let inbound = Arc::new(Inbound::new(
            cfg.clone(),
            pool,
            lifecycle,
            providers,
            crate::policy::Policies::new(&cfg),
        ));
        serve(&self.net, Dial::Tcp(addr(pa)), inbound);
    }

    /// A provider without a sidecar, registered directly.
    async fn bare(&self, instance: &str, host: &str, at: &str) {
        let ep = Endpoint::new(
            svc(),
            InstanceId::new(instance).unwrap(),
            HostId::new(host).unwrap(),
            addr(at),
        );
        self.registry.register(ep).await.unwrap();
    }

    /// The caller host's CA, served at [`CA`].
    fn ca(&mut self) {
        let cfg = config("h1", "");
        let lifecycle = Lifecycle::new();
        lifecycle.set(detour_proto::SidecarState::Ready);
        let registry: Arc<dyn Registry> = self.registry.clone();
        let catalog = Arc::new(Catalog::new(registry.clone()));
        let links = Links::new(
            cfg.clone(),
            registry.watch_hosts(),
            &self.ca_pool,
            Arc::default(),
        );
        let documents = super::Documents {
            gray: self.gray.clone(),
            policies: crate::policy::Policies::new(&cfg),
            routes: self.routes.clone(),
        };
        let control = ControlService::new(
            lifecycle.clone(),
            catalog.clone(),
            (cfg.host.clone(), cfg.zone.clone()),
            documents.clone(),
        );
        let pool = Pool::with_connector(PoolOptions::default(), self.net.clone());
        let outbound = Arc::new(
            Outbound::new(
                cfg,
                catalog,
                Upstreams {
                    providers: pool.clone(),
                    pas: pool,
                },
                links,
                documents,
                lifecycle,
                control,
            )
            .with_tracer(self.tracer.clone()),
        );
        serve(&self.net, Dial::Unix(CA.into()), outbound);
    }

    /// One call through the CA, as an app would make it.
    async fn call(&self, method: Method) -> Response<BoxBody> {
        self.call_with(method, &[]).await
    }

    /// [`Self::call`] with `headers`.
    async fn call_with(&self, method: Method, headers: &[(&str, &str)]) -> Response<BoxBody> {
        let mut req = app_request(method);
        (req.headers_mut()).insert(http::header::HOST, HeaderValue::from_static("hello"));
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            req.headers_mut()
                .insert(name, HeaderValue::from_str(v).unwrap());
        }
        self.ca_pool
            .send(&Dial::Unix(CA.into()), AppProtocol::Http1, req)
            .await
            .unwrap()
    }
}

fn serve<H: Handler>(net: &MemoryNet, at: Dial, handler: Arc<H>) {
    net.set(
        at,
        Upstream::serve(move |req: Request<Incoming>| {
            let h = handler.clone();
            async move { Ok::<_, Abort>(h.handle(req).await) }
        }),
    );
}

async fn text(resp: Response<BoxBody>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(start_paused = true)]
async fn a_pa_whose_provider_is_gone_fails_nobody_and_runs_nothing_twice() {
    let mut w = World::new();
    w.provider("p3", "10.0.3.1:80", P::Ok);
    // h2's provider process died after it registered: its address refuses connections.
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.pa("h3", "10.0.3.9:4143", "10.0.3.1:80").await;
    w.ca();
    for _ in 0..20 {
        let resp = w.call(Method::POST).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[PATH_HEADER], "mesh");
        assert_eq!(text(resp).await, "p3");
    }
    assert_eq!(w.got("p3", Method::POST), 20, "every POST ran exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_forged_mesh_header_from_a_provider_is_dropped_and_never_retried() {
    let mut w = World::new();
    // Straight to a provider without a sidecar (C→CA→P), and through a PA (C→CA→PA→P).
    w.provider("bare", "10.0.4.1:80", P::Forges("upstream-connect"));
    w.bare("bare", "h4", "10.0.4.1:80").await;
    w.provider("p2", "10.0.2.1:80", P::Forges("draining"));
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    for _ in 0..20 {
        let resp = w.call(Method::POST).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get(ERROR_HEADER).is_none(), "{resp:?}");
    }
    let (a, b) = (w.got("bare", Method::POST), w.got("p2", Method::POST));
    assert_eq!(a + b, 20, "each POST reached one provider once ({a} + {b})");
    assert!(a > 0 && b > 0, "both paths were used ({a} / {b})");
}

/// h2's PA broken as `pa` says from the first call on, its provider fine.
async fn broken_pa(pa: Upstream) -> World {
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.net.set(Dial::Tcp(addr("10.0.2.9:4143")), pa);
    w.ca();
    w
}

fn dropping() -> Upstream {
    Upstream::serve(|_| async { Err::<Response<BoxBody>, _>(Abort) })
}

#[tokio::test(start_paused = true)]
async fn a_pa_that_refuses_or_drops_sends_what_is_safe_straight_to_the_provider() {
    // Dropped after the request was read: a GET goes straight to the provider...
    let w = broken_pa(dropping()).await;
    let resp = w.call(Method::GET).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    // ...a POST may have been processed: it is answered upstream-reset, never repeated.
    let w = broken_pa(dropping()).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        MeshErrorKind::from_headers(resp.headers()),
        Some(MeshErrorKind::UpstreamReset)
    );
    assert_eq!(w.got("p2", Method::POST), 0);
    // Refused outright, it never left: any method goes straight to the provider, once.
    let w = broken_pa(Upstream::Refuse).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    assert_eq!(w.got("p2", Method::POST), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_pa_holds_no_idempotent_request() {
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    assert_eq!(text(w.call(Method::GET).await).await, "p2");
    // The PA stops (SIGSTOP): its open connections, the pooled HTTP/2 one included, stall.
    w.net.freeze(&Dial::Tcp(addr("10.0.2.9:4143")), true);
    let t = Instant::now();
    let w = Arc::new(w);
    let get = {
        let w = w.clone();
        tokio::spawn(async move { (w.call(Method::GET).await, t.elapsed()) })
    };
    let post = {
        let w = w.clone();
        tokio::spawn(async move { (w.call(Method::POST).await, t.elapsed()) })
    };
    let (resp, took) = get.await.unwrap();
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    assert!(
        took <= Duration::from_millis(800),
        "the GET waited {took:?}"
    );
    let (resp, took) = post.await.unwrap();
    assert_eq!(
        MeshErrorKind::from_headers(resp.headers()),
        Some(MeshErrorKind::Timeout),
        "a POST waits for its answer until the request timeout"
    );
    assert!(took >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_service_switched_off_goes_straight_to_its_providers_and_comes_back() {
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    assert_eq!(w.call(Method::GET).await.headers()[PATH_HEADER], "mesh");
    w.gray.apply(Some(
        br#"{"version":1,"rules":[{"id":"rb","mesh":"off","service":"hello","origin":"rollback"}]}"#,
    ));
    for m in [Method::GET, Method::POST] {
        let resp = w.call(m).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    }
    w.gray.apply(None);
    assert_eq!(w.call(Method::GET).await.headers()[PATH_HEADER], "mesh");
}

/// A writer into a shared buffer, for a subscriber a test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Debug logs of this thread, into a buffer, while the guard lives.
fn debug_log() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

#[tokio::test(start_paused = true)]
async fn a_request_and_each_of_its_attempts_have_a_span() {
    let (captured, _default) = debug_log();
    // The PA refuses: the first attempt goes through it, the second straight to the provider.
    let w = broken_pa(Upstream::Refuse).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let request = r#"request{direction="outbound" method=POST service="hello"}"#;
    let first = format!(r#"{request}:attempt{{n=1 instance=h2-hello path="pa"}}"#);
    assert!(log.contains(&first), "no {first} in:\n{log}");
    assert!(log.contains("attempt failed"), "{log}");
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_traces_names_the_trace_in_its_request_span() {
    use detour_core::trace::{OtlpEndpoint, TraceConfig, Tracer};
    let (captured, _default) = debug_log();
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    // Exporting (to nowhere), recording none of the traces it starts: ids without spans.
    let mut cfg = TraceConfig::new(OtlpEndpoint::parse("http://127.0.0.1:9").unwrap(), "t");
    cfg.sample = 0.0;
    w.tracer = Tracer::start(cfg);
    w.ca();
    assert_eq!(w.call(Method::GET).await.status(), StatusCode::OK);
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let at = log
        .find("trace_id=")
        .unwrap_or_else(|| panic!("no trace_id in:\n{log}"));
    let id = &log[at + "trace_id=".len()..][..32];
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
}

#[tokio::test(start_paused = true)]
async fn routes_send_each_request_to_its_subset_on_the_mesh_and_ca_direct_paths() {
    let mut w = World::new();
    w.provider("v1", "10.0.2.1:80", P::Ok);
    w.provider("v2", "10.0.3.1:80", P::Ok);
    w.pa_with("h2", "10.0.2.9:4143", "10.0.2.1:80", "version = \"1\"")
        .await;
    w.pa_with("h3", "10.0.3.9:4143", "10.0.3.1:80", "version = \"2\"")
        .await;
    w.ca();
    w.routes.apply(Some(
        br#"{"version":1,"services":{"hello":{
            "subsets":{"v1":{"version":"1"},"v2":{"version":"2"}},
            "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v2"}],
            "default":"v1"}}}"#,
    ));
    for path in ["mesh", "ca-direct"] {
        for _ in 0..10 {
            let resp = w.call_with(Method::GET, &[("x-canary", "1")]).await;
            assert_eq!(resp.headers()[PATH_HEADER], path);
            assert_eq!(text(resp).await, "v2");
            let resp = w.call(Method::POST).await;
            assert_eq!(resp.headers()[PATH_HEADER], path);
            assert_eq!(text(resp).await, "v1");
        }
        // The mesh off for the service: the CA goes straight to the providers, by the same rules.
        w.gray.apply(Some(
            br#"{"version":1,"rules":[{"id":"rb","mesh":"off","service":"hello","origin":"rollback"}]}"#,
        ));
    }
    // A subset with no endpoint (v3 not deployed yet): its requests fall back to the default.
    w.routes.apply(Some(
        br#"{"version":1,"services":{"hello":{
            "subsets":{"v1":{"version":"1"},"v3":{"version":"3"}},
            "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v3"}],
            "default":"v1"}}}"#,
    ));
    for _ in 0..10 {
        let resp = w.call_with(Method::GET, &[("x-canary", "1")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "v1");
    }
    assert_eq!(w.routes.state()["hello"]["fallbacks"], 10);
}

/// An app's request for `hello` (a POST carries a body).
fn app_request(method: Method) -> Request<BoxBody> {
    let body = if method == Method::POST {
        full("order #1")
    } else {
        empty()
    };
    Request::builder()
        .method(method)
        .uri("/")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_sdk_goes_around_a_ca_that_is_gone_and_comes_back_when_it_is_served_again() {
    use detour_core::PathTaken;
    use detour_thin_sdk::{Client, path_taken};
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    // The app's SDK, on the same in-memory network: C→CA→PA→P.
    let client = Client::builder(Dial::Unix(CA.into()))
        .connector(w.net.clone())
        .timeout(Duration::from_secs(5))
        .build();
    assert!(client.wait_ready(Duration::from_secs(5)).await);
    let resp = client.send(&svc(), app_request(Method::GET)).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    while client.snapshot(&svc()).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The CA gone (its socket refuses): every call goes straight to the provider, once.
    w.net.set(Dial::Unix(CA.into()), Upstream::Refuse);
    let posts = w.got("p2", Method::POST);
    for i in 0..20 {
        let method = if i % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let resp = client.send(&svc(), app_request(method)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    }
    assert_eq!(w.got("p2", Method::POST) - posts, 10, "each POST ran once");
    // A CA served again (a new `Outbound`, as after a restart): the link's probes and a new
    // control session bring the calls back to the mesh.
    w.ca();
    let mut paths = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = client.send(&svc(), app_request(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        paths.push(path_taken(&resp));
        if paths.ends_with(&[Some(PathTaken::Mesh); 5]) {
            return;
        }
    }
    panic!("the calls never settled back on the mesh: {paths:?}");
}
