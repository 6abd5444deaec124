//! Process set-up every Detour binary shares: the one Prometheus recorder of the process, its
//! upkeep, the tracing subscriber, and the open-files limit. `docs/metrics.md` lists every
//! metric.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Buckets of the per-service response-time histograms (`detour_service_*`), seconds: 100 µs
/// to 30 s.
pub const SERVICE_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
            ])
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Prefix("detour_service_".into()),
                    &SERVICE_BUCKETS,
                )
            })
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::debug!(
                "a metrics recorder was already installed; /metrics shows only this one"
            );
        }
        let docs = documented(METRICS_DOC)
            .into_iter()
            .chain(documented(SYNC_DOC));
        for (name, kind, help) in docs {
            match kind {
                "counter" => metrics::describe_counter!(name, help),
                "gauge" => metrics::describe_gauge!(name, help),
                "histogram" => metrics::describe_histogram!(name, help),
                _ => {}
            }
        }
        handle
    })
}

/// The process's metrics as Prometheus text: those recorded, then the process's own
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
/// `process_max_fds`, `process_start_time_seconds`), read from `/proc` at each scrape.
pub fn render() -> String {
    render_from(prometheus())
}

/// As [`render`], with the recorded metrics of `handle`.
pub fn render_from(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    text.push_str(&process_text());
    text
}

/// Sets `detour_build_info{binary, version} 1`; call once at start.
pub fn build_info(binary: &'static str, version: &'static str) {
    prometheus();
    metrics::describe_gauge!(
        "detour_build_info",
        "Always 1; the labels name the binary and its version."
    );
    metrics::gauge!("detour_build_info", "binary" => binary, "version" => version).set(1.0);
}

/// The process metrics (Prometheus's standard names), from `/proc/self`; what cannot be read
/// is left out.
fn process_text() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    // Page size and clock ticks: the values every Linux Detour runs on uses.
    const PAGE: f64 = 4096.0;
    const TICKS: f64 = 100.0;
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some((_, rest)) = stat.rsplit_once(')')
    {
        // Fields after the command: state is field 3; utime 14, stime 15, starttime 22.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (num(14), num(15)) {
            metric(
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, seconds.",
                (u + s) / TICKS,
            );
        }
        if let (Some(start), Some(boot)) = (num(22), boot_time()) {
            metric(
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, seconds.",
                boot + start / TICKS,
            );
        }
    }
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
        && let Some(rss) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<f64>().ok())
    {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, bytes.",
            rss * PAGE,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count() as f64,
        );
    }
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if let Some(max) = lim.current {
        metric(
            "process_max_fds",
            "gauge",
            "The open-files limit.",
            max as f64,
        );
    }
    out
}

/// The boot time, seconds since the Unix epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// docs/metrics.md and docs/registry-sync.md: their tables give each metric's `# HELP` text.
const METRICS_DOC: &str = include_str!("../../docs/metrics.md");
const SYNC_DOC: &str = include_str!("../../docs/registry-sync.md");

/// The metrics the tables of `doc` describe: (name, type, meaning without Markdown's
/// backticks), from rows `| \`name\` | type | labels | meaning |`.
pub fn documented(doc: &str) -> Vec<(&str, &str, String)> {
    doc.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split(" | ").collect();
            let name = cells.first()?.strip_prefix("| `")?.strip_suffix('`')?;
            if cells.len() < 4 || name.contains('`') || name.contains('*') {
                return None;
            }
            let kind = cells[1].trim();
            let help = cells[3..].join(" | ");
            let help = help.trim_end_matches(" |").trim_end_matches('|').trim();
            Some((name, kind, help.replace('`', "")))
        })
        .collect()
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

/// How log lines are written: `text` (one readable line an event) or `json` (one JSON object
/// a line: `timestamp`, `level`, `target`, `fields`, and the spans it is in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Text,
    /// JSON lines, for a log collector.
    Json,
}

impl LogFormat {
    /// `"text"` or `"json"`.
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// `DETOUR_LOG_FORMAT` (`text` when unset; an unknown value is said on stderr, then text).
    pub fn from_env() -> LogFormat {
        match std::env::var("DETOUR_LOG_FORMAT") {
            Ok(v) => LogFormat::parse(&v).unwrap_or_else(|| {
                eprintln!("DETOUR_LOG_FORMAT={v:?} is not one of \"text\", \"json\": text");
                LogFormat::Text
            }),
            Err(_) => LogFormat::Text,
        }
    }
}

/// Installs the tracing subscriber on stderr: `RUST_LOG` (default `default_level`), lines as
/// `format` says, ANSI colours only when stderr is a terminal (never under journald or in a
/// file).
pub fn init_logging_as(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
    };
}

/// Installs the tracing subscriber (`RUST_LOG`, default `info`; `DETOUR_LOG_FORMAT`).
pub fn init_logging() {
    init_logging_as(LogFormat::from_env(), "info");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name written in `text` (the literal after `counter!(`, `gauge!(`,
    /// `histogram!(`).
    fn emitted(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for macro_name in ["counter!(", "gauge!(", "histogram!("] {
            for (i, _) in text.match_indices(macro_name) {
                let rest = text[i + macro_name.len()..].trim_start();
                if let Some(rest) = rest.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    out.push(rest[..end].to_owned());
                }
            }
        }
        out
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_metric_the_processes_emit_is_documented_with_its_help() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut docs = documented(METRICS_DOC);
        docs.extend(documented(SYNC_DOC));
        let known: std::collections::HashSet<&str> = docs.iter().map(|d| d.0).collect();
        let mut files = Vec::new();
        for dir in [
            "sidecar/src",
            "core/src",
            "thin-sdk/src",
            "registry-sync/src",
            "registry-sync/agent/src",
            "watchdog/src",
        ] {
            sources(&root.join(dir), &mut files);
        }
        assert!(files.len() > 50, "sources found: {}", files.len());
        let mut missing = std::collections::BTreeSet::new();
        let mut all_emitted = std::collections::HashSet::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            for name in emitted(&text) {
                all_emitted.insert(name.clone());
                if name.starts_with("detour_") && !known.contains(name.as_str()) {
                    missing.insert(format!("{name} ({})", f.display()));
                }
            }
        }
        assert!(missing.is_empty(), "not in docs/metrics.md: {missing:?}");
        let emitted_anywhere: std::collections::HashSet<String> = all_emitted;
        let unused: Vec<&str> = docs
            .iter()
            .map(|d| d.0)
            .filter(|n| n.starts_with("detour_") && !emitted_anywhere.contains(*n))
            .collect();
        assert!(unused.is_empty(), "documented, never emitted: {unused:?}");
        for (name, kind, help) in &docs {
            assert!(
                matches!(*kind, "counter" | "gauge" | "histogram"),
                "{name}: type {kind:?}"
            );
            assert!(!help.is_empty(), "{name}: no meaning");
            let suffix_ok = match *kind {
                "counter" => name.ends_with("_total"),
                _ => !name.ends_with("_total"),
            };
            assert!(
                suffix_ok,
                "{name}: a {kind} named against Prometheus's conventions"
            );
        }
    }

    #[test]
    fn a_row_gives_name_type_and_help() {
        let doc =
            "| `detour_x_total` | counter | `a` | what `b` counts |\n| `a`, `b` | | | as before |";
        assert_eq!(
            documented(doc),
            [("detour_x_total", "counter", "what b counts".to_owned())]
        );
    }
}
