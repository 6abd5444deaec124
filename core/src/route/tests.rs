//! Table tests of the routing decision: matches, splits, fallbacks, pinning and its stability.

use std::collections::BTreeMap;

use detour_proto::{Endpoint, HostId, InstanceId, ServiceName};
use http::{HeaderMap, HeaderValue, Method};

use super::*;

fn ep(instance: &str, version: &str, zone: &str) -> Endpoint {
    let mut e = Endpoint::new(
        ServiceName::new("hello").unwrap(),
        InstanceId::new(instance).unwrap(),
        HostId::new("h").unwrap(),
        "127.0.0.1:1".parse().unwrap(),
    );
    e.version = version.into();
    e.zone = zone.into();
    e
}

fn routes(json: &str) -> ServiceRoutes {
    ServiceRoutes::parse(json).unwrap()
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

const CANARY: &str = r#"{
    "subsets": {"v1": {"version": "1"}, "v2": {"version": "2"}, "eu": {"zone": "eu", "tier": "gold"}},
    "rules": [
        {"match": {"headers": {"x-canary": "1"}}, "to": "v2"},
        {"match": {"method": "post", "path_prefix": "/orders"}, "to": "v1"},
        {"match": {"path_exact": "/gold", "cookies": {"plan": "gold"}}, "to": "eu"}
    ],
    "default": {"v1": 95, "v2": 5}
}"#;

/// A request (method, path, headers), the rule that decides it and the subset it goes to.
type Case = (
    Method,
    &'static str,
    &'static [(&'static str, &'static str)],
    Decided,
    Option<&'static str>,
);

#[test]
fn rules_match_in_order_and_the_default_takes_the_rest() {
    let r = routes(CANARY);
    let all_up = |_: usize| true;
    let cases: &[Case] = &[
        (
            Method::GET,
            "/x",
            &[("x-canary", "1")],
            Decided::Rule(0),
            Some("v2"),
        ),
        (
            Method::POST,
            "/x",
            &[("x-canary", "1")],
            Decided::Rule(0),
            Some("v2"),
        ),
        (Method::POST, "/orders/7", &[], Decided::Rule(1), Some("v1")),
        (
            Method::GET,
            "/orders/7",
            &[("x-canary", "0")],
            Decided::Default,
            None,
        ),
        (
            Method::GET,
            "/gold",
            &[("cookie", "a=b; plan=gold")],
            Decided::Rule(2),
            Some("eu"),
        ),
        (
            Method::GET,
            "/gold/x",
            &[("cookie", "plan=gold")],
            Decided::Default,
            None,
        ),
        (
            Method::GET,
            "/gold",
            &[("cookie", "plan=silver")],
            Decided::Default,
            None,
        ),
    ];
    for (method, path, hs, decided, subset) in cases {
        let h = headers(hs);
        let req = RequestView {
            method,
            path,
            headers: &h,
        };
        let s = r.select(&req, 0, all_up);
        assert_eq!(s.decided, *decided, "{method} {path} {hs:?}");
        if let Some(name) = subset {
            assert_eq!(r.subset_name(s.subset), *name, "{method} {path} {hs:?}");
        }
        assert!(!s.fell_back);
    }
}

#[test]
fn a_split_lands_within_two_points_of_its_weights() {
    let r = routes(CANARY);
    let h = HeaderMap::new();
    let req = RequestView {
        method: &Method::GET,
        path: "/",
        headers: &h,
    };
    let n = 20_000;
    let mut rng = fastrand::Rng::with_seed(7);
    let v2 = (0..n)
        .filter(|_| r.subset_name(r.select(&req, rng.u64(..), |_| true).subset) == "v2")
        .count();
    let share = v2 as f64 * 100.0 / f64::from(n);
    assert!((3.0..=7.0).contains(&share), "v2 share {share}%");
}

