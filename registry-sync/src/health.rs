//! Active health checks of endpoints the catalog keeps against the registry's word: a TCP connect
//! and, when a path is configured, an HTTP/1.1 `GET` of it that must answer 2xx.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use detour_proto::{AppProtocol, Endpoint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How one service's kept instances are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// Time the whole check may take.
    pub timeout: Duration,
    /// Path to `GET` after connecting (HTTP/1.1 providers); `None`: the connect alone decides.
    pub http_path: Option<String>,
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(500),
            http_path: None,
        }
    }
}

/// Active health check of one endpoint (the seam for tests).
pub trait HealthCheck: Send + Sync + 'static {
    /// Whether `ep` passes `spec`.
    fn check(&self, ep: &Endpoint, spec: &CheckSpec) -> Pin<Box<dyn Future<Output = bool> + Send>>;
}

/// Checks over the network: TCP connect to the provider's address, then the HTTP `GET` if the
/// spec names a path and the provider speaks HTTP/1.1 (HTTP/2 and gRPC providers are checked by
/// connect alone). An endpoint reached through its PA only (`no_direct`) is never dialled on its
/// own address (that may be the checking host's own loopback): its PA is, by connect alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetCheck;

impl HealthCheck for NetCheck {
    fn check(&self, ep: &Endpoint, spec: &CheckSpec) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let (addr, path) = if ep.no_direct {
            match ep.pa_address {
                Some(pa) => (pa, None),
                None => return Box::pin(async { false }),
            }
        } else {
            let path = spec
                .http_path
                .clone()
                .filter(|_| ep.protocol == AppProtocol::Http1);
            (ep.app_address, path)
        };
        let limit = spec.timeout;
        Box::pin(async move {
            let probe = async {
                let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                let Some(path) = path else {
                    return Some(true);
                };
                let req = format!(
                    "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: detour-health\r\nconnection: close\r\n\r\n"
                );
                stream.write_all(req.as_bytes()).await.ok()?;
                Some(status_is_success(&mut stream).await)
            };
            matches!(tokio::time::timeout(limit, probe).await, Ok(Some(true)))
        })
    }
}

/// Reads a response's status line; true for 2xx.
async fn status_is_success(stream: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let mut len = 0;
    // "HTTP/1.1 200" is 12 bytes; read until the status code is in.
    while len < 12 {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => len += n,
        }
    }
    let line = &buf[..len];
    line.starts_with(b"HTTP/1.") && line.get(9) == Some(&b'2')
}

/// A server answering every connection with `status` after reading the request head.
#[cfg(test)]
pub(crate) async fn answering(status: &'static str) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
            let _ = s.write_all(resp.as_bytes()).await;
        }
    });
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::{HostId, InstanceId, ServiceName};
    use tokio::net::TcpListener;

    fn ep(addr: std::net::SocketAddr) -> Endpoint {
        Endpoint::new(
            ServiceName::new("echo").unwrap(),
            InstanceId::new("i1").unwrap(),
            HostId::new("h1").unwrap(),
            addr,
        )
    }

    fn spec(path: Option<&str>) -> CheckSpec {
        CheckSpec {
            timeout: Duration::from_secs(2),
            http_path: path.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn connect_and_http_get_decide() {
        let ok = answering("200 OK").await;
        let sick = answering("503 Service Unavailable").await;
        assert!(NetCheck.check(&ep(ok), &spec(None)).await);
        assert!(NetCheck.check(&ep(ok), &spec(Some("/healthz"))).await);
        // Accepting connections is not enough when a path is configured.
        assert!(NetCheck.check(&ep(sick), &spec(None)).await);
        assert!(!NetCheck.check(&ep(sick), &spec(Some("/healthz"))).await);
        // Nothing listening.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = l.local_addr().unwrap();
        drop(l);
        assert!(!NetCheck.check(&ep(closed), &spec(None)).await);
    }

    #[tokio::test]
    async fn a_silent_server_fails_within_the_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let spec = CheckSpec {
            timeout: Duration::from_millis(200),
            http_path: Some("/healthz".into()),
        };
        // Accepted by the kernel's backlog, never answered.
        assert!(!NetCheck.check(&ep(addr), &spec).await);
        drop(l);
    }

    #[tokio::test]
    async fn http2_and_grpc_providers_are_checked_by_connect_alone() {
        let sick = answering("503 Service Unavailable").await;
        let mut e = ep(sick);
        e.protocol = AppProtocol::Http2;
        assert!(NetCheck.check(&e, &spec(Some("/healthz"))).await);
    }
}
