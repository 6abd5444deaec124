//! Connection pooling over any [`Connect`] (TCP and Unix sockets by default), at hyper's
//! connection level.
//!
//! HTTP/1.1 connections are kept in a small LIFO pool per target and returned only after the
//! response body reached its end. HTTP/2 uses one multiplexed connection per target. Working at
//! the connection level (not hyper-util's pooled client) is what lets a failure say whether the
//! request ever left: see [`Failed::outcome`].

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use std::fmt;
use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use detour_proto::AppProtocol;
use http::{Request, Response};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::{BoxBody, boxed};
use crate::connect::{Connect, NetConnect};
use crate::decide::{Alternatives, Next, Part, RequestKind, decide};
pub use crate::dial::{Dial, Stream};
pub use error::{Failed, TransportError};

mod error;
mod pooled;

use pooled::{PooledBody, Return};

/// The name a request is sent to, parsed once: the `:authority` of an HTTP/2 request, the
/// `Host` of an HTTP/1.1 one.
#[derive(Debug, Clone)]
pub struct Target {
    authority: http::uri::Authority,
    host: http::HeaderValue,
}

impl Target {
    /// Parses `authority` (`name` or `name:port`).
    pub fn new(authority: &str) -> Result<Target, http::Error> {
        Ok(Target {
            authority: authority.parse::<http::uri::Authority>()?,
            host: http::HeaderValue::from_str(authority)?,
        })
    }

    /// The authority as text.
    pub fn as_str(&self) -> &str {
        self.authority.as_str()
    }
}

/// Rewrites a request's target for `protocol`: origin-form plus `Host: authority` for HTTP/1.1,
/// an absolute `http://authority/...` URI (`:authority`) for HTTP/2.
pub fn set_target(
    authority: &str,
    protocol: AppProtocol,
    req: Request<BoxBody>,
) -> Result<Request<BoxBody>, http::Error> {
    to_target(&Target::new(authority)?, protocol, req)
}

/// [`set_target`] with the name parsed already.
pub fn to_target(
    target: &Target,
    protocol: AppProtocol,
    req: Request<BoxBody>,
) -> Result<Request<BoxBody>, http::Error> {
    let (mut parts, body) = req.into_parts();
    let pq = std::mem::take(&mut parts.uri)
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // The version follows the protocol of the next hop, not the one the request arrived on:
    // hyper only chunks an HTTP/1.1 body of unknown length when the request says HTTP/1.1.
    match protocol {
        AppProtocol::Http1 => {
            parts.version = http::Version::HTTP_11;
            parts.uri = http::Uri::from(pq);
            parts
                .headers
                .insert(http::header::HOST, target.host.clone());
        }
        AppProtocol::Http2 => {
            parts.version = http::Version::HTTP_2;
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(target.authority.clone());
            uri.path_and_query = Some(pq);
            parts.uri = http::Uri::from_parts(uri)?;
            parts.headers.remove(http::header::HOST);
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// A request extension: the connect timeout for a connection this request opens (instead of
/// the pool's), set per service by the sidecar. A shared HTTP/2 connection is opened with the
/// timeout of the request that opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectTimeout(pub Duration);

/// Tuning of a [`Pool`].
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Time allowed for TCP/Unix connect.
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per target.
    pub max_idle_per_target: usize,
    /// HTTP/2 initial stream window.
    pub h2_stream_window: u32,
    /// HTTP/2 initial connection window.
    pub h2_connection_window: u32,
    /// Most HTTP/1.1 connections open to one target (0: no limit); requests beyond wait for
    /// one to come free.
    pub max_conns_per_target: usize,
    /// Most requests waiting for a connection to one target; beyond, `Overloaded`.
    pub max_pending_per_target: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            max_idle_per_target: 64,
            h2_stream_window: 1 << 20,
            h2_connection_window: 16 << 20,
            max_conns_per_target: 0,
            max_pending_per_target: 1024,
        }
    }
}

#[derive(Default)]
struct Entry {
    h1_idle: Vec<Idle>,
    h2: Option<http2::SendRequest<BoxBody>>,
    /// Bumped by [`Pool::forget`]: a connection taken out before is not taken back.
    generation: u64,
    /// HTTP/1.1 connections open (idle or in use), under `max_conns_per_target`.
    h1_open: usize,
    /// Requests waiting for one.
    h1_waiting: usize,
    /// Wakes one waiter when a connection comes back or closes.
    h1_freed: Arc<tokio::sync::Notify>,
    /// Held while an HTTP/2 connection to the target is being opened: the requests that find
    /// none wait for that one instead of each opening their own (a peer's GOAWAY under load
    /// would otherwise bring as many handshakes as requests in flight).
    h2_connecting: Arc<tokio::sync::Mutex<()>>,
    /// How the last HTTP/2 connect to the target failed, and when: the requests that waited
    /// for it fail the same way at once rather than each try (and time out) in turn.
    h2_failed: Option<(tokio::time::Instant, TransportError)>,
}