#[test]
fn an_unusable_subset_falls_back_to_the_default_and_then_to_every_endpoint() {
    let r = routes(CANARY);
    let h = headers(&[("x-canary", "1")]);
    let req = RequestView {
        method: &Method::GET,
        path: "/",
        headers: &h,
    };
    let v2 = r.subsets.iter().position(|s| s.name == "v2").unwrap();
    // v2 down: the default split (roll 0 lands on v1).
    let s = r.select(&req, 0, |i| i != v2);
    assert!(s.fell_back);
    assert_eq!(r.subset_name(s.subset), "v1");
    // Nothing usable: every endpoint.
    let s = r.select(&req, 0, |_| false);
    assert!(s.fell_back);
    assert_eq!(s.subset, None);
    // Over real endpoints: no healthy v2 endpoint.
    let mut down = ep("b", "2", "");
    down.healthy = false;
    let eps = vec![ep("a", "1", ""), down];
    let s = r.select_among(&req, 0, &eps);
    assert_eq!((r.subset_name(s.subset), s.fell_back), ("v1", true));
}

#[test]
fn subsets_select_by_version_zone_and_labels() {
    let r = routes(CANARY);
    let mut gold = ep("g", "", "eu");
    gold.labels = BTreeMap::from([("tier".into(), "gold".into())]);
    let mut labelled = ep("l", "", "");
    labelled.labels = BTreeMap::from([("version".into(), "2".into())]);
    let eu = &r.subsets[0];
    assert_eq!(eu.name, "eu");
    assert!(eu.contains(&gold));
    assert!(!eu.contains(&ep("x", "", "eu")));
    let v2 = &r.subsets[2];
    assert!(v2.contains(&labelled) && v2.contains(&ep("y", "2", "")));
    assert!(!v2.contains(&ep("z", "1", "")));
}

#[test]
fn no_rules_and_no_default_means_every_endpoint() {
    let r = routes(r#"{"subsets": {"v2": {"version": "2"}}}"#);
    let h = HeaderMap::new();
    let req = RequestView {
        method: &Method::GET,
        path: "/",
        headers: &h,
    };
    let s = r.select(&req, 99, |_| true);
    assert_eq!(
        (s.subset, s.decided, s.fell_back),
        (None, Decided::Default, false)
    );
}

#[test]
fn a_pinned_caller_keeps_its_subset_and_endpoint() {
    let r = routes(
        r#"{"subsets": {"v1": {"version": "1"}, "v2": {"version": "2"}},
            "default": {"v1": 50, "v2": 50}, "hash": {"cookie": "user"}}"#,
    );
    for user in ["alice", "bob", "carol", "dave"] {
        let h = headers(&[("cookie", &format!("user={user}"))]);
        let req = RequestView {
            method: &Method::GET,
            path: "/",
            headers: &h,
        };
        let first = r.select(&req, 1, |_| true);
        assert!(first.key.is_some());
        for roll in 2..50 {
            assert_eq!(
                r.select(&req, roll, |_| true).subset,
                first.subset,
                "{user}"
            );
        }
    }
    let h = HeaderMap::new();
    let req = RequestView {
        method: &Method::GET,
        path: "/",
        headers: &h,
    };
    assert_eq!(r.select(&req, 1, |_| true).key, None);
}

#[test]
fn when_one_of_n_endpoints_leaves_only_its_keys_move() {
    let n = 10;
    let eps: Vec<Endpoint> = (0..n).map(|i| ep(&format!("i{i}"), "1", "")).collect();
    let all: Vec<&Endpoint> = eps.iter().collect();
    let fewer: Vec<&Endpoint> = eps.iter().filter(|e| e.instance.as_str() != "i3").collect();
    let keys = 10_000;
    let mut moved = 0;
    let mut held_by_i3 = 0;
    for k in 0..keys {
        let key = key_hash(format!("user-{k}").as_bytes());
        let before = all[rendezvous_order(key, &all)[0]];
        let after = fewer[rendezvous_order(key, &fewer)[0]];
        if before.instance.as_str() == "i3" {
            held_by_i3 += 1;
        }
        if before.instance != after.instance {
            moved += 1;
            assert_eq!(before.instance.as_str(), "i3", "a key not on i3 moved");
        }
    }
    assert_eq!(moved, held_by_i3);
    // About 1/N of the keys, and never more than 1/N by much.
    assert!(moved * n <= keys * 12 / 10, "{moved} of {keys} moved");
    // The same key gives the same order every time (no per-process seed).
    assert_eq!(key_hash(b"user-1"), key_hash(b"user-1"));
    assert_eq!(rendezvous_order(5, &all), rendezvous_order(5, &all));
    assert_eq!(
        rendezvous_best(5, &all, |e| e.instance.as_str() != "i0"),
        rendezvous_order(5, &all)
            .into_iter()
            .find(|i| all[*i].instance.as_str() != "i0")
    );
}

