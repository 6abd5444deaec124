//! A token bucket, pure: `rate` requests a second on average, bursts of up to `burst`.

use tokio::time::Instant;

/// One bucket.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` a second, holding at most `burst` (at least 1).
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`; false when none is left.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let t = Instant::now();
        let mut b = TokenBucket::new(10, 5, t);
        let taken = (0..20).filter(|_| b.try_take(t)).count();
        assert_eq!(taken, 5, "the burst");
        // One second later: ten more (the rate), capped by the burst of five.
        let t1 = t + Duration::from_secs(1);
        assert_eq!((0..20).filter(|_| b.try_take(t1)).count(), 5);
        // 100 ms later: one.
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!((0..20).filter(|_| b.try_take(t2)).count(), 1);
        // Over ten seconds, one request every 50 ms: at most rate × time + burst pass.
        let mut passed = 0;
        for i in 0..200 {
            if b.try_take(t2 + Duration::from_millis(50 * i)) {
                passed += 1;
            }
        }
        assert!(passed <= 10 * 10 + 5, "{passed}");
        assert!(passed >= 95, "{passed}");
    }
}
