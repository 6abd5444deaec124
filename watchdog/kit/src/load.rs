//! The load generator behind `detourctl load`: a fixed request rate through the SDK (or
//! straight to one provider), open loop — a request that could not start on time is sent late
//! and its latency counted from when it was due, never skipped — with every request counted by
//! outcome. Lateness within the timer's own (up to 5 ms) is not counted as latency.
//!
//! Besides GET, POST and PUT it sends gRPC unary calls (HTTP/2, `application/grpc`, through the
//! SDK's [`detour_thin_sdk::GrpcChannel`]; a call fails unless its `grpc-status` is 0) and long
//! streams (a GET answered with [`STREAM_CHUNKS`] chunks, one every [`STREAM_EVERY_MS`] ms; it
//! fails when cut or short). `SOAK` mixes all of them.

use detour_proto::sync::Mutex;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use detour_core::body::{empty, full};
use detour_core::transport::set_target;
use detour_core::{BoxBody, Dial, Pool, PoolOptions};
use detour_proto::{AppProtocol, ServiceName};
use detour_thin_sdk::{Client, PathTaken, mesh_error, path_taken};
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::load_stats::Outcome;
pub use crate::load_stats::{
    FailedRequest, MAX_LISTED_FAILURES, MAX_LISTED_SLOW, SlowRequest, Stats,
};
use crate::provider::{GRPC_STATUS, REPLAYED, SERVED_BY};

/// The chunks of a long stream.
pub const STREAM_CHUNKS: u32 = 20;
/// The time between two chunks of a long stream: a stream lasts about 2 s.
pub const STREAM_EVERY_MS: u32 = 100;
/// The gRPC method the generator calls (the demo provider answers any).
pub const GRPC_PATH: &str = "/detour.demo.Echo/Say";

/// Lateness below this is the timer's own, not back-pressure: tokio ends a sleep at the first
/// millisecond tick after its deadline and parks its driver in whole milliseconds, so on an
/// idle machine a sleep ends up to about 2 ms late, and how often over 2 ms depends on the
/// schedule's phase against the ticks (`examples/timer_lag.rs`; in one run, from 0 to 144 of
/// 1,500 sleeps). With a 2-ms slack, a generator whose phase was unlucky timed several percent
/// of its requests from when they were due, 2 ms of its own timer included: enough to hold its
/// p99 near 2.5 ms for as long as it ran.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// Which methods to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodMix {
    /// Always this method.
    One(MethodKind),
    /// GET and POST alternately.
    Mix,
    /// Of every 20 requests: 1 long stream, 2 gRPC calls, the others GET and POST alternately.
    Soak,
}

/// The methods the generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// GET.
    Get,
    /// POST with the configured body.
    Post,
    /// PUT with the configured body.
    Put,
    /// A gRPC unary call (POST over HTTP/2) with the configured body as its message.
    Grpc,
    /// A long stream: a GET answered over about 2 s.
    Stream,
}

impl MethodKind {
    /// Whether a failure of this kind is a lost idempotent request (GET, PUT). A long stream
    /// is not counted so: once its body has begun, nobody can send it again.
    pub fn idempotent(self) -> bool {
        matches!(self, MethodKind::Get | MethodKind::Put)
    }
}

impl MethodMix {
    /// The kind of the `i`-th request.
    pub fn kind(self, i: u64) -> MethodKind {
        match self {
            MethodMix::One(k) => k,
            MethodMix::Mix if i.is_multiple_of(2) => MethodKind::Get,
            MethodMix::Mix => MethodKind::Post,
            MethodMix::Soak => match i % 20 {
                19 => MethodKind::Stream,
                4 | 14 => MethodKind::Grpc,
                n if n.is_multiple_of(2) => MethodKind::Get,
                _ => MethodKind::Post,
            },
        }
    }
}

