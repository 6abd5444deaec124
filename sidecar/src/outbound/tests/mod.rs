//! The in-process mesh the CA's tests run on, with tokio's clock paused: real `Outbound` and
//! `Inbound` handlers served on a `MemoryNet`, an in-memory registry, and providers that
//! answer, fail, refuse, forge mesh headers or hang as each test says.
//!
//! - `paths`: the CA's routing through PAs, straight to providers, and by gray rules and routes.
//! - `errors`: what the mesh answers for itself (no provider, no service) and what it does not.
//! - `sdk`: an app's SDK in front of the CA: going around a CA that is gone or sick, and back.

#![allow(clippy::unwrap_used)]

mod errors;
mod paths;
mod sdk;

use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
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
use crate::http::server::{ConnInfo, Handler};
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
    /// Answers 500, its own error (no mesh header).
    Fails,
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
    /// Answers the CA made itself (with a mesh error header).
    ca_errors: Arc<std::sync::atomic::AtomicUsize>,
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
            ca_errors: Arc::default(),
        }
    }

    /// A caller host h1 with its CA, and a provider host h2 (PA at 10.0.2.9:4143) whose provider
    /// p2 answers as `how` says.
    async fn one_pa(how: P) -> World {
        let mut w = World::new();
        w.provider("p2", "10.0.2.1:80", how);
        w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
        w.ca();
        w
    }

    /// An app's SDK on this network, in front of the CA.
    fn app(&self) -> detour_thin_sdk::ClientBuilder {
        detour_thin_sdk::Client::builder(Dial::Unix(CA.into())).connector(self.net.clone())
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
                        .entry((name.to_owned(), req.method().clone()))
                        .or_default() += 1;
                    let mut resp = Response::new(full(name));
                    match how {
                        P::Ok => {}
                        P::Fails => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
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
        let seen = self.seen.lock();
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
        let errors = self.ca_errors.clone();
        self.net.set(
            Dial::Unix(CA.into()),
            Upstream::serve(move |req: Request<Incoming>| {
                let (h, errors) = (outbound.clone(), errors.clone());
                async move {
                    let resp = h.handle(req, ConnInfo::default()).await;
                    if resp.headers().contains_key(ERROR_HEADER) {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok::<_, Abort>(resp)
                }
            }),
        );
    }

    /// One call through the CA, as an app would make it.
    async fn call(&self, method: Method) -> Response<BoxBody> {
        self.call_with(method, &[]).await
    }

    /// [`Self::call`] with `headers`.
    async fn call_with(&self, method: Method, headers: &[(&str, &str)]) -> Response<BoxBody> {
        self.call_to("hello", method, headers).await
    }

    /// A call for `service` through the CA.
    async fn call_to(
        &self,
        service: &str,
        method: Method,
        headers: &[(&str, &str)],
    ) -> Response<BoxBody> {
        let mut req = app_request(method);
        let host = HeaderValue::from_str(service).unwrap();
        req.headers_mut().insert(http::header::HOST, host);
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
            async move { Ok::<_, Abort>(h.handle(req, ConnInfo::default()).await) }
        }),
    );
}

async fn text(resp: Response<BoxBody>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
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
