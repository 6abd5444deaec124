//! A live link: the pure [`Link`] machine behind a lock, with every transition logged once and
//! counted, and the `detour_link_state` gauge kept current. Shared by the SDK (scope `sdk`)
//! and the sidecar's CA half (scope `ca`).

use detour_proto::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::link::{Event, Link, LinkConfig, LinkState};

/// The names one scope gives the three states.
#[derive(Debug, Clone, Copy)]
pub struct StateNames {
    /// The scope label (`sdk`, `ca`).
    pub scope: &'static str,
    /// Name of the primary state (`mesh`, `via_pa`).
    pub primary: &'static str,
    /// Name of the fallback state (`direct`, `ca_direct`).
    pub fallback: &'static str,
}

/// The SDK's names.
pub const SDK_NAMES: StateNames = StateNames {
    scope: "sdk",
    primary: "mesh",
    fallback: "direct",
};

impl StateNames {
    /// The name of `state` in this scope.
    pub fn name(&self, state: LinkState) -> &'static str {
        match state {
            LinkState::Primary => self.primary,
            LinkState::Fallback => self.fallback,
            LinkState::Recovering { .. } => "recovering",
        }
    }
}

/// Now, on tokio's clock (so tests with paused time drive the ramp).
fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Gauge value of a state: 0 primary, 1 fallback, 2 recovering.
fn gauge(state: LinkState) -> f64 {
    match state {
        LinkState::Primary => 0.0,
        LinkState::Fallback => 1.0,
        LinkState::Recovering { .. } => 2.0,
    }
}

/// One link with its bookkeeping.
#[derive(Debug)]
pub struct LinkHandle {
    names: StateNames,
    peer: String,
    link: Mutex<Link>,
    /// Follows the state, for requests that wait on the primary path.
    watch: tokio::sync::watch::Sender<LinkState>,
    /// Requests on this link, for the probes' pace.
    use_: Usage,
}

/// When requests last chose a path on a link, and the wake-up of probes resting meanwhile.
#[derive(Debug)]
struct Usage {
    born: tokio::time::Instant,
    /// The last request's time, in ms after `born`.
    last_ms: AtomicU64,
    /// Set while the probes wait at their idle pace: the next request wakes them.
    resting: AtomicBool,
    woken: tokio::sync::Notify,
}

impl LinkHandle {
    /// A link to `peer`, in the primary state (or the fallback one when `start_fallback`).
    pub fn new(names: StateNames, peer: String, cfg: LinkConfig, start_fallback: bool) -> Self {
        let link = if start_fallback {
            Link::new_fallback(cfg)
        } else {
            Link::new(cfg)
        };
        let h = Self {
            names,
            peer,
            watch: tokio::sync::watch::channel(link.state()).0,
            link: Mutex::new(link),
            use_: Usage {
                born: now(),
                last_ms: AtomicU64::new(0),
                resting: AtomicBool::new(false),
                woken: tokio::sync::Notify::new(),
            },
        };
        h.publish(h.state());
        h
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock()
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        self.lock().state()
    }

    /// The current state's name in this scope.
    pub fn state_name(&self) -> &'static str {
        self.names.name(self.state())
    }

    /// Feeds one event.
    pub fn event(&self, event: Event) {
        let t = {
            let mut link = self.lock();
            link.on(event, now())
        };
        if let Some(t) = t {
            let (from, to) = (self.names.name(t.from), self.names.name(t.to));
            tracing::info!(scope = self.names.scope, peer = %self.peer, from, to, reason = t.reason.as_str(), "link switched");
            metrics::counter!("detour_link_transitions_total",
                "scope" => self.names.scope, "from" => from, "to" => to, "reason" => t.reason.as_str())
            .increment(1);
            self.publish(t.to);
            self.watch.send_replace(t.to);
        }
    }

    /// Resolves once the link is on its fallback path (at once if it already is): a request
    /// still waiting on the primary path may then be sent on the other one.
    pub fn left_primary(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.watch.subscribe();
        async move {
            if rx.wait_for(|s| *s == LinkState::Fallback).await.is_err() {
                // The link is gone: it will never say so.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether this request should take the primary path (drives the ramp, too). Counts as
    /// the link's use: probes resting at their idle pace are woken.
    pub fn choose_primary(&self) -> bool {
        let t = now();
        let u = &self.use_;
        let ms = u64::try_from(t.saturating_duration_since(u.born).as_millis()).unwrap_or(u64::MAX);
        u.last_ms.store(ms, Ordering::Relaxed);
        if u.resting.load(Ordering::Relaxed) && u.resting.swap(false, Ordering::AcqRel) {
            u.woken.notify_one();
        }
        self.event(Event::Tick);
        let share = self.lock().primary_share(t);
        share >= 1.0 || (share > 0.0 && fastrand::f64() < share)
    }

    /// How long since a request last chose a path on this link (since it was made, if none).
    pub fn idle_for(&self) -> Duration {
        let u = &self.use_;
        let last = u.born + Duration::from_millis(u.last_ms.load(Ordering::Relaxed));
        now().saturating_duration_since(last)
    }

    /// Resolves at the next request on this link: the probes' idle wait, cut short.
    pub async fn next_use(&self) {
        let u = &self.use_;
        let woken = u.woken.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        u.resting.store(true, Ordering::Release);
        woken.await;
    }

    /// The probes wait at their busy pace again (no request needs to wake them).
    pub fn busy(&self) {
        self.use_.resting.store(false, Ordering::Release);
    }

    fn publish(&self, state: LinkState) {
        metrics::gauge!("detour_link_state", "scope" => self.names.scope, "peer" => self.peer.clone())
            .set(gauge(state));
    }
}
