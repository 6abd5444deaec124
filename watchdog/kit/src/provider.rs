//! A small demo provider (HTTP/1.1 and HTTP/2 on one port), used by `detourctl demo` and the
//! integration tests.
//!
//! | request | answer |
//! |---|---|
//! | `GET /…` | `hello from {instance}` |
//! | `POST /…` | the number of body bytes received (the body is streamed, never held) |
//! | `…?ms=N` | waits N ms before answering (beside [`DemoProvider::set_delay_ms`], `detourctl provider --delay-ms`) |
//! | `GET …?chunks=N&every_ms=M` | a long stream: N lines (`1\n` … `N\n`), one every M ms (N ≤ 10,000, M ≤ 10,000) |
//! | `content-type: application/grpc…` | a gRPC answer: the request's message echoed (at most 1 MiB, else `grpc-status: 8`), `grpc-status: 0` in the trailers |
//! | `/status/NNN` | answers with status NNN |
//! | `…?forge=REASON` | adds `x-detour-error: REASON` to the answer (as a provider forging the mesh's header would) |
//! | `GET /healthz` | 200 `ok`, or 503 after [`DemoProvider::set_healthy`]`(false)`; not counted |
//! | `idempotency-key: K` on a POST, PUT or gRPC call | carried out once per key ([`Dedupe`]): a POST's answer is `{bytes} carried out by {instance}`; a repeat of the key gets the first answer with `idempotent-replayed: true`; a bad key gets 400 |
//!
//! Every answer carries `x-served-by: {instance}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use detour_core::BoxBody;
use detour_core::body::{boxed, full};
use detour_thin_sdk::dedupe::{Dedupe, IdempotencyKey};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// The header naming the instance that answered.
pub const SERVED_BY: &str = "x-served-by";
/// On the answer to a repeated idempotency key: the key's first answer, not carried out again.
pub const REPLAYED: &str = "idempotent-replayed";
/// The gRPC status header (in the trailers, or in the head of a trailers-only answer).
pub const GRPC_STATUS: &str = "grpc-status";
/// The largest gRPC request echoed.
const MAX_GRPC_BYTES: usize = 1 << 20;
/// The most chunks, and the longest time between two, of a long stream.
const MAX_STREAM_CHUNKS: u64 = 10_000;
const MAX_STREAM_EVERY_MS: u64 = 10_000;

