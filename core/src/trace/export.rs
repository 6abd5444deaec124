//! The span exporter: finished spans go into a bounded queue (full: dropped and counted, never
//! waited for) and a thread of its own sends them in batches to an OTLP/HTTP endpoint,
//! JSON-encoded (`POST /v1/traces`), one connection at a time with connect and answer
//! timeouts. A batch the endpoint does not take is dropped and counted: spans are never kept
//! for a retry. The thread keeps encoding and sending off the data path's runtime.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use detour_proto::sync::Mutex;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::sync::atomic::AtomicBool;
use tokio::sync::Notify;

use super::{Attribute, Event, SpanId, SpanKind, TraceId, Value};

/// Most spans sent in one request.
const MAX_BATCH: usize = 512;
/// Time to connect to the endpoint, and then to get its answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go: an `http://host:port/path` URL (OTLP/HTTP; `/v1/traces` when no path is
/// given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpEndpoint {
    /// `host:port`, resolved at each export.
    pub authority: String,
    /// The request path.
    pub path: String,
}

impl OtlpEndpoint {
    /// Parses `url`; only `http://` is supported (a collector on the host or the network).
    pub fn parse(url: &str) -> Result<OtlpEndpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?}: only http:// endpoints are supported (OTLP/HTTP with JSON)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let uri: http::uri::Authority = authority
            .parse()
            .map_err(|_| format!("{url:?}: {authority:?} is not host:port"))?;
        if uri.port_u16().is_none() || authority.contains('@') {
            return Err(format!("{url:?}: give the port, and no user"));
        }
        let path = match path {
            "" | "/" => "/v1/traces".to_owned(),
            p => p.to_owned(),
        };
        if path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(format!("{url:?}: {path:?} is not a valid path"));
        }
        Ok(OtlpEndpoint {
            authority: authority.to_owned(),
            path,
        })
    }
}

/// How spans are exported.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The OTLP/HTTP endpoint.
    pub endpoint: OtlpEndpoint,
    /// The resource's `service.name` (what back-ends group spans by).
    pub service_name: String,
    /// More resource attributes (`host.name`, …).
    pub resource: Vec<(String, String)>,
    /// Share of the traces this process starts that are recorded, 0 to 1 (traces that come
    /// with a `traceparent` follow its sampled flag).
    pub sample: f64,
    /// Most finished spans waiting for export; beyond, dropped and counted.
    pub queue: usize,
    /// How long a batch may wait for more spans.
    pub flush: Duration,
}

impl TraceConfig {
    /// A config with the defaults: everything started here sampled, 2,048 spans queued, a
    /// batch sent at least every second.
    pub fn new(endpoint: OtlpEndpoint, service_name: impl Into<String>) -> Self {
        TraceConfig {
            endpoint,
            service_name: service_name.into(),
            resource: Vec::new(),
            sample: 1.0,
            queue: 2048,
            flush: Duration::from_secs(1),
        }
    }

    /// The config the OpenTelemetry variables of `env` describe: the endpoint from
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (`/v1/traces` appended), the name from `OTEL_SERVICE_NAME` (else `service_name`), the
    /// sampled share from `OTEL_TRACES_SAMPLER_ARG`. `None` with no endpoint; an error names
    /// the variable that is wrong.
    pub fn from_env(
        service_name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<TraceConfig>, String> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("OTEL_"))
            .collect();
        let endpoint = match (
            env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(e), _) if !e.is_empty() => OtlpEndpoint::parse(e)
                .map_err(|e| format!("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: {e}"))?,
            (_, Some(e)) if !e.is_empty() => {
                OtlpEndpoint::parse(&format!("{}/v1/traces", e.trim_end_matches('/')))
                    .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))?
            }
            _ => return Ok(None),
        };
        let name = env
            .get("OTEL_SERVICE_NAME")
            .filter(|n| !n.is_empty())
            .map_or(service_name, String::as_str);
        let mut cfg = TraceConfig::new(endpoint, name);
        if let Some(arg) = env.get("OTEL_TRACES_SAMPLER_ARG") {
            cfg.sample = arg
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| {
                    format!("OTEL_TRACES_SAMPLER_ARG: {arg:?} is not between 0 and 1")
                })?;
        }
        Ok(Some(cfg))
    }
}