impl std::str::FromStr for MethodMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(MethodMix::One(MethodKind::Get)),
            "POST" => Ok(MethodMix::One(MethodKind::Post)),
            "PUT" => Ok(MethodMix::One(MethodKind::Put)),
            "GRPC" => Ok(MethodMix::One(MethodKind::Grpc)),
            "STREAM" => Ok(MethodMix::One(MethodKind::Stream)),
            "MIX" => Ok(MethodMix::Mix),
            "SOAK" => Ok(MethodMix::Soak),
            _ => Err(format!(
                "{s:?}: expected GET, POST, PUT, GRPC, STREAM, MIX or SOAK"
            )),
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Through the SDK to the local sidecar.
    Sdk(Client),
    /// Straight to one provider.
    Direct {
        /// The provider's address.
        dial: Dial,
        /// Its protocol.
        protocol: AppProtocol,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The service called.
    pub service: ServiceName,
    /// Requests per second.
    pub rate: u32,
    /// How long to send.
    pub duration: Duration,
    /// Methods.
    pub methods: MethodMix,
    /// Body size of POST/PUT requests.
    pub body_bytes: usize,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Request path and query.
    pub path: String,
    /// Time allowed per request (head and body).
    pub timeout: Duration,
    /// List every answered request slower than this, one by one (`None`: list none).
    pub slow: Option<Duration>,
    /// When set, every POST, PUT and gRPC call carries `idempotency-key: {keys}-{n}` (`n` the
    /// request's number): its provider carries each out once, and the mesh may send it again
    /// when its outcome is unknown. Its failure then counts as an idempotent one.
    pub keys: Option<String>,
}

/// Runs `spec` against `target`; `tick` is called about once a second with that second's
/// counts. Stops early when `stop` resolves.
pub async fn run(
    spec: &LoadSpec,
    target: &Target,
    mut tick: impl FnMut(u64, &Stats),
    stop: impl std::future::Future<Output = ()>,
) -> Stats {
    let total = Arc::new(Mutex::new(Stats::default()));
    let window = Arc::new(Mutex::new(Stats::default()));
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let body = Bytes::from(vec![b'x'; spec.body_bytes]);
    let pool = Pool::new(PoolOptions::default());
    let interval = Duration::from_secs_f64(1.0 / f64::from(spec.rate.max(1)));
    let start = Instant::now();
    let end = start + spec.duration;
    let mut next_tick = start + Duration::from_secs(1);
    let mut second = 0u64;
    tokio::pin!(stop);
    let mut i: u64 = 0;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end {
            break;
        }
        while next_tick <= due {
            tokio::select! {
                _ = tokio::time::sleep_until(next_tick) => {}
                _ = &mut stop => return finish(total, sem, spec).await,
            }
            second += 1;
            let w = std::mem::take(&mut *lock(&window));
            tick(second, &w);
            next_tick += Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = &mut stop => return finish(total, sem, spec).await,
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let kind = spec.methods.kind(i);
        let key = spec
            .keys
            .as_ref()
            .filter(|_| matches!(kind, MethodKind::Post | MethodKind::Put | MethodKind::Grpc))
            .map(|prefix| format!("{prefix}-{i}"));
        let idempotent = kind.idempotent() || key.is_some();
        let req = build(kind, &spec.path, &body, key);
        let (target, service, pool) = (target.clone(), spec.service.clone(), pool.clone());
        let (total, window, timeout, slow) =
            (total.clone(), window.clone(), spec.timeout, spec.slow);
        // Open loop without timer noise: a request that starts within TIMER_SLACK of its due
        // time is timed from its start (tokio's timer has millisecond granularity); one that
        // starts later was held back (by the concurrency cap or a stalled loop) and is timed
        // from when it was due.
        let started = Instant::now();
        let lag = started.saturating_duration_since(due);
        let late = lag > TIMER_SLACK;
        let origin = if late { due } else { started };
        lock(&total).record_start(lag, late);
        lock(&window).record_start(lag, late);
        tokio::spawn(async move {
            let outcome = match req {
                Ok(req) => {
                    let sent = send(&target, &pool, &service, kind, req);
                    match tokio::time::timeout(timeout, sent).await {
                        Ok(o) => o,
                        Err(_) => Outcome::failed("timeout"),
                    }
                }
                Err(e) => Outcome::failed(format!("invalid_request:{e}")),
            };
            let latency = origin.elapsed();
            record(&total, &window, &outcome, (kind, idempotent), latency);
            list_slow(&total, slow, &outcome, kind, latency);
            drop(permit);
        });
        i += 1;
    }
    finish(total, sem, spec).await
}

