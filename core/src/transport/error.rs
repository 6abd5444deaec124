//! How a request failed in transport, and whether it ever left: the one place a transport
//! error becomes an [`Outcome`] for the retry decision.

use std::io;
use std::time::Duration;

use crate::dial::Dial;

use http::Request;

use crate::body::BoxBody;
use crate::decide::{Outcome, Part};

/// A request that failed in transport, saying whether it ever left.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection could not be opened; the request never left.
    #[error("connect to {target}: {source}")]
    Connect {
        /// The target.
        target: Dial,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The connection was not opened in time; the request never left.
    #[error("connect to {target}: timed out after {after:?}")]
    ConnectTimeout {
        /// The target.
        target: Dial,
        /// The connect timeout.
        after: Duration,
    },
    /// The target answered and was not trusted (its TLS handshake failed after it spoke, or it
    /// proved another identity): the request never left, and it must not be sent elsewhere
    /// because of this — it is a refusal, not an unreachable target.
    #[error("{target} is not trusted: {reason}")]
    Untrusted {
        /// The target.
        target: Dial,
        /// Why.
        reason: String,
    },
    /// The HTTP handshake failed, or the connection closed before the request was written;
    /// the request never left.
    #[error("request to {target} was not sent: {source}")]
    NotSent {
        /// The target.
        target: Dial,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The target already has its most HTTP/1.1 connections open and its queue of requests
    /// waiting for one is full: the request never left.
    #[error("{target}: {open} connections open and {waiting} requests waiting, the most allowed")]
    Overloaded {
        /// The target.
        target: Dial,
        /// Connections open.
        open: usize,
        /// Requests waiting.
        waiting: usize,
    },
    /// The server refused the HTTP/2 stream without processing it (`REFUSED_STREAM`, or a
    /// stream above a GOAWAY's last id; RFC 9113 §8.7): it never reached the application.
    #[error("request to {target} was refused unprocessed: {source}")]
    Refused {
        /// The target.
        target: Dial,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The request was (at least partly) sent and then the exchange failed: the outcome at the
    /// server is unknown.
    #[error("request to {target} failed after it was sent: {source}")]
    AfterSent {
        /// The target.
        target: Dial,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
}

impl TransportError {
    /// The same failure again (for a request that waited on the attempt that failed).
    pub(super) fn again(&self) -> TransportError {
        match self {
            TransportError::Connect { target, source } => TransportError::Connect {
                target: target.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            TransportError::ConnectTimeout { target, after } => TransportError::ConnectTimeout {
                target: target.clone(),
                after: *after,
            },
            TransportError::Untrusted { target, reason } => TransportError::Untrusted {
                target: target.clone(),
                reason: reason.clone(),
            },
            other => TransportError::Connect {
                target: match other {
                    TransportError::NotSent { target, .. }
                    | TransportError::Overloaded { target, .. }
                    | TransportError::Refused { target, .. }
                    | TransportError::AfterSent { target, .. } => target.clone(),
                    _ => Dial::Tcp(std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                },
                source: io::Error::other(other.to_string()),
            },
        }
    }

    /// Whether the request certainly never reached the server (safe to send elsewhere).
    pub fn never_left(&self) -> bool {
        !matches!(self, TransportError::AfterSent { .. })
    }
}

/// A failed send: the error, and the request itself whenever it never left (so the caller can
/// send it elsewhere, whatever its method).
#[derive(Debug)]
pub struct Failed {
    /// What went wrong.
    pub error: TransportError,
    /// The untouched request, when it was never written to any connection.
    pub request: Option<Request<BoxBody>>,
    /// Whether the attempt used a pooled connection (one that may have closed unnoticed).
    pub reused: bool,
}

impl Failed {
    pub(super) fn never_sent(
        error: TransportError,
        request: Request<BoxBody>,
        reused: bool,
    ) -> Self {
        Failed {
            error,
            request: Some(request),
            reused,
        }
    }

    pub(super) fn after_sent(error: hyper::Error, target: &Dial, reused: bool) -> Self {
        let target = target.clone();
        let error = if refused_stream(&error) {
            TransportError::Refused {
                target,
                source: error,
            }
        } else {
            TransportError::AfterSent {
                target,
                source: error,
            }
        };
        Failed {
            error,
            request: None,
            reused,
        }
    }

    /// How the attempt ended, `part` being what the target is (the sidecar in between, or a
    /// provider), for [`decide`].
    ///
    /// A request refused unprocessed on a reused HTTP/2 connection counts as stale, too: the
    /// peer sent GOAWAY (it is going away, or handing its sockets to a successor), and a fresh
    /// connection shows which — refused (go elsewhere) or accepted by the successor.
    pub fn outcome(&self, part: Part) -> Outcome {
        match (&self.request, &self.error) {
            (Some(_), _) | (None, TransportError::Refused { .. }) if self.reused => Outcome::Stale,
            (Some(_), _) | (None, TransportError::Refused { .. }) => Outcome::NeverReached(part),
            (None, _) => Outcome::Lost(part),
        }
    }
}

/// Whether an HTTP/2 error says the stream was not processed (RFC 9113 §8.7).
fn refused_stream(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cur {
        // A stream reset with REFUSED_STREAM, or one above the last id of the peer's GOAWAY:
        // h2 reports only the latter as a GOAWAY error from the remote (a connection error the
        // library or the peer detects arrives as a library GOAWAY, a reset or an I/O error).
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote()))
        {
            return true;
        }
        cur = e.source();
    }
    false
}
