//! Accepting and serving connections on the proxy listeners: protocol detection, HTTP/1.1 or
//! HTTP/2 serving, the `[limits]` (connections per listener, idle close, HTTP/2 streams and
//! keep-alive pings), and graceful close when the sidecar closes its listeners.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use bytes::BytesMut;
use detour_core::BoxBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::detect::{Detected, Prefixed, detect};
use crate::http::linger::Lingering;
use crate::process::lifecycle::Lifecycle;

/// Something that answers proxied requests.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request, which came on a connection `conn` describes; mesh failures are
    /// answered, never returned.
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<BoxBody>> + Send;
}

/// What a request's connection says of it: the verified identity of its caller (mutual TLS)
/// and the connection's share of the providers, when there are. Handed to the handler with
/// each request (two reference counts), not put in the request's extensions (which would
/// allocate a map and a box for each).
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    /// The sidecar at the other end, as its certificate proved.
    pub caller: Option<Caller>,
    /// The connection's share of the providers.
    pub share: Option<ConnShare>,
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
    /// Connections, idle time, HTTP/2 streams and pings.
    pub limits: crate::config::limits::Limits,
    /// Mutual TLS on this listener (the PA's, unless plaintext is configured).
    pub tls: Option<Arc<crate::tls::TlsState>>,
    /// Which connections get a TLS handshake (with `tls`).
    pub handshakes: Option<Arc<crate::tls::guard::HandshakeGuard>>,
    /// Whether each connection gets its share of the local providers
    /// (`limits.max_in_flight_per_connection`): on the inbound listener, whose requests go to
    /// them; the outbound ones send none there.
    pub provider_share: bool,
    /// Whether an HTTP/1.1 caller that shuts down its sending side after a request still gets
    /// the answer (RFC 9112, 9.6), rather than the request being dropped at once as one the
    /// caller gave up on. On the TCP listeners, which any HTTP client may use; not on the
    /// outbound Unix socket, the SDK's, which closes a connection only to abandon what is on
    /// it (an attempt it hedged, a call the app gave up on).
    pub half_close: bool,
}

