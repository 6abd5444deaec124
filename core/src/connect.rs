//! The seam where the data path touches the network: opening a connection to a [`Dial`].
//! [`NetConnect`] dials real TCP and Unix sockets; unit tests plug in-memory upstreams in
//! instead (`testing::MemoryNet`, feature `test-util`).
//!
//! A connection fails in one of two ways that the retry logic must never mix up: the peer could
//! not be *reached* (refused, reset before it said anything, no answer in time — another path
//! may be taken), or the peer answered and was *not trusted* ([`UntrustedPeer`]: its TLS
//! handshake failed after it spoke, or it proved another identity — a refusal: nothing is sent
//! anywhere else because of it, least of all in the clear).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use crate::dial::{Dial, Stream};

/// A boxed connect future.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send + 'a>>;

/// Opens connections.
pub trait Connect: Send + Sync + 'static {
    /// Connects to `dial`.
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a>;

    /// Connects to `dial` within `timeout`; running out of time is an error of kind
    /// [`io::ErrorKind::TimedOut`] (the peer was not reached). A connector with a handshake of
    /// its own overrides it to tell a silent peer from one that spoke and failed.
    fn connect_within<'a>(&'a self, dial: &'a Dial, timeout: Duration) -> Connecting<'a> {
        Box::pin(async move {
            match tokio::time::timeout(timeout, self.connect(dial)).await {
                Ok(r) => r,
                Err(_) => Err(timed_out(dial, timeout)),
            }
        })
    }
}

/// The error of a connect that ran out of `timeout`.
pub fn timed_out(dial: &Dial, timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connect to {dial}: no answer within {timeout:?}"),
    )
}

/// A peer that answered but is not trusted: its TLS handshake failed after it had spoken, or
/// it proved an identity other than the one expected. Carried inside an [`io::Error`]
/// ([`UntrustedPeer::into_io`], [`UntrustedPeer::of`]).
#[derive(Debug, thiserror::Error)]
#[error("untrusted peer: {0}")]
pub struct UntrustedPeer(pub String);

impl UntrustedPeer {
    /// As an I/O error (what connectors return).
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, self)
    }

    /// The refusal inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<&UntrustedPeer> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<UntrustedPeer>())
    }
}

/// Real sockets: TCP (with `TCP_NODELAY`) and Unix.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetConnect;

impl Connect for NetConnect {
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a> {
        Box::pin(Stream::connect(dial))
    }
}