/// Counts one request's outcome in the totals and the current second's window; a failure is
/// also listed (up to [`MAX_LISTED_FAILURES`]).
fn record(
    total: &Mutex<Stats>,
    window: &Mutex<Stats>,
    outcome: &Outcome,
    (kind, idempotent): (MethodKind, bool),
    latency: Duration,
) {
    if let Some(failure) = &outcome.failure {
        let mut t = lock(total);
        if t.failed_requests.len() < MAX_LISTED_FAILURES {
            let ended = detour_registry::now_unix_ms();
            t.failed_requests.push(FailedRequest {
                due_unix_ms: ended.saturating_sub(latency.as_millis() as u64),
                ended_unix_ms: ended,
                method: kind,
                kind: failure.clone(),
            });
        }
    }
    lock(total).record(outcome, kind, idempotent, latency);
    lock(window).record(outcome, kind, idempotent, latency);
}

/// Lists one answered request that took longer than `slow` (long streams, which take seconds by
/// design, apart), up to [`MAX_LISTED_SLOW`].
fn list_slow(
    total: &Mutex<Stats>,
    slow: Option<Duration>,
    outcome: &Outcome,
    kind: MethodKind,
    latency: Duration,
) {
    let over = slow.is_some_and(|s| latency > s);
    if !over || outcome.failure.is_some() || kind == MethodKind::Stream {
        return;
    }
    let mut t = lock(total);
    if t.slow_requests.len() < MAX_LISTED_SLOW {
        let ended = detour_registry::now_unix_ms();
        t.slow_requests.push(SlowRequest {
            due_unix_ms: ended.saturating_sub(latency.as_millis() as u64),
            latency_us: latency.as_micros() as u64,
            method: kind,
            path: outcome.path.map_or("-", PathTaken::as_str),
        });
    }
}

async fn finish(total: Arc<Mutex<Stats>>, sem: Arc<Semaphore>, spec: &LoadSpec) -> Stats {
    // Wait for the requests still in flight (each is bounded by the request timeout).
    let all = spec.concurrency.max(1) as u32;
    let _ =
        tokio::time::timeout(spec.timeout + Duration::from_secs(1), sem.acquire_many(all)).await;
    lock(&total).clone()
}

fn lock(m: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    m.lock()
}

/// The request of `kind`, carrying `key` as its idempotency key when given.
fn build(
    kind: MethodKind,
    path: &str,
    body: &Bytes,
    key: Option<String>,
) -> Result<Request<BoxBody>, http::Error> {
    let mut req = build_unkeyed(kind, path, body)?;
    if let Some(key) = key {
        let value = HeaderValue::try_from(key)?;
        req.headers_mut()
            .insert(detour_thin_sdk::dedupe::IDEMPOTENCY_KEY, value);
    }
    Ok(req)
}

