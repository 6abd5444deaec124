//! Peak-EWMA latency of one endpoint, for the latency-aware balancer (`proxy.balance =
//! "peak-ewma"`, as Finagle's and Linkerd's): the estimate jumps to any slower answer at once
//! (the peak) and otherwise moves toward the answers it sees with a time constant of 2 s, and
//! toward 0 while nothing is sent, so that an endpoint once slow is tried again. An attempt that
//! ended without an answer counts as a 100 ms answer that fades with a 1 s time constant.
//! Estimates within twice the lower plus 1 ms are alike ([`alike`]): the balancer then
//! compares requests in flight alone, so that equal endpoints share the load at any
//! concurrency; otherwise its cost of an endpoint is the estimate times its requests in flight
//! plus one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The time constant of the average: 2 s, not Finagle's and Linkerd's 10 s. One slow answer
/// (a spike of the p999) keeps an endpoint out of the draw until its peak has decayed to
/// within [`alike`] of the others: with 10 s, at 100 requests/s over two endpoints, one of them
/// took every request of whole 2-s windows (docs/performance.md).
pub const DECAY: Duration = Duration::from_secs(2);

/// How slow an endpoint counts right after an attempt on it ended without an answer.
pub const FAILED_ATTEMPT: Duration = Duration::from_millis(100);

/// The time constant of that penalty: shorter than [`DECAY`], so an endpoint that failed once
/// (a provider restarting) is tried again within seconds.
pub const PENALTY_DECAY: Duration = Duration::from_secs(1);

/// How far apart two estimates may be and still be alike: a hop's jitter, not a slower
/// endpoint.
pub const ALIKE_WITHIN: Duration = Duration::from_millis(1);

/// How many times the lower estimate the higher may be (plus [`ALIKE_WITHIN`]) and still be
/// alike. Between endpoints this close, the requests in flight already move the load to the
/// faster under load; what they add is a spike's weight (one slow answer makes the peak).
pub const ALIKE_FACTOR: f64 = 2.0;

/// Whether estimates `a_ns` and `b_ns` are alike: the higher is at most [`ALIKE_FACTOR`] times
/// the lower plus [`ALIKE_WITHIN`]. Without it, at one request in flight or none the cost is the
/// estimate alone: the endpoint not drawn decays toward 0 until it is the cheaper, and the
/// whole load moves from one endpoint to the other every few seconds.
pub fn alike(a_ns: f64, b_ns: f64) -> bool {
    let (lo, hi) = (a_ns.min(b_ns), a_ns.max(b_ns));
    hi <= lo * ALIKE_FACTOR + ALIKE_WITHIN.as_nanos() as f64
}

/// The estimate after `rtt_ns` was seen `elapsed_ns` after an estimate of `prev_ns`: the peak
/// when slower, else the decayed average.
pub fn observe(prev_ns: f64, elapsed_ns: u64, rtt_ns: f64) -> f64 {
    observe_with(DECAY, prev_ns, elapsed_ns, rtt_ns)
}

/// [`observe`] with the time constant `decay`.
fn observe_with(decay: Duration, prev_ns: f64, elapsed_ns: u64, rtt_ns: f64) -> f64 {
    if rtt_ns > prev_ns {
        return rtt_ns;
    }
    let w = (-(elapsed_ns as f64) / decay.as_nanos() as f64).exp();
    prev_ns * w + rtt_ns * (1.0 - w)
}

/// Nanoseconds since this process's first reading (tokio's clock: paused in tests).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(Instant::now().duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// One endpoint's estimate (0 until its first answer), and the penalty of its last failed
/// attempt (decaying with [`PENALTY_DECAY`]); the balancer reads the larger.
#[derive(Debug, Default)]
pub struct PeakEwma {
    answers: Decaying,
    failures: Decaying,
}

impl PeakEwma {
    /// Takes in an answer that took `rtt`.
    pub fn observe(&self, rtt: Duration) {
        self.answers.update(DECAY, rtt.as_nanos() as f64);
    }

