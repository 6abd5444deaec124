//! The agent's read-only admin API on a loopback port: `GET /live`, `/ready` (200 once it is
//! the leader or a standby), `/metrics` (Prometheus text), `/state` (JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Most admin connections served at once (more wait in the backlog).
const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request head; and to finish a connection at all.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// What the API reads.
pub trait StateSource: Send + Sync + 'static {
    /// Whether the agent is ready (leader or standby).
    fn ready(&self) -> bool;
    /// The `/state` document.
    fn state(&self) -> serde_json::Value;
}

fn reply(status: StatusCode, kind: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(kind));
    r
}

fn route(
    req: &Request<Incoming>,
    src: &dyn StateSource,
    prom: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "read-only API: GET only\n",
        );
    }
    match req.uri().path() {
        "/live" => reply(StatusCode::OK, TEXT, "live\n"),
        "/ready" if src.ready() => reply(StatusCode::OK, TEXT, "ready\n"),
        "/ready" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: the target was not reached yet\n",
        ),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            detour_registry::telemetry::render_from(prom),
        ),
        "/state" => {
            let body = serde_json::to_vec_pretty(&src.state()).unwrap_or_default();
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: /live, /ready, /metrics, /state\n",
        ),
    }
}

/// Serves the API on `listener` for ever.
pub async fn serve(listener: TcpListener, src: Arc<dyn StateSource>, prom: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (io, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (src, prom) = (src.clone(), prom.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = route(&req, &*src, &prom);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}
