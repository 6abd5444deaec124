//! The link state machine, transition by transition, from tables.

use super::*;

fn cfg() -> LinkConfig {
    LinkConfig {
        fail_after: 2,
        recover_after: 3,
        ramp_start: 0.1,
        ramp: Duration::from_secs(2),
    }
}

/// A fixed origin for readable tables (`Instant` has no constructor).
fn t0() -> Instant {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn at(ms: u64) -> Instant {
    t0() + Duration::from_millis(ms)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum S {
    Pri,
    Fb,
    Rec,
}

fn kind(s: LinkState) -> S {
    match s {
        LinkState::Primary => S::Pri,
        LinkState::Fallback => S::Fb,
        LinkState::Recovering { .. } => S::Rec,
    }
}

/// Runs `(time_ms, event, expected state after, expected transition reason)` rows.
fn run(mut link: Link, rows: &[(u64, Event, S, Option<Reason>)]) {
    for (i, (ms, ev, want, reason)) in rows.iter().enumerate() {
        let t = link.on(*ev, at(*ms));
        assert_eq!(kind(link.state()), *want, "row {i}: {ev:?} at {ms} ms");
        assert_eq!(t.map(|t| t.reason), *reason, "row {i}: {ev:?} transition");
    }
}

#[test]
fn any_fault_leaves_the_primary_path_at_once() {
    for reason in [
        Reason::DrainAnnounced,
        Reason::ConnectFailed,
        Reason::ControlDropped,
        Reason::HostStatus,
        Reason::MeshErrors,
    ] {
        run(
            Link::new(cfg()),
            &[
                (0, Event::Fault(reason), S::Fb, Some(reason)),
                (1, Event::Fault(reason), S::Fb, None),
            ],
        );
    }
}

#[test]
fn probes_fail_after_the_threshold_and_reset_on_success() {
    run(
        Link::new(cfg()),
        &[
            (0, Event::ProbeFailed, S::Pri, None),
            (1, Event::ProbeOk, S::Pri, None),
            (2, Event::ProbeFailed, S::Pri, None),
            (3, Event::ProbeFailed, S::Fb, Some(Reason::ProbeFailed)),
        ],
    );
}

#[test]
fn recovery_needs_readiness_and_consecutive_good_probes_then_ramps() {
    let mut link = Link::new(cfg());
    run(
        link.clone(),
        &[
            (
                0,
                Event::Fault(Reason::ConnectFailed),
                S::Fb,
                Some(Reason::ConnectFailed),
            ),
            (10, Event::PeerNotReady, S::Fb, None),
            (20, Event::ProbeOk, S::Fb, None),
            (30, Event::ProbeOk, S::Fb, None),
            (40, Event::ProbeOk, S::Fb, None), // probes fine, peer not ready yet
            (50, Event::PeerReady, S::Rec, Some(Reason::Recovered)),
            (1000, Event::Tick, S::Rec, None),
            (2050, Event::Tick, S::Pri, Some(Reason::RampDone)),
        ],
    );
    // The ramp share grows from 10% to 100%.
    link.on(Event::Fault(Reason::ConnectFailed), at(0));
    assert_eq!(link.primary_share(at(0)), 0.0);
    for ms in [1, 2, 3] {
        link.on(Event::ProbeOk, at(ms));
    }
    assert!(matches!(link.state(), LinkState::Recovering { .. }));
    assert!((link.primary_share(at(3)) - 0.1).abs() < 1e-9);
    assert!((link.primary_share(at(1003)) - 0.55).abs() < 1e-9);
    assert_eq!(link.primary_share(at(5000)), 1.0);
}

#[test]
fn a_failed_probe_or_fault_during_the_ramp_falls_back() {
    let rows_probe = [
        (
            0,
            Event::Fault(Reason::DrainAnnounced),
            S::Fb,
            Some(Reason::DrainAnnounced),
        ),
        (1, Event::ProbeOk, S::Fb, None),
        (2, Event::ProbeOk, S::Fb, None),
        (3, Event::ProbeOk, S::Rec, Some(Reason::Recovered)),
        (4, Event::ProbeFailed, S::Fb, Some(Reason::ProbeFailed)),
        (5, Event::ProbeOk, S::Fb, None), // the count starts again
        (6, Event::ProbeOk, S::Fb, None),
        (7, Event::ProbeOk, S::Rec, Some(Reason::Recovered)),
        (
            8,
            Event::Fault(Reason::MeshErrors),
            S::Fb,
            Some(Reason::MeshErrors),
        ),
    ];
    run(Link::new(cfg()), &rows_probe);
}

#[test]
fn mesh_off_holds_the_fallback_until_mesh_on() {
    run(
        Link::new(cfg()),
        &[
            (0, Event::MeshOff, S::Fb, Some(Reason::MeshOff)),
            (1, Event::ProbeOk, S::Fb, None),
            (2, Event::ProbeOk, S::Fb, None),
            (3, Event::ProbeOk, S::Fb, None),
            (4, Event::MeshOn, S::Rec, Some(Reason::Recovered)),
        ],
    );
}

#[test]
fn a_link_that_starts_on_the_fallback_waits_for_the_peer() {
    run(
        Link::new_fallback(cfg()),
        &[
            (0, Event::ProbeOk, S::Fb, None),
            (1, Event::ProbeOk, S::Fb, None),
            (2, Event::ProbeOk, S::Fb, None),
            (3, Event::PeerReady, S::Rec, Some(Reason::Recovered)),
        ],
    );
}
