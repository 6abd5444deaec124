//! Keeping a copy of a request so it can be sent again on the other path: only when its body is
//! empty or known to fit in a bound, and arrives within a deadline. Larger bodies stream once
//! and are never retried after they left.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt;

use crate::body::{BoxBody, CallerBodyFault, full};
use crate::decide::RequestKind;
use crate::transport::ConnectTimeout;

/// Marks a request as safe to send twice although its method is not idempotent
/// (`req.extensions_mut().insert(Idempotent)`).
#[derive(Debug, Clone, Copy)]
pub struct Idempotent;

/// The header by which a caller names one operation, so that its provider carries it out once
/// however often the request arrives (`Idempotency-Key`, as in the IETF HTTPAPI draft). The
/// mesh never removes it.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");
/// The longest idempotency key taken.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// The request's idempotency key: one `Idempotency-Key` header of 1 to
/// [`MAX_IDEMPOTENCY_KEY`] visible ASCII characters. Anything else (absent, empty, too long,
/// other bytes, the header twice) is no key.
pub fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    valid_idempotency_key(value.as_bytes())
        .then(|| value.to_str().ok())
        .flatten()
}

/// Whether `bytes` are an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII
/// characters.
pub fn valid_idempotency_key(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes.len() <= MAX_IDEMPOTENCY_KEY
        && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// A request that can be rebuilt.
#[derive(Debug, Clone)]
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
    /// The one extension the pool reads ([`ConnectTimeout`]), carried into every copy.
    connect_timeout: Option<ConnectTimeout>,
}

impl Replay {
    /// The copy of `parts` with `body`.
    fn of(head: Head<'_>, body: Bytes) -> Self {
        Replay {
            method: head.method.clone(),
            uri: head.uri.clone(),
            version: head.version,
            headers: head.headers.clone(),
            body,
            connect_timeout: head.extensions.get::<ConnectTimeout>().copied(),
        }
    }