    /// Takes in an attempt that ended without an answer.
    pub fn failed(&self) {
        (self.failures).update(PENALTY_DECAY, FAILED_ATTEMPT.as_nanos() as f64);
    }

    /// The estimate now (ns), decayed toward 0 since the last answer, or the failure penalty
    /// when larger.
    pub fn get(&self) -> f64 {
        let answers = self.answers.update(DECAY, 0.0);
        let failures = self.failures.update(PENALTY_DECAY, 0.0);
        answers.max(failures)
    }
}

/// A peak-EWMA value.
#[derive(Debug, Default)]
struct Decaying {
    /// The value in ns (`f64` bits).
    value: AtomicU64,
    /// When it was last updated (ns, [`now_ns`]).
    at: AtomicU64,
}

impl Decaying {
    /// Races between two updates lose one of them: an estimate, not an account.
    fn update(&self, decay: Duration, rtt_ns: f64) -> f64 {
        let now = now_ns();
        let prev = f64::from_bits(self.value.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.at.swap(now, Ordering::Relaxed));
        let next = observe_with(decay, prev, elapsed, rtt_ns);
        self.value.store(next.to_bits(), Ordering::Relaxed);
        next
    }
}

/// When a request to an endpoint started (only the latency-aware balancer reads the clock).
pub fn started(latency_aware: bool) -> Option<Instant> {
    latency_aware.then(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slower_answer_is_taken_at_once_and_faster_ones_slowly() {
        let ms = 1e6;
        // (previous, elapsed ms, answer) → estimate
        assert_eq!(observe(10.0 * ms, 0, 50.0 * ms), 50.0 * ms);
        assert_eq!(
            observe(50.0 * ms, 0, 10.0 * ms),
            50.0 * ms,
            "no time, no change"
        );
        let after_one_tau = observe(50.0 * ms, DECAY.as_nanos() as u64, 10.0 * ms);
        let expected = 10.0 * ms + 40.0 * ms * (-1.0f64).exp();
        assert!((after_one_tau - expected).abs() < 1.0, "{after_one_tau}");
        let long_after = observe(50.0 * ms, 10 * DECAY.as_nanos() as u64, 10.0 * ms);
        assert!((long_after - 10.0 * ms).abs() < 0.01 * ms, "{long_after}");
    }

    #[test]
    fn estimates_within_twice_the_lower_and_a_millisecond_are_alike() {
        let ms = 1e6;
        // (a, b) in ms → alike
        let table = [
            (0.0, 0.0, true),
            (0.0, 1.0, true),
            (0.0, 1.01, false),
            (0.3, 1.6, true),
            (0.3, 1.61, false),
            (0.3, 10.3, false),
            (4.0, 9.0, true),
            (4.0, 9.01, false),
            (20.0, 41.0, true),
            (20.0, 41.1, false),
            (100.0, 2.0, false),
        ];
        for (a, b, want) in table {
            assert_eq!(alike(a * ms, b * ms), want, "{a} ms and {b} ms");
            assert_eq!(alike(b * ms, a * ms), want, "{b} ms and {a} ms");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_estimate_decays_toward_zero() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(100));
        assert!((e.get() - 100e6).abs() < 1e3);
        tokio::time::advance(DECAY * 3).await;
        assert!(e.get() < 100e6 * 0.06, "{}", e.get());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_attempt_weighs_at_once_and_fades_within_seconds() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(2));
        e.failed();
        assert!((e.get() - 100e6).abs() < 1e3, "{}", e.get());
        // 3 s later the penalty is 5 ms; after 3 s more (and a 2 ms answer), 0.25 ms: the
        // answers' estimate (2 ms decayed by 3 s) counts again.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!((4e6..6e6).contains(&e.get()), "{}", e.get());
        e.observe(Duration::from_millis(2));
        tokio::time::advance(Duration::from_secs(3)).await;
        let answers = 2e6 * (-1.5f64).exp();
        assert!((e.get() - answers).abs() < 1e4, "{}", e.get());
    }
}
