//! The retry budget of one service at the CA (as Linkerd's and Finagle's): over a sliding
//! window, resends of requests that may have reached a provider are allowed up to a share of the
//! requests plus a small floor per second, so a failing provider cannot multiply its load.
//! Pure: the caller passes the time.

use std::time::Duration;
use tokio::time::Instant;

use crate::config::limits::BudgetConfig;

/// Slots the window is cut into.
const SLOTS: usize = 10;

/// Requests and resends of one service over the window.
#[derive(Debug)]
pub struct RetryBudget {
    cfg: BudgetConfig,
    start: Instant,
    /// Per slot: its index since `start`, requests, resends.
    slots: [(u64, u64, u64); SLOTS],
}

impl RetryBudget {
    /// An empty budget starting at `now`.
    pub fn new(cfg: BudgetConfig, now: Instant) -> Self {
        Self {
            cfg,
            start: now,
            slots: [(u64::MAX, 0, 0); SLOTS],
        }
    }

    fn slot_len(&self) -> Duration {
        (self.cfg.window / SLOTS as u32).max(Duration::from_millis(1))
    }

    fn slot(&mut self, now: Instant) -> &mut (u64, u64, u64) {
        let index = (now.saturating_duration_since(self.start).as_nanos()
            / self.slot_len().as_nanos()) as u64;
        let s = &mut self.slots[(index % SLOTS as u64) as usize];
        if s.0 != index {
            *s = (index, 0, 0);
        }
        s
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let current = (now.saturating_duration_since(self.start).as_nanos()
            / self.slot_len().as_nanos()) as u64;
        self.slots
            .iter()
            .filter(|s| s.0 != u64::MAX && current.saturating_sub(s.0) < SLOTS as u64)
            .fold((0, 0), |(r, x), s| (r + s.1, x + s.2))
    }

    /// Counts one request (its first attempt).
    pub fn request(&mut self, now: Instant) {
        self.slot(now).1 += 1;
    }

    /// Whether one more resend fits; if so it is counted.
    pub fn try_retry(&mut self, now: Instant) -> bool {
        let (requests, resends) = self.totals(now);
        let allowed = self.cfg.ratio * requests as f64
            + f64::from(self.cfg.min_per_second) * self.cfg.window.as_secs_f64();
        if (resends + 1) as f64 > allowed {
            return false;
        }
        self.slot(now).2 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ratio: f64, min: u32) -> (RetryBudget, Instant) {
        let now = Instant::now();
        let cfg = BudgetConfig {
            ratio,
            min_per_second: min,
            window: Duration::from_secs(10),
        };
        (RetryBudget::new(cfg, now), now)
    }

    #[test]
    fn resends_are_a_share_of_requests_plus_the_floor() {
        let (mut b, now) = budget(0.2, 1);
        for _ in 0..1000 {
            b.request(now);
        }
        let allowed = (0..1000).take_while(|_| b.try_retry(now)).count();
        // 20% of 1,000, plus 1 a second over a 10 s window.
        assert_eq!(allowed, 210);
        assert!(!b.try_retry(now));
    }

    #[test]
    fn the_floor_allows_resends_with_no_traffic_and_the_window_forgets() {
        let (mut b, now) = budget(0.2, 2);
        assert_eq!((0..100).take_while(|_| b.try_retry(now)).count(), 20);
        let later = now + Duration::from_secs(11);
        assert!(
            b.try_retry(later),
            "resends older than the window no longer count"
        );
    }

    #[test]
    fn a_zero_budget_allows_nothing() {
        let (mut b, now) = budget(0.0, 0);
        b.request(now);
        assert!(!b.try_retry(now));
    }
}
