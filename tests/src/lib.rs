//! A small builder language for integration tests: a [`Mesh`] of real sidecar processes on
//! loopback sharing one directory registry, real providers (HTTP and gRPC), and SDK clients.
//!
//! It may import every Detour crate (with the sidecar binary, the one place that links the
//! sidecar library); nothing imports it.
//!
//! Every process is owned by a guard and killed by PID when the mesh drops; every port is
//! chosen by the OS; readiness is probed, never slept on.

pub mod etcd;
pub mod etcd_tls;
pub mod gray;
pub mod grpc;
mod hello_mesh;
pub mod otlp;
mod provider_process;
pub mod proxy;
pub mod raw;
pub mod scenario;
pub mod sync;
pub mod watchdog_host;
pub mod zookeeper;

pub use hello_mesh::hello_mesh;
pub use provider_process::ProviderProcess;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The trust domain of test meshes.
pub const TRUST_DOMAIN: &str = "detour.local";

use detour_kit::certs::{Authority, DEFAULT_VALIDITY};
use detour_kit::provider::DemoProvider;
use detour_kit::sidecar::{SidecarProcess, find_binary, find_sidecar_binary};
use detour_kit::sidecar_config::{SidecarToml, TlsFiles};
use detour_kit::watched::WatchdogProcess;
use detour_proto::{AppProtocol, ServiceName};
use detour_thin_sdk::{Client, Dial};

/// One provider a host offers.
#[derive(Debug, Clone)]
pub struct Offer {
    /// Service name.
    pub service: String,
    /// Where the provider listens.
    pub address: SocketAddr,
    /// Its protocol.
    pub protocol: AppProtocol,
}

impl Offer {
    /// An HTTP/1.1 provider.
    pub fn http1(service: &str, address: SocketAddr) -> Self {
        Self {
            service: service.into(),
            address,
            protocol: AppProtocol::Http1,
        }
    }

    /// An HTTP/2 (gRPC) provider.
    pub fn grpc(service: &str, address: SocketAddr) -> Self {
        Self {
            service: service.into(),
            address,
            protocol: AppProtocol::Http2,
        }
    }
}

/// Real sidecars on loopback sharing a directory registry under a temporary directory.
pub struct Mesh {
    dir: tempfile::TempDir,
    binary: PathBuf,
    /// Sidecars by host name.
    pub sidecars: BTreeMap<String, SidecarProcess>,
    /// Hosts run by a watchdog (which runs their sidecar), by host name.
    pub watchdogs: BTreeMap<String, WatchdogProcess>,
    /// The registry spec sidecars use (`dir:` under the root unless set).
    registry: Option<String>,
    /// The mesh's throw-away CA (trust domain `detour.local`): every sidecar gets a
    /// certificate from it and talks mutual TLS, unless its config has its own `[tls]`.
    pub ca: Authority,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Every process first, while their run directories (and pid files) still exist; the
        // temporary directory goes after.
        self.watchdogs.clear();
        self.sidecars.clear();
        // `DETOUR_TEST_KEEP=1` keeps the directory (logs, state) of a mesh for a look after.
        if std::env::var_os("DETOUR_TEST_KEEP").is_some() {
            let kept = std::mem::replace(
                &mut self.dir,
                tempfile::TempDir::new().expect("a temporary directory"),
            );
            eprintln!("kept {}", kept.keep().display());
        }
    }
}

impl Mesh {
    /// An empty mesh. Panics with a clear message when `detour-sidecar` has not been built.
    pub fn new() -> Mesh {
        let binary = find_sidecar_binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new()
            .prefix("detour-test-")
            .tempdir()
            .expect("temporary directory");
        Mesh {
            dir,
            binary,
            sidecars: BTreeMap::new(),
            watchdogs: BTreeMap::new(),
            registry: None,
            ca: Authority::new(TRUST_DOMAIN).expect("a throw-away CA"),
        }
    }

    /// Where `host`'s certificate, key and bundle are (written on the first [`Mesh::config`]).
    pub fn pki_dir(&self, host: &str) -> PathBuf {
        self.root().join("pki").join(host)
    }

