//! In-memory upstreams for unit tests (feature `test-util`): a [`MemoryNet`] is a [`Connect`]
//! whose targets serve HTTP/1.1 or HTTP/2 from a handler, refuse connections, or accept and
//! never answer (a hung process). With tokio's paused clock, the SDK's and the sidecar's
//! retry, probe and fallback logic runs in milliseconds and deterministically.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

use crate::body::BoxBody;
use crate::connect::{Connect, Connecting};
use crate::dial::{Dial, Stream};

/// The handler breaks the connection instead of answering (HTTP/1.1: closed; HTTP/2: the
/// stream is reset) — a request lost after it was sent.
#[derive(Debug, Clone, Copy)]
pub struct Abort;

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("aborted by the test handler")
    }
}

impl std::error::Error for Abort {}

/// A boxed handler future.
pub type Answer = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Abort>> + Send>>;

/// Answers requests of an in-memory target.
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> Answer + Send + Sync>;

/// What an in-memory target does with connections.
#[derive(Clone)]
pub enum Upstream {
    /// Refuses them (`ECONNREFUSED`).
    Refuse,
    /// Accepts them and never reads (a stopped or hung process).
    Hang,
    /// Serves HTTP/1.1 or HTTP/2 on them with this handler.
    Serve(Handler),
}

impl Upstream {
    /// A target served by `f`.
    pub fn serve<F, Fut>(f: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<BoxBody>, Abort>> + Send + 'static,
    {
        Upstream::Serve(Arc::new(move |req| Box::pin(f(req))))
    }
}

/// In-memory targets by address; an address with no target refuses connections.
#[derive(Default)]
pub struct MemoryNet {
    targets: Mutex<HashMap<Dial, Upstream>>,
    /// Server ends of hung connections, kept open.
    held: Mutex<Vec<DuplexStream>>,
    /// Connections opened per target.
    connects: Mutex<HashMap<Dial, usize>>,
    /// Per target, the switch that stops its served connections (a SIGSTOP).
    freezes: Mutex<HashMap<Dial, Arc<Freeze>>>,
}

impl std::fmt::Debug for MemoryNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNet").finish_non_exhaustive()
    }
}

impl MemoryNet {
    /// An empty network.
    pub fn new() -> Arc<MemoryNet> {
        Arc::new(MemoryNet::default())
    }

    /// Makes `dial` behave as `upstream` for connections opened from now on.
    pub fn set(&self, dial: Dial, upstream: Upstream) {
        lock(&self.targets).insert(dial, upstream);
    }

    /// Stops (or resumes) `dial`'s served connections, open or future: they neither read nor
    /// write while frozen, as a stopped process.
    pub fn freeze(&self, dial: &Dial, frozen: bool) {
        self.freeze_of(dial).set(frozen);
    }

    fn freeze_of(&self, dial: &Dial) -> Arc<Freeze> {
        lock(&self.freezes).entry(dial.clone()).or_default().clone()
    }

    /// Connections opened to `dial` so far.
    pub fn connects(&self, dial: &Dial) -> usize {
        lock(&self.connects).get(dial).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
}

impl Connect for MemoryNet {
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a> {
        let upstream = lock(&self.targets).get(dial).cloned();
        let freeze = self.freeze_of(dial);
        Box::pin(async move {
            let upstream = upstream.unwrap_or(Upstream::Refuse);
            if let Upstream::Refuse = upstream {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{dial} refuses connections"),
                ));
            }
            *lock(&self.connects).entry(dial.clone()).or_default() += 1;
            let (client, server) = tokio::io::duplex(256 * 1024);
            match upstream {
                Upstream::Refuse => unreachable!("handled above"),
                Upstream::Hang => lock(&self.held).push(server),
                Upstream::Serve(handler) => {
                    let server = Gated { io: server, freeze };
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| handler(req));
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(server), svc)
                            .await;
                    });
                }
            }
            Ok(Stream::Other(Box::new(client)))
        })
    }
}

/// Whether a target is stopped, and who waits for it to resume.
#[derive(Default)]
struct Freeze {
    frozen: AtomicBool,
    waiting: Mutex<Vec<Waker>>,
}

impl Freeze {
    fn set(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
        if !frozen {
            for w in lock(&self.waiting).drain(..) {
                w.wake();
            }
        }
    }

    /// Pending (and woken on resume) while frozen.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.frozen.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        lock(&self.waiting).push(cx.waker().clone());
        if self.frozen.load(Ordering::SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// The server end of a connection, stopped while its target is frozen.
struct Gated {
    io: DuplexStream,
    freeze: Arc<Freeze>,
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.freeze.poll(cx));
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.freeze.poll(cx));
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.freeze.poll(cx));
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A handler's plain answer.
pub fn ok(text: &'static str) -> Result<Response<BoxBody>, Abort> {
    Ok(Response::new(crate::body::full(text)))
}