/// A pooled HTTP/1.1 connection: its sender, and a second handle on its TCP socket.
type Idle = (http1::SendRequest<BoxBody>, Option<Peek>);

/// A second handle on a pooled HTTP/1.1 connection's TCP socket, to see, just before a request
/// is written on it, whether the server closed it while it sat idle (its FIN is in the socket
/// but hyper's connection task has not run yet). A request written there would be lost with an
/// unknown outcome, though the server never read it — the window in which a provider that
/// dies (`kill -9`) takes non-idempotent requests with it.
struct Peek(std::net::TcpStream);

impl Peek {
    fn of(stream: &Stream) -> Option<Peek> {
        use std::os::fd::AsFd;
        match stream {
            Stream::Tcp(s) => s
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(|fd| Peek(std::net::TcpStream::from(fd))),
            _ => None,
        }
    }

    /// Whether the server closed the connection (or sent something unasked, which no idle
    /// HTTP/1.1 connection should carry). The socket is non-blocking (tokio's), so this never
    /// waits.
    fn closed(&self) -> bool {
        let mut byte = [0u8; 1];
        !matches!(self.0.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// One open HTTP/1.1 connection's place under the per-target cap, given back when it closes.
struct Slot {
    pool: Weak<Pool>,
    dial: Dial,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            let mut entries = pool.lock();
            if let Some(e) = entries.get_mut(&self.dial) {
                e.h1_open = e.h1_open.saturating_sub(1);
                e.h1_freed.notify_one();
            }
        }
    }
}

/// A request's place in a target's queue, left when it gets a connection or gives up.
struct Waiting<'a> {
    pool: &'a Pool,
    dial: &'a Dial,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.pool.lock().get_mut(self.dial) {
            e.h1_waiting = e.h1_waiting.saturating_sub(1);
        }
    }
}

/// What the cap allows now.
enum Admit {
    /// Open a new connection holding this slot.
    Open(Option<Slot>),
    /// Wait for this to fire, holding the place in the queue.
    Wait(Arc<tokio::sync::Notify>),
    /// Full, and the queue too.
    Overloaded(TransportError),
}

/// Connections to many targets, by protocol.
pub struct Pool {
    opts: PoolOptions,
    connector: Arc<dyn Connect>,
    entries: Mutex<FastMap<Dial, Entry>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("opts", &self.opts).finish()
    }
}

impl Pool {
    /// An empty pool over real sockets.
    pub fn new(opts: PoolOptions) -> Arc<Pool> {
        Self::with_connector(opts, Arc::new(NetConnect))
    }

    /// An empty pool whose connections `connector` opens.
    pub fn with_connector(opts: PoolOptions, connector: Arc<dyn Connect>) -> Arc<Pool> {
        Arc::new(Pool {
            opts,
            connector,
            entries: Mutex::new(FastMap::default()),
        })
    }