    /// The `[tls]` files of `host` (issued now if not yet).
    pub fn tls_files(&self, host: &str) -> TlsFiles {
        let dir = self.pki_dir(host);
        if !dir.join("cert.pem").exists() {
            self.ca
                .write_host(&dir, host, DEFAULT_VALIDITY)
                .expect("host certificate");
        }
        TlsFiles::Dir {
            dir,
            trust_domain: Some(TRUST_DOMAIN.to_owned()),
            reload_ms: Some(200),
        }
    }

    /// Makes every sidecar started from now on use `spec` (e.g. `etcd:http://…`).
    pub fn use_registry(&mut self, spec: &str) {
        self.registry = Some(spec.to_owned());
    }

    /// The mesh's temporary root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The config text of host `host` on loopback address `ip`, with `extra` TOML appended
    /// (its own `[tls]` replaces the mesh's).
    pub fn config(&self, host: &str, ip: &str, offers: &[Offer], extra: &str) -> String {
        let tls = match extra.contains("[tls]") {
            true => TlsFiles::Omitted,
            false => self.tls_files(host),
        };
        let mut t = SidecarToml::new(host, ip, &self.root().join(host))
            .tls(tls)
            .registry_dir("poll_ms = 50\nttl_ms = 10000");
        if let Some(r) = &self.registry {
            t = t.registry(r);
        }
        for o in offers {
            t = t.provide(
                &o.service,
                &o.address.to_string(),
                Some(o.protocol.as_str()),
            );
        }
        t.extra(extra).render()
    }

    /// Starts the sidecar of `host` on `ip` offering `offers`; waits until it is ready.
    pub async fn start(&mut self, host: &str, ip: &str, offers: &[Offer]) -> &SidecarProcess {
        self.start_with(host, ip, offers, "").await
    }

    /// As [`Mesh::start`], with extra config sections.
    pub async fn start_with(
        &mut self,
        host: &str,
        ip: &str,
        offers: &[Offer],
        extra: &str,
    ) -> &SidecarProcess {
        let cfg = self.config(host, ip, offers, extra);
        self.start_config(host, &cfg).await
    }

    /// Starts the sidecar of `host` with exactly `config` (see [`Mesh::config`]).
    pub async fn start_config(&mut self, host: &str, config: &str) -> &SidecarProcess {
        let run_dir = self.root().join(host);
        let sc = SidecarProcess::start(&self.binary, &run_dir, config, Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("starting sidecar {host}: {e}"));
        self.sidecars.insert(host.to_owned(), sc);
        &self.sidecars[host]
    }

    /// The sidecar of `host`.
    pub fn sidecar(&self, host: &str) -> &SidecarProcess {
        &self.sidecars[host]
    }

    /// The `detour-sidecar` binary the mesh runs.
    pub fn sidecar_binary(&self) -> &Path {
        &self.binary
    }

    /// Starts `host` on `ip` the production way: a watchdog (config `watchdog_extra` appended)
    /// running `sidecar_binary` (the mesh's when `None`) with the usual sidecar config
    /// (`sidecar_extra` appended); waits until the watchdog reports its sidecar ready.
    pub async fn start_watched(
        &mut self,
        host: &str,
        ip: &str,
        offers: &[Offer],
        sidecar_extra: &str,
        watchdog_extra: &str,
        sidecar_binary: Option<&Path>,
    ) -> &WatchdogProcess {
        let cfg = self.config(host, ip, offers, sidecar_extra);
        self.start_watched_config(host, ip, &cfg, watchdog_extra, sidecar_binary)
            .await
    }

    /// As [`Mesh::start_watched`], with exactly `sidecar_config` (see [`Mesh::config`]).
    pub async fn start_watched_config(
        &mut self,
        host: &str,
        ip: &str,
        sidecar_config: &str,
        watchdog_extra: &str,
        sidecar_binary: Option<&Path>,
    ) -> &WatchdogProcess {
        let cfg = sidecar_config;
        let watchdog =
            find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN").unwrap_or_else(|e| panic!("{e}"));
        let run_dir = self.root().join(host);
        let binary = sidecar_binary.unwrap_or(&self.binary).to_owned();
        let w = WatchdogProcess::start(
            &watchdog,
            &binary,
            &run_dir,
            cfg,
            ip,
            watchdog_extra,
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("starting the watchdog of {host}: {e}"));
        self.watchdogs.insert(host.to_owned(), w);
        &self.watchdogs[host]
    }

    /// The watchdog of `host`.
    pub fn watched(&self, host: &str) -> &WatchdogProcess {
        &self.watchdogs[host]
    }

