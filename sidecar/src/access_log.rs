//! The access log: one JSON line per request at the CA and the PA, when `[access_log] path`
//! is set — to a file (opened for appending, opened again on SIGHUP, as logrotate expects) or
//! to stdout (`-`). Sampled (`sample`) and capped (`max_per_second`) before a line is made;
//! lines go through a bounded queue to one writer task, so a slow disk drops lines (counted)
//! and never holds a request.

use detour_proto::sync::Mutex;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use detour_core::trace::{TraceId, TraceParent};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::AccessLogSettings;
use crate::ratelimit::TokenBucket;

/// Lines waiting for the writer at most; more are dropped.
const QUEUE: usize = 4096;

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the response head was ready, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// `outbound` (CA) or `inbound` (PA).
    pub direction: &'static str,
    /// The W3C trace id: the request's `traceparent`'s, or the trace this hop started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The caller's identity (the PA: the SPIFFE ID of the calling sidecar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The service (absent when the request named none that is valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The method.
    pub method: String,
    /// The request's path, without the query (at most 256 bytes).
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// The mesh error answered with, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// The path the request took: `mesh`, `ca_direct`, `local`, `none`.
    pub link: &'static str,
    /// The endpoint (instance) of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The request body's declared length, if declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_bytes: Option<u64>,
    /// The response body's declared length, if declared.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_bytes: Option<u64>,
    /// Time to the response head, ms.
    pub duration_ms: f64,
}

/// The access log of one sidecar.
pub struct AccessLog {
    sample: f64,
    cap: Option<Mutex<TokenBucket>>,
    tx: mpsc::Sender<Vec<u8>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("sample", &self.sample)
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Starts the writer of `settings` (inside the runtime); `None` when no path is set.
    pub fn start(settings: &AccessLogSettings) -> Option<AccessLog> {
        let path = settings.path.clone()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_lines(path, rx));
        Some(AccessLog {
            sample: settings.sample,
            cap: (settings.max_per_second > 0).then(|| {
                let rate = settings.max_per_second;
                Mutex::new(TokenBucket::new(rate, rate, tokio::time::Instant::now()))
            }),
            tx,
        })
    }

    /// Whether this request is logged (sampling, then the cap): asked before an entry is made.
    pub fn wants(&self) -> bool {
        if self.sample < 1.0 && fastrand::f64() >= self.sample {
            return false;
        }
        if let Some(cap) = &self.cap {
            let ok = cap.lock().try_take(tokio::time::Instant::now());
            if !ok {
                metrics::counter!("detour_access_log_dropped_total", "reason" => "rate")
                    .increment(1);
                return false;
            }
        }
        true
    }

    /// Queues `entry` (dropped, and counted, when the writer is behind).
    pub fn log(&self, entry: &Entry) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if self.tx.try_send(line).is_err() {
            metrics::counter!("detour_access_log_dropped_total", "reason" => "queue").increment(1);
        }
    }
}

/// The writer task: appends lines to `path` (`-`: stdout), opening it again on SIGHUP.
async fn write_lines(path: PathBuf, mut rx: mpsc::Receiver<Vec<u8>>) {
    let stdout = path.as_os_str() == "-";
    let open = |path: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(
                |e| tracing::error!(path = %path.display(), error = %e, "access log: cannot open"),
            )
            .ok()
    };
    let mut file = if stdout { None } else { open(&path) };
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            line = rx.recv() => {
                let Some(line) = line else { return };
                let written = match (&mut file, stdout) {
                    (_, true) => std::io::stdout().write_all(&line),
                    (Some(f), false) => f.write_all(&line),
                    (None, false) => Err(std::io::Error::other("not open")),
                };
                if written.is_err() {
                    metrics::counter!("detour_access_log_dropped_total", "reason" => "write").increment(1);
                }
            }
            _ = hangup => {
                if !stdout {
                    file = open(&path);
                    tracing::info!(path = %path.display(), "access log opened again (SIGHUP)");
                }
            }
        }
    }
}

/// What is known of a request before it is routed (taken only for a request that is logged).
#[derive(Debug)]
pub struct Pending {
    direction: &'static str,
    trace_id: Option<String>,
    caller: Option<String>,
    method: String,
    path: String,
    request_bytes: Option<u64>,
}

/// What routing learnt of a request, for its line.
#[derive(Debug, Default)]
pub struct Routed {
    /// The service, once known.
    pub service: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub endpoint: Option<String>,
}

impl Pending {
    /// The request side of a line (`direction`: `outbound` or `inbound`; `caller`: the calling
    /// sidecar's identity, at a PA; `trace`: the hop's trace, when it takes part in tracing,
    /// else the request's `traceparent`'s).
    pub fn of(
        direction: &'static str,
        parts: &http::request::Parts,
        caller: Option<String>,
        trace: Option<TraceId>,
    ) -> Self {
        let trace = trace.or_else(|| TraceParent::of(&parts.headers).map(|t| t.trace_id));
        Pending {
            direction,
            trace_id: trace.map(|t| t.hex()),
            caller,
            method: parts.method.to_string(),
            path: logged_path(&parts.uri),
            request_bytes: content_length(&parts.headers),
        }
    }

    /// The line, once answered with `resp` after `took` over `link`.
    pub fn finish<B>(
        self,
        routed: Routed,
        resp: &http::Response<B>,
        error: Option<&'static str>,
        link: &'static str,
        took: Duration,
    ) -> Entry {
        Entry {
            time: rfc3339_now(),
            direction: self.direction,
            trace_id: self.trace_id,
            caller: self.caller,
            service: routed.service,
            method: self.method,
            path: self.path,
            status: resp.status().as_u16(),
            error,
            link,
            endpoint: routed.endpoint,
            attempts: routed.attempts,
            request_bytes: self.request_bytes,
            response_bytes: content_length(resp.headers()),
            duration_ms: took.as_secs_f64() * 1000.0,
        }
    }
}

/// `now` as RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    detour_proto::utc::utc_ms(detour_registry::now_unix_ms())
}

/// The request path to log: no query, at most 256 bytes (cut at a character boundary).
pub fn logged_path(uri: &http::Uri) -> String {
    let p = uri.path();
    let mut end = p.len().min(256);
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    p[..end].to_owned()
}

/// A header's declared length.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_paths_and_lengths() {
        let t = rfc3339_now();
        assert_eq!(t.len(), "2026-12-06T08:57:05.123Z".len(), "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
        let uri: http::Uri = "/a/b?secret=1".parse().unwrap();
        assert_eq!(logged_path(&uri), "/a/b");
        let long: http::Uri = format!("/{}", "a".repeat(300)).parse().unwrap();
        assert_eq!(logged_path(&long).len(), 256);
    }
}
