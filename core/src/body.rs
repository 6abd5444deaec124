//! The one body type requests and responses travel in, and helpers to build it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Boxed error of any body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin (hyper's `Incoming`, a buffer, a gRPC body).
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Wraps `body` so that `guard` lives until the body is dropped (for in-flight counts and
/// connection tracking that must cover the whole response, not only its head).
pub fn with_guard<G: Send + Unpin + 'static>(body: BoxBody, guard: G) -> BoxBody {
    Guarded {
        body,
        _guard: guard,
    }
    .boxed_unsync()
}

struct Guarded<G> {
    body: BoxBody,
    _guard: G,
}

impl<G: Send + Unpin + 'static> http_body::Body for Guarded<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How the caller's side of a streamed request body failed, once it did (its connection
/// closed mid-body, or its framing was bad). Whoever judges the attempt that carried the body
/// blames the caller for it, not the upstream: no link, outlier or health state hears of it.
#[derive(Debug, Clone, Default)]
pub struct CallerBodyFault(Arc<OnceLock<String>>);

impl CallerBodyFault {
    /// The body's error, if it failed.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// `body`, boxed, and watched for a failure of its own when it has anything to stream. An
/// ended body can fail no more and has nothing to send: it is replaced by an empty one (no
/// watch, and no allocation: the empty body has no size to box).
pub fn watched<B>(body: B) -> (BoxBody, Option<CallerBodyFault>)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return (empty(), None);
    }
    let fault = CallerBodyFault::default();
    let body = Watched {
        body,
        fault: fault.clone(),
    };
    (body.boxed_unsync(), Some(fault))
}

struct Watched<B> {
    body: B,
    fault: CallerBodyFault,
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            std::task::Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                let _ = self.fault.0.set(e.to_string());
                std::task::Poll::Ready(Some(Err(e)))
            }
            other => other.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that yields one chunk, then fails.
    struct Breaks(u8);

    impl http_body::Body for Breaks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            self.0 += 1;
            std::task::Poll::Ready(Some(match self.0 {
                1 => Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
                _ => Err(std::io::Error::other("the caller went away")),
            }))
        }
    }

    #[tokio::test]
    async fn a_streamed_body_that_fails_says_so_and_an_ended_one_is_not_watched() {
        let (body, fault) = watched(Breaks(0));
        let fault = fault.expect("a body with something to stream is watched");
        assert_eq!(fault.get(), None);
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.to_string(), "the caller went away");
        assert_eq!(fault.get(), Some("the caller went away"));

        let (body, fault) = watched(Full::new(Bytes::from_static(b"whole")));
        let fault = fault.unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
        assert_eq!(fault.get(), None, "a body that ends well is no fault");

        let (_, fault) = watched(Empty::<Bytes>::new());
        assert!(fault.is_none());
    }
}