    /// Where an SDK on `host` reaches its sidecar (a plain one, or one under a watchdog).
    pub fn outbound(&self, host: &str) -> Dial {
        match self.sidecars.get(host) {
            Some(sc) => sc.outbound(),
            None => self
                .watched(host)
                .outbound()
                .expect("the sidecar's address file"),
        }
    }

    /// The admin address of `host`'s sidecar now.
    pub fn admin_addr(&self, host: &str) -> SocketAddr {
        match self.sidecars.get(host) {
            Some(sc) => sc.addrs.admin,
            None => {
                self.watched(host)
                    .sidecar()
                    .expect("the sidecar's address file")
                    .admin
            }
        }
    }

    /// Sends `signal` to `host`'s sidecar.
    pub fn signal(&self, host: &str, signal: nix::sys::signal::Signal) {
        self.sidecar(host)
            .child
            .signal(signal)
            .unwrap_or_else(|e| panic!("signal {signal} to {host}: {e}"));
    }

    /// Sends `signal` to `host`'s sidecar and waits (up to 30 s) until it has exited.
    pub async fn stop_with(&mut self, host: &str, signal: nix::sys::signal::Signal) {
        self.signal(host, signal);
        let sc = self.sidecars.get_mut(host).expect("known host");
        let exit = sc
            .child
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("wait");
        assert!(exit.is_some(), "{host} still running 30 s after {signal}");
    }

    /// Starts `host`'s sidecar again with its config; waits until it is ready.
    pub async fn restart(&mut self, host: &str) {
        let (run_dir, config) = {
            let sc = self.sidecar(host);
            (sc.run_dir.clone(), sc.config.clone())
        };
        let sc =
            SidecarProcess::start_with(&self.binary, &run_dir, &config, Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("restarting sidecar {host}: {e}"));
        self.sidecars.insert(host.to_owned(), sc);
    }

    /// A plain client of `host`'s admin API.
    pub fn admin(&self, host: &str) -> Client {
        Client::builder(Dial::Tcp(self.admin_addr(host)))
            .control(false)
            .build()
    }

    /// An SDK client on `host` speaking `protocol` to its sidecar's Unix socket.
    pub fn client(&self, host: &str, protocol: AppProtocol) -> Client {
        Client::builder(self.outbound(host))
            .protocol(protocol)
            .app("test")
            .timeout(Duration::from_secs(30))
            .build()
    }

    /// An SDK client on `host` using the sidecar's loopback TCP listener.
    pub fn tcp_client(&self, host: &str, protocol: AppProtocol) -> Client {
        let addr = self
            .sidecar(host)
            .addrs
            .outbound_tcp
            .expect("outbound TCP listener");
        Client::builder(Dial::Tcp(addr))
            .protocol(protocol)
            .app("test")
            .timeout(Duration::from_secs(30))
            .build()
    }