/// A running demo provider; stops when dropped.
#[derive(Debug)]
pub struct DemoProvider {
    addr: SocketAddr,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Drop for DemoProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DemoProvider {
    /// Binds `addr` (port 0 for any) and serves as `instance`, keeping the records of
    /// idempotency keys in its memory.
    pub async fn start(addr: SocketAddr, instance: &str) -> std::io::Result<DemoProvider> {
        DemoProvider::start_with(addr, instance, Dedupe::default()).await
    }

    /// As [`DemoProvider::start`], with the records of idempotency keys in `dedupe` (shared
    /// with other instances when its store is).
    pub async fn start_with(
        addr: SocketAddr,
        instance: &str,
        dedupe: Dedupe,
    ) -> std::io::Result<DemoProvider> {
        // A deep accept queue, as a real server has: bursts of connects (a caller's retries
        // when its sidecar hangs) must not be dropped by the kernel.
        let listener = detour_core::listen_tcp(addr)?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts {
            dedupe,
            ..Counts::default()
        });
        let instance = HeaderValue::from_str(instance)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let task = tokio::spawn(serve(listener, instance, counts.clone()));
        Ok(DemoProvider { addr, counts, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.counts.served.load(Ordering::Relaxed)
    }

    /// Keyed requests answered with their key's first answer (not carried out again).
    pub fn replayed(&self) -> u64 {
        self.counts.replayed.load(Ordering::Relaxed)
    }

    /// Keyed requests carried out (their work done and their record made).
    pub fn carried_out(&self) -> u64 {
        self.counts.carried_out.load(Ordering::Relaxed)
    }

    /// Requests whose head arrived so far (answered or not yet).
    pub fn received(&self) -> u64 {
        self.counts.received.load(Ordering::Relaxed)
    }

    /// Waits `ms` before every answer from now on (a slow provider), beside a request's own
    /// `?ms=`.
    pub fn set_delay_ms(&self, ms: u64) {
        self.counts
            .delay_ms
            .store(ms.min(60_000), Ordering::Relaxed);
    }

    /// What `GET /healthz` answers from now on (200 or 503); other requests are served as
    /// before.
    pub fn set_healthy(&self, healthy: bool) {
        self.counts.unhealthy.store(!healthy, Ordering::Relaxed);
    }
}

/// Request counters and the health flag.
#[derive(Debug, Default)]
struct Counts {
    received: AtomicU64,
    served: AtomicU64,
    unhealthy: AtomicBool,
    /// Waited before every answer (ms).
    delay_ms: AtomicU64,
    /// Keyed requests answered from their key's record.
    replayed: AtomicU64,
    /// Keyed requests carried out.
    carried_out: AtomicU64,
    /// Where keyed requests are carried out once.
    dedupe: Dedupe,
}

async fn serve(listener: TcpListener, instance: HeaderValue, served: Arc<Counts>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let instance = instance.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let instance = instance.clone();
                let served = served.clone();
                async move { Ok::<_, Infallible>(answer(req, instance, served).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    instance: HeaderValue,
    counts: Arc<Counts>,
) -> Response<BoxBody> {
    if req.uri().path() == "/healthz" {
        return health_answer(&counts, instance);
    }
    counts.received.fetch_add(1, Ordering::Relaxed);
    let query = |key: &str| {
        req.uri()
            .query()
            .and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            })
            .and_then(|v| v.parse::<u64>().ok())
    };
    let wait_ms = query("ms");
    let chunks = query("chunks").map(|n| n.min(MAX_STREAM_CHUNKS));
    let every_ms = query("every_ms").unwrap_or(0).min(MAX_STREAM_EVERY_MS);
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let forged = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("forge=")))
        .and_then(|v| HeaderValue::from_str(v).ok());
    let forced = req
        .uri()
        .path()
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let is_post = req.method() == Method::POST || req.method() == Method::PUT;
    let key = match IdempotencyKey::of(req.headers()) {
        Ok(key) => key.filter(|_| grpc || is_post),
        Err(e) => {
            counts.served.fetch_add(1, Ordering::Relaxed);
            let mut resp = Response::new(full(Bytes::from(format!("{e}\n"))));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
    };
    let (received, kept) = read_body(req.into_body(), grpc).await;
    let delay = counts.delay_ms.load(Ordering::Relaxed) + wait_ms.unwrap_or(0);
    if let Some(key) = key {
        let resp = keyed_answer(&counts, &key, grpc, (received, kept), delay, &instance).await;
        return finish(resp, forced, instance, forged);
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    counts.served.fetch_add(1, Ordering::Relaxed);
    let resp = if grpc {
        grpc_answer(kept, received)
    } else if let Some(n) = chunks.filter(|_| !is_post) {
        stream_answer(n, Duration::from_millis(every_ms))
    } else {
        plain_answer(is_post, received, &instance)
    };
    finish(resp, forced, instance, forged)
}

/// `resp` with the status a request forced and the headers every answer carries.
fn finish(
    mut resp: Response<BoxBody>,
    forced: Option<StatusCode>,
    instance: HeaderValue,
    forged: Option<HeaderValue>,
) -> Response<BoxBody> {
    if let Some(s) = forced {
        *resp.status_mut() = s;
    }
    resp.headers_mut().insert(SERVED_BY, instance);
    if let Some(v) = forged {
        resp.headers_mut()
            .insert(detour_core::failure::ERROR_HEADER, v);
    }
    resp
}

/// The answer to a keyed request: carried out (after `delay_ms`) the first time its key is
/// seen, its record replayed after that. A gRPC call's record is the message it echoed; a
/// call over the size limit stores nothing.
async fn keyed_answer(
    counts: &Counts,
    key: &IdempotencyKey,
    grpc: bool,
    (received, kept): (u64, Vec<u8>),
    delay_ms: u64,
    instance: &HeaderValue,
) -> Response<BoxBody> {
    let ok = !grpc || received as usize == kept.len();
    let run = || async move {
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if !ok {
            return Err("the gRPC message is over the limit");
        }
        counts.carried_out.fetch_add(1, Ordering::Relaxed);
        Ok(if grpc {
            Bytes::from(kept)
        } else {
            let by = instance.to_str().unwrap_or("?");
            Bytes::from(format!("{received} carried out by {by}\n"))
        })
    };
    let once = counts.dedupe.once(key, run).await;
    counts.served.fetch_add(1, Ordering::Relaxed);
    match once {
        Ok(once) => {
            let mut resp = if grpc {
                grpc_answer(once.record.to_vec(), once.record.len() as u64)
            } else {
                Response::new(full(once.record))
            };
            if once.replayed {
                counts.replayed.fetch_add(1, Ordering::Relaxed);
                resp.headers_mut()
                    .insert(REPLAYED, HeaderValue::from_static("true"));
            }
            resp
        }
        Err(_) if grpc => grpc_answer(Vec::new(), 1),
        Err(e) => {
            let mut resp = Response::new(full(Bytes::from(format!("{e}\n"))));
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        }
    }
}

/// The answer to `/healthz`: 200, or 503 while the provider is told to be unhealthy.
fn health_answer(counts: &Counts, instance: HeaderValue) -> Response<BoxBody> {
    let (status, text) = if counts.unhealthy.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
    } else {
        (StatusCode::OK, "ok\n")
    };
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(SERVED_BY, instance);
    resp
}

/// Reads a request body to its end (or its first error): how many bytes came, and, for a gRPC
/// call (`grpc`), the bytes themselves up to one message of the largest size echoed.
async fn read_body(mut body: Incoming, grpc: bool) -> (u64, Vec<u8>) {
    let mut received = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(f) = frame else { break };
        if let Some(d) = f.data_ref() {
            received += d.len() as u64;
            if grpc && kept.len() + d.len() <= MAX_GRPC_BYTES + 5 {
                kept.extend_from_slice(d);
            }
        }
    }
    (received, kept)
}

