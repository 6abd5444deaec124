//! Exponential backoff with full jitter, for every reconnect and re-list to a registry: after
//! the n-th failure in a row a client waits a uniformly random time in `[0, min(cap, base·2ⁿ))`,
//! so a fleet that lost its registry at the same moment does not come back in step.
//!
//! The arithmetic is pure ([`Backoff::next_with`] takes the random draw); [`Backoff::next_delay`]
//! draws it.

use std::time::Duration;

/// The delays of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// The registry clients' default: 100 ms doubling to at most 3 s, so a client is back
    /// within 3 s of its registry's return while a fleet's retries spread over those 3 s.
    pub const REGISTRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));

    /// Delays starting under `base` and never above `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            failures: 0,
        }
    }

    /// The bound of the next delay: `min(cap, base·2ⁿ)` after `n` failures in a row.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Records one more failure and returns how long to wait: `unit` (a draw in `[0, 1)`;
    /// values outside are clamped) times the ceiling before this failure.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::next_with`] with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// Waits the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn ceilings_double_up_to_the_cap_and_delays_stay_under_them() {
        // (failures before, draw, expected delay)
        let table: &[(u32, f64, Duration)] = &[
            (0, 0.0, MS(0)),
            (0, 0.5, MS(50)),
            (0, 0.999, Duration::from_micros(99_900)),
            (1, 0.5, MS(100)),
            (2, 0.5, MS(200)),
            (3, 1.0, MS(800)),
            (4, 1.0, MS(1_600)),
            (5, 1.0, MS(3_000)), // 3.2 s capped
            (40, 0.25, MS(750)),
            (u32::MAX, 0.5, MS(1_500)),
            (2, -3.0, MS(0)), // draws outside [0, 1] are clamped
            (2, 7.0, MS(400)),
        ];
        for &(failures, draw, want) in table {
            let mut b = Backoff::REGISTRY;
            b.failures = failures;
            assert_eq!(
                b.next_with(draw),
                want,
                "after {failures} failures, draw {draw}"
            );
        }
    }

    #[test]
    fn a_success_starts_over() {
        let mut b = Backoff::new(MS(10), MS(1_000));
        let ceilings: Vec<Duration> = (0..9)
            .map(|_| {
                let c = b.ceiling();
                b.next_with(0.0);
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            [10, 20, 40, 80, 160, 320, 640, 1_000, 1_000].map(MS)
        );
        assert_eq!(b.failures(), 9);
        b.reset();
        assert_eq!(b.ceiling(), MS(10));
    }

    #[test]
    fn random_delays_spread_over_the_whole_window() {
        // A fleet retrying after the same failure count: its delays cover [0, ceiling) instead
        // of landing together (checked on 2,000 draws, in tenths of the window).
        let mut seen = [0u32; 10];
        for _ in 0..2_000 {
            let mut b = Backoff::new(MS(1_000), MS(1_000));
            let d = b.next_delay();
            assert!(d < MS(1_000));
            seen[(d.as_millis() / 100) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }
}
