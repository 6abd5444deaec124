//! The load generator behind `detourctl load`: a fixed request rate through the SDK (or
//! straight to one provider), open loop — a request that could not start on time is sent late
//! and its latency counted from when it was due, never skipped — with every request counted by
//! outcome. Lateness within the timer's granularity (2 ms) is not counted as latency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use detour_core::body::{empty, full};
use detour_core::transport::set_target;
use detour_core::{BoxBody, Dial, Pool, PoolOptions};
use detour_proto::{AppProtocol, ServiceName};
use detour_thin_sdk::{Client, PathTaken, mesh_error, path_taken};
use hdrhistogram::Histogram;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::provider::SERVED_BY;

/// Lateness below this is the timer's granularity, not back-pressure.
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Which methods to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodMix {
    /// Always this method.
    One(MethodKind),
    /// GET and POST alternately.
    Mix,
}

/// The methods the generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// GET.
    Get,
    /// POST with the configured body.
    Post,
    /// PUT with the configured body.
    Put,
}

impl std::str::FromStr for MethodMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "GET" => Ok(MethodMix::One(MethodKind::Get)),
            "POST" => Ok(MethodMix::One(MethodKind::Post)),
            "PUT" => Ok(MethodMix::One(MethodKind::Put)),
            "MIX" => Ok(MethodMix::Mix),
            _ => Err(format!("{s:?}: expected GET, POST, PUT or MIX")),
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Through the SDK to the local sidecar.
    Sdk(Client),
    /// Straight to one provider.
    Direct {
        /// The provider's address.
        dial: Dial,
        /// Its protocol.
        protocol: AppProtocol,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The service called.
    pub service: ServiceName,
    /// Requests per second.
    pub rate: u32,
    /// How long to send.
    pub duration: Duration,
    /// Methods.
    pub methods: MethodMix,
    /// Body size of POST/PUT requests.
    pub body_bytes: usize,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Request path and query.
    pub path: String,
    /// Time allowed per request (head and body).
    pub timeout: Duration,
}

/// Counts of a run (or of one second of it).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests started.
    pub sent: u64,
    /// Requests answered 2xx/3xx with no mesh error.
    pub ok: u64,
    /// Everything else.
    pub failed: u64,
    /// Failures of idempotent requests (GET, PUT).
    pub failed_idempotent: u64,
    /// Failures whose outcome at the provider is unknown.
    pub unknown_outcome: u64,
    /// Failures by kind (`sidecar_unavailable`, `mesh:upstream-connect`, `http_500`, …).
    pub failures: BTreeMap<String, u64>,
    /// Which instance answered (from `x-served-by`), when the provider says.
    pub served_by: BTreeMap<String, u64>,
    /// When each instance last answered (ms since the epoch).
    pub served_last_unix_ms: BTreeMap<String, u64>,
    /// Answered requests by path: `mesh`, `ca_direct`, `direct`.
    pub paths: BTreeMap<&'static str, u64>,
    /// When the first answer came over a path other than the mesh (Unix ms).
    pub first_off_mesh_unix_ms: Option<u64>,
    /// When the last answer came over a path other than the mesh (Unix ms).
    pub last_off_mesh_unix_ms: Option<u64>,
    /// When the last answer came over the direct path (C→P; Unix ms).
    pub last_direct_unix_ms: Option<u64>,
    /// Answers over the mesh path per 10 ms (by the Unix ms the 10 ms start at): when callers
    /// left the mesh and came back.
    pub mesh_answers: BTreeMap<u64, u64>,
    /// Latency in microseconds, from when each request was due.
    pub latency_us: Histogram<u64>,
    /// The same, of idempotent requests only (GET, PUT).
    pub latency_idem_us: Histogram<u64>,
    /// The same, of non-idempotent requests only (POST).
    pub latency_non_idem_us: Histogram<u64>,
    /// The first [`MAX_LISTED_FAILURES`] failed requests, one by one.
    pub failed_requests: Vec<FailedRequest>,
}

/// Failed requests listed one by one at most (the counts cover all of them).
pub const MAX_LISTED_FAILURES: usize = 1000;

/// One failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRequest {
    /// When it was due (ms since the epoch).
    pub due_unix_ms: u64,
    /// When it ended.
    pub ended_unix_ms: u64,
    /// Its method.
    pub method: MethodKind,
    /// How it failed (as in [`Stats::failures`]).
    pub kind: String,
}

impl FailedRequest {
    /// `failed: due_unix_ms=… ended_unix_ms=… method=… kind=…`
    pub fn line(&self) -> String {
        format!(
            "failed: due_unix_ms={} ended_unix_ms={} method={:?} kind={}",
            self.due_unix_ms, self.ended_unix_ms, self.method, self.kind
        )
    }
}

