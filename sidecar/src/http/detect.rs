//! Protocol detection on accepted connections: HTTP/2 with prior knowledge or HTTP/1.1, and an
//! early check of the first HTTP/1.1 request head so malformed or oversized input gets a clear,
//! marked answer instead of a bare hyper error.
//!
//! The bytes read for detection are replayed to hyper by [`Prefixed`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use detour_core::failure::MeshErrorKind;

use crate::http::respond::MeshError;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most headers accepted in one request head: hyper's own bound for the heads after the first,
/// which it parses on the stack (with a larger `max_headers`, hyper allocates and fills two
/// arrays of that many entries for every head). Envoy's default is the same.
pub const MAX_HEADERS: usize = 100;

/// What the first bytes of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/2 prior knowledge.
    Http2,
    /// HTTP/1.x with a well-formed first head.
    Http1,
    /// The peer closed before sending a request.
    Closed,
    /// A bad first request, already answered with this error.
    Rejected(MeshError),
}

/// Classifies `buf` (the bytes read so far): `None` means more bytes are needed.
pub fn classify(buf: &[u8], max_header_bytes: usize) -> Option<Result<Detected, MeshError>> {
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (buf.len() >= H2_PREFACE.len()).then_some(Ok(Detected::Http2));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > max_header_bytes => {
            Some(Err(too_large(len, max_header_bytes)))
        }
        Ok(httparse::Status::Complete(_)) => Some(Ok(Detected::Http1)),
        Ok(httparse::Status::Partial) if buf.len() > max_header_bytes => {
            Some(Err(too_large(buf.len(), max_header_bytes)))
        }
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Err(MeshError::new(
            MeshErrorKind::HeaderTooLarge,
            format!("more than {MAX_HEADERS} headers"),
        ))),
        Err(e) => Some(Err(MeshError::new(
            MeshErrorKind::MalformedRequest,
            format!("bad request head: {e}"),
        ))),
    }
}

fn too_large(size: usize, limit: usize) -> MeshError {
    MeshError::new(
        MeshErrorKind::HeaderTooLarge,
        format!("{size} bytes, limit {limit}"),
    )
}

/// Reads until the protocol is known. On a bad HTTP/1.1 head, answers it (400 or 431 with
/// `x-detour-error`) and reports [`Detected::Rejected`].
pub async fn detect<S>(
    io: &mut S,
    buf: &mut BytesMut,
    max_header_bytes: usize,
    head_timeout: Duration,
    proxy: &str,
) -> io::Result<Detected>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let read = async {
        loop {
            if io.read_buf(buf).await? == 0 {
                return Ok::<_, io::Error>(Ok(Detected::Closed));
            }
            if let Some(r) = classify(buf, max_header_bytes) {
                return Ok(r);
            }
        }
    };
    let outcome = match tokio::time::timeout(head_timeout, read).await {
        Ok(r) => r?,
        Err(_) => return Ok(Detected::Closed),
    };
    match outcome {
        Ok(d) => Ok(d),
        Err(err) => {
            metrics::counter!("detour_rejected_requests_total", "reason" => err.reason())
                .increment(1);
            tracing::info!(error = %err, "rejected a bad request head");
            let body = format!("{err}\n");
            let head = format!(
                "HTTP/1.1 {} {}\r\n{}: {}\r\n{}: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                err.kind.status().as_u16(),
                err.kind.status().canonical_reason().unwrap_or(""),
                detour_proto::ERROR_HEADER,
                err.reason(),
                detour_proto::PROXY_HEADER,
                proxy,
                body.len()
            );
            io.write_all(head.as_bytes()).await?;
            io.write_all(body.as_bytes()).await?;
            io.shutdown().await?;
            Ok(Detected::Rejected(err))
        }
    }
}

/// An I/O stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: BytesMut,
    io: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix`, then reads from `io`.
    pub fn new(prefix: BytesMut, io: S) -> Self {
        Self { prefix, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefaces_and_heads() {
        assert_eq!(classify(b"PRI * HT", 1024), None);
        assert_eq!(classify(H2_PREFACE, 1024), Some(Ok(Detected::Http2)));
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n", 1024), None);
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1024),
            Some(Ok(Detected::Http1))
        );
        let kind = |buf: &[u8]| match classify(buf, 1024) {
            Some(Err(e)) => Some(e.kind),
            _ => None,
        };
        assert_eq!(
            kind(b"\x16\x03\x01 hello\r\n\r\n"),
            Some(MeshErrorKind::MalformedRequest)
        );
        assert_eq!(
            kind(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"),
            Some(MeshErrorKind::MalformedRequest)
        );
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(2000));
        assert_eq!(kind(big.as_bytes()), Some(MeshErrorKind::HeaderTooLarge));
    }

    #[tokio::test]
    async fn bad_heads_are_answered_with_the_mesh_header() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
        let mut buf = BytesMut::new();
        let d = detect(&mut server, &mut buf, 1024, Duration::from_secs(1), "h1")
            .await
            .unwrap();
        assert!(
            matches!(&d, Detected::Rejected(e) if e.kind == MeshErrorKind::MalformedRequest),
            "{d:?}"
        );
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("x-detour-error: malformed-request"), "{out}");
    }

    #[tokio::test]
    async fn prefix_is_replayed() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut p = Prefixed::new(BytesMut::from(&b"hello"[..]), server);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
