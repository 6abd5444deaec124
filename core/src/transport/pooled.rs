//! An HTTP/1.1 response body that hands its connection back to the pool once it reached its
//! end.

use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{Idle, Pool};
use crate::body::BoxError;
use crate::dial::Dial;

/// Hands an HTTP/1.1 connection back to its pool.
pub(super) struct Return {
    pub(super) sender: Option<Idle>,
    pub(super) pool: Weak<Pool>,
    pub(super) dial: Dial,
    /// The pool's generation for `dial` when the connection was taken.
    pub(super) generation: u64,
}

impl Return {
    fn give_back(&mut self) {
        if let (Some(sender), Some(pool)) = (self.sender.take(), self.pool.upgrade()) {
            pool.give_back_h1(self.dial.clone(), sender, self.generation);
        }
    }
}

/// A response body that returns its connection to the pool when it reaches its end. Dropped
/// early, it drops the connection instead (its state is unknown).
pub(super) struct PooledBody {
    pub(super) inner: Incoming,
    pub(super) ret: Return,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match frame {
            None => {
                this.ret.give_back();
                Poll::Ready(None)
            }
            Some(Ok(f)) => {
                if this.inner.is_end_stream() {
                    this.ret.give_back();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