/// How long an idle HTTP/2 connection closed by the idle timeout may take to finish its
/// GOAWAY exchange before it is dropped.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Requests in flight on one connection, and when the last one was answered.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        }
    }

    fn begin(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// How long the connection has had nothing in flight (zero while a request is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// One request in flight on a connection, until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
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
    let slots = Arc::new(Semaphore::new(opts.limits.max_connections));
    loop {
        // At the connection limit, new connections wait in the accept queue.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("detour_connection_limit_reached_total", "listener" => name)
                    .increment(1);
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = lifecycle.accepting_stopped() => break,
                }
            }
        };
        let accepted = tokio::select! {
            r = accept(&listener) => r,
            _ = lifecycle.accepting_stopped() => break,
        };
        match accepted {
            Ok(Accepted::Tcp(s, peer)) => {
                let handshake = match (&opts.tls, &opts.handshakes) {
                    (Some(_), Some(guard)) => match guard.admit(peer.ip(), Instant::now()) {
                        Ok(p) => Some((p, peer.ip())),
                        Err(why) => {
                            // Closed before any byte of TLS: no CPU spent on a stranger.
                            metrics::counter!("detour_tls_handshakes_refused_total", "reason" => why.as_str())
                                .increment(1);
                            continue;
                        }
                    },
                    _ => None,
                };
                let _ = s.set_nodelay(true);
                spawn_conn(
                    s,
                    name,
                    handler.clone(),
                    lifecycle.clone(),
                    opts.clone(),
                    (permit, handshake),
                );
            }
            Ok(Accepted::Unix(s)) => {
                spawn_conn(
                    s,
                    name,
                    handler.clone(),
                    lifecycle.clone(),
                    opts.clone(),
                    (permit, None),
                );
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
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    match listener {
        Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn spawn_conn<S, H>(
    io: S,
    name: &'static str,
    handler: Arc<H>,
    lifecycle: Arc<Lifecycle>,
    opts: Arc<ConnOptions>,
    (permit, handshake): (
        OwnedSemaphorePermit,
        Option<(OwnedSemaphorePermit, std::net::IpAddr)>,
    ),
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let guard = lifecycle.conn_guard();
    metrics::counter!("detour_connections_total", "listener" => name).increment(1);
    tokio::spawn(async move {
        let served = match &opts.tls {
            None => serve_conn(io, handler, &lifecycle, &opts, None).await,
            Some(tls) => {
                match crate::tls::offload::accept(tls.clone(), io, opts.head_timeout).await {
                    Ok((io, caller)) => {
                        if let Some((slot, source)) = handshake
                            && let Some(guard) = &opts.handshakes
                        {
                            guard.completed(source, Instant::now());
                            drop(slot);
                        }
                        metrics::counter!("detour_tls_handshakes_total", "side" => "inbound")
                            .increment(1);
                        serve_conn(io, handler, &lifecycle, &opts, Some(Caller(caller))).await
                    }
                    Err(e) => {
                        metrics::counter!("detour_tls_handshake_failures_total", "side" => "inbound")
                        .increment(1);
                        tracing::debug!(listener = name, error = %e, "TLS handshake refused (counted in detour_tls_handshake_failures_total)");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = served {
            tracing::debug!(listener = name, error = %e, "connection ended with an error");
        }
        drop(guard);
        drop(permit);
    });
}

/// One connection's share of the providers: a request of the connection holds a permit while
/// it is with a provider (`limits.max_in_flight_per_connection`), so that one caller
/// connection with thousands of HTTP/2 streams cannot take every provider connection.
#[derive(Debug, Clone)]
pub struct ConnShare(pub Arc<tokio::sync::Semaphore>);

/// The verified identity of the sidecar at the other end of a mutual-TLS connection, in the
/// [`ConnInfo`] of each of its requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub crate::tls::identity::SpiffeId);

/// How long a closed connection keeps reading what its peer still sends, waiting for the
/// peer to close too.
const LINGER: Duration = Duration::from_secs(1);

/// Serves one connection until it closes; on drain, closes it gracefully (HTTP/1.1: after the
/// current response; HTTP/2: GOAWAY, then the open streams finish). `caller`, when known, goes
/// into every request's extensions.
pub async fn serve_conn<S, H>(
    mut io: S,
    handler: Arc<H>,
    lifecycle: &Arc<Lifecycle>,
    opts: &ConnOptions,
    caller: Option<Caller>,
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
    // Closed with a lingering close: the peer gets to read every answer (see `linger`).
    let io = TokioIo::new(Lingering::new(Prefixed::new(buf, io), LINGER));
    let http2 = match detected {
        Detected::Http1 => false,
        Detected::Http2 => true,
        // Nothing to serve: the peer closed, or `detect` answered a head it refused.
        Detected::Closed | Detected::Rejected(_) => return Ok(()),
    };
    let activity = Arc::new(Activity::new());
    let shared = opts.provider_share && opts.limits.max_in_flight_per_connection > 0;
    let share = shared.then(|| {
        ConnShare(Arc::new(tokio::sync::Semaphore::new(
            opts.limits.max_in_flight_per_connection,
        )))
    });
    let (_watcher, mut stop) = watch(lifecycle, &activity, opts.limits.idle_timeout);
    if !http2 {
        let svc = conn_service::<H, Inline>(handler, activity, ConnInfo { caller, share });
        let conn = h1_server(opts).serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => return Ok(r?),
            _ = stop_asked(&mut stop) => {}
        }
        conn.as_mut().graceful_shutdown();
        return Ok(conn.await?);
    }
    let svc = conn_service::<H, Boxed>(handler, activity, ConnInfo { caller, share });
    let conn = h2_server(opts).serve_connection(io, svc);
    tokio::pin!(conn);
    let idled = tokio::select! {
        r = conn.as_mut() => return Ok(r?),
        idled = stop_asked(&mut stop) => idled,
    };
    conn.as_mut().graceful_shutdown();
    if !idled {
        return Ok(conn.await?);
    }
    // An idle peer that does not answer the GOAWAY's ping is not waited for.
    match tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await {
        Ok(r) => Ok(r?),
        Err(_) => Ok(()),
    }
}

/// The service of one connection: each request goes to the handler with the connection's
/// `conn`, and counts as in flight until its response body has been sent or dropped.
fn conn_service<H: Handler, P: Place>(
    handler: Arc<H>,
    active: Arc<Activity>,
    conn: ConnInfo,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<BoxBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let h = handler.clone();
        let active = active.clone();
        let conn = conn.clone();
        async move {
            // In flight until its response *body* has been sent (or dropped): a stream whose
            // head went out long ago — a gRPC stream, a long download — keeps the connection
            // from counting as idle.
            active.begin();
            let guard = InFlight(active);
            let resp = P::place(h.handle(req, conn)).await;
            Ok::<_, Infallible>(resp.map(|b| detour_core::body::with_guard(b, guard)))
        }
    })
}

/// Where a connection's service keeps the handler's future of each request. The future is
/// large (several KiB: the route, its attempt and the pool's send, all inline).
trait Place {
    /// The future the service awaits.
    type Out<F: Future + Send + 'static>: Future<Output = F::Output> + Send + 'static;
    fn place<F: Future + Send + 'static>(f: F) -> Self::Out<F>;
}

/// Inline, for HTTP/1.1: hyper's HTTP/1.1 dispatcher keeps one request's future at a time in
/// a box it allocated once for the connection, so a box per request would only add an
/// allocation.
struct Inline;

impl Place for Inline {
    type Out<F: Future + Send + 'static> = F;
    fn place<F: Future + Send + 'static>(f: F) -> F {
        f
    }
}

/// Boxed, for HTTP/2: hyper moves each stream's future into a task of its own; a pointer
/// moves instead of the whole future.
struct Boxed;

impl Place for Boxed {
    type Out<F: Future + Send + 'static> = std::pin::Pin<Box<F>>;
    fn place<F: Future + Send + 'static>(f: F) -> Self::Out<F> {
        Box::pin(f)
    }
}

/// The HTTP/1.1 server of a connection: head timeout and size limits from `opts`; at most
/// [`MAX_HEADERS`](crate::http::detect::MAX_HEADERS) headers a head, hyper's default; half-closed
/// connections answered as `opts.half_close` says (hyper's default drops the request).
fn h1_server(opts: &ConnOptions) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(opts.head_timeout)
        .max_buf_size((opts.max_header_bytes * 2).max(64 * 1024))
        .half_close(opts.half_close);
    b
}

/// The HTTP/2 server of a connection: windows, stream and header limits, keep-alive pings.
fn h2_server(opts: &ConnOptions) -> http2::Builder<TokioExecutor> {
    let ping = opts.limits.h2_keepalive;
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(opts.limits.max_concurrent_streams)
        // Streams the peer reset before this side took them up: h2's default (20)
        // closes the connection past it, with every stream on it. A caller that went
        // elsewhere while this process was stalled (a SIGSTOP, a long GC of the host)
        // resets each request it gave up on, and the POSTs still waiting on the same
        // connection would be lost. Bounded by the stream limit instead.
        .max_pending_accept_reset_streams(opts.limits.max_concurrent_streams as usize)
        .max_header_list_size((opts.max_header_bytes * 4) as u32)
        .keep_alive_interval(Some(ping))
        .keep_alive_timeout(ping);
    b
}

/// Watches one connection on a task of its own until dropped: a select over the watch itself
/// would poll its timer and the lifecycle on every wake of the connection, that is, on every
/// request. The receiver gets what [`closed_or_idle`] returns.
fn watch(
    lifecycle: &Arc<Lifecycle>,
    activity: &Arc<Activity>,
    idle: Duration,
) -> (Watcher, tokio::sync::oneshot::Receiver<bool>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (lifecycle, activity) = (lifecycle.clone(), activity.clone());
    let task = tokio::spawn(async move {
        let _ = tx.send(closed_or_idle(&lifecycle, &activity, idle).await);
    });
    (Watcher(task), rx)
}

/// The watch task of a connection, stopped when the connection ends.
struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the watch said: closed (false) or idle (true); never resolves without a word.
async fn stop_asked(rx: &mut tokio::sync::oneshot::Receiver<bool>) -> bool {
    match rx.await {
        Ok(idled) => idled,
        Err(_) => std::future::pending().await,
    }
}

/// Resolves when the sidecar closes its connections (false) or when the connection has had
/// nothing in flight for `idle` (true).
async fn closed_or_idle(lifecycle: &Lifecycle, activity: &Activity, idle: Duration) -> bool {
    loop {
        tokio::select! {
            _ = lifecycle.closed() => return false,
            _ = tokio::time::sleep(idle.saturating_sub(activity.idle_for())) => {
                if activity.idle_for() >= idle {
                    return true;
                }
            }
        }
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

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
