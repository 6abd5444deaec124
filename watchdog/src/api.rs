//! The watchdog's API. On its Unix socket (mode 0600: the host's operator and its sidecar)
//! everything; on its loopback port, reading only.
//!
//! | endpoint | where | answer |
//! |---|---|---|
//! | `GET /live` | both | 200 while the watchdog runs |
//! | `GET /ready` | both | 200 while its sidecar is ready, 503 otherwise |
//! | `GET /metrics` | both | Prometheus text |
//! | `GET /state` | both | JSON: host, the sidecar (pid, state, binary and previous binary, adopted), restarts, crash loop, last exit, upgrade, the registrations held |
//! | `PUT /v1/publication` | Unix | the sidecar's publication (a `HostPublication`, at most 1 MiB) |
//! | `POST /v1/upgrade` | Unix | `{"binary": PATH}` or `{"rollback": true}`: an upgrade without loss; answers when it is done or abandoned |
//! | `POST /v1/shutdown` | Unix | drains the sidecar, withdraws the host's registrations, stops the watchdog |

use detour_proto::sync::Mutex;
use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use detour_core::BoxBody;
use detour_core::body::full;
use detour_proto::{HostId, HostPublication, PUBLICATION_PROTOCOL, PUBLICATION_PROTOCOL_HEADER};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};

use crate::held::Held;

/// Largest request body taken.
const MAX_BODY: usize = 1 << 20;

/// Most connections served at once on each listener (more wait in the accept queue): holding
/// the loopback port's connections slows its readers down and nothing else — the sidecar
/// publishes, and the operator commands, on the Unix socket, which has its own.
const MAX_CONNECTIONS: usize = 64;

/// Time to send a request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest life of a connection to the read-only loopback API.
const READ_ONLY_CONNECTION: std::time::Duration = std::time::Duration::from_secs(60);

/// What the watchdog is doing, for `/state` and `/ready`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The sidecar's process id, while there is one.
    pub sidecar_pid: Option<u32>,
    /// `starting`, `ready`, `down` or `hung`.
    pub sidecar_state: String,
    /// The binary the sidecar runs.
    pub binary: PathBuf,
    /// The binary before the last upgrade (what a rollback goes back to).
    pub previous_binary: Option<PathBuf>,
    /// The version label of the gray rule that chose the binary, if one did.
    pub rule_version: String,
    /// Whether the running sidecar was adopted from an earlier watchdog.
    pub adopted: bool,
    /// Restarts so far (any reason).
    pub restarts: u64,
    /// Whether the host is marked `failed` (a crash loop).
    pub crash_loop: bool,
    /// Unplanned exits in the crash-loop window.
    pub recent_crashes: usize,
    /// How the last sidecar ended, and why.
    pub last_exit: Option<String>,
    /// `idle`, or what an upgrade is doing.
    pub upgrade: String,
    /// How the last upgrade ended.
    pub last_upgrade: Option<String>,
}

/// Where an upgrade goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeTo {
    /// This binary.
    Binary(PathBuf),
    /// The binary before the last upgrade.
    Rollback,
}

/// What an upgrade did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeDone {
    /// The new sidecar's process id.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// The binary before.
    pub previous: PathBuf,
    /// From asking to the new sidecar being ready, in ms.
    pub ready_ms: u64,
    /// Until the old one had exited, in ms.
    pub done_ms: u64,
}

/// What the API asks of the agent.
#[derive(Debug)]
pub enum Command {
    /// Upgrade (or roll back) the sidecar.
    Upgrade {
        /// Where to.
        to: UpgradeTo,
        /// The outcome.
        reply: oneshot::Sender<Result<UpgradeDone, String>>,
    },
    /// Drain the sidecar, withdraw everything, stop.
    Shutdown {
        /// Answered once done.
        reply: oneshot::Sender<()>,
    },
}

/// The body of `POST /v1/upgrade`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The binary to run.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Back to the previous binary instead.
    #[serde(default)]
    pub rollback: bool,
}

