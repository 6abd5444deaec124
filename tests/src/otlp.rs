//! An OTLP/HTTP trace receiver for tests: it takes `POST /v1/traces` with a JSON body (as
//! OpenTelemetry collectors do), answers 200 and keeps every span it read, with its resource's
//! `service.name` and `host.name`.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// One span as received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// The resource's `host.name`, if any.
    pub host: Option<String>,
    /// Hex ids.
    pub trace_id: String,
    pub span_id: String,
    pub parent: Option<String>,
    /// Its name and kind (2 server, 3 client).
    pub name: String,
    pub kind: i64,
    /// Attributes, values as text.
    pub attrs: HashMap<String, String>,
    /// Event names with their attributes.
    pub events: Vec<(String, HashMap<String, String>)>,
    /// Status code 2 (error).
    pub failed: bool,
}

impl ReceivedSpan {
    /// The attribute `key`, or "".
    pub fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map_or("", String::as_str)
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    /// Listens on 127.0.0.1, port 0.
    pub async fn start() -> OtlpReceiver {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = l.local_addr().expect("address");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s, kept.clone()));
            }
        });
        OtlpReceiver { addr, spans, task }
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().clone()
    }

    /// The spans of `trace_id`, once at least `n` arrived (within 10 s).
    pub async fn trace(&self, trace_id: &str, n: usize) -> Vec<ReceivedSpan> {
        for _ in 0..200 {
            let t: Vec<_> = (self.spans().into_iter())
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if t.len() >= n {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "trace {trace_id}: fewer than {n} spans arrived: {:#?}",
            (self.spans().into_iter())
                .filter(|s| s.trace_id == trace_id)
                .collect::<Vec<_>>()
        );
    }
}

/// Serves one connection: HTTP/1.1 requests with a `content-length` body.
async fn serve(s: tokio::net::TcpStream, kept: Arc<Mutex<Vec<ReceivedSpan>>>) {
    let mut r = BufReader::new(s);
    loop {
        let mut len = 0usize;
        let mut first = true;
        let mut path = String::new();
        loop {
            let mut line = String::new();
            match r.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if first {
                path = line.split(' ').nth(1).unwrap_or("").to_owned();
                first = false;
            } else if line.is_empty() {
                break;
            } else if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len.min(64 << 20)];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let status = match (path == "/v1/traces", serde_json::from_slice::<Value>(&body)) {
            (true, Ok(doc)) => {
                kept.lock().extend(spans_of(&doc));
                "200 OK"
            }
            _ => "400 Bad Request",
        };
        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\n{{}}");
        if r.get_mut().write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn text(v: &Value) -> String {
    match (v.get("stringValue"), v.get("intValue")) {
        (Some(Value::String(s)), _) => s.clone(),
        (_, Some(Value::String(i))) => i.clone(),
        _ => v.to_string(),
    }
}

fn attrs(v: &Value) -> HashMap<String, String> {
    (v.as_array().into_iter().flatten())
        .map(|kv| {
            (
                kv["key"].as_str().unwrap_or("").to_owned(),
                text(&kv["value"]),
            )
        })
        .collect()
}

/// The spans of one OTLP JSON document.
fn spans_of(doc: &Value) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attrs(&rs["resource"]["attributes"]);
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let str_of = |k: &str| s[k].as_str().unwrap_or("").to_owned();
                out.push(ReceivedSpan {
                    service: resource.get("service.name").cloned().unwrap_or_default(),
                    host: resource.get("host.name").cloned(),
                    trace_id: str_of("traceId"),
                    span_id: str_of("spanId"),
                    parent: s["parentSpanId"].as_str().map(str::to_owned),
                    name: str_of("name"),
                    kind: s["kind"].as_i64().unwrap_or(0),
                    attrs: attrs(&s["attributes"]),
                    events: (s["events"].as_array().into_iter().flatten())
                        .map(|e| {
                            let name = e["name"].as_str().unwrap_or("").to_owned();
                            (name, attrs(&e["attributes"]))
                        })
                        .collect(),
                    failed: s["status"]["code"].as_i64() == Some(2),
                });
            }
        }
    }
    out
}
