//! Accepting and serving connections on the proxy listeners: protocol detection, HTTP/1.1 or
//! HTTP/2 serving, and graceful close when the sidecar closes its listeners.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use detour_core::BoxBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

use crate::detect::{Detected, MAX_HEADERS, Prefixed, detect};
use crate::lifecycle::Lifecycle;

/// Something that answers proxied requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; mesh failures are answered, never returned.
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<BoxBody>> + Send;
}

/// What every proxy connection needs to know.
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// The request-head limit (first head checked before hyper sees it).
    pub max_header_bytes: usize,
    /// Time allowed for the first request head to arrive.
    pub head_timeout: Duration,
    /// This sidecar's name, for the `x-detour-proxy` header.
    pub proxy: String,
}

/// A listener of either kind.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener),
}

/// Accepts on `listener` until the sidecar stops accepting (a drain, or a hand-off to its
/// successor), serving each connection on its own task.
pub async fn accept_loop<H: Handler>(
    listener: Listener,
    name: &'static str,
    handler: Arc<H>,
    lifecycle: Arc<Lifecycle>,
    opts: Arc<ConnOptions>,
) {
    loop {
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = lifecycle.accepting_stopped() => break,
        };
        match accepted {
            Ok(Accepted::Tcp(s)) => {
                let _ = s.set_nodelay(true);
                spawn_conn(s, name, handler.clone(), lifecycle.clone(), opts.clone());
            }
            Ok(Accepted::Unix(s)) => {
                spawn_conn(s, name, handler.clone(), lifecycle.clone(), opts.clone());
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(listener = name, error = %e, "accept failed");
                metrics::counter!("detour_accept_errors_total", "listener" => name).increment(1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!(listener = name, "stopped accepting");
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn spawn_conn<S, H>(
    io: S,
    name: &'static str,
    handler: Arc<H>,
    lifecycle: Arc<Lifecycle>,
    opts: Arc<ConnOptions>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let guard = lifecycle.conn_guard();
    metrics::counter!("detour_connections_total", "listener" => name).increment(1);
    tokio::spawn(async move {
        if let Err(e) = serve_conn(io, handler, &lifecycle, &opts).await {
            tracing::debug!(listener = name, error = %e, "connection ended with an error");
        }
        drop(guard);
    });
}

/// Serves one connection until it closes; on drain, closes it gracefully (HTTP/1.1: after the
/// current response; HTTP/2: GOAWAY, then the open streams finish).
pub async fn serve_conn<S, H>(
    mut io: S,
    handler: Arc<H>,
    lifecycle: &Lifecycle,
    opts: &ConnOptions,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let mut buf = BytesMut::with_capacity(1024);
    let detected = detect(
        &mut io,
        &mut buf,
        opts.max_header_bytes,
        opts.head_timeout,
        &opts.proxy,
    )
    .await?;
    let io = TokioIo::new(Prefixed::new(buf, io));
    let svc = service_fn(move |req| {
        let h = handler.clone();
        async move { Ok::<_, Infallible>(h.handle(req).await) }
    });
    match detected {
        Detected::Http1 => {
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(opts.head_timeout)
                .max_buf_size((opts.max_header_bytes * 2).max(64 * 1024))
                .max_headers(MAX_HEADERS)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return Ok(r?),
                _ = lifecycle.closed() => conn.as_mut().graceful_shutdown(),
            }
            Ok(conn.await?)
        }
        Detected::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(16 << 20)
                .max_concurrent_streams(4096)
                .max_header_list_size((opts.max_header_bytes * 4) as u32)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => return Ok(r?),
                _ = lifecycle.closed() => conn.as_mut().graceful_shutdown(),
            }
            Ok(conn.await?)
        }
        Detected::Closed | Detected::Rejected(_) => Ok(()),
    }
}

/// The answer to `/detour/ping`: 200 while ready, 503 otherwise (starting, draining).
pub fn ping_response(lifecycle: &Lifecycle) -> Response<BoxBody> {
    let state = lifecycle.state();
    let mut resp = Response::new(detour_core::body::full(format!("{}\n", state.as_str())));
    if state != detour_proto::SidecarState::Ready {
        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    }
    resp
}
