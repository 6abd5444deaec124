//! Which incoming connections the PA spends a TLS handshake on. A full handshake costs the
//! sidecar's runtime a few hundred microseconds of CPU before any client certificate is seen,
//! so anyone who can reach the PA could stall the CA, the PA and the admin API with a stream
//! of ClientHellos. The PA admits a connection to its handshake only when
//! - it has fewer than `concurrency` handshakes in progress;
//! - its source address is within `per_source` handshakes a second (a burst of twice that);
//! - the PA as a whole is within `rate` handshakes a second (a burst of a fifth of it) —
//!   unless the source completed a handshake in the last ten minutes (a known peer: a caller's
//!   sidecar reconnecting is not turned away because strangers flood).
//!
//! A connection not admitted is closed before any byte of TLS, and counted
//! (`detour_tls_handshakes_refused_total{reason}`). Pure apart from the clock it is given.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::tls::HandshakeLimits;
use crate::ratelimit::TokenBucket;

/// Sources tracked at most (per-source buckets, known peers); the oldest are forgotten.
const MAX_SOURCES: usize = 4096;

/// How long a source that completed a handshake counts as a known peer.
const KNOWN_FOR: Duration = Duration::from_secs(600);

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many handshakes in progress.
    Concurrency,
    /// The PA's handshake rate.
    Rate,
    /// The source's handshake rate.
    Source,
}

impl Refused {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Concurrency => "concurrency",
            Refused::Rate => "rate",
            Refused::Source => "source",
        }
    }
}

/// The admission state of one listener.
#[derive(Debug)]
pub struct HandshakeGuard {
    limits: HandshakeLimits,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    global: Option<TokenBucket>,
    sources: HashMap<IpAddr, TokenBucket>,
    known: HashMap<IpAddr, Instant>,
}

impl HandshakeGuard {
    /// A guard with `limits`, at `now`.
    pub fn new(limits: HandshakeLimits, now: Instant) -> Self {
        let slots = if limits.concurrency == 0 {
            Semaphore::MAX_PERMITS
        } else {
            limits.concurrency as usize
        };
        Self {
            limits,
            slots: Arc::new(Semaphore::new(slots)),
            state: Mutex::new(State {
                global: (limits.rate > 0)
                    .then(|| TokenBucket::new(limits.rate, (limits.rate / 5).max(1), now)),
                sources: HashMap::new(),
                known: HashMap::new(),
            }),
        }
    }

    /// Whether a connection from `source` gets a handshake now; the permit holds its slot
    /// until dropped.
    pub fn admit(&self, source: IpAddr, now: Instant) -> Result<OwnedSemaphorePermit, Refused> {
        {
            let mut st = self.state.lock();
            let known = st
                .known
                .get(&source)
                .is_some_and(|t| now.saturating_duration_since(*t) < KNOWN_FOR);
            if self.limits.per_source > 0 {
                if st.sources.len() >= MAX_SOURCES && !st.sources.contains_key(&source) {
                    st.sources.clear();
                }
                let per = self.limits.per_source;
                let bucket = st
                    .sources
                    .entry(source)
                    .or_insert_with(|| TokenBucket::new(per, per * 2, now));
                if !bucket.try_take(now) {
                    return Err(Refused::Source);
                }
            }
            if !known
                && let Some(g) = st.global.as_mut()
                && !g.try_take(now)
            {
                return Err(Refused::Rate);
            }
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Concurrency)
    }

    /// `source` completed a handshake at `now`: a known peer from now on.
    pub fn completed(&self, source: IpAddr, now: Instant) {
        let mut st = self.state.lock();
        if st.known.len() >= MAX_SOURCES && !st.known.contains_key(&source) {
            st.known
                .retain(|_, t| now.saturating_duration_since(*t) < KNOWN_FOR);
            if st.known.len() >= MAX_SOURCES {
                st.known.clear();
            }
        }
        st.known.insert(source, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_gets_its_share_the_pa_its_rate_and_known_peers_get_through() {
        let t = Instant::now();
        let g = HandshakeGuard::new(
            HandshakeLimits {
                concurrency: 100,
                rate: 50,
                per_source: 5,
            },
            t,
        );
        // One source: a burst of 10, then refused.
        let from_one: Vec<_> = (0..20).map(|_| g.admit(ip(1), t)).collect();
        assert_eq!(from_one.iter().filter(|r| r.is_ok()).count(), 10);
        assert_eq!(
            from_one.last().unwrap().as_ref().err(),
            Some(&Refused::Source)
        );
        drop(from_one);
        // Many sources: the PA's burst (10, a fifth of 50 a second) has gone to the first.
        let many: Vec<_> = (2..40).map(|i| g.admit(ip(i), t)).collect();
        assert!(
            many.iter()
                .all(|r| r.as_ref().err() == Some(&Refused::Rate))
        );
        // A known peer is not held to the PA's rate.
        g.completed(ip(200), t);
        assert!(g.admit(ip(200), t).is_ok());
        // A second later the rate has refilled.
        let t1 = t + Duration::from_secs(1);
        assert!(g.admit(ip(50), t1).is_ok());
    }

    #[test]
    fn handshakes_in_progress_are_bounded() {
        let t = Instant::now();
        let g = HandshakeGuard::new(
            HandshakeLimits {
                concurrency: 2,
                rate: 0,
                per_source: 0,
            },
            t,
        );
        let a = g.admit(ip(1), t).unwrap();
        let _b = g.admit(ip(2), t).unwrap();
        assert_eq!(g.admit(ip(3), t).err(), Some(Refused::Concurrency));
        drop(a);
        assert!(
            g.admit(ip(3), t).is_ok(),
            "a finished handshake frees its slot"
        );
    }

    #[test]
    fn no_limits_admits_everything() {
        let t = Instant::now();
        let g = HandshakeGuard::new(
            HandshakeLimits {
                concurrency: 0,
                rate: 0,
                per_source: 0,
            },
            t,
        );
        let held: Vec<_> = (0..1000).map(|i| g.admit(ip((i % 250) as u8), t)).collect();
        assert!(held.iter().all(Result::is_ok));
    }
}