    /// The same connector and options, with no connections yet (for traffic kept apart, such
    /// as probes).
    pub fn fresh(&self, opts: PoolOptions) -> Arc<Pool> {
        Self::with_connector(opts, self.connector.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<Dial, Entry>> {
        self.entries.lock()
    }

    /// Sends `req` to `dial` over `proto`; a pooled connection found closed before the
    /// request was written on it is replaced by a fresh one ([`Outcome::Stale`]). The request's
    /// URI must already be in the form the protocol needs (origin-form with `Host` for
    /// HTTP/1.1, absolute for HTTP/2).
    pub async fn send(
        self: &Arc<Self>,
        dial: &Dial,
        proto: AppProtocol,
        mut req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Failed> {
        loop {
            let failed = match self.send_once(dial, proto, req).await {
                Ok(resp) => return Ok(resp),
                Err(f) => f,
            };
            let kind = RequestKind {
                idempotent: false,
                resendable: failed.request.is_some(),
            };
            let none = Alternatives {
                other_path: false,
                other_endpoint: false,
            };
            match (
                decide(failed.outcome(Part::Provider), kind, none),
                failed.request,
            ) {
                (Next::Again, Some(back)) => req = back,
                (_, request) => {
                    return Err(Failed { request, ..failed });
                }
            }
        }
    }

    /// One attempt on one connection (pooled when one is idle).
    pub async fn send_once(
        self: &Arc<Self>,
        dial: &Dial,
        proto: AppProtocol,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Failed> {
        match proto {
            AppProtocol::Http1 => self.send_h1(dial, req).await,
            AppProtocol::Http2 => self.send_h2(dial, req).await,
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        dial: &Dial,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Failed> {
        let connect_timeout = self.connect_timeout_of(&req);
        let generation = self.generation(dial);
        let mut queued: Option<Waiting<'_>> = None;
        let ((mut sender, peek), reused) = loop {
            if let Some(s) = self.take_h1(dial).await {
                break (s, true);
            }
            match self.admit_h1(dial, queued.is_some()) {
                // Connecting is rare and its future large: boxed, it does not grow every send's.
                Admit::Open(slot) => {
                    match Box::pin(self.connect_h1(dial, slot, connect_timeout)).await {
                        Ok(s) => break (s, false),
                        Err(e) => return Err(Failed::never_sent(e, req, false)),
                    }
                }
                Admit::Overloaded(e) => return Err(Failed::never_sent(e, req, false)),
                Admit::Wait(freed) => {
                    if queued.is_none() {
                        queued = Some(Waiting { pool: self, dial });
                    }
                    freed.notified().await;
                }
            }
        };
        drop(queued);
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let ret = Return {
                    sender: Some((sender, peek)),
                    pool: Arc::downgrade(self),
                    dial: dial.clone(),
                    generation,
                };
                Ok(resp.map(|inner| boxed(PooledBody { inner, ret })))
            }
            Err(mut e) => match e.take_message() {
                Some(back) => {
                    let error = TransportError::NotSent {
                        target: dial.clone(),
                        source: e.into_error(),
                    };
                    Err(Failed::never_sent(error, back, reused))
                }
                None => Err(Failed::after_sent(e.into_error(), dial, reused)),
            },
        }
    }

    async fn take_h1(&self, dial: &Dial) -> Option<Idle> {
        loop {
            let (mut sender, peek) = self.lock().get_mut(dial)?.h1_idle.pop()?;
            if sender.is_closed() || peek.as_ref().is_some_and(Peek::closed) {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some((sender, peek));
            }
        }
    }

    fn give_back_h1(&self, dial: Dial, (sender, peek): Idle, generation: u64) {
        if sender.is_closed() {
            return;
        }
        let mut entries = self.lock();
        let entry = entries.entry(dial).or_default();
        if entry.generation == generation && entry.h1_idle.len() < self.opts.max_idle_per_target {
            entry.h1_idle.push((sender, peek));
            entry.h1_freed.notify_one();
        }
    }

    /// Whether a new HTTP/1.1 connection to `dial` may open now; `queued` says the request
    /// already holds a place in the queue.
    fn admit_h1(self: &Arc<Self>, dial: &Dial, queued: bool) -> Admit {
        let cap = self.opts.max_conns_per_target;
        if cap == 0 {
            return Admit::Open(None);
        }
        let mut entries = self.lock();
        let entry = entries.entry(dial.clone()).or_default();
        if entry.h1_open < cap {
            entry.h1_open += 1;
            return Admit::Open(Some(Slot {
                pool: Arc::downgrade(self),
                dial: dial.clone(),
            }));
        }
        if !queued {
            if entry.h1_waiting >= self.opts.max_pending_per_target {
                return Admit::Overloaded(TransportError::Overloaded {
                    target: dial.clone(),
                    open: entry.h1_open,
                    waiting: entry.h1_waiting,
                });
            }
            entry.h1_waiting += 1;
        }
        Admit::Wait(entry.h1_freed.clone())
    }

    /// The request's [`ConnectTimeout`], else the pool's.
    fn connect_timeout_of(&self, req: &Request<BoxBody>) -> Duration {
        req.extensions()
            .get::<ConnectTimeout>()
            .map_or(self.opts.connect_timeout, |t| t.0)
    }

    fn generation(&self, dial: &Dial) -> u64 {
        self.lock().get(dial).map_or(0, |e| e.generation)
    }

    /// Stops reusing every connection to `dial`: idle ones are closed now, those in use when
    /// their exchange ends (a peer handing its sockets to a successor: new connections reach
    /// the successor).
    pub fn forget(&self, dial: &Dial) {
        let mut entries = self.lock();
        let entry = entries.entry(dial.clone()).or_default();
        entry.h1_idle.clear();
        entry.h2 = None;
        entry.generation += 1;
    }

    async fn dial(
        &self,
        dial: &Dial,
        timeout: Duration,
    ) -> Result<TokioIo<Stream>, TransportError> {
        match self.connector.connect_within(dial, timeout).await {
            Ok(s) => Ok(TokioIo::new(s)),
            Err(source) => Err(
                if let Some(u) = crate::connect::UntrustedPeer::of(&source) {
                    TransportError::Untrusted {
                        target: dial.clone(),
                        reason: u.0.clone(),
                    }
                } else if source.kind() == io::ErrorKind::TimedOut {
                    TransportError::ConnectTimeout {
                        target: dial.clone(),
                        after: timeout,
                    }
                } else {
                    TransportError::Connect {
                        target: dial.clone(),
                        source,
                    }
                },
            ),
        }
    }

    /// Opens an HTTP/1.1 connection; `slot`, its place under the per-target cap, is held until
    /// the connection closes (or given back at once if it does not open).
    async fn connect_h1(
        &self,
        dial: &Dial,
        slot: Option<Slot>,
        timeout: Duration,
    ) -> Result<Idle, TransportError> {
        let io = self.dial(dial, timeout).await?;
        let peek = Peek::of(io.inner());
        let not_sent = |source| TransportError::NotSent {
            target: dial.clone(),
            source,
        };
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(not_sent)?;
        let target = dial.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, error = %e, "http/1 upstream connection ended");
            }
            drop(slot);
        });
        sender.ready().await.map_err(not_sent)?;
        Ok((sender, peek))
    }

