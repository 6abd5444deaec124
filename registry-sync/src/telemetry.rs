//! Process set-up every Detour binary shares: the one Prometheus recorder of the process, its
//! upkeep, the tracing subscriber, and the open-files limit. `docs/metrics.md` lists every
//! metric.

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

/// Raises the open-files soft limit to the hard one: a proxy holds two descriptors per request
/// in flight, an agent one per client, and the common soft default (1024) runs out long before
/// the hard one.
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (lim.current, lim.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => tracing::debug!(from = current, to = maximum, "open-files limit raised"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
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
