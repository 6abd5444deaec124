//! Peak-EWMA latency of one endpoint, for the latency-aware balancer (`proxy.balance =
//! "peak-ewma"`, as Finagle's and Linkerd's): the estimate jumps to any slower answer at once
//! (the peak) and otherwise moves toward the answers it sees with a time constant of 10 s, and
//! toward 0 while nothing is sent, so that an endpoint once slow is tried again. An attempt that
//! ended without an answer counts as a 100 ms answer that fades with a 1 s time constant. The
//! balancer's cost of an endpoint is the estimate times its requests in flight plus one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The time constant of the average.
pub const DECAY: Duration = Duration::from_secs(10);

/// How slow an endpoint counts right after an attempt on it ended without an answer.
pub const FAILED_ATTEMPT: Duration = Duration::from_millis(100);

/// The time constant of that penalty: far shorter than [`DECAY`], so an endpoint that failed
/// once (a provider restarting) is tried again within seconds, not minutes.
pub const PENALTY_DECAY: Duration = Duration::from_secs(1);

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
        // 3 s later the penalty is 5 ms; 5 s later under 1 ms, and the answers' 2 ms (decayed
        // by 5 s of 10) count again.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!((4e6..6e6).contains(&e.get()), "{}", e.get());
        tokio::time::advance(Duration::from_secs(2)).await;
        let answers = 2e6 * (-0.5f64).exp();
        assert!((e.get() - answers).abs() < 1e4, "{}", e.get());
    }
}