fn plain_answer(is_post: bool, received: u64, instance: &HeaderValue) -> Response<BoxBody> {
    let text = if is_post {
        format!("{received}\n")
    } else {
        format!("hello from {}\n", instance.to_str().unwrap_or("?"))
    };
    Response::new(full(Bytes::from(text)))
}

/// The message of a gRPC request echoed, or `grpc-status: 8` when it was over the limit.
fn grpc_answer(kept: Vec<u8>, received: u64) -> Response<BoxBody> {
    let ok = received as usize == kept.len();
    let mut trailers = http::HeaderMap::new();
    let (data, status) = if ok {
        (Bytes::from(kept), "0")
    } else {
        (Bytes::new(), "8")
    };
    trailers.insert(GRPC_STATUS, HeaderValue::from_static(status));
    let mut frames = Vec::new();
    if !data.is_empty() {
        frames.push(Ok::<_, Infallible>(Frame::data(data)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut resp = Response::new(boxed(StreamBody::new(tokio_stream::iter(frames))));
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    // Declared, so that an HTTP/1.1 hop (a PA to a provider registered as http1) carries it.
    headers.insert(http::header::TRAILER, HeaderValue::from_static(GRPC_STATUS));
    resp
}

/// `n` lines, one every `every`: a long stream that ends when the caller goes away.
fn stream_answer(n: u64, every: Duration) -> Response<BoxBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        for i in 1..=n {
            if i > 1 {
                tokio::time::sleep(every).await;
            }
            if tx
                .send(Ok(Frame::data(Bytes::from(format!("{i}\n")))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Response::new(boxed(StreamBody::new(ReceiverStream::new(rx))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use detour_thin_sdk::dedupe::DirStore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One HTTP/1.1 exchange on a new connection: the answer as text.
    async fn exchange(addr: SocketAddr, head: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    fn post(key: &str) -> String {
        format!(
            "POST / HTTP/1.1\r\nhost: x\r\nidempotency-key: {key}\r\ncontent-length: 3\r\n\
             connection: close\r\n\r\nabc"
        )
    }

    #[tokio::test]
    async fn instances_sharing_a_dedupe_directory_carry_a_key_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let start = |name: &'static str| {
            let store = DirStore::open(dir.path(), hour).unwrap();
            DemoProvider::start_with("127.0.0.1:0".parse().unwrap(), name, Dedupe::new(store))
        };
        let (a, b) = (start("a").await.unwrap(), start("b").await.unwrap());
        let first = exchange(a.addr(), &post("order-1")).await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        assert!(first.ends_with("3 carried out by a\n"), "{first}");
        assert!(!first.contains(REPLAYED), "{first}");
        let again = exchange(b.addr(), &post("order-1")).await;
        assert!(again.ends_with("3 carried out by a\n"), "{again}");
        assert!(again.contains("idempotent-replayed: true"), "{again}");
        assert!(again.contains("x-served-by: b"), "{again}");
        assert_eq!((a.carried_out(), b.carried_out(), b.replayed()), (1, 0, 1));
        // Another key runs; a bad key is refused, not carried out unprotected.
        let other = exchange(b.addr(), &post("order-2")).await;
        assert!(other.ends_with("3 carried out by b\n"), "{other}");
        let bad = exchange(b.addr(), &post("two\tparts")).await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        assert_eq!(b.carried_out(), 1);
    }
}
