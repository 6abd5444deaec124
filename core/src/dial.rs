//! Where to connect (TCP or a Unix socket), the connected stream of either kind, and listening
//! sockets with a queue deep enough for bursts of connects.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};

/// Connections the kernel queues for a listener before they are accepted. The default of 128
/// overflows when many callers connect at once — after a restart, or when every request waiting
/// on a hung sidecar is re-sent direct — and an overflowing queue drops connection attempts,
/// which then wait a second for the kernel's retransmit.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with `SO_REUSEADDR` and a queue of [`LISTEN_BACKLOG`].
pub fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Where to connect: a TCP address or a Unix socket path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dial {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl std::str::FromStr for Dial {
    type Err = String;

    /// `unix:/path`, an absolute path, or `ip:port`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Dial::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Dial::Unix(PathBuf::from(s)));
        }
        s.parse()
            .map(Dial::Tcp)
            .map_err(|_| format!("{s:?} is neither ip:port nor unix:/path"))
    }
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dial::Tcp(a) => write!(f, "{a}"),
            Dial::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A byte stream of any other kind (in-memory connections in tests).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connected TCP or Unix stream (or, through a custom [`crate::connect::Connect`], any
/// other byte stream).
pub enum Stream {
    /// TCP (with `TCP_NODELAY` set).
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
    /// Anything else.
    Other(Box<dyn Io>),
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stream::Tcp(s) => s.fmt(f),
            Stream::Unix(s) => s.fmt(f),
            Stream::Other(_) => f.write_str("Stream::Other"),
        }
    }
}

impl Stream {
    /// Connects to `dial`.
    pub async fn connect(dial: &Dial) -> io::Result<Stream> {
        match dial {
            Dial::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Dial::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match Pin::get_mut($self) {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Other($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Other(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_parses() {
        assert_eq!(
            "127.0.0.1:80".parse::<Dial>().unwrap(),
            Dial::Tcp("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/x.sock".parse::<Dial>().unwrap(),
            Dial::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "/run/x.sock".parse::<Dial>().unwrap(),
            Dial::Unix("/run/x.sock".into())
        );
        assert!("localhost".parse::<Dial>().is_err());
    }
}