/// 1 µs to 1 h at 3 significant figures.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            sent: 0,
            ok: 0,
            failed: 0,
            failed_idempotent: 0,
            unknown_outcome: 0,
            failures: BTreeMap::new(),
            served_by: BTreeMap::new(),
            served_last_unix_ms: BTreeMap::new(),
            paths: BTreeMap::new(),
            first_off_mesh_unix_ms: None,
            last_off_mesh_unix_ms: None,
            last_direct_unix_ms: None,
            mesh_answers: BTreeMap::new(),
            latency_us: histogram(),
            latency_idem_us: histogram(),
            latency_non_idem_us: histogram(),
            failed_requests: Vec::new(),
        }
    }
}

impl Stats {
    /// Latency quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// The end of the last 10 ms in `[from, to)` (Unix ms) with an answer over the mesh path.
    pub fn last_mesh_answer_between(&self, from: u64, to: u64) -> Option<u64> {
        self.mesh_answers
            .range(from / 10 * 10..to)
            .next_back()
            .map(|(t, _)| t + 10)
    }

    /// The longest time with no answer over the mesh path between two that had one:
    /// `(end of the last 10 ms with one before, start of the first 10 ms with one after)`.
    pub fn longest_mesh_gap(&self) -> Option<(u64, u64)> {
        let times: Vec<u64> = self.mesh_answers.keys().copied().collect();
        times
            .windows(2)
            .map(|w| (w[0] + 10, w[1]))
            .filter(|(a, b)| b > a)
            .max_by_key(|(a, b)| b - a)
    }

    /// `mesh_gap: from_unix_ms=… to_unix_ms=…` ([`Stats::longest_mesh_gap`]; `-` without one).
    pub fn gap_line(&self) -> String {
        match self.longest_mesh_gap() {
            Some((a, b)) => format!("mesh_gap: from_unix_ms={a} to_unix_ms={b}"),
            None => "mesh_gap: from_unix_ms=- to_unix_ms=-".into(),
        }
    }

    /// The `load: …` summary line.
    pub fn summary(&self, prefix: &str) -> String {
        format!(
            "{prefix}: sent={} ok={} failed={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2}",
            self.sent,
            self.ok,
            self.failed,
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
        )
    }

    /// Latency by idempotency: `latency: p99_idem_ms=… max_idem_ms=… p99_non_idem_ms=…
    /// max_non_idem_ms=…`.
    pub fn latency_line(&self) -> String {
        let q = |h: &Histogram<u64>, q: f64| {
            if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            }
        };
        let max = |h: &Histogram<u64>| h.max() as f64 / 1000.0;
        format!(
            "latency: p99_idem_ms={:.2} max_idem_ms={:.2} p99_non_idem_ms={:.2} max_non_idem_ms={:.2}",
            q(&self.latency_idem_us, 0.99),
            max(&self.latency_idem_us),
            q(&self.latency_non_idem_us, 0.99),
            max(&self.latency_non_idem_us),
        )
    }

    /// The path line: answers by path and when traffic was off the mesh path.
    pub fn path_line(&self) -> String {
        let n = |k| self.paths.get(k).copied().unwrap_or(0);
        let t = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "paths: mesh={} ca_direct={} direct={} first_off_mesh_unix_ms={} last_off_mesh_unix_ms={} failed_idempotent={} unknown_outcome={}",
            n("mesh"),
            n("ca_direct"),
            n("direct"),
            t(self.first_off_mesh_unix_ms),
            t(self.last_off_mesh_unix_ms),
            self.failed_idempotent,
            self.unknown_outcome
        )
    }

    /// Who answered, how often, and when last: `served: NAME=COUNT@LAST_UNIX_MS …`.
    pub fn served_line(&self) -> String {
        let parts: Vec<String> = self
            .served_by
            .iter()
            .map(|(k, n)| {
                format!(
                    "{k}={n}@{}",
                    self.served_last_unix_ms.get(k).copied().unwrap_or(0)
                )
            })
            .collect();
        format!("served: {}", parts.join(" "))
    }

    /// The failure breakdown line.
    pub fn failure_line(&self) -> String {
        if self.failures.is_empty() {
            return "failures: none".into();
        }
        let parts: Vec<String> = self
            .failures
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "failures: {} (idempotent={} unknown_outcome={})",
            parts.join(" "),
            self.failed_idempotent,
            self.unknown_outcome
        )
    }

    fn record(&mut self, outcome: &Outcome, idempotent: bool, latency: Duration) {
        self.sent += 1;
        let us = (latency.as_micros() as u64).max(1);
        let _ = self.latency_us.record(us);
        let by_kind = if idempotent {
            &mut self.latency_idem_us
        } else {
            &mut self.latency_non_idem_us
        };
        let _ = by_kind.record(us);
        if let Some(by) = &outcome.served_by {
            *self.served_by.entry(by.clone()).or_default() += 1;
            self.served_last_unix_ms
                .insert(by.clone(), detour_registry_sync::now_unix_ms());
        }
        if let Some(path) = outcome.path {
            *self.paths.entry(path.as_str()).or_default() += 1;
            let now = detour_registry_sync::now_unix_ms();
            if path == PathTaken::Mesh {
                *self.mesh_answers.entry(now / 10 * 10).or_default() += 1;
            } else {
                self.first_off_mesh_unix_ms.get_or_insert(now);
                self.last_off_mesh_unix_ms = Some(now);
                if path == PathTaken::Direct {
                    self.last_direct_unix_ms = Some(now);
                }
            }
        }
        match &outcome.failure {
            None => self.ok += 1,
            Some(kind) => {
                self.failed += 1;
                if idempotent {
                    self.failed_idempotent += 1;
                }
                if kind == "outcome_unknown" || kind == "timeout" {
                    self.unknown_outcome += 1;
                }
                *self.failures.entry(kind.clone()).or_default() += 1;
            }
        }
    }
}

