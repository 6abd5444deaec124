//! When to restart the sidecar and whether its host is crash-looping, pure: exits, readiness
//! and time in; restart delays and the crash-loop mark out.
//!
//! An unplanned exit restarts after a backoff that starts at `backoff` and doubles up to
//! `max_backoff`; a sidecar that stays ready for `stable` earns the short backoff back.
//! `crashes` unplanned exits within `window` mark the host `failed` (a crash loop): restarts then
//! come every `loop_retry`, and the mark clears once a sidecar has stayed ready for
//! `clear_after`. Planned exits (an upgrade's hand-off, a restart the watchdog asked for) restart
//! at once and count for nothing.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// The supervision thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// First restart delay after an unplanned exit.
    pub backoff: Duration,
    /// Longest restart delay outside a crash loop.
    pub max_backoff: Duration,
    /// Ready this long: the backoff starts again from `backoff`.
    pub stable: Duration,
    /// Unplanned exits within `window` that make a crash loop.
    pub crashes: u32,
    /// The crash-loop window.
    pub window: Duration,
    /// Restart delay while crash-looping.
    pub loop_retry: Duration,
    /// Ready this long ends a crash loop.
    pub clear_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            stable: Duration::from_secs(10),
            crashes: 5,
            window: Duration::from_secs(60),
            loop_retry: Duration::from_secs(10),
            clear_after: Duration::from_secs(10),
        }
    }
}

/// What an exit leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// Wait this long before starting the sidecar again.
    pub after: Duration,
    /// This exit began a crash loop (mark the host `failed`).
    pub crash_loop_began: bool,
}

/// What of a [`Supervisor`] outlives the watchdog process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// How long ago each unplanned exit in the window was, oldest first.
    pub crash_ages: Vec<Duration>,
    /// Whether the host is marked failed.
    pub crash_loop: bool,
    /// The next backoff.
    pub backoff: Duration,
}

/// The supervision state of one host's sidecar.
#[derive(Debug, Clone)]
pub struct Supervisor {
    policy: Policy,
    /// Unplanned exits within the window.
    crashes: VecDeque<Instant>,
    /// The next backoff outside a crash loop.
    backoff: Duration,
    /// Since when the current sidecar is ready.
    ready_since: Option<Instant>,
    /// Whether the host is marked failed.
    crash_loop: bool,
}