#[test]
fn weights_bias_the_rendezvous() {
    let mut heavy = ep("heavy", "1", "");
    heavy.weight = 3;
    let light = ep("light", "1", "");
    let both = [&heavy, &light];
    let on_heavy = (0..10_000u64)
        .filter(|k| rendezvous_order(key_hash(&k.to_le_bytes()), &both)[0] == 0)
        .count();
    assert!((7_000..=8_000).contains(&on_heavy), "{on_heavy}");
}

#[test]
fn malformed_entries_are_refused_with_the_reason() {
    let bad = [
        (r#"{"rules": [{"to": "nope"}]}"#, "no subset named"),
        (r#"{"subsets": {"v": {}}}"#, "selects nothing"),
        (r#"{"subsets": {"all": {"version": "1"}}}"#, "not \"all\""),
        (
            r#"{"subsets": {"v": {"version": "1"}}, "default": {"v": 0}}"#,
            "above 0",
        ),
        (
            r#"{"subsets": {"v": {"version": "1"}}, "rules": [{"match": {"path_prefix": "x"}, "to": "v"}]}"#,
            "start with /",
        ),
        (
            r#"{"subsets": {"v": {"version": "1"}}, "rules": [{"match": {"headers": {"bad header": "1"}}, "to": "v"}]}"#,
            "not a header name",
        ),
        (r#"{"hash": {"header": "a", "cookie": "b"}}"#, "exactly one"),
        (r#"{"weights": 1}"#, "unknown field"),
    ];
    for (json, why) in bad {
        let e = ServiceRoutes::parse(json).unwrap_err();
        assert!(e.contains(why), "{json}: {e}");
    }
}

#[test]
fn documents_keep_good_entries_and_refuse_bad_versions() {
    let doc = RouteDoc::parse(
        br#"{"version": 1, "services": {
            "hello": {"subsets": {"v2": {"version": "2"}}, "default": "v2"},
            "broken": {"default": "missing"},
            "no spaces": {}
        }}"#,
    )
    .unwrap();
    assert_eq!(doc.services.len(), 1);
    assert_eq!(doc.malformed.len(), 2, "{:?}", doc.malformed);
    let again = RouteDoc::parse(&doc.to_bytes()).unwrap();
    assert_eq!(again.services, doc.services);
    assert!(matches!(
        RouteDoc::parse(br#"{"version": 2}"#),
        Err(RouteDocError::Version { found: 2, .. })
    ));
    assert!(RouteDoc::parse(b"\xff").is_err());
}

#[test]
fn a_zone_is_kept_while_its_minimum_share_is_usable() {
    let z = ZonePreference {
        zone: "a".into(),
        min_healthy_percent: 50,
    };
    // (local, usable, total) → stays
    let cases = [
        ((2, 2, 4), true),
        ((2, 1, 4), true),
        ((3, 1, 5), false),
        ((2, 0, 4), false),
        ((0, 0, 4), false),
        ((4, 4, 4), false),
    ];
    for ((local, usable, total), stays) in cases {
        assert_eq!(
            z.stays(local, usable, total),
            stays,
            "{local} {usable} {total}"
        );
    }
}