struct Outcome {
    failure: Option<String>,
    served_by: Option<String>,
    path: Option<PathTaken>,
}

/// Runs `spec` against `target`; `tick` is called about once a second with that second's
/// counts. Stops early when `stop` resolves.
pub async fn run(
    spec: &LoadSpec,
    target: &Target,
    mut tick: impl FnMut(u64, &Stats),
    stop: impl std::future::Future<Output = ()>,
) -> Stats {
    let total = Arc::new(Mutex::new(Stats::default()));
    let window = Arc::new(Mutex::new(Stats::default()));
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let body = Bytes::from(vec![b'x'; spec.body_bytes]);
    let pool = Pool::new(PoolOptions::default());
    let interval = Duration::from_secs_f64(1.0 / f64::from(spec.rate.max(1)));
    let start = Instant::now();
    let end = start + spec.duration;
    let mut next_tick = start + Duration::from_secs(1);
    let mut second = 0u64;
    tokio::pin!(stop);
    let mut i: u64 = 0;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end {
            break;
        }
        while next_tick <= due {
            tokio::select! {
                _ = tokio::time::sleep_until(next_tick) => {}
                _ = &mut stop => return finish(total, sem, spec).await,
            }
            second += 1;
            let w = std::mem::take(&mut *lock(&window));
            tick(second, &w);
            next_tick += Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = &mut stop => return finish(total, sem, spec).await,
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let kind = match spec.methods {
            MethodMix::One(k) => k,
            MethodMix::Mix if i.is_multiple_of(2) => MethodKind::Get,
            MethodMix::Mix => MethodKind::Post,
        };
        let req = build(kind, &spec.path, &body);
        let (target, service, pool) = (target.clone(), spec.service.clone(), pool.clone());
        let (total, window, timeout) = (total.clone(), window.clone(), spec.timeout);
        // Open loop without timer noise: a request that starts within TIMER_SLACK of its due
        // time is timed from its start (tokio's timer has millisecond granularity); one that
        // starts later was held back (by the concurrency cap or a stalled loop) and is timed
        // from when it was due.
        let started = Instant::now();
        let origin = if started.duration_since(due) <= TIMER_SLACK {
            started
        } else {
            due
        };
        tokio::spawn(async move {
            let outcome = match req {
                Ok(req) => {
                    match tokio::time::timeout(timeout, send(&target, &pool, &service, req)).await {
                        Ok(o) => o,
                        Err(_) => Outcome {
                            failure: Some("timeout".into()),
                            served_by: None,
                            path: None,
                        },
                    }
                }
                Err(e) => Outcome {
                    failure: Some(format!("invalid_request:{e}")),
                    served_by: None,
                    path: None,
                },
            };
            let latency = origin.elapsed();
            let idempotent = kind != MethodKind::Post;
            if let Some(failure) = &outcome.failure {
                let mut t = lock(&total);
                if t.failed_requests.len() < MAX_LISTED_FAILURES {
                    let ended = detour_registry_sync::now_unix_ms();
                    t.failed_requests.push(FailedRequest {
                        due_unix_ms: ended.saturating_sub(latency.as_millis() as u64),
                        ended_unix_ms: ended,
                        method: kind,
                        kind: failure.clone(),
                    });
                }
            }
            lock(&total).record(&outcome, idempotent, latency);
            lock(&window).record(&outcome, idempotent, latency);
            drop(permit);
        });
        i += 1;
    }
    finish(total, sem, spec).await
}