    /// A fresh copy of the request.
    pub fn request(&self) -> Request<BoxBody> {
        let mut req = Request::new(full(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        if let Some(t) = self.connect_timeout {
            req.extensions_mut().insert(t);
        }
        req
    }
}

/// A request's head, borrowed from a whole request or from its parts.
struct Head<'a> {
    method: &'a http::Method,
    uri: &'a http::Uri,
    version: http::Version,
    headers: &'a http::HeaderMap,
    extensions: &'a http::Extensions,
}

impl<'a> Head<'a> {
    fn of<B>(req: &'a Request<B>) -> Self {
        Head {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    fn of_parts(parts: &'a http::request::Parts) -> Self {
        Head {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
}

/// A request being routed: the request itself while it has not been sent (or after it was
/// handed back), and its copy when its body was kept — what the retry decision needs to know.
#[derive(Debug)]
pub struct Held {
    req: Option<Request<BoxBody>>,
    replay: Option<Replay>,
    idempotent: bool,
    /// Set when the caller's own body failed as it streamed ([`crate::body::watched`]).
    body_fault: Option<CallerBodyFault>,
}

impl Held {
    /// `req` (prepared by [`prepare`], which gave `replay`); `body_fault` watches its body
    /// when it streams from the caller.
    pub fn new(
        req: Request<BoxBody>,
        replay: Option<Replay>,
        idempotent: bool,
        body_fault: Option<CallerBodyFault>,
    ) -> Self {
        Self {
            req: Some(req),
            replay,
            idempotent,
            body_fault,
        }
    }

    /// The watch on the caller's own body, when it streams: if it failed while an attempt sent
    /// it, the attempt's failure is the caller's, whatever the upstream made of it.
    pub fn body_fault(&self) -> Option<&CallerBodyFault> {
        self.body_fault.as_ref()
    }

    /// How the caller's own body failed, if it did ([`Held::body_fault`]).
    pub fn caller_body_failed(&self) -> Option<&str> {
        self.body_fault.as_ref().and_then(CallerBodyFault::get)
    }

    /// The request for the next attempt: the original if still held, else a fresh copy.
    pub fn take(&mut self) -> Option<Request<BoxBody>> {
        self.req
            .take()
            .or_else(|| self.replay.as_ref().map(Replay::request))
    }

    /// Takes back a request an attempt handed back unsent.
    pub fn give_back(&mut self, req: Option<Request<BoxBody>>) {
        if req.is_some() {
            self.req = req;
        }
    }

    /// What routing looks at in it (`None` when it left and no copy was kept).
    pub fn view(&self) -> Option<crate::route::RequestView<'_>> {
        match (&self.req, &self.replay) {
            (Some(r), _) => Some(crate::route::RequestView {
                method: r.method(),
                path: r.uri().path(),
                headers: r.headers(),
            }),
            (None, Some(c)) => Some(crate::route::RequestView {
                method: &c.method,
                path: c.uri.path(),
                headers: &c.headers,
            }),
            (None, None) => None,
        }
    }

    /// Whether it may be processed twice.
    pub fn idempotent(&self) -> bool {
        self.idempotent
    }

    /// Whether a copy was kept (the request can go again after it left).
    pub fn has_copy(&self) -> bool {
        self.replay.is_some()
    }

    /// What the retry decision needs to know of it.
    pub fn kind(&self) -> RequestKind {
        RequestKind {
            idempotent: self.idempotent,
            resendable: self.req.is_some() || self.replay.is_some(),
        }
    }
}

/// Whether `req` may be sent again after it left: its method is idempotent, the app said so
/// ([`Idempotent`]), or it carries an idempotency key ([`idempotency_key`]): a caller that
/// names its operation says its provider carries each key out once.
pub fn is_idempotent<B>(req: &Request<B>) -> bool {
    matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || req.extensions().get::<Idempotent>().is_some()
        || idempotency_key(req.headers()).is_some()
}

/// Why a small body could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The body failed while it was read.
    #[error("reading the request body: {0}")]
    Body(crate::body::BoxError),
    /// The body did not arrive within the deadline.
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
}

/// Buffers `req`'s body when it is at most `max` bytes (known from its size hint) and arrives
/// within `deadline`, returning the request to send and a copy to replay. A body of unknown or
/// larger size is left streaming. A request without a body is sent as it is, with a copy of its
/// head (no timer, no buffering); the request sent keeps its extensions.
pub async fn prepare(
    req: Request<BoxBody>,
    max: u64,
    deadline: Duration,
) -> Result<(Request<BoxBody>, Option<Replay>), PrepareError> {
    if req.body().is_end_stream() {
        // The request stays whole (not taken apart and put together again: two moves less).
        let replay = Replay::of(Head::of(&req), Bytes::new());
        return Ok((req, Some(replay)));
    }
    if req.body().size_hint().upper().is_none_or(|u| u > max) {
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(deadline, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return Err(PrepareError::Body(e)),
        Err(_) => return Err(PrepareError::TimedOut(deadline)),
    };
    let replay = Replay::of(Head::of_parts(&parts), bytes.clone());
    Ok((Request::from_parts(parts, full(bytes)), Some(replay)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{boxed, empty};

    const SEC: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn a_stalled_small_body_ends_at_the_deadline() {
        // A body that announces 5 bytes and never sends them.
        struct Stalled;
        impl http_body::Body for Stalled {
            type Data = Bytes;
            type Error = std::io::Error;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>>
            {
                std::task::Poll::Pending
            }
            fn size_hint(&self) -> http_body::SizeHint {
                http_body::SizeHint::with_exact(5)
            }
        }
        let req = Request::post("/a").body(boxed(Stalled)).unwrap();
        let err = prepare(req, 10, SEC).await.unwrap_err();
        assert!(matches!(err, PrepareError::TimedOut(_)), "{err}");
    }

    #[tokio::test]
    async fn small_bodies_are_kept_large_or_unknown_ones_stream() {
        let req = Request::post("/a")
            .header("x", "1")
            .body(full("hello"))
            .unwrap();
        let (_, replay) = prepare(req, 10, SEC).await.unwrap();
        let again = replay.unwrap().request();
        assert_eq!(again.headers()["x"], "1");
        assert_eq!(
            again.into_body().collect().await.unwrap().to_bytes(),
            "hello"
        );

        let req = Request::post("/a").body(full(vec![0u8; 11])).unwrap();
        assert!(prepare(req, 10, SEC).await.unwrap().1.is_none());

        let stream = http_body_util::StreamBody::new(futures_stream());
        let req = Request::post("/a").body(boxed(stream)).unwrap();
        assert!(prepare(req, 10, SEC).await.unwrap().1.is_none());

        let req = Request::get("/").body(empty()).unwrap();
        assert!(prepare(req, 0, SEC).await.unwrap().1.is_some());
    }

    #[tokio::test]
    async fn the_connect_timeout_reaches_the_request_sent_and_every_copy() {
        let t = crate::transport::ConnectTimeout(Duration::from_millis(70));
        for req in [
            Request::get("/").body(empty()).unwrap(),
            Request::post("/").body(full("abc")).unwrap(),
        ] {
            let mut req = req;
            req.extensions_mut().insert(t);
            let (sent, replay) = prepare(req, 10, SEC).await.unwrap();
            assert_eq!(
                sent.extensions().get::<crate::transport::ConnectTimeout>(),
                Some(&t)
            );
            let again = replay.unwrap().request();
            assert_eq!(
                again.extensions().get::<crate::transport::ConnectTimeout>(),
                Some(&t)
            );
        }
    }

    fn futures_stream()
    -> tokio_stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        tokio_stream::iter(vec![Ok(http_body::Frame::data(Bytes::from_static(b"x")))])
    }

    #[test]
    fn idempotency_by_method_or_mark() {
        assert!(is_idempotent(&Request::get("/").body(()).unwrap()));
        assert!(is_idempotent(&Request::put("/").body(()).unwrap()));
        assert!(!is_idempotent(&Request::post("/").body(()).unwrap()));
        let mut post = Request::post("/").body(()).unwrap();
        post.extensions_mut().insert(Idempotent);
        assert!(is_idempotent(&post));
    }

    #[test]
    fn a_valid_idempotency_key_makes_a_post_idempotent_and_nothing_else_does() {
        let keyed = |values: &[&[u8]]| {
            let mut post = Request::post("/").body(()).unwrap();
            for v in values {
                post.headers_mut().append(
                    IDEMPOTENCY_KEY,
                    http::HeaderValue::from_bytes(v).expect("a header value"),
                );
            }
            post
        };
        assert!(is_idempotent(&keyed(&[b"order-42"])));
        assert_eq!(
            idempotency_key(keyed(&[b"order-42"]).headers()),
            Some("order-42")
        );
        let long = vec![b'k'; MAX_IDEMPOTENCY_KEY];
        assert!(is_idempotent(&keyed(&[&long])));
        let too_long = vec![b'k'; MAX_IDEMPOTENCY_KEY + 1];
        for bad in [
            keyed(&[]),
            keyed(&[b""]),
            keyed(&[&too_long]),
            keyed(&[b"two words"]),
            keyed(&[b"tab\tin"]),
            keyed(&[b"caf\xc3\xa9"]),
            keyed(&[b"a", b"b"]),
        ] {
            assert!(!is_idempotent(&bad), "{:?}", bad.headers());
        }
    }
}
