//! The balancer's picks: least loaded of two, round-robin, ejection, limits, zones, peak-EWMA.

use super::*;
use detour_proto::{HostId, ServiceName};

fn eps(n: usize) -> Vec<Endpoint> {
    (0..n)
        .map(|i| {
            Endpoint::new(
                ServiceName::new("s").unwrap(),
                InstanceId::new(format!("i{i}")).unwrap(),
                HostId::new(format!("h{i}")).unwrap(),
                format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_in_flight_limit_passes_over_busy_endpoints() {
    let b = Balancer::new(Balance::P2c);
    let e = eps(2);
    let held: Vec<InFlight> = (0..4)
        .map(|_| b.pick_limited(&e, &[], 2, 0).unwrap().1)
        .collect();
    assert_eq!(b.load_of(&e[0].instance).in_flight(), 2);
    assert_eq!(b.load_of(&e[1].instance).in_flight(), 2);
    assert_eq!(b.pick_limited(&e, &[], 2, 0).err(), Some(NoPick::AllBusy));
    assert_eq!(
        b.pick_limited(&e, &[e[0].instance.clone(), e[1].instance.clone()], 2, 0)
            .err(),
        Some(NoPick::None)
    );
    drop(held);
    assert!(
        b.pick_limited(&e, &[], 2, 0).is_ok(),
        "a finished request frees its slot"
    );
}

#[test]
fn below_the_panic_threshold_every_endpoint_is_used() {
    let b = Balancer::new(Balance::RoundRobin);
    let e = eps(4);
    for ep in &e[..3] {
        b.eject(&ep.instance, Duration::from_secs(60));
    }
    // One of four left (25%): with a threshold of 50%, all four take turns.
    let mut seen: Vec<String> = (0..8)
        .map(|_| {
            b.pick_limited(&e, &[], 0, 50)
                .unwrap()
                .0
                .instance
                .to_string()
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "{seen:?}");
    // With a threshold of 25% (or 0), the one left takes everything.
    for t in [25, 0] {
        for _ in 0..4 {
            let (ep, _) = b.pick_limited(&e, &[], 0, t).unwrap();
            assert_eq!(ep.instance.as_str(), "i3");
        }
    }
}

#[test]
fn endpoints_marked_unhealthy_are_passed_over_within_the_panic_threshold() {
    let b = Balancer::new(Balance::RoundRobin);
    let mut e = eps(4);
    e[0].healthy = false;
    for _ in 0..12 {
        let (ep, _) = b.pick_limited(&e, &[], 0, 50).unwrap();
        assert_ne!(
            ep.instance.as_str(),
            "i0",
            "an unhealthy endpoint is not drawn"
        );
    }
    // Three of four unhealthy (25% left, below 50%): every endpoint is used again.
    e[1].healthy = false;
    e[2].healthy = false;
    let mut seen: Vec<String> = (0..8)
        .map(|_| {
            b.pick_limited(&e, &[], 0, 50)
                .unwrap()
                .0
                .instance
                .to_string()
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Every one unhealthy: still an answer (none is better than an error).
    e[3].healthy = false;
    assert!(b.pick_limited(&e, &[], 0, 50).is_ok());
}

#[test]
fn round_robin_takes_turns() {
    let b = Balancer::new(Balance::RoundRobin);
    let e = eps(3);
    let picks: Vec<String> = (0..6)
        .map(|_| b.pick(&e, &[]).unwrap().0.instance.to_string())
        .collect();
    assert_eq!(picks, ["i0", "i1", "i2", "i0", "i1", "i2"]);
}

#[test]
fn p2c_avoids_the_loaded_endpoint() {
    let b = Balancer::new(Balance::P2c);
    let e = eps(2);
    // Hold 10 requests on i0.
    let held: Vec<InFlight> = (0..10)
        .map(|_| InFlight {
            load: {
                let l = b.load_of(&e[0].instance);
                l.in_flight.fetch_add(1, Ordering::Relaxed);
                l
            },
            started: None,
        })
        .collect();
    for _ in 0..20 {
        let (ep, _g) = b.pick(&e, &[]).unwrap();
        assert_eq!(ep.instance.as_str(), "i1");
    }
    drop(held);
    assert_eq!(b.load_of(&e[0].instance).in_flight(), 0);
}

#[test]
fn an_endpoint_answering_server_errors_in_a_row_is_ejected_within_the_share() {
    let e = eps(4);
    let b = Balancer::new(Balance::RoundRobin);
    let answer = |id: usize, err: bool| {
        let (ep, f) = b.pick(&e[id..=id], &[]).unwrap();
        assert_eq!(ep.instance, e[id].instance);
        b.record_answer(&f, err, e.len(), Outlier::default())
    };
    // Four errors, a success, four errors: no ejection (not in a row).
    for _ in 0..4 {
        assert!(!answer(0, true));
    }
    assert!(!answer(0, false));
    for _ in 0..4 {
        assert!(!answer(0, true));
    }
    assert!(answer(0, true), "the fifth in a row ejects");
    for _ in 0..50 {
        let (ep, _f) = b.pick(&e, &[]).unwrap();
        assert_ne!(ep.instance, e[0].instance);
    }
    // A second outlier: 2 of 4 is within 50%; a third is not ejected.
    for _ in 0..5 {
        answer(1, true);
    }
    let third: Vec<bool> = (0..5).map(|_| answer(2, true)).collect();
    assert!(!third.contains(&true), "more than half would be ejected");
}

#[test]
fn ejected_endpoints_are_passed_over_unless_all_are() {
    let b = Balancer::new(Balance::RoundRobin);
    let e = eps(2);
    b.eject(&e[0].instance, Duration::from_secs(60));
    for _ in 0..4 {
        assert_eq!(b.pick(&e, &[]).unwrap().0.instance.as_str(), "i1");
    }
    b.eject(&e[1].instance, Duration::from_secs(60));
    assert!(
        b.pick(&e, &[]).is_some(),
        "panic mode: all ejected means all eligible"
    );
    assert_eq!(
        b.pick(&e, &[e[1].instance.clone()])
            .unwrap()
            .0
            .instance
            .as_str(),
        "i0"
    );
    assert!(
        b.pick(&e, &[e[0].instance.clone(), e[1].instance.clone()])
            .is_none()
    );
}

#[test]
fn loads_of_removed_endpoints_are_forgotten_once_per_set() {
    let b = Balancer::new(Balance::RoundRobin);
    let all = Arc::new(EndpointSet::known(eps(3)));
    b.retain(&all);
    for _ in 0..3 {
        b.pick(&all.endpoints, &[]).unwrap();
    }
    assert_eq!(b.loads.lock().len(), 3);
    let two = Arc::new(EndpointSet::known(eps(2)));
    b.retain(&two);
    assert_eq!(b.loads.lock().len(), 2);
    // The same set again costs nothing and changes nothing.
    b.load_of(&all.endpoints[2].instance);
    b.retain(&two);
    assert_eq!(b.loads.lock().len(), 3);
}

#[test]
fn a_caller_stays_in_its_zone_while_enough_of_it_is_usable() {
    let b = Balancer::new(Balance::P2c);
    let mut e = eps(4);
    for (i, ep) in e.iter_mut().enumerate() {
        ep.zone = if i < 2 { "a" } else { "b" }.into();
    }
    let zone = ZonePreference {
        zone: "a".into(),
        min_healthy_percent: 50,
    };
    let how = Pick {
        zone: Some(&zone),
        ..Pick::default()
    };
    let zone_of = |b: &Balancer, e: &[Endpoint], tried: &[InstanceId]| {
        b.pick_with(e, tried, &how).unwrap().0.zone.clone()
    };
    for _ in 0..20 {
        assert_eq!(zone_of(&b, &e, &[]), "a");
    }
    // Half of zone a ejected: still at the minimum, still a.
    b.eject(&e[0].instance, Duration::from_secs(60));
    for _ in 0..20 {
        assert_eq!(zone_of(&b, &e, &[]), "a");
    }
    // Both tried or ejected: spill over to b.
    assert_eq!(zone_of(&b, &e, &[e[1].instance.clone()]), "b");
    e[1].healthy = false;
    assert_eq!(zone_of(&b, &e, &[]), "b");
    // Below the minimum share (one of three usable, 50% wanted): spill over.
    let mut three = eps(5);
    for (i, ep) in three.iter_mut().enumerate() {
        ep.zone = if i < 3 { "a" } else { "b" }.into();
    }
    three[0].healthy = false;
    three[1].healthy = false;
    let spilled = (0..40).filter(|_| zone_of(&b, &three, &[]) == "b").count();
    assert!(spilled > 0, "traffic spills to zone b");
}

#[tokio::test(start_paused = true)]
async fn the_latency_aware_balancer_prefers_the_faster_endpoint() {
    let b = Balancer::new(Balance::PeakEwma);
    let e = eps(2);
    let outlier = Outlier::default();
    // One answer each: i0 in 50 ms, i1 in 5 ms.
    for (i, ms) in [(0, 50), (1, 5)] {
        let (ep, flight) = b.pick(&e[i..=i], &[]).unwrap();
        assert_eq!(ep.instance, e[i].instance);
        tokio::time::advance(Duration::from_millis(ms)).await;
        b.record_answer(&flight, false, 2, outlier);
    }
    let to_i1 = (0..100)
        .filter(|_| b.pick(&e, &[]).unwrap().0.instance.as_str() == "i1")
        .count();
    // Both candidates of every draw are the two endpoints: the faster wins each.
    assert_eq!(to_i1, 100);
}

#[tokio::test(start_paused = true)]
async fn an_endpoint_that_fails_at_once_does_not_draw_the_latency_aware_picks() {
    let b = Balancer::new(Balance::PeakEwma);
    let e = eps(2);
    let outlier = Outlier::default();
    // i1 answers in 5 ms; every attempt on i0 ends at once without an answer (a reset).
    let (_, flight) = b.pick(&e[1..=1], &[]).unwrap();
    tokio::time::advance(Duration::from_millis(5)).await;
    b.record_answer(&flight, false, 2, outlier);
    let (_, flight) = b.pick(&e[0..=0], &[]).unwrap();
    b.record_failure(&flight);
    drop(flight);
    let to_i0 = (0..100)
        .filter(|_| b.pick(&e, &[]).unwrap().0.instance.as_str() == "i0")
        .count();
    assert_eq!(to_i0, 0, "a failed attempt counts as slow as {FAILED:?}");
    // The penalty fades within seconds while i1 keeps answering in 5 ms (every 100 ms): i0 is
    // tried again, as a provider that restarted would be.
    let mut again = None;
    for tick in 1..=100 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let (ep, flight) = b.pick(&e, &[]).unwrap();
        if ep.instance.as_str() == "i0" {
            again = Some(Duration::from_millis(100 * tick));
            break;
        }
        tokio::time::advance(Duration::from_millis(5)).await;
        b.record_answer(&flight, false, 2, outlier);
    }
    let again = again.expect("i0 is tried again within 10 s");
    assert!(
        again >= Duration::from_secs(2),
        "tried again after {again:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn endpoints_alike_share_the_latency_aware_picks_one_request_at_a_time() {
    let b = Balancer::new(Balance::PeakEwma);
    let e = eps(2);
    let outlier = Outlier::default();
    // One request at a time, every 10 ms; i0 answers in 300 µs, i1 in 400 µs. Without a band
    // of alike estimates the whole load would move from one to the other every second or two
    // (the one not drawn decays toward 0 until it is the cheaper).
    fastrand::seed(7);
    for window in 0..20 {
        let mut to_i0 = 0;
        for _ in 0..100 {
            let (ep, flight) = b.pick(&e, &[]).unwrap();
            let i0 = ep.instance.as_str() == "i0";
            to_i0 += usize::from(i0);
            tokio::time::advance(Duration::from_micros(if i0 { 300 } else { 400 })).await;
            b.record_answer(&flight, false, 2, outlier);
            drop(flight);
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        assert!(
            (35..=65).contains(&to_i0),
            "window {window}: {to_i0} of 100 to i0"
        );
    }
}

/// One request on `e[i]` alone, answered in `us` µs.
async fn answer(b: &Balancer, e: &[Endpoint], i: usize, us: u64) {
    let (_, flight) = b.pick(&e[i..=i], &[]).unwrap();
    tokio::time::advance(Duration::from_micros(us)).await;
    b.record_answer(&flight, false, e.len(), Outlier::default());
}

#[tokio::test(start_paused = true)]
async fn one_slow_answer_keeps_an_endpoint_out_for_about_two_seconds() {
    let b = Balancer::new(Balance::PeakEwma);
    let e = eps(2);
    answer(&b, &e, 1, 300).await;
    answer(&b, &e, 0, 4_000).await; // a spike
    // One request every 10 ms, answered in 300 µs: i0 is drawn again once its peak has
    // decayed to within twice i1's estimate plus 1 ms (≈ 1.8 s with a 2 s time constant).
    let mut again = None;
    for tick in 1..=1000 {
        tokio::time::advance(Duration::from_millis(10)).await;
        if b.pick(&e, &[]).unwrap().0.instance.as_str() == "i0" {
            again = Some(Duration::from_millis(10 * tick));
            break;
        }
        answer(&b, &e, 1, 300).await;
    }
    let again = again.expect("i0 is drawn again within 10 s");
    assert!(
        (Duration::from_secs(1)..=Duration::from_secs(3)).contains(&again),
        "drawn again after {again:?}"
    );
}

const FAILED: Duration = ewma::FAILED_ATTEMPT;
