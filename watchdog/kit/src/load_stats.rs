//! What a load run counts: requests by outcome, kind, path and instance, latency histograms,
//! and the failed requests one by one; and the lines `detourctl load` prints of them.

use std::collections::BTreeMap;
use std::time::Duration;

use detour_thin_sdk::PathTaken;
use hdrhistogram::Histogram;

use crate::load::MethodKind;

/// Counts of a run (or of one second of it).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Requests started.
    pub sent: u64,
    /// Requests answered 2xx/3xx with no mesh error.
    pub ok: u64,
    /// Everything else.
    pub failed: u64,
    /// Failures of idempotent requests (GET, PUT, and POSTs and gRPC calls that carry an
    /// idempotency key).
    pub failed_idempotent: u64,
    /// Keyed requests the provider answered from its record of the key, not carrying them
    /// out again (`idempotent-replayed: true`): repeats the mesh sent after an unknown outcome.
    pub replayed: u64,
    /// Failures whose outcome at the provider is unknown.
    pub unknown_outcome: u64,
    /// gRPC calls started (also in `sent`).
    pub grpc: u64,
    /// gRPC calls that failed (also in `failed`).
    pub failed_grpc: u64,
    /// Long streams started (also in `sent`).
    pub streams: u64,
    /// Long streams that failed or were cut (also in `failed`, not in `failed_idempotent`: a
    /// stream whose body the caller has begun to read cannot be sent again).
    pub failed_streams: u64,
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
    /// How long each long stream took, head to last byte, in microseconds (long streams are not
    /// in the latency histograms).
    pub stream_us: Histogram<u64>,
    /// How late each request started after it was due, in microseconds: the load generator's
    /// own lag (its timer, its scheduling, the concurrency cap).
    pub start_lag_us: Histogram<u64>,
    /// Requests that started more than the timer's slack (5 ms) after they were due: their
    /// latency counts from when they were due, the lag included.
    pub late_starts: u64,
    /// Latency in microseconds, from when each request was due (long streams apart).
    pub latency_us: Histogram<u64>,
    /// The same, of idempotent requests only (GET, PUT).
    pub latency_idem_us: Histogram<u64>,
    /// The same, of non-idempotent requests only (POST).
    pub latency_non_idem_us: Histogram<u64>,
    /// The first [`MAX_LISTED_FAILURES`] failed requests, one by one.
    pub failed_requests: Vec<FailedRequest>,
    /// The first [`MAX_LISTED_SLOW`] answered requests slower than [`LoadSpec::slow`]
    /// (long streams apart), one by one.
    ///
    /// [`LoadSpec::slow`]: crate::load::LoadSpec::slow
    pub slow_requests: Vec<SlowRequest>,
}

/// Failed requests listed one by one at most (the counts cover all of them).
pub const MAX_LISTED_FAILURES: usize = 100_000;

/// Slow requests listed one by one at most (about 4 MB).
pub const MAX_LISTED_SLOW: usize = 100_000;

/// One answered request slower than the threshold asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlowRequest {
    /// When it was due (ms since the epoch).
    pub due_unix_ms: u64,
    /// How long it took, from its start (or from when it was due, for a late start).
    pub latency_us: u64,
    /// Its method.
    pub method: MethodKind,
    /// The path its answer came over (`mesh`, `ca_direct`, `direct`; `-` when not told).
    pub path: &'static str,
}