async fn finish(total: Arc<Mutex<Stats>>, sem: Arc<Semaphore>, spec: &LoadSpec) -> Stats {
    // Wait for the requests still in flight (each is bounded by the request timeout).
    let all = spec.concurrency.max(1) as u32;
    let _ =
        tokio::time::timeout(spec.timeout + Duration::from_secs(1), sem.acquire_many(all)).await;
    lock(&total).clone()
}

fn lock(m: &Mutex<Stats>) -> std::sync::MutexGuard<'_, Stats> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn build(kind: MethodKind, path: &str, body: &Bytes) -> Result<Request<BoxBody>, http::Error> {
    let (method, body) = match kind {
        MethodKind::Get => (Method::GET, empty()),
        MethodKind::Post => (Method::POST, full(body.clone())),
        MethodKind::Put => (Method::PUT, full(body.clone())),
    };
    Request::builder().method(method).uri(path).body(body)
}

async fn send(
    target: &Target,
    pool: &Arc<Pool>,
    service: &ServiceName,
    req: Request<BoxBody>,
) -> Outcome {
    let resp: Result<Response<BoxBody>, String> = match target {
        Target::Sdk(client) => client
            .send(service, req)
            .await
            .map_err(|e| e.kind().to_owned()),
        Target::Direct { dial, protocol } => match set_target(service.as_str(), *protocol, req) {
            Ok(req) => pool.send(dial, *protocol, req).await.map_err(|f| {
                if f.error.never_left() {
                    "connect".into()
                } else {
                    "outcome_unknown".into()
                }
            }),
            Err(e) => Err(format!("invalid_request:{e}")),
        },
    };
    match resp {
        Err(kind) => Outcome {
            failure: Some(kind),
            served_by: None,
            path: None,
        },
        Ok(resp) => {
            let served_by = resp
                .headers()
                .get(SERVED_BY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let path = match target {
                Target::Sdk(_) => path_taken(&resp),
                Target::Direct { .. } => Some(PathTaken::Direct),
            };
            let mesh = match target {
                Target::Sdk(_) => mesh_error(&resp).map(|k| format!("mesh:{k}")),
                Target::Direct { .. } => None,
            };
            let status = resp.status();
            let body_ok = resp.into_body().collect().await.is_ok();
            let failure = if let Some(m) = mesh {
                Some(m)
            } else if !body_ok {
                Some("body_error".into())
            } else if status.is_client_error() || status.is_server_error() {
                Some(format!("http_{}", status.as_u16()))
            } else {
                None
            };
            Outcome {
                failure,
                served_by,
                path,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_by_outcome() {
        let mut s = Stats::default();
        let ok = Outcome {
            failure: None,
            served_by: Some("a".into()),
            path: Some(PathTaken::Direct),
        };
        let bad = Outcome {
            failure: Some("outcome_unknown".into()),
            served_by: None,
            path: None,
        };
        s.record(&ok, true, Duration::from_millis(2));
        s.record(&bad, false, Duration::from_millis(4));
        s.record(&bad, true, Duration::from_millis(4));
        assert_eq!((s.sent, s.ok, s.failed), (3, 1, 2));
        assert_eq!(s.failed_idempotent, 1);
        assert_eq!(s.unknown_outcome, 2);
        assert_eq!(s.served_by["a"], 1);
        assert!(
            s.summary("load")
                .starts_with("load: sent=3 ok=1 failed=2 p50_ms=")
        );
        assert!(s.failure_line().contains("outcome_unknown=2"));
        assert!(
            s.latency_line()
                .starts_with("latency: p99_idem_ms=4.00 max_idem_ms=4.00 p99_non_idem_ms=4.00"),
            "{}",
            s.latency_line()
        );
        assert!("mix".parse::<MethodMix>().is_ok());
        assert!("PATCH".parse::<MethodMix>().is_err());
    }

    #[test]
    fn mesh_gaps_are_found_from_the_answers() {
        let mut s = Stats::default();
        assert_eq!(s.longest_mesh_gap(), None);
        for (t, n) in [(1000, 3), (1010, 1), (1500, 2), (1520, 1), (3000, 4)] {
            s.mesh_answers.insert(t, n);
        }
        assert_eq!(s.longest_mesh_gap(), Some((1530, 3000)));
        assert_eq!(s.gap_line(), "mesh_gap: from_unix_ms=1530 to_unix_ms=3000");
        assert_eq!(s.last_mesh_answer_between(1000, 1600), Some(1530));
        assert_eq!(s.last_mesh_answer_between(1600, 3000), None);
        assert_eq!(s.last_mesh_answer_between(1005, 1009), Some(1010));
    }
}