    /// Waits until `host`'s sidecar routes `service` to `n` endpoints (registrations travel
    /// through the registry), by probing its `/state`.
    pub async fn wait_endpoints(&self, host: &str, service: &str, n: usize) {
        let admin = self.admin_addr(host);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let client = Client::builder(Dial::Tcp(admin)).control(false).build();
        // Asking once makes the catalog watch the service.
        let svc = ServiceName::new(service).expect("service name");
        let sdk = self.client(host, AppProtocol::Http1);
        loop {
            let state = admin_get_json(&client, "/state").await;
            let have = state["services"][service]["endpoints"]
                .as_array()
                .map_or(0, Vec::len);
            if have == n {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(self.root().join(host).join("sidecar.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "{host} sees {have} endpoints of {service}, wanted {n}: {state}\n{host}'s log (last lines first):\n{}",
                    tail.join("\n")
                );
            }
            // Touch the service through the outbound side so the catalog watches it.
            let _ = sdk
                .send(
                    &svc,
                    http::Request::get("/")
                        .body(detour_thin_sdk::body::empty())
                        .expect("request"),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The common test topology: a caller host `h1` (127.0.0.1, config `h1_extra` appended) and a
/// provider host `h2` (127.0.0.2) whose demo provider `h2-hello` offers `hello`; returns once
/// `h1` routes `hello`.
pub async fn caller_and_provider(h1_extra: &str) -> (Mesh, DemoProvider) {
    let provider = DemoProvider::start("127.0.0.2:0".parse().expect("addr"), "h2-hello")
        .await
        .expect("demo provider starts");
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start_with("h1", "127.0.0.1", &[], h1_extra).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    (mesh, provider)
}

/// An SDK client on `host` whose sidecar is ready and whose endpoint snapshot of `service` is in
/// memory and in `snapshot_file` (so it can fall back to direct calls).
pub async fn ready_sdk(mesh: &Mesh, host: &str, service: &str, snapshot_file: &Path) -> Client {
    let svc = ServiceName::new(service).expect("service name");
    let client = Client::builder(mesh.outbound(host))
        .app("test")
        .timeout(Duration::from_secs(20))
        .snapshot_file(snapshot_file)
        .build();
    assert!(
        client.wait_ready(Duration::from_secs(10)).await,
        "{host}'s sidecar never reported ready"
    );
    let req = http::Request::get("/")
        .body(detour_thin_sdk::body::empty())
        .expect("request");
    let resp = client.send(&svc, req).await.expect("first call");
    assert_eq!(resp.status(), 200);
    wait_until(
        &format!("an endpoint snapshot of {service}"),
        Duration::from_secs(5),
        || {
            client
                .snapshot(&svc)
                .is_some_and(|s| !s.endpoints.is_empty())
                && snapshot_file.exists()
        },
    )
    .await;
    client
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new()
    }
}

/// GETs `path` from an admin API through `client` (built on the admin address) as JSON.
pub async fn admin_get_json(client: &Client, path: &str) -> serde_json::Value {
    let (status, body) = admin_get(client, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// Holds the one lock of the load timelines: a test holding it runs no other test holding it
/// beside it (they measure losses and times on two cores shared with the processes they start).
/// A test that panics lets it go.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Waits until `cond` holds, checking every 10 ms; panics naming `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fetches a value with `get` every 100 ms until `done` holds (at most `within`); returns it, or
/// panics naming `what` and the last value.
pub async fn wait_value<T, F, Fut>(
    what: &str,
    within: Duration,
    get: F,
    done: impl Fn(&T) -> bool,
) -> T
where
    T: std::fmt::Display,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let v = get().await;
        if done(&v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}; last: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of the samples of metric `name` whose labels contain `label` (`""`: all), from
/// `/metrics` of the admin API behind `client`; `None` when there is no such sample.
pub async fn metric(client: &Client, name: &str, label: &str) -> Option<f64> {
    let (_, text) = admin_get(client, "/metrics").await;
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Waits (up to 10 s) until the sum of metric `name`'s series with `label` reaches `at_least`.
pub async fn wait_metric(client: &Client, name: &str, label: &str, at_least: f64) -> f64 {
    wait_value(
        &format!("{name}{{{label}}} >= {at_least}"),
        Duration::from_secs(10),
        || async { metric(client, name, label).await.unwrap_or(0.0) },
        |v| *v >= at_least,
    )
    .await
}

/// GETs `path` from the admin API behind `client`: status and body text.
pub async fn admin_get(client: &Client, path: &str) -> (u16, String) {
    // The SDK sends the service name as `Host`; the admin API takes loopback names only.
    let svc = ServiceName::new("localhost").expect("name");
    let req = http::Request::get(path)
        .body(detour_thin_sdk::body::empty())
        .expect("request");
    let resp = client.send(&svc, req).await.expect("admin API answers");
    let status = resp.status().as_u16();
    (status, body_text(resp).await)
}

/// Reads a response body as text.
pub async fn body_text(resp: http::Response<detour_thin_sdk::BoxBody>) -> String {
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Peak resident memory (VmHWM) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    read_status_kib(pid, "VmHWM:")
}

/// Current resident memory (VmRSS) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    read_status_kib(pid, "VmRSS:")
}

fn read_status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The directory registry spec of `mesh` (for `detourctl --registry`).
pub fn dir_registry(mesh: &Mesh) -> String {
    format!("dir:{}/registry", mesh.root().display())
}

/// `detourctl ARGS --registry REGISTRY`: exit status, stdout, stderr.
pub async fn detourctl(registry: &str, args: &[&str]) -> (i32, String, String) {
    let bin = find_binary("detourctl", "DETOURCTL_BIN").unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::process::Command::new(bin)
        .args(args)
        .args(["--registry", registry, "--timeout-ms", "1000"])
        .env_remove("DETOUR_REGISTRY")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run detourctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