/// The API's shared parts.
pub struct Api {
    /// This host.
    pub host: HostId,
    /// The registrations held.
    pub held: Arc<Held>,
    /// What the agent is doing.
    pub status: Arc<Mutex<Status>>,
    /// Requests to the agent.
    pub cmds: mpsc::Sender<Command>,
    /// Connections open now (a stopping watchdog waits for its last answers to go out).
    pub open: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Api {
    /// Binds the Unix socket (mode 0600, replacing a stale file) and serves both listeners.
    pub fn serve(self: Arc<Self>, tcp: TcpListener, unix_path: &Path) -> std::io::Result<()> {
        if unix_path.exists() {
            if std::os::unix::net::UnixStream::connect(unix_path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another watchdog serves {}", unix_path.display()),
                ));
            }
            std::fs::remove_file(unix_path)?;
        }
        let unix = UnixListener::bind(unix_path)?;
        std::fs::set_permissions(unix_path, std::fs::Permissions::from_mode(0o600))?;
        let me = self.clone();
        let unix_slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = unix_slots.clone().acquire_owned().await else {
                    return;
                };
                match unix.accept().await {
                    Ok((s, _)) => me.clone().conn(s, true, permit),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        });
        let tcp_slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = tcp_slots.clone().acquire_owned().await else {
                    return;
                };
                match tcp.accept().await {
                    Ok((s, _)) => self.clone().conn(s, false, permit),
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        });
        Ok(())
    }

    /// Waits (up to `within`) until no connection is open: the answer to a shutdown has gone.
    pub async fn quiesce(&self, within: std::time::Duration) {
        let mut rx = self.open.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|n| *n == 0)).await;
    }

    fn conn<S>(self: Arc<Self>, io: S, trusted: bool, permit: tokio::sync::OwnedSemaphorePermit)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.open.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            let _permit = permit;
            let open = self.open.clone();
            let svc = service_fn(move |req| {
                let api = self.clone();
                async move { Ok::<_, Infallible>(api.handle(req, trusted).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc);
            if trusted {
                // An upgrade's answer may take as long as the upgrade.
                let _ = conn.await;
            } else {
                let _ = tokio::time::timeout(READ_ONLY_CONNECTION, conn).await;
            }
            open.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    async fn handle(&self, req: Request<Incoming>, trusted: bool) -> Response<BoxBody> {
        let path = req.uri().path().to_owned();
        match (req.method().clone(), path.as_str(), trusted) {
            (Method::GET, "/live", _) => text(StatusCode::OK, "live\n"),
            (Method::GET, "/ready", _) => {
                if self.status().sidecar_state == "ready" {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (Method::GET, "/metrics", _) => {
                let mut r = text(StatusCode::OK, &detour_registry::telemetry::render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            (Method::GET, "/state", _) => self.state().await,
            (Method::PUT, "/v1/publication", true) => match body_json(req).await {
                Ok(p) => self.publication(p).await,
                Err(r) => r,
            },
            (Method::POST, "/v1/upgrade", true) => match body_json(req).await {
                Ok(u) => self.upgrade(u).await,
                Err(r) => r,
            },
            (Method::POST, "/v1/shutdown", true) => {
                let (reply, done) = oneshot::channel();
                if self.cmds.send(Command::Shutdown { reply }).await.is_err() {
                    return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
                }
                let _ = done.await;
                text(StatusCode::OK, "stopped\n")
            }
            (_, "/v1/publication" | "/v1/upgrade" | "/v1/shutdown", false) => text(
                StatusCode::FORBIDDEN,
                "only on the watchdog's Unix socket\n",
            ),
            (_, "/live" | "/ready" | "/metrics" | "/state", _)
            | (_, "/v1/publication" | "/v1/upgrade" | "/v1/shutdown", true) => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn status(&self) -> Status {
        self.status.lock().clone()
    }

    async fn state(&self) -> Response<BoxBody> {
        let publication = self.held.publication().await;
        let mark = self.held.current_mark().await.map(|m| m.as_str());
        let body = serde_json::json!({
            "host": self.host,
            "version": crate::VERSION,
            "publication_protocol": PUBLICATION_PROTOCOL,
            "watchdog": self.status(),
            "held": { "mark": mark, "publication": publication },
        });
        let mut r = Response::new(full(body.to_string()));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    async fn publication(&self, p: HostPublication) -> Response<BoxBody> {
        let mut r = if !(PUBLICATION_PROTOCOL - 1..=PUBLICATION_PROTOCOL + 1).contains(&p.protocol)
        {
            tracing::warn!(
                sidecar = p.protocol,
                watchdog = PUBLICATION_PROTOCOL,
                "refused a publication of a protocol this watchdog does not speak"
            );
            metrics::counter!("detour_watchdog_publications_refused_total").increment(1);
            text(
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!(
                    "publication protocol {} is not one this watchdog takes ({} to {})\n",
                    p.protocol,
                    PUBLICATION_PROTOCOL - 1,
                    PUBLICATION_PROTOCOL + 1
                ),
            )
        } else {
            match self.held.apply(p).await {
                Ok(()) => text(StatusCode::OK, "held\n"),
                Err(e) => {
                    tracing::warn!(error = %e, "refused a publication");
                    metrics::counter!("detour_watchdog_publications_refused_total").increment(1);
                    text(StatusCode::UNPROCESSABLE_ENTITY, &format!("{e}\n"))
                }
            }
        };
        r.headers_mut().insert(
            PUBLICATION_PROTOCOL_HEADER,
            HeaderValue::from(PUBLICATION_PROTOCOL),
        );
        r
    }

    async fn upgrade(&self, u: UpgradeRequest) -> Response<BoxBody> {
        let to = match (u.binary, u.rollback) {
            (Some(b), false) => UpgradeTo::Binary(b),
            (None, true) => UpgradeTo::Rollback,
            _ => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "give either \"binary\" or \"rollback\": true\n",
                );
            }
        };
        let (reply, done) = oneshot::channel();
        if self
            .cmds
            .send(Command::Upgrade { to, reply })
            .await
            .is_err()
        {
            return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
        }
        match done.await {
            Ok(Ok(d)) => {
                let mut r =
                    Response::new(full(serde_json::to_string(&d).unwrap_or_default() + "\n"));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            Ok(Err(reason)) => text(StatusCode::CONFLICT, &format!("{reason}\n")),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
        }
    }
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes; a bad one is answered 400 or 413.
async fn body_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<BoxBody>> {
    let bytes: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body: {e} (at most {MAX_BODY} bytes)\n"),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| text(StatusCode::BAD_REQUEST, &format!("not valid JSON: {e}\n")))
}

fn text(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = status;
    r
}