/// A span as exported.
pub(crate) struct Finished {
    pub trace_id: TraceId,
    pub id: SpanId,
    pub parent: Option<SpanId>,
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    pub start: u64,
    pub end: u64,
    pub attributes: Vec<Attribute>,
    pub events: Vec<Event>,
    pub error: Option<String>,
}

/// The queue the spans wait in, and the sampling rule.
pub(super) struct Exporter {
    queue: Arc<Queue>,
    sample: f64,
    counts: Arc<Counts>,
}

/// Finished spans waiting for the export thread: a plain buffer under a lock, so that a span
/// costs the data path a push and never a wake-up of another thread (the thread wakes at each
/// flush interval, or when a whole batch is waiting).
struct Queue {
    spans: Mutex<Vec<Finished>>,
    capacity: usize,
    /// A whole batch waits, or the exporter is gone.
    wake: Notify,
    closed: AtomicBool,
}

/// Spans exported and dropped so far (also counted in the metrics).
#[derive(Debug, Default)]
pub(super) struct Counts {
    pub exported: AtomicU64,
    pub dropped: AtomicU64,
}

impl Exporter {
    pub(super) fn start(cfg: TraceConfig) -> Arc<Exporter> {
        let queue = Arc::new(Queue {
            spans: Mutex::new(Vec::new()),
            capacity: cfg.queue.max(1),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let sample = cfg.sample.clamp(0.0, 1.0);
        let counts = Arc::new(Counts::default());
        let (q, kept) = (queue.clone(), counts.clone());
        let thread = std::thread::Builder::new()
            .name("detour-traces".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(run(q, cfg, kept)),
                    Err(e) => {
                        tracing::warn!(error = %e, "no runtime for trace export; spans are dropped")
                    }
                }
            });
        if let Err(e) = thread {
            tracing::warn!(error = %e, "no thread for trace export; spans are dropped");
        }
        Arc::new(Exporter {
            queue,
            sample,
            counts,
        })
    }

    /// Whether a trace started here is recorded.
    pub(super) fn sample(&self) -> bool {
        self.sample >= 1.0 || (self.sample > 0.0 && fastrand::f64() < self.sample)
    }

    pub(super) fn submit(&self, span: Finished) {
        let q = &self.queue;
        let mut spans = q.spans.lock();
        if spans.len() >= q.capacity {
            drop(spans);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("detour_trace_spans_dropped_total", "reason" => "queue_full")
                .increment(1);
            return;
        }
        spans.push(span);
        let whole = spans.len() == MAX_BATCH;
        drop(spans);
        if whole {
            q.wake.notify_one();
        }
    }

    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.counts.exported.load(Ordering::Relaxed),
            self.counts.dropped.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.wake.notify_one();
    }
}

/// The export thread's loop: at each flush interval (or as soon as a whole batch waits), the
/// waiting spans in batches, posted one at a time; ends when the exporter is gone.
async fn run(queue: Arc<Queue>, cfg: TraceConfig, counts: Arc<Counts>) {
    let resource = resource(&cfg);
    let mut warned = false;
    loop {
        let batch: Vec<Finished> = {
            let mut spans = queue.spans.lock();
            let n = spans.len().min(MAX_BATCH);
            spans.drain(..n).collect()
        };
        if batch.is_empty() {
            if queue.closed.load(Ordering::Relaxed) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(cfg.flush) => {}
                () = queue.wake.notified() => {}
            }
            continue;
        }
        let n = batch.len() as u64;
        let body = encode(&resource, &batch);
        drop(batch);
        match post(&cfg.endpoint, body).await {
            Ok(()) => {
                counts.exported.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("detour_trace_spans_exported_total").increment(n);
                warned = false;
            }
            Err(e) => {
                counts.dropped.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("detour_trace_spans_dropped_total", "reason" => "export_failed")
                    .increment(n);
                if !warned {
                    tracing::warn!(endpoint = %cfg.endpoint.authority, error = %e, "trace export failed; spans are dropped until it works again");
                    warned = true;
                }
            }
        }
        // Less than a whole batch left: wait for the next interval.
        let left = queue.spans.lock().len();
        if left < MAX_BATCH && !queue.closed.load(Ordering::Relaxed) {
            tokio::select! {
                () = tokio::time::sleep(cfg.flush) => {}
                () = queue.wake.notified() => {}
            }
        }
    }
}