impl SlowRequest {
    /// `slow: due_unix_ms=… latency_us=… method=… path=…`
    pub fn line(&self) -> String {
        format!(
            "slow: due_unix_ms={} latency_us={} method={:?} path={}",
            self.due_unix_ms, self.latency_us, self.method, self.path
        )
    }
}

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
            replayed: 0,
            unknown_outcome: 0,
            grpc: 0,
            failed_grpc: 0,
            streams: 0,
            failed_streams: 0,
            stream_us: histogram(),
            start_lag_us: histogram(),
            late_starts: 0,
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
            slow_requests: Vec::new(),
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
            "{prefix}: sent={} ok={} failed={} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} p999_ms={:.2} max_ms={:.2} late_starts={}",
            self.sent,
            self.ok,
            self.failed,
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
            self.late_starts,
        )
    }

    /// Latency by idempotency, and the load generator's own start lag: `latency: p99_idem_ms=…
    /// max_idem_ms=… p99_non_idem_ms=… max_non_idem_ms=… p99_start_lag_ms=… max_start_lag_ms=…`.
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
            "latency: p99_idem_ms={:.2} max_idem_ms={:.2} p99_non_idem_ms={:.2} max_non_idem_ms={:.2} p99_start_lag_ms={:.2} max_start_lag_ms={:.2}",
            q(&self.latency_idem_us, 0.99),
            max(&self.latency_idem_us),
            q(&self.latency_non_idem_us, 0.99),
            max(&self.latency_non_idem_us),
            q(&self.start_lag_us, 0.99),
            max(&self.start_lag_us),
        )
    }

    /// The path line: answers by path and when traffic was off the mesh path.
    pub fn path_line(&self) -> String {
        let n = |k| self.paths.get(k).copied().unwrap_or(0);
        let t = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "paths: mesh={} ca_direct={} direct={} first_off_mesh_unix_ms={} last_off_mesh_unix_ms={} failed_idempotent={} unknown_outcome={} replayed={}",
            n("mesh"),
            n("ca_direct"),
            n("direct"),
            t(self.first_off_mesh_unix_ms),
            t(self.last_off_mesh_unix_ms),
            self.failed_idempotent,
            self.unknown_outcome,
            self.replayed
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

    /// gRPC calls and long streams: `kinds: grpc=… grpc_failed=… streams=… streams_failed=…
    /// stream_p50_ms=… stream_max_ms=…`.
    pub fn kinds_line(&self) -> String {
        let q = |q: f64| {
            if self.stream_us.is_empty() {
                0.0
            } else {
                self.stream_us.value_at_quantile(q) as f64 / 1000.0
            }
        };
        format!(
            "kinds: grpc={} grpc_failed={} streams={} streams_failed={} stream_p50_ms={:.2} stream_max_ms={:.2}",
            self.grpc,
            self.failed_grpc,
            self.streams,
            self.failed_streams,
            q(0.5),
            self.stream_us.max() as f64 / 1000.0,
        )
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

    /// Counts how late one request started after it was due; `late`: past the timer's slack.
    pub(crate) fn record_start(&mut self, lag: Duration, late: bool) {
        let _ = self.start_lag_us.record((lag.as_micros() as u64).max(1));
        self.late_starts += u64::from(late);
    }

    /// Counts one request of `kind`; `idempotent`: it may be sent twice (its method, or a key).
    pub(crate) fn record(
        &mut self,
        outcome: &Outcome,
        kind: MethodKind,
        idempotent: bool,
        latency: Duration,
    ) {
        self.sent += 1;
        self.replayed += u64::from(outcome.replayed);
        let us = (latency.as_micros() as u64).max(1);
        if kind == MethodKind::Stream {
            self.streams += 1;
            let _ = self.stream_us.record(us);
        } else {
            let _ = self.latency_us.record(us);
            let by_kind = if idempotent {
                &mut self.latency_idem_us
            } else {
                &mut self.latency_non_idem_us
            };
            let _ = by_kind.record(us);
        }
        if kind == MethodKind::Grpc {
            self.grpc += 1;
        }
        if let Some(by) = &outcome.served_by {
            *self.served_by.entry(by.clone()).or_default() += 1;
            self.served_last_unix_ms
                .insert(by.clone(), detour_registry::now_unix_ms());
        }
        if let Some(path) = outcome.path {
            *self.paths.entry(path.as_str()).or_default() += 1;
            let now = detour_registry::now_unix_ms();
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
            Some(failure) => {
                self.failed += 1;
                if idempotent {
                    self.failed_idempotent += 1;
                }
                match kind {
                    MethodKind::Stream => self.failed_streams += 1,
                    MethodKind::Grpc => self.failed_grpc += 1,
                    _ => {}
                }
                if failure == "outcome_unknown" || failure == "timeout" {
                    self.unknown_outcome += 1;
                }
                *self.failures.entry(failure.clone()).or_default() += 1;
            }
        }
    }
}

/// How one request ended.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// How it failed, `None` when it did not.
    pub failure: Option<String>,
    /// The instance that answered.
    pub served_by: Option<String>,
    /// The path that answered.
    pub path: Option<PathTaken>,
    /// The provider answered from its record of the request's idempotency key.
    pub replayed: bool,
}

impl Outcome {
    pub(crate) fn failed(kind: impl Into<String>) -> Self {
        Outcome {
            failure: Some(kind.into()),
            ..Outcome::default()
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
            replayed: false,
        };
        let bad = Outcome::failed("outcome_unknown");
        s.record(
            &ok,
            MethodKind::Get,
            MethodKind::Get.idempotent(),
            Duration::from_millis(2),
        );
        s.record(
            &bad,
            MethodKind::Post,
            MethodKind::Post.idempotent(),
            Duration::from_millis(4),
        );
        s.record(
            &bad,
            MethodKind::Get,
            MethodKind::Get.idempotent(),
            Duration::from_millis(4),
        );
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
        s.record(
            &ok,
            MethodKind::Stream,
            MethodKind::Stream.idempotent(),
            Duration::from_millis(2000),
        );
        s.record(
            &bad,
            MethodKind::Stream,
            MethodKind::Stream.idempotent(),
            Duration::from_millis(700),
        );
        s.record(
            &bad,
            MethodKind::Grpc,
            MethodKind::Grpc.idempotent(),
            Duration::from_millis(1),
        );
        assert_eq!((s.sent, s.failed, s.failed_idempotent), (6, 4, 1));
        assert_eq!(
            (s.streams, s.failed_streams, s.grpc, s.failed_grpc),
            (2, 1, 1, 1)
        );
        // Streams are timed apart: the request latencies stay those of the four others.
        assert_eq!(s.latency_us.len(), 4);
        assert!(
            s.kinds_line()
                .starts_with("kinds: grpc=1 grpc_failed=1 streams=2 streams_failed=1"),
            "{}",
            s.kinds_line()
        );
        // A keyed POST is idempotent; an answer from the key's record is counted.
        let replayed = Outcome {
            replayed: true,
            ..Outcome::default()
        };
        s.record(&replayed, MethodKind::Post, true, Duration::from_millis(1));
        s.record(&bad, MethodKind::Post, true, Duration::from_millis(1));
        assert_eq!((s.failed_idempotent, s.replayed), (2, 1));
    }

    #[test]
    fn the_generators_own_lag_is_counted_apart() {
        let mut s = Stats::default();
        s.record_start(Duration::from_micros(300), false);
        s.record_start(Duration::from_micros(700), false);
        s.record_start(Duration::from_millis(5), true);
        assert_eq!(s.late_starts, 1);
        assert!(
            s.summary("t=1s").ends_with(" late_starts=1"),
            "{}",
            s.summary("t=1s")
        );
        let line = s.latency_line();
        assert!(
            line.ends_with("p99_start_lag_ms=5.00 max_start_lag_ms=5.00"),
            "{line}"
        );
        // A start lag is no request: sent and the latencies stay as they were.
        assert_eq!((s.sent, s.latency_us.len()), (0, 0));
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
