//! The link state machine, pure: state + event + time → new state (+ the transition to report).
//! No I/O happens here; the SDK and the sidecar feed it events and read its routing share.
//!
//! One machine shape serves both halves of the design:
//! - the SDK half, per local sidecar: `mesh → direct → recovering → mesh`;
//! - the CA half, per remote host: `via_pa → ca_direct → recovering → via_pa`.
//!
//! Leaving the primary path is immediate on any fault. Coming back needs the peer to say it is
//! ready *and* `recover_after` consecutive good probes, then a ramp that moves the primary
//! path's share of requests from `ramp_start` to 100% over `ramp`; any fault during the ramp
//! falls back again.

use std::time::Duration;
use tokio::time::Instant;

/// Where a link sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// The primary path (SDK: through the sidecar; CA: through the remote PA).
    Primary,
    /// The fallback path (SDK: direct to providers; CA: straight to the provider).
    Fallback,
    /// Moving back to the primary path since `since`.
    Recovering {
        /// When the ramp started.
        since: Instant,
    },
}

/// Why a link changed (logged and counted as the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The peer announced a planned stop.
    DrainAnnounced,
    /// Connecting to the peer failed, or the connection was reset.
    ConnectFailed,
    /// Active probes failed.
    ProbeFailed,
    /// The control stream to the peer dropped.
    ControlDropped,
    /// The registry says the peer is draining, stopped or failed.
    HostStatus,
    /// An operator turned the mesh off for this scope.
    MeshOff,
    /// Too many responses carried errors produced by the peer itself.
    MeshErrors,
    /// Enough good probes while the peer is ready.
    Recovered,
    /// The ramp back reached 100%.
    RampDone,
}

impl Reason {
    /// The metric label / log word.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::DrainAnnounced => "drain_announced",
            Reason::ConnectFailed => "connect_failed",
            Reason::ProbeFailed => "probe_failed",
            Reason::ControlDropped => "control_dropped",
            Reason::HostStatus => "host_status",
            Reason::MeshOff => "mesh_off",
            Reason::MeshErrors => "mesh_errors",
            Reason::Recovered => "recovered",
            Reason::RampDone => "ramp_done",
        }
    }
}

/// What can happen to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Something says the primary path is unusable now.
    Fault(Reason),
    /// The peer reports ready (control stream or registry status).
    PeerReady,
    /// The peer reports not ready (starting, draining …) without it being a fault.
    PeerNotReady,
    /// One active probe succeeded.
    ProbeOk,
    /// One active probe failed.
    ProbeFailed,
    /// The mesh is switched off for this scope until `MeshOn` (a gray rule or a rollback: the
    /// SDK's per-service switch, told by its sidecar's `MeshSwitch`).
    MeshOff,
    /// The mesh is switched back on.
    MeshOn,
    /// Time passes (drives the ramp).
    Tick,
}

/// Thresholds and timing.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// Consecutive failed probes that make a link leave the primary path.
    pub fail_after: u32,
    /// Consecutive good probes (with the peer ready) before the ramp back starts.
    pub recover_after: u32,
    /// Share of requests on the primary path when the ramp starts.
    pub ramp_start: f64,
    /// How long the ramp back to 100% takes.
    pub ramp: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            fail_after: 2,
            recover_after: 3,
            ramp_start: 0.1,
            ramp: Duration::from_secs(2),
        }
    }
}

/// A change of state, to log once and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State left.
    pub from: LinkState,
    /// State entered.
    pub to: LinkState,
    /// Why.
    pub reason: Reason,
}

/// One link.
#[derive(Debug, Clone)]
pub struct Link {
    cfg: LinkConfig,
    state: LinkState,
    /// Whether the peer last said it is ready.
    peer_ready: bool,
    /// Whether the mesh is switched off for this scope.
    disabled: bool,
    good_probes: u32,
    bad_probes: u32,
}

impl Link {
    /// A link on the primary path, with the peer assumed ready.
    pub fn new(cfg: LinkConfig) -> Self {
        Self::starting_in(cfg, LinkState::Primary, true)
    }

    /// A link that starts on the fallback path (the peer is not known to be up).
    pub fn new_fallback(cfg: LinkConfig) -> Self {
        Self::starting_in(cfg, LinkState::Fallback, false)
    }

    fn starting_in(cfg: LinkConfig, state: LinkState, peer_ready: bool) -> Self {
        Self {
            cfg,
            state,
            peer_ready,
            disabled: false,
            good_probes: 0,
            bad_probes: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// The share of requests that should take the primary path at `now` (0.0–1.0).
    pub fn primary_share(&self, now: Instant) -> f64 {
        match self.state {
            LinkState::Primary => 1.0,
            LinkState::Fallback => 0.0,
            LinkState::Recovering { since } => {
                let t = now.saturating_duration_since(since).as_secs_f64();
                let r = self.cfg.ramp.as_secs_f64().max(1e-9);
                (self.cfg.ramp_start + (1.0 - self.cfg.ramp_start) * (t / r)).min(1.0)
            }
        }
    }

    /// Applies `event` at `now`; returns the transition if the state changed.
    pub fn on(&mut self, event: Event, now: Instant) -> Option<Transition> {
        let from = self.state;
        let next = match (self.state, event) {
            (_, Event::MeshOff) => {
                self.disabled = true;
                self.fallback(Reason::MeshOff)
            }
            (_, Event::MeshOn) => {
                self.disabled = false;
                self.try_recover(now)
            }
            (_, Event::Fault(reason)) => {
                self.good_probes = 0;
                self.fallback(reason)
            }
            (_, Event::PeerNotReady) => {
                self.peer_ready = false;
                self.good_probes = 0;
                None
            }
            (_, Event::PeerReady) => {
                self.peer_ready = true;
                self.try_recover(now)
            }
            (LinkState::Primary, Event::ProbeFailed) => {
                self.bad_probes += 1;
                (self.bad_probes >= self.cfg.fail_after)
                    .then_some((LinkState::Fallback, Reason::ProbeFailed))
            }
            (LinkState::Recovering { .. }, Event::ProbeFailed) => {
                self.good_probes = 0;
                Some((LinkState::Fallback, Reason::ProbeFailed))
            }
            (LinkState::Fallback, Event::ProbeFailed) => {
                self.good_probes = 0;
                None
            }
            (_, Event::ProbeOk) => {
                self.bad_probes = 0;
                self.good_probes = self.good_probes.saturating_add(1);
                self.try_recover(now)
            }
            (LinkState::Recovering { since }, Event::Tick) => {
                (now.saturating_duration_since(since) >= self.cfg.ramp)
                    .then_some((LinkState::Primary, Reason::RampDone))
            }
            (_, Event::Tick) => None,
        };
        let (to, reason) = next?;
        if to == from {
            return None;
        }
        if to == LinkState::Fallback {
            self.bad_probes = 0;
        }
        self.state = to;
        Some(Transition { from, to, reason })
    }

    fn fallback(&mut self, reason: Reason) -> Option<(LinkState, Reason)> {
        (self.state != LinkState::Fallback).then_some((LinkState::Fallback, reason))
    }

    fn try_recover(&mut self, now: Instant) -> Option<(LinkState, Reason)> {
        let ready = self.peer_ready && !self.disabled && self.good_probes >= self.cfg.recover_after;
        match self.state {
            LinkState::Fallback if ready => {
                Some((LinkState::Recovering { since: now }, Reason::Recovered))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
