//! Metrics and logging set-up every Detour process shares: the one Prometheus recorder of the
//! process, its upkeep, and the tracing subscriber. `docs/metrics.md` lists every metric.

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
