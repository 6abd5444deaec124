//! The sidecar's per-request metrics, resolved once; the recorder, its upkeep and logging are
//! the ones every Detour process shares (`detour_registry::telemetry`). `docs/metrics.md`
//! lists every metric.

use std::sync::OnceLock;
use std::time::Duration;

pub use detour_registry::telemetry::{prometheus, spawn_upkeep};

/// The label values of `detour_requests_total` and `detour_response_head_seconds`.
const DIRECTIONS: [&str; 2] = ["outbound", "inbound"];
const PATHS: [&str; 4] = ["mesh", "ca_direct", "local", "none"];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The per-request metrics, resolved once: looking a labelled metric up in the recorder on
/// every request (hashing its key, comparing labels) cost more than recording it.
struct RequestMetrics {
    requests: Vec<metrics::Counter>,
    head: [metrics::Histogram; 2],
}

static REQUEST_METRICS: OnceLock<RequestMetrics> = OnceLock::new();

fn request_metrics() -> &'static RequestMetrics {
    REQUEST_METRICS.get_or_init(|| {
        // The recorder first, so that the handles resolve to it.
        prometheus();
        let mut requests = Vec::with_capacity(DIRECTIONS.len() * PATHS.len() * CLASSES.len());
        for direction in DIRECTIONS {
            for path in PATHS {
                for class in CLASSES {
                    requests.push(metrics::counter!(
                        "detour_requests_total",
                        "direction" => direction,
                        "path" => path,
                        "class" => class
                    ));
                }
            }
        }
        let head = DIRECTIONS
            .map(|d| metrics::histogram!("detour_response_head_seconds", "direction" => d));
        RequestMetrics { requests, head }
    })
}

/// Which way a request went through this sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From a local caller (the CA).
    Outbound = 0,
    /// From a remote sidecar to a local provider (the PA).
    Inbound = 1,
}

/// The path label of a request: `mesh`, `ca_direct`, `local` (the PA to its provider), `none`
/// (answered with a mesh error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathLabel {
    /// Through the remote PA.
    Mesh = 0,
    /// Straight to the provider from the CA.
    CaDirect = 1,
    /// The PA to its local provider.
    Local = 2,
    /// A mesh error.
    None = 3,
}

impl PathLabel {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        PATHS[self as usize]
    }
}

/// Counts one finished request head (`detour_requests_total`) and its time
/// (`detour_response_head_seconds`).
pub fn record_request(
    direction: Direction,
    path: PathLabel,
    status: http::StatusCode,
    took: Duration,
) {
    let m = request_metrics();
    let i = (direction as usize * PATHS.len() + path as usize) * CLASSES.len() + class_of(status);
    m.requests[i].increment(1);
    m.head[direction as usize].record(took.as_secs_f64());
}

/// Ends a hop's span with what it answered: the method (`Some` when recording), the status,
/// the path and the mesh error; a mesh error or a 5xx marks it failed.
pub fn close_hop<B>(
    hop: &mut detour_core::trace::Span,
    method: Option<String>,
    resp: &http::Response<B>,
    path: PathLabel,
    error: Option<detour_core::MeshErrorKind>,
) {
    if !hop.is_recording() {
        return;
    }
    if let Some(m) = method {
        hop.attr("http.request.method", m);
    }
    hop.attr("http.response.status_code", resp.status().as_u16());
    hop.attr("detour.path", path.as_str());
    match error {
        Some(kind) => {
            hop.attr("detour.error", kind.reason());
            hop.fail(|| kind.to_string());
        }
        None if resp.status().is_server_error() => hop.fail(|| resp.status().to_string()),
        None => {}
    }
}

/// The golden metrics of one service in one direction, resolved once per service:
/// `detour_service_requests_total{direction, service, path, class}`,
/// `detour_service_response_seconds{direction, service, path}` and
/// `detour_service_mesh_errors_total{direction, service, kind}`. The `service` label is
/// bounded (`detour_registry::labels`: 1,000 names, then `other`).
pub struct ServiceMetrics {
    direction: Direction,
    service: String,
    requests: Vec<metrics::Counter>,
    seconds: Vec<metrics::Histogram>,
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceMetrics")
            .field("direction", &self.direction)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ServiceMetrics {
    /// The metrics of `service` in `direction`.
    pub fn new(direction: Direction, service: &detour_proto::ServiceName) -> ServiceMetrics {
        prometheus();
        let d = DIRECTIONS[direction as usize];
        let label = detour_registry::labels::service(service);
        let mut requests = Vec::with_capacity(PATHS.len() * CLASSES.len());
        for path in PATHS {
            for class in CLASSES {
                requests.push(metrics::counter!(
                    "detour_service_requests_total",
                    "direction" => d,
                    "service" => label.clone(),
                    "path" => path,
                    "class" => class
                ));
            }
        }
        let seconds = PATHS
            .iter()
            .map(|path| {
                metrics::histogram!(
                    "detour_service_response_seconds",
                    "direction" => d,
                    "service" => label.clone(),
                    "path" => *path
                )
            })
            .collect();
        ServiceMetrics {
            direction,
            service: label,
            requests,
            seconds,
        }
    }

    /// The `service` label value (the service's name, or `other` beyond the bound).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Counts one request of the service, answered with `status` over `path` after `took`;
    /// `error`: the mesh error it was answered with, if any.
    pub fn record(
        &self,
        path: PathLabel,
        status: http::StatusCode,
        took: Duration,
        error: Option<detour_core::MeshErrorKind>,
    ) {
        self.requests[path as usize * CLASSES.len() + class_of(status)].increment(1);
        self.seconds[path as usize].record(took.as_secs_f64());
        if let Some(kind) = error {
            metrics::counter!(
                "detour_service_mesh_errors_total",
                "direction" => DIRECTIONS[self.direction as usize],
                "service" => self.service.clone(),
                "kind" => kind.reason()
            )
            .increment(1);
        }
    }
}

/// The index of `status`'s class in [`CLASSES`].
fn class_of(status: http::StatusCode) -> usize {
    match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}
