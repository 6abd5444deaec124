//! Traces across the hops: W3C trace context read, started when absent and passed on by the
//! SDK, the CA and the PA that export spans; a span per hop and per attempt (retries, hedges and path switches as
//! span events), exported over OTLP/HTTP when configured.
//!
//! A process without an exporter does not take part: it reads nothing and writes nothing, and
//! the request keeps the `traceparent` and `tracestate` it came with on every path. With an
//! exporter, a request without a valid `traceparent` starts a new trace (recorded when the
//! sample says so), an invalid one is replaced and its `tracestate` dropped, as the
//! recommendation says, and a valid one is the hop's parent (recorded when its sampled flag is
//! set; otherwise passed on unchanged). Spans end when dropped, so an attempt cancelled by a
//! hedge still ends.
//!
//! Untrusted input: the sampled flag of an incoming `traceparent` is followed, so a caller can
//! ask for its calls to be recorded; the export queue is bounded and drops (and counts) what
//! does not fit, so this costs CPU, never memory or blocking.

mod context;
pub(crate) mod export;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;

pub use context::{SpanId, TRACEPARENT, TRACESTATE, TraceId, TraceParent};
pub use export::{OtlpEndpoint, TraceConfig};

use export::{Exporter, Finished};

/// What a span stands for (OTLP's span kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside one process.
    Internal,
    /// A request received (a hop).
    Server,
    /// A request sent (an attempt).
    Client,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(Cow<'static, str>),
    /// A whole number.
    Int(i64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value::Str(Cow::Borrowed(s))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(Cow::Owned(s))
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Value::Int(i64::from(v))
    }
}

/// A named attribute.
pub type Attribute = (&'static str, Value);

/// Starts spans; cheap to clone. [`Tracer::off`] records nothing and touches no header.
#[derive(Clone, Default)]
pub struct Tracer {
    exporter: Option<Arc<Exporter>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("exporting", &self.exporter.is_some())
            .finish()
    }
}

impl Tracer {
    /// A tracer that records nothing.
    pub fn off() -> Self {
        Tracer::default()
    }

    /// A tracer exporting to `cfg.endpoint`; its export task runs on the current runtime.
    pub fn start(cfg: TraceConfig) -> Self {
        Tracer {
            exporter: Some(Exporter::start(cfg)),
        }
    }

    /// Spans exported and spans dropped so far (queue full or export failed).
    pub fn counts(&self) -> (u64, u64) {
        self.exporter.as_ref().map_or((0, 0), |e| e.counts())
    }

    /// Whether spans may be recorded (an exporter is configured).
    pub fn is_on(&self) -> bool {
        self.exporter.is_some()
    }

    /// The span of a request received with `headers` (a hop, or an SDK call): the child of its
    /// valid `traceparent`, or the root of a new trace. An invalid `traceparent` and its
    /// `tracestate` are removed from `headers`. Without an exporter: a span that is nothing.
    pub fn begin(&self, headers: &mut HeaderMap, name: &'static str, kind: SpanKind) -> Span {
        let Some(e) = &self.exporter else {
            return Span::none();
        };
        match TraceParent::of(headers) {
            Some(tp) if tp.sampled => {
                Span::recording(e, tp.trace_id, Some(tp.parent_id), name, kind)
            }
            Some(tp) => Span::context(Context {
                trace_id: tp.trace_id,
                id: tp.parent_id,
                sampled: false,
                passthrough: true,
            }),
            None => {
                if headers.contains_key(TRACEPARENT) {
                    headers.remove(TRACEPARENT);
                    metrics::counter!("detour_trace_context_invalid_total").increment(1);
                }
                headers.remove(TRACESTATE);
                let trace_id = TraceId::random();
                match e.sample() {
                    true => Span::recording(e, trace_id, None, name, kind),
                    false => Span::context(Context {
                        trace_id,
                        id: SpanId::random(),
                        sampled: false,
                        passthrough: false,
                    }),
                }
            }
        }
    }
}

/// One span: recorded and exported when it is dropped, a bare context when not recording, or
/// nothing at all in a process without an exporter.
pub struct Span {
    ctx: Option<Context>,
    record: Option<Box<Record>>,
}

/// Where a span sits in its trace.
#[derive(Debug, Clone, Copy)]
struct Context {
    trace_id: TraceId,
    /// The span's id when recording; otherwise the id its children name as their parent.
    id: SpanId,
    sampled: bool,
    /// The request already carries the `traceparent` a child would write.
    passthrough: bool,
}

