//! A raw HTTP/1.1 provider for tests that need answers no real server gives on purpose: it
//! reads request heads (no bodies) on kept-alive connections and answers each as told — bytes
//! after a delay, or a closed connection — counting connections that carried a request (health
//! checks only connect) and requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to do with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Write these bytes (a whole response).
    Send(Vec<u8>),
    /// Close the connection without an answer.
    Close,
}

/// A 200 with `body`.
pub fn ok(body: &str) -> Reply {
    Reply::Send(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// A running raw provider.
#[derive(Debug, Clone)]
pub struct RawProvider {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections that carried at least one request.
    pub conns: Arc<AtomicU64>,
    /// Requests read.
    pub requests: Arc<AtomicU64>,
}

impl RawProvider {
    /// Listens on `ip` (port 0); each request head (lower-cased) goes to `reply`, whose answer
    /// is written after `delay`.
    pub async fn start(
        ip: &str,
        delay: Duration,
        reply: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> RawProvider {
        let l = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind a raw provider");
        let addr = l.local_addr().expect("local address");
        let p = RawProvider {
            addr,
            conns: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
        };
        let (conns, requests, reply) = (p.conns.clone(), p.requests.clone(), Arc::new(reply));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (conns, requests, reply) = (conns.clone(), requests.clone(), reply.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut first = true;
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                            buf.drain(..end + 4);
                            if std::mem::take(&mut first) {
                                conns.fetch_add(1, Ordering::Relaxed);
                            }
                            requests.fetch_add(1, Ordering::Relaxed);
                            let bytes = match reply(&head) {
                                Reply::Close => return,
                                Reply::Send(b) => b,
                            };
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            if s.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        p
    }
}
