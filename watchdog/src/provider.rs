//! A small demo provider (HTTP/1.1 and HTTP/2 on one port), used by `detourctl demo` and the
//! integration tests.
//!
//! | request | answer |
//! |---|---|
//! | `GET /…` | `hello from {instance}` |
//! | `POST /…` | the number of body bytes received (the body is streamed, never held) |
//! | `…?ms=N` | waits N ms before answering |
//! | `/status/NNN` | answers with status NNN |
//! | `…?forge=REASON` | adds `x-detour-error: REASON` to the answer (as a provider forging the mesh's header would) |
//! | `GET /healthz` | 200 `ok`, or 503 after [`DemoProvider::set_healthy`]`(false)`; not counted |
//!
//! Every answer carries `x-served-by: {instance}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use detour_core::BoxBody;
use detour_core::body::full;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The header naming the instance that answered.
pub const SERVED_BY: &str = "x-served-by";

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
    /// Binds `addr` (port 0 for any) and serves as `instance`.
    pub async fn start(addr: SocketAddr, instance: &str) -> std::io::Result<DemoProvider> {
        // A deep accept queue, as a real server has: bursts of connects (a caller's retries
        // when its sidecar hangs) must not be dropped by the kernel.
        let listener = detour_core::listen_tcp(addr)?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts::default());
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

    /// Requests whose head arrived so far (answered or not yet).
    pub fn received(&self) -> u64 {
        self.counts.received.load(Ordering::Relaxed)
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
        let (status, text) = if counts.unhealthy.load(Ordering::Relaxed) {
            (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
        } else {
            (StatusCode::OK, "ok\n")
        };
        let mut resp = Response::new(full(text));
        *resp.status_mut() = status;
        resp.headers_mut().insert(SERVED_BY, instance);
        return resp;
    }
    counts.received.fetch_add(1, Ordering::Relaxed);
    let wait_ms = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse::<u64>().ok());
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
    let mut received = 0u64;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    received += d.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    if let Some(ms) = wait_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    counts.served.fetch_add(1, Ordering::Relaxed);
    let text = if is_post {
        format!("{received}\n")
    } else {
        format!("hello from {}\n", instance.to_str().unwrap_or("?"))
    };
    let mut resp = Response::new(full(Bytes::from(text)));
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
