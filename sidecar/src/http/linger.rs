//! A lingering close: when the server closes a connection, it sends its FIN and then reads (and
//! discards) what the peer still sends until the peer closes too, for a bounded time, before
//! the socket is dropped. Dropped at once, a socket with unread bytes resets the connection
//! (RST on TCP, `ECONNRESET` on a Unix socket), and the peer may lose answers it has not read
//! yet: an HTTP/2 client whose WINDOW_UPDATE hits the reset fails every stream whose frames
//! were still in its buffer — requests this server had answered in full.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// An I/O whose shutdown lingers (see the module).
pub struct Lingering<S> {
    io: S,
    linger: Duration,
    state: State,
}

enum State {
    Open,
    /// FIN sent; reading until the peer's FIN or the deadline.
    Draining(Pin<Box<Sleep>>),
    Done,
}

impl<S> Lingering<S> {
    /// Wraps `io`; its shutdown waits at most `linger` for the peer to close.
    pub fn new(io: S, linger: Duration) -> Self {
        Self {
            io,
            linger,
            state: State::Open,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
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
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Open => {
                    ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    this.state = State::Draining(Box::pin(tokio::time::sleep(this.linger)));
                }
                State::Draining(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        this.state = State::Done;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => this.state = State::Done,
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(_)) => this.state = State::Done,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The server answers, the peer writes something the server never asked for (an HTTP/2
    /// WINDOW_UPDATE, say), the server closes and its socket is dropped; only then does the
    /// peer read.
    async fn read_after_close(lingering: bool) -> std::io::Result<Vec<u8>> {
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        client.write_all(b"late").await.unwrap();
        if lingering {
            let mut server = Lingering::new(server, Duration::from_millis(200));
            server.write_all(b"answer").await.unwrap();
            server.shutdown().await.unwrap();
        } else {
            let mut server = server;
            server.write_all(b"answer").await.unwrap();
            server.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.map(|_| got)
    }

    #[tokio::test]
    async fn the_peer_reads_every_answer_though_it_wrote_after_the_close() {
        assert_eq!(read_after_close(true).await.unwrap(), b"answer");
        // Without the linger the unread bytes reset the connection under the answer.
        let reset = read_after_close(false).await.unwrap_err();
        assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_waited_for_no_longer_than_the_linger() {
        let (server, _client) = tokio::net::UnixStream::pair().unwrap();
        let mut server = Lingering::new(server, Duration::from_secs(1));
        let start = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(1));
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
