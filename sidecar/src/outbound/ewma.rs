//! Peak-EWMA latency of one endpoint, for the latency-aware balancer (`proxy.balance =
//! "peak-ewma"`, as Finagle's and Linkerd's): the estimate jumps to any slower answer at once
//! (the peak) and otherwise moves toward the answers it sees with a time constant of 10 s, and
//! toward 0 while nothing is sent, so that an endpoint once slow is tried again. The balancer's
//! cost of an endpoint is the estimate times its requests in flight plus one.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The time constant of the average.
pub const DECAY: Duration = Duration::from_secs(10);

/// How slow an attempt that ended without an answer counts, at least.
pub const FAILED_ATTEMPT: Duration = Duration::from_millis(100);

/// The estimate after `rtt_ns` was seen `elapsed_ns` after an estimate of `prev_ns`: the peak
/// when slower, else the decayed average.
pub fn observe(prev_ns: f64, elapsed_ns: u64, rtt_ns: f64) -> f64 {
    if rtt_ns > prev_ns {
        return rtt_ns;
    }
    let w = (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp();
    prev_ns * w + rtt_ns * (1.0 - w)
}

/// Nanoseconds since this process's first reading (tokio's clock: paused in tests).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(Instant::now().duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// One endpoint's estimate (0 until its first answer).
#[derive(Debug, Default)]
pub struct PeakEwma {
    /// The estimate in ns (`f64` bits).
    value: AtomicU64,
    /// When it was last updated (ns, [`now_ns`]).
    at: AtomicU64,
}

impl PeakEwma {
    /// Takes in an answer that took `rtt`.
    pub fn observe(&self, rtt: Duration) {
        self.update(rtt.as_nanos() as f64);
    }

    /// The estimate now, decayed toward 0 since the last answer.
    pub fn get(&self) -> f64 {
        self.update(0.0)
    }

    /// Races between two updates lose one of them: an estimate, not an account.
    fn update(&self, rtt_ns: f64) -> f64 {
        let now = now_ns();
        let prev = f64::from_bits(self.value.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.at.swap(now, Ordering::Relaxed));
        let next = observe(prev, elapsed, rtt_ns);
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
}
