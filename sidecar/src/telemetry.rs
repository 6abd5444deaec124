//! Metrics and logging set-up: the one Prometheus recorder of the process and the tracing
//! subscriber. `docs/metrics.md` lists every metric.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!(
                "a metrics recorder was already installed; /metrics shows only this one"
            );
        }
        handle
    })
}

/// How often the histograms' recorded samples are folded into their buckets. Until then each
/// sample is kept (8 bytes; at 20,000 requests a second, 160 KB a second), so this bounds the
/// memory they hold.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// Keeps histograms bounded; call once per process inside the runtime.
pub fn spawn_upkeep() {
    let handle = prometheus().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            handle.run_upkeep();
        }
    });
}

/// Installs the tracing subscriber (`RUST_LOG`, default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

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

/// Counts one finished request head (`detour_requests_total`) and its time
/// (`detour_response_head_seconds`).
pub fn record_request(
    direction: Direction,
    path: PathLabel,
    status: http::StatusCode,
    took: Duration,
) {
    let m = request_metrics();
    let class = match status.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    };
    let i = (direction as usize * PATHS.len() + path as usize) * CLASSES.len() + class;
    m.requests[i].increment(1);
    m.head[direction as usize].record(took.as_secs_f64());
}