fn build_unkeyed(
    kind: MethodKind,
    path: &str,
    body: &Bytes,
) -> Result<Request<BoxBody>, http::Error> {
    let (method, uri, body) = match kind {
        MethodKind::Get => (Method::GET, path.to_owned(), empty()),
        MethodKind::Post => (Method::POST, path.to_owned(), full(body.clone())),
        MethodKind::Put => (Method::PUT, path.to_owned(), full(body.clone())),
        MethodKind::Stream => {
            let sep = if path.contains('?') { '&' } else { '?' };
            let uri = format!("{path}{sep}chunks={STREAM_CHUNKS}&every_ms={STREAM_EVERY_MS}");
            (Method::GET, uri, empty())
        }
        MethodKind::Grpc => {
            let mut framed = Vec::with_capacity(body.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
            framed.extend_from_slice(body);
            let req = Request::builder()
                .method(Method::POST)
                .uri(GRPC_PATH)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers")
                .body(full(framed))?;
            return Ok(req);
        }
    };
    Request::builder().method(method).uri(uri).body(body)
}

async fn send(
    target: &Target,
    pool: &Arc<Pool>,
    service: &ServiceName,
    kind: MethodKind,
    req: Request<BoxBody>,
) -> Outcome {
    let resp = exchange(target, pool, service, kind, req).await;
    let resp = match resp {
        Err(failure) => return Outcome::failed(failure),
        Ok(resp) => resp,
    };
    let served_by = resp
        .headers()
        .get(SERVED_BY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let replayed = resp.headers().get(REPLAYED).is_some_and(|v| v == "true");
    let path = match target {
        Target::Sdk(_) => path_taken(&resp),
        Target::Direct { .. } => Some(PathTaken::Direct),
    };
    let mesh = match target {
        Target::Sdk(_) => mesh_error(&resp).map(|k| format!("mesh:{k}")),
        Target::Direct { .. } => None,
    };
    let status = resp.status();
    // A gRPC answer without a message carries its status in the head (trailers-only).
    let head_grpc_status = resp.headers().get(GRPC_STATUS).cloned();
    let body = resp.into_body().collect().await;
    let failure = if let Some(m) = mesh {
        Some(m)
    } else if status.is_client_error() || status.is_server_error() {
        Some(format!("http_{}", status.as_u16()))
    } else {
        match (kind, body) {
            (MethodKind::Stream, Err(_)) => Some("stream_cut".into()),
            (_, Err(_)) => Some("body_error".into()),
            (MethodKind::Stream, Ok(c)) => {
                let lines = c.to_bytes().iter().filter(|b| **b == b'\n').count();
                (lines != STREAM_CHUNKS as usize).then(|| "stream_short".into())
            }
            (MethodKind::Grpc, Ok(c)) => {
                let trailer = c.trailers().and_then(|t| t.get(GRPC_STATUS)).cloned();
                grpc_failure(trailer.or(head_grpc_status).as_ref())
            }
            (_, Ok(_)) => None,
        }
    };
    Outcome {
        replayed: replayed && failure.is_none(),
        failure,
        served_by,
        path,
    }
}

/// Sends one request to `target`: its answer, or how it failed.
async fn exchange(
    target: &Target,
    pool: &Arc<Pool>,
    service: &ServiceName,
    kind: MethodKind,
    req: Request<BoxBody>,
) -> Result<Response<BoxBody>, String> {
    match target {
        Target::Sdk(client) if kind == MethodKind::Grpc => {
            let mut channel = client.grpc(service.clone());
            tower::Service::call(&mut channel, req.map(tonic::body::Body::new))
                .await
                .map_err(|e| match e.downcast_ref::<detour_thin_sdk::Error>() {
                    Some(e) => e.kind().to_owned(),
                    None => "grpc_transport".to_owned(),
                })
        }
        Target::Sdk(client) => client
            .send(service, req)
            .await
            .map_err(|e| e.kind().to_owned()),
        Target::Direct { dial, protocol } => {
            let protocol = if kind == MethodKind::Grpc {
                AppProtocol::Http2
            } else {
                *protocol
            };
            match set_target(service.as_str(), protocol, req) {
                Ok(req) => pool.send(dial, protocol, req).await.map_err(|f| {
                    if f.error.never_left() {
                        "connect".into()
                    } else {
                        "outcome_unknown".into()
                    }
                }),
                Err(e) => Err(format!("invalid_request:{e}")),
            }
        }
    }
}

/// How a gRPC call with this `grpc-status` failed; `None` for 0 (OK).
fn grpc_failure(status: Option<&HeaderValue>) -> Option<String> {
    match status.map(|v| v.to_str().unwrap_or("?")) {
        Some("0") => None,
        Some(code) => Some(format!("grpc_status_{code}")),
        None => Some("grpc_no_status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soak_mix_sends_every_kind() {
        let kinds: Vec<MethodKind> = (0..20).map(|i| MethodMix::Soak.kind(i)).collect();
        let n = |k| kinds.iter().filter(|x| **x == k).count();
        assert_eq!(n(MethodKind::Stream), 1);
        assert_eq!(n(MethodKind::Grpc), 2);
        assert_eq!(n(MethodKind::Get) + n(MethodKind::Post), 17);
        assert!(n(MethodKind::Post) >= 8);
        assert_eq!("soak".parse::<MethodMix>(), Ok(MethodMix::Soak));
        assert!("mix".parse::<MethodMix>().is_ok());
        assert!("PATCH".parse::<MethodMix>().is_err());
        assert!(!MethodKind::Stream.idempotent() && MethodKind::Put.idempotent());
    }

    #[test]
    fn requests_of_each_kind_are_shaped_for_the_demo_provider() {
        let body = Bytes::from_static(b"abc");
        let s = build(MethodKind::Stream, "/x?a=1", &body, None).expect("valid");
        assert_eq!(s.uri(), "/x?a=1&chunks=20&every_ms=100");
        let g = build(MethodKind::Grpc, "/", &body, None).expect("valid");
        assert_eq!(g.method(), Method::POST);
        assert_eq!(g.uri(), GRPC_PATH);
        assert_eq!(g.headers()[header::CONTENT_TYPE], "application/grpc");
        assert_eq!(grpc_failure(Some(&HeaderValue::from_static("0"))), None);
        assert_eq!(
            grpc_failure(Some(&HeaderValue::from_static("14"))).as_deref(),
            Some("grpc_status_14")
        );
        assert_eq!(grpc_failure(None).as_deref(), Some("grpc_no_status"));
    }

    #[test]
    fn only_answered_requests_over_the_threshold_are_listed_as_slow() {
        let total = Mutex::new(Stats::default());
        let ok = Outcome {
            path: Some(PathTaken::CaDirect),
            ..Outcome::default()
        };
        let ms = Duration::from_millis;
        let two = Some(ms(2));
        list_slow(&total, two, &ok, MethodKind::Get, ms(3));
        list_slow(&total, two, &ok, MethodKind::Post, ms(2));
        list_slow(
            &total,
            two,
            &Outcome::failed("timeout"),
            MethodKind::Get,
            ms(9),
        );
        list_slow(&total, two, &ok, MethodKind::Stream, ms(2000));
        list_slow(&total, None, &ok, MethodKind::Get, ms(9));
        let listed = lock(&total).slow_requests.clone();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(
            (listed[0].latency_us, listed[0].method),
            (3000, MethodKind::Get)
        );
        assert!(
            listed[0]
                .line()
                .ends_with("latency_us=3000 method=Get path=ca_direct"),
            "{}",
            listed[0].line()
        );
    }

    /// A provider that answers a stream with `body` (chunked) and then closes, cleanly or not.
    async fn one_answer(body: &'static str, finish: bool) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let mut out = String::from("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
            out.push_str(&format!("{:x}\r\n{body}\r\n", body.len()));
            if finish {
                out.push_str("0\r\n\r\n");
            }
            let _ = s.write_all(out.as_bytes()).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_cut_or_short_stream_fails() {
        let service = ServiceName::new("hello").expect("valid");
        let pool = Pool::new(PoolOptions::default());
        for (finish, want) in [(false, "stream_cut"), (true, "stream_short")] {
            let target = Target::Direct {
                dial: Dial::Tcp(one_answer("1\n2\n3\n", finish).await),
                protocol: AppProtocol::Http1,
            };
            let req = build(MethodKind::Stream, "/", &Bytes::new(), None).expect("valid");
            let out = send(&target, &pool, &service, MethodKind::Stream, req).await;
            assert_eq!(out.failure.as_deref(), Some(want));
        }
    }
}