/// One batch sent; an answer other than 2xx is an error.
async fn post(endpoint: &OtlpEndpoint, body: Vec<u8>) -> Result<(), String> {
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(endpoint.authority.as_str()),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let exchange = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let req = http::Request::post(endpoint.path.as_str())
            .header(http::header::HOST, endpoint.authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // The answer is read (bounded by the timeout) so the collector sees a whole exchange.
        let _ = resp.into_body().collect().await;
        conn.abort();
        match status.is_success() {
            true => Ok(()),
            false => Err(format!("the endpoint answered {status}")),
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| "no answer in time".to_owned())?
}

/// The resource's attributes, as OTLP JSON.
fn resource(cfg: &TraceConfig) -> String {
    let mut out = String::from("{\"attributes\":[");
    kv(
        &mut out,
        "service.name",
        &Value::Str(cfg.service_name.clone().into()),
    );
    for (k, v) in &cfg.resource {
        out.push(',');
        kv(&mut out, k, &Value::Str(v.clone().into()));
    }
    out.push_str("]}");
    out
}

/// The OTLP JSON of one batch (ids in hex, times as decimal strings, as the protocol's JSON
/// mapping says), written straight into one buffer.
pub(crate) fn encode(resource: &str, spans: &[Finished]) -> Vec<u8> {
    let mut out = String::with_capacity(256 + spans.len() * 512);
    out.push_str("{\"resourceSpans\":[{\"resource\":");
    out.push_str(resource);
    out.push_str(",\"scopeSpans\":[{\"scope\":{\"name\":\"detour\",\"version\":\"");
    out.push_str(env!("CARGO_PKG_VERSION"));
    out.push_str("\"},\"spans\":[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        span_json(&mut out, s);
    }
    out.push_str("]}]}]}");
    out.into_bytes()
}

fn span_json(out: &mut String, s: &Finished) {
    use std::fmt::Write;
    let kind = match s.kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
    };
    let _ = write!(
        out,
        "{{\"traceId\":\"{}\",\"spanId\":\"{}\",",
        s.trace_id, s.id
    );
    if let Some(p) = s.parent {
        let _ = write!(out, "\"parentSpanId\":\"{p}\",");
    }
    out.push_str("\"name\":");
    string(out, &s.name);
    let _ = write!(
        out,
        ",\"kind\":{kind},\"startTimeUnixNano\":\"{}\",\"endTimeUnixNano\":\"{}\",\"attributes\":",
        s.start, s.end
    );
    attributes(out, &s.attributes);
    out.push_str(",\"events\":[");
    for (i, e) in s.events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"timeUnixNano\":\"{}\",\"name\":", e.time);
        string(out, e.name);
        out.push_str(",\"attributes\":");
        attributes(out, &e.attributes);
        out.push('}');
    }
    out.push_str("],\"status\":");
    match &s.error {
        Some(m) => {
            out.push_str("{\"code\":2,\"message\":");
            string(out, m);
            out.push('}');
        }
        None => out.push_str("{}"),
    }
    out.push('}');
}

fn attributes(out: &mut String, attrs: &[Attribute]) {
    out.push('[');
    for (i, (k, v)) in attrs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        kv(out, k, v);
    }
    out.push(']');
}

fn kv(out: &mut String, key: &str, value: &Value) {
    out.push_str("{\"key\":");
    string(out, key);
    match value {
        Value::Str(s) => {
            out.push_str(",\"value\":{\"stringValue\":");
            string(out, s);
        }
        Value::Int(i) => {
            use std::fmt::Write;
            let _ = write!(out, ",\"value\":{{\"intValue\":\"{i}\"");
        }
    }
    out.push_str("}}");
}

/// `s` as a JSON string: quotes, backslashes and control characters escaped.
fn string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