    async fn send_h2(
        self: &Arc<Self>,
        dial: &Dial,
        req: Request<BoxBody>,
    ) -> Result<Response<BoxBody>, Failed> {
        let connect_timeout = self.connect_timeout_of(&req);
        let cached = self
            .lock()
            .get(dial)
            .and_then(|e| e.h2.clone())
            .filter(|s| !s.is_closed());
        let reused = cached.is_some();
        let mut sender = match cached {
            Some(s) => s,
            None => {
                let connecting = self
                    .lock()
                    .entry(dial.clone())
                    .or_default()
                    .h2_connecting
                    .clone();
                let _one = connecting.lock().await;
                // Opened meanwhile by the request that held the lock?
                let fresh = self
                    .lock()
                    .get(dial)
                    .and_then(|e| e.h2.clone())
                    .filter(|s| !s.is_closed());
                let failed = self.lock().get(dial).and_then(|e| {
                    e.h2_failed
                        .as_ref()
                        .filter(|(at, _)| at.elapsed() < Duration::from_millis(100))
                        .map(|(_, err)| err.again())
                });
                match (fresh, failed) {
                    (Some(s), _) => s,
                    (None, Some(e)) => return Err(Failed::never_sent(e, req, false)),
                    // Boxed for the same reason as in `send_h1`.
                    (None, None) => match Box::pin(self.connect_h2(dial, connect_timeout)).await {
                        Ok(s) => s,
                        Err(e) => {
                            self.lock().entry(dial.clone()).or_default().h2_failed =
                                Some((tokio::time::Instant::now(), e.again()));
                            return Err(Failed::never_sent(e, req, false));
                        }
                    },
                }
            }
        };
        let not_sent = |pool: &Self, source| {
            if reused {
                pool.forget_h2(dial);
            }
            TransportError::NotSent {
                target: dial.clone(),
                source,
            }
        };
        if let Err(source) = sender.ready().await {
            return Err(Failed::never_sent(not_sent(self, source), req, reused));
        }
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp.map(boxed)),
            Err(mut e) => match e.take_message() {
                Some(back) => {
                    let error = not_sent(self, e.into_error());
                    Err(Failed::never_sent(error, back, reused))
                }
                None => Err(Failed::after_sent(e.into_error(), dial, reused)),
            },
        }
    }

    fn forget_h2(&self, dial: &Dial) {
        if let Some(e) = self.lock().get_mut(dial) {
            e.h2 = None;
        }
    }

    async fn connect_h2(
        &self,
        dial: &Dial,
        timeout: Duration,
    ) -> Result<http2::SendRequest<BoxBody>, TransportError> {
        let io = self.dial(dial, timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(self.opts.h2_stream_window)
            .initial_connection_window_size(self.opts.h2_connection_window)
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .handshake(io)
            .await
            .map_err(|source| TransportError::NotSent {
                target: dial.clone(),
                source,
            })?;
        let target = dial.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%target, error = %e, "http/2 upstream connection ended");
            }
        });
        self.lock().entry(dial.clone()).or_default().h2 = Some(sender.clone());
        Ok(sender)
    }
}

#[cfg(test)]
mod goaway_tests;
#[cfg(test)]
mod tests;
