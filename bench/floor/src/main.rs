//! `detour-floor`: one proxy hop and nothing else — the floor `bench/run.sh` measures Detour
//! against. It has the sidecar's runtime (one current-thread tokio runtime), socket options
//! (TCP_NODELAY both ways) and pool shape (a LIFO pool of idle HTTP/1.1 connections handed back
//! when a response body ends; one shared HTTP/2 connection with the sidecar's windows), and none
//! of Detour's code: no routing, registry, link state, retries, replay copy, metrics or timers.
//!
//! ```text
//! detour-floor --listen 127.0.0.1:0 --to 127.0.0.2:8080 --accept h1 --upstream h2 [--addr-file F]
//! ```
//!
//! Two hops make the mesh form (`h1 → h2c → h1`: the first accepts HTTP/1.1 and sends HTTP/2,
//! the second accepts HTTP/2 and sends HTTP/1.1) or a plain chain (`h1 → h1 → h1`). The
//! request's `Host` (or `:authority`) is kept; a failed upstream answers 502.

// std's mutex, as a bare hyper proxy would have it: the floor takes nothing from Detour.
#![allow(clippy::disallowed_types)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{Request, Response, StatusCode, Uri, Version, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper::server::conn::{http1 as server1, http2 as server2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

/// One minimal hyper proxy hop.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to accept on (port 0: any free port; see --addr-file).
    #[arg(long)]
    listen: SocketAddr,
    /// The next hop.
    #[arg(long)]
    to: SocketAddr,
    /// Protocol of accepted connections.
    #[arg(long, value_enum)]
    accept: Proto,
    /// Protocol towards the next hop (h2: cleartext HTTP/2).
    #[arg(long, value_enum)]
    upstream: Proto,
    /// Writes the bound address here once accepting.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    H1,
    H2,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    if let Some(f) = &args.addr_file {
        std::fs::write(f, listener.local_addr()?.to_string())?;
    }
    let up = Arc::new(Upstream {
        to: args.to,
        proto: args.upstream,
        idle: Mutex::new(Vec::new()),
        h2: tokio::sync::Mutex::new(None),
    });
    loop {
        let (s, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => continue,
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(serve(s, up.clone(), args.accept));
    }
}

/// Serves one accepted connection.
async fn serve(s: TcpStream, up: Arc<Upstream>, accept: Proto) {
    let svc = service_fn(move |req| {
        let up = up.clone();
        async move { Ok::<_, Infallible>(up.forward(req).await) }
    });
    let io = TokioIo::new(s);
    let _ = match accept {
        Proto::H1 => server1::Builder::new().serve_connection(io, svc).await,
        Proto::H2 => {
            server2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(16 << 20)
                .serve_connection(io, svc)
                .await
        }
    };
}

/// The next hop and the connections to it.
struct Upstream {
    to: SocketAddr,
    proto: Proto,
    /// Idle HTTP/1.1 connections, last returned first out.
    idle: Mutex<Vec<client1::SendRequest<Incoming>>>,
    /// The shared HTTP/2 connection (locked while one is opened).
    h2: tokio::sync::Mutex<Option<client2::SendRequest<Incoming>>>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

impl Upstream {
    async fn forward(self: Arc<Self>, req: Request<Incoming>) -> Response<Relay> {
        match self.clone().try_forward(req).await {
            Ok(resp) => resp,
            Err(_) => {
                let mut resp = Response::new(Relay::empty());
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp
            }
        }
    }

    async fn try_forward(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Relay>, Failure> {
        let (mut parts, body) = req.into_parts();
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str().to_owned(),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
                .to_owned(),
        };
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        match self.proto {
            Proto::H1 => {
                parts.version = Version::HTTP_11;
                parts.uri = Uri::builder().path_and_query(pq).build()?;
                if !parts.headers.contains_key(header::HOST) {
                    parts.headers.insert(header::HOST, authority.parse()?);
                }
                let mut sender = self.take_h1().await?;
                let resp = sender
                    .send_request(Request::from_parts(parts, body))
                    .await?;
                Ok(resp.map(|inner| Relay {
                    inner: Some(inner),
                    back: Some((sender, self)),
                }))
            }
            Proto::H2 => {
                parts.version = Version::HTTP_2;
                parts.uri = Uri::builder()
                    .scheme("http")
                    .authority(authority)
                    .path_and_query(pq)
                    .build()?;
                parts.headers.remove(header::HOST);
                let mut sender = self.h2_sender().await?;
                sender.ready().await?;
                let resp = sender
                    .send_request(Request::from_parts(parts, body))
                    .await?;
                Ok(resp.map(|inner| Relay {
                    inner: Some(inner),
                    back: None,
                }))
            }
        }
    }

    async fn connect(&self) -> Result<TokioIo<TcpStream>, Failure> {
        let s = TcpStream::connect(self.to).await?;
        s.set_nodelay(true)?;
        Ok(TokioIo::new(s))
    }

    /// An idle HTTP/1.1 connection, or a new one.
    async fn take_h1(&self) -> Result<client1::SendRequest<Incoming>, Failure> {
        loop {
            let Some(mut s) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                break;
            };
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
        }
        let (mut sender, conn) = client1::handshake(self.connect().await?).await?;
        tokio::spawn(conn);
        sender.ready().await?;
        Ok(sender)
    }

    fn give_back(&self, s: client1::SendRequest<Incoming>) {
        if !s.is_closed() {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        }
    }

    /// The shared HTTP/2 connection, opened on first use and again once closed.
    async fn h2_sender(&self) -> Result<client2::SendRequest<Incoming>, Failure> {
        let mut h2 = self.h2.lock().await;
        if let Some(s) = h2.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let (sender, conn) = client2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(self.connect().await?)
            .await?;
        tokio::spawn(conn);
        *h2 = Some(sender.clone());
        Ok(sender)
    }
}

/// A response body relayed from the next hop; over HTTP/1.1 it hands its connection back to
/// the pool once it reached its end (dropped early, the connection is dropped too).
struct Relay {
    inner: Option<Incoming>,
    back: Option<(client1::SendRequest<Incoming>, Arc<Upstream>)>,
}

impl Relay {
    fn empty() -> Self {
        Relay {
            inner: None,
            back: None,
        }
    }

    fn give_back(&mut self) {
        if let Some((s, up)) = self.back.take() {
            up.give_back(s);
        }
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
        if frame.is_none() || inner.is_end_stream() {
            this.give_back();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