impl Supervisor {
    /// A supervisor with no history.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            crashes: VecDeque::new(),
            backoff: policy.backoff,
            ready_since: None,
            crash_loop: false,
        }
    }

    /// Whether the host is in a crash loop (marked `failed`).
    pub fn crash_loop(&self) -> bool {
        self.crash_loop
    }

    /// Unplanned exits within the window, now.
    pub fn recent_crashes(&self) -> usize {
        self.crashes.len()
    }

    /// What a restarted watchdog needs to carry on: the age of every crash in the window (at
    /// `now`), the crash-loop mark and the next backoff.
    pub fn memory(&self, now: Instant) -> Memory {
        Memory {
            crash_ages: self
                .crashes
                .iter()
                .map(|t| now.saturating_duration_since(*t))
                .collect(),
            crash_loop: self.crash_loop,
            backoff: self.backoff,
        }
    }

    /// A supervisor carrying on from `m` (taken by an earlier watchdog) at `now`.
    pub fn restore(policy: Policy, m: &Memory, now: Instant) -> Self {
        let mut s = Self::new(policy);
        s.crashes = m
            .crash_ages
            .iter()
            .filter(|age| **age <= policy.window)
            .filter_map(|age| now.checked_sub(*age))
            .collect();
        s.crash_loop = m.crash_loop;
        s.backoff = m.backoff.clamp(policy.backoff, policy.max_backoff);
        s
    }

    /// The sidecar exited at `now`; `planned` when the watchdog caused it on purpose.
    pub fn on_exit(&mut self, now: Instant, planned: bool) -> Restart {
        self.ready_since = None;
        if planned {
            return Restart {
                after: Duration::ZERO,
                crash_loop_began: false,
            };
        }
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.policy.window)
        {
            self.crashes.pop_front();
        }
        let began = !self.crash_loop && self.crashes.len() >= self.policy.crashes as usize;
        self.crash_loop |= began;
        let after = if self.crash_loop {
            self.policy.loop_retry
        } else {
            let b = self.backoff;
            self.backoff = (self.backoff * 2).min(self.policy.max_backoff);
            b
        };
        Restart {
            after,
            crash_loop_began: began,
        }
    }

    /// The sidecar became ready at `now`.
    pub fn on_ready(&mut self, now: Instant) {
        self.ready_since.get_or_insert(now);
    }

    /// Time passes; returns true when a crash loop has just ended (clear the `failed` mark).
    pub fn tick(&mut self, now: Instant) -> bool {
        let Some(since) = self.ready_since else {
            return false;
        };
        let ready_for = now.saturating_duration_since(since);
        if ready_for >= self.policy.stable {
            self.backoff = self.policy.backoff;
        }
        if self.crash_loop && ready_for >= self.policy.clear_after {
            self.crash_loop = false;
            self.crashes.clear();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            stable: Duration::from_secs(10),
            crashes: 3,
            window: Duration::from_secs(60),
            loop_retry: Duration::from_secs(5),
            clear_after: Duration::from_secs(20),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_once_stable() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(Policy {
            crashes: 100,
            ..policy()
        });
        let delays: Vec<u64> = (0..6)
            .map(|i| s.on_exit(t0 + ms(i), false).after.as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 800, 800]);
        s.on_ready(t0 + ms(100));
        assert!(!s.tick(t0 + ms(5_000)));
        assert_eq!(
            s.on_exit(t0 + ms(5_001), false).after,
            ms(800),
            "not stable yet"
        );
        s.on_ready(t0 + ms(6_000));
        s.tick(t0 + ms(16_000));
        assert_eq!(
            s.on_exit(t0 + ms(16_001), false).after,
            ms(100),
            "stable: reset"
        );
    }

    #[test]
    fn planned_exits_restart_at_once_and_count_for_nothing() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy());
        for i in 0..10 {
            assert_eq!(s.on_exit(t0 + ms(i), true).after, Duration::ZERO);
        }
        assert_eq!(s.recent_crashes(), 0);
        assert!(!s.crash_loop());
    }

    #[test]
    fn crashes_within_the_window_mark_a_crash_loop_until_ready_long_enough() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy());
        assert!(!s.on_exit(t0, false).crash_loop_began);
        assert!(!s.on_exit(t0 + ms(1_000), false).crash_loop_began);
        let r = s.on_exit(t0 + ms(2_000), false);
        assert!(r.crash_loop_began);
        assert_eq!(r.after, ms(5_000), "slow retries while looping");
        let again = s.on_exit(t0 + ms(8_000), false);
        assert!(!again.crash_loop_began, "marked once");
        assert_eq!(again.after, ms(5_000));
        assert!(s.crash_loop());
        s.on_ready(t0 + ms(14_000));
        assert!(!s.tick(t0 + ms(30_000)), "ready 16 s < 20 s");
        assert!(s.tick(t0 + ms(34_000)), "ready 20 s: the mark clears");
        assert!(!s.crash_loop());
        assert!(!s.tick(t0 + ms(35_000)), "once");
    }

    #[test]
    fn a_restored_supervisor_keeps_the_crash_loop_and_its_history() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut s = Supervisor::new(policy());
        s.on_exit(t0, false);
        s.on_exit(t0 + ms(1_000), false);
        assert!(s.on_exit(t0 + ms(2_000), false).crash_loop_began);
        let m = s.memory(t0 + ms(3_000));
        assert_eq!(m.crash_ages.len(), 3);
        // A new watchdog, 2 s later by its own clock.
        let t1 = t0 + ms(50_000);
        let mut r = Supervisor::restore(policy(), &m, t1);
        assert!(r.crash_loop(), "the mark survives");
        assert_eq!(r.recent_crashes(), 3);
        assert_eq!(
            r.on_exit(t1 + ms(1), false).after,
            ms(5_000),
            "still looping"
        );
        // Crashes older than the window are not brought back.
        let old = Memory {
            crash_ages: vec![Duration::from_secs(3600), ms(10)],
            crash_loop: false,
            backoff: Duration::from_secs(3600),
        };
        let r = Supervisor::restore(policy(), &old, t1);
        assert_eq!(r.recent_crashes(), 1);
        assert_eq!(r.memory(t1).backoff, ms(800), "within the policy");
    }

    #[test]
    fn crashes_spread_wider_than_the_window_are_no_loop() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(policy());
        for i in 0..10u64 {
            let r = s.on_exit(t0 + Duration::from_secs(31 * i), false);
            assert!(!r.crash_loop_began, "exit {i}");
        }
        assert!(s.recent_crashes() <= 2);
    }
}