struct Record {
    exporter: Arc<Exporter>,
    parent: Option<SpanId>,
    name: Cow<'static, str>,
    kind: SpanKind,
    start: u64,
    attributes: Vec<Attribute>,
    events: Vec<Event>,
    error: Option<String>,
}

/// Something that happened during a span.
#[derive(Debug, Clone)]
pub struct Event {
    /// When, nanoseconds since the Unix epoch.
    pub time: u64,
    /// What.
    pub name: &'static str,
    /// Details.
    pub attributes: Vec<Attribute>,
}

impl std::fmt::Debug for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Span")
            .field("ctx", &self.ctx)
            .field("recording", &self.record.is_some())
            .finish()
    }
}

impl Span {
    fn recording(
        exporter: &Arc<Exporter>,
        trace_id: TraceId,
        parent: Option<SpanId>,
        name: &'static str,
        kind: SpanKind,
    ) -> Span {
        Span {
            ctx: Some(Context {
                trace_id,
                id: SpanId::random(),
                sampled: true,
                passthrough: false,
            }),
            record: Some(Box::new(Record {
                exporter: exporter.clone(),
                parent,
                name: Cow::Borrowed(name),
                kind,
                start: unix_nanos(),
                attributes: Vec::new(),
                events: Vec::new(),
                error: None,
            })),
        }
    }

    /// A span that is nothing: no trace, nothing written, nothing recorded.
    pub fn none() -> Span {
        Span {
            ctx: None,
            record: None,
        }
    }

    fn context(ctx: Context) -> Span {
        Span {
            ctx: Some(ctx),
            record: None,
        }
    }

    /// The trace this span belongs to (`None` in a process without an exporter).
    pub fn trace_id(&self) -> Option<TraceId> {
        self.ctx.map(|c| c.trace_id)
    }

    /// This span's id (when not recording: the id its children name as their parent).
    pub fn id(&self) -> Option<SpanId> {
        self.ctx.map(|c| c.id)
    }

    /// Whether this span is recorded.
    pub fn is_recording(&self) -> bool {
        self.record.is_some()
    }

    /// A child span (an attempt of this hop or call).
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Span {
        match (&self.record, self.ctx) {
            (Some(r), Some(c)) => Span::recording(&r.exporter, c.trace_id, Some(c.id), name, kind),
            (_, ctx) => Span { ctx, record: None },
        }
    }

    /// Writes this span as the parent into the `traceparent` of a request about to be sent
    /// (nothing when the request already carries it).
    pub fn inject(&self, headers: &mut HeaderMap) {
        let Some(c) = self.ctx.filter(|c| !c.passthrough) else {
            return;
        };
        let tp = TraceParent {
            trace_id: c.trace_id,
            parent_id: c.id,
            sampled: c.sampled,
        };
        headers.insert(TRACEPARENT, tp.header_value());
    }

    /// Renames the span (once the service is known, say).
    pub fn rename(&mut self, name: impl Into<Cow<'static, str>>) {
        if let Some(r) = &mut self.record {
            r.name = name.into();
        }
    }

    /// Sets an attribute (nothing when not recording).
    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(r) = &mut self.record {
            r.attributes.push((key, value.into()));
        }
    }

    /// Adds an event; `attributes` is only called when recording.
    pub fn event(&mut self, name: &'static str, attributes: impl FnOnce() -> Vec<Attribute>) {
        if let Some(r) = &mut self.record {
            r.events.push(Event {
                time: unix_nanos(),
                name,
                attributes: attributes(),
            });
        }
    }

    /// Marks the span failed; `message` is only called when recording.
    pub fn fail(&mut self, message: impl FnOnce() -> String) {
        if let Some(r) = &mut self.record {
            r.error = Some(message());
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        let (Some(r), Some(c)) = (self.record.take(), self.ctx) else {
            return;
        };
        let Record {
            exporter,
            parent,
            name,
            kind,
            start,
            attributes,
            events,
            error,
        } = *r;
        exporter.submit(Finished {
            trace_id: c.trace_id,
            id: c.id,
            parent,
            name,
            kind,
            start,
            end: unix_nanos().max(start),
            attributes,
            events,
            error,
        });
    }
}

/// Now, in nanoseconds since the Unix epoch (the wall clock: what trace back-ends show).
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
