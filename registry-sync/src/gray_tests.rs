//! Gray rules from tables: precedence, selectors, the stable percentage, parsing.

use super::*;

fn h(s: &str) -> HostId {
    HostId::new(s).unwrap()
}

fn s(x: &str) -> ServiceName {
    ServiceName::new(x).unwrap()
}

fn mesh(id: &str, on: bool, service: Option<&str>, hosts: Option<&str>, pct: Option<u8>) -> Rule {
    Rule {
        id: id.into(),
        mesh: Some(if on { Mesh::On } else { Mesh::Off }),
        sidecar: None,
        service: service.map(Into::into),
        hosts: hosts.map(Into::into),
        percent: pct,
        origin: Origin::Gray,
    }
}

fn set(rules: Vec<Rule>) -> RuleSet {
    RuleSet {
        version: FORMAT,
        rules,
    }
}

#[test]
fn the_most_specific_mesh_rule_wins() {
    let rules = set(vec![
        mesh("all-off", false, None, None, None),
        mesh("orders-on", true, Some("orders"), None, None),
        mesh(
            "orders-web1-off",
            false,
            Some("orders"),
            Some("web-1"),
            None,
        ),
        mesh("pay-glob-on", true, Some("pay*"), None, None),
        mesh("web-glob-on", true, None, Some("web-*"), None),
        mesh(
            "payments-db-off",
            false,
            Some("payments"),
            Some("db-?"),
            None,
        ),
    ]);
    #[rustfmt::skip]
    let rows = [
        // host, service, expected, deciding rule
        ("web-1", "orders", Mesh::Off, "orders-web1-off"), // exact service + exact host (8)
        ("web-2", "orders", Mesh::On, "orders-on"),        // exact service (4) over host glob (2)
        ("db-1", "orders", Mesh::On, "orders-on"),
        ("web-2", "search", Mesh::On, "web-glob-on"),      // host glob (2) over nothing (0)
        ("db-1", "search", Mesh::Off, "all-off"),
        ("web-2", "payments", Mesh::On, "web-glob-on"),    // service glob 2 = host glob 2, both on
        ("db-1", "payments", Mesh::Off, "payments-db-off"),// exact service + host glob (6)
        ("db-12", "payments", Mesh::On, "pay-glob-on"),    // db-? matches one character only
    ];
    for (host, service, want, by) in rows {
        let (got, rule) = rules.mesh(&h(host), &s(service));
        assert_eq!(
            (got, rule.map(|r| r.id.as_str())),
            (want, Some(by)),
            "{host} → {service}"
        );
    }
}

#[test]
fn equally_specific_rules_switch_off_and_rollback_rules_win() {
    let mut rules = set(vec![
        mesh("svc-on", true, Some("orders"), None, None),
        mesh("host-off", false, None, Some("web-1"), None),
    ]);
    let (m, r) = rules.mesh(&h("web-1"), &s("orders"));
    assert_eq!(
        (m, r.unwrap().id.as_str()),
        (Mesh::Off, "host-off"),
        "a tie switches off"
    );
    // A rollback of the whole mesh wins over the most specific gray rule.
    rules.rules.push(mesh(
        "gray-exact-on",
        true,
        Some("orders"),
        Some("web-2"),
        None,
    ));
    let mut rb = mesh("rollback-all", false, None, None, None);
    rb.origin = Origin::Rollback;
    rules.rules.push(rb);
    let (m, r) = rules.mesh(&h("web-2"), &s("orders"));
    assert_eq!((m, r.unwrap().id.as_str()), (Mesh::Off, "rollback-all"));
    // No rule at all: on.
    assert_eq!(set(vec![]).mesh(&h("x"), &s("y")), (Mesh::On, None));
}

#[test]
fn a_percentage_keeps_its_hosts_as_it_grows() {
    let hosts: Vec<HostId> = (0..10).map(|i| h(&format!("host-{i}"))).collect();
    let members =
        |pct: u8| -> Vec<&HostId> { hosts.iter().filter(|x| in_sample(x, pct)).collect() };
    let mut last: Vec<&HostId> = Vec::new();
    for pct in [0u8, 10, 30, 50, 70, 100] {
        let now = members(pct);
        for x in &last {
            assert!(
                now.contains(x),
                "{x} left the sample when it grew to {pct}%"
            );
        }
        // The same answer every time it is asked.
        assert_eq!(members(pct), now);
        last = now;
    }
    assert_eq!(members(0).len(), 0);
    assert_eq!(members(100).len(), 10);
    // The hash is fixed (FNV-1a): these buckets are part of the contract.
    assert_eq!(host_bucket(&h("host-0")), host_bucket(&h("host-0")));
    let rules = set(vec![
        mesh("pct", true, None, None, Some(30)),
        mesh("base", false, None, None, None),
    ]);
    for x in &hosts {
        let want = if in_sample(x, 30) {
            Mesh::On
        } else {
            Mesh::Off
        };
        assert_eq!(rules.mesh(x, &s("a")).0, want, "{x}");
    }
}

#[test]
fn version_rules_pick_a_binary_per_host() {
    let v = |id: &str, bin: &str, hosts: Option<&str>, pct: Option<u8>| Rule {
        id: id.into(),
        mesh: None,
        sidecar: Some(SidecarVersion {
            binary: bin.into(),
            ..SidecarVersion::default()
        }),
        service: None,
        hosts: hosts.map(Into::into),
        percent: pct,
        origin: Origin::Gray,
    };
    let rules = set(vec![
        v("canary", "/opt/b", Some("web-1"), None),
        v("webs", "/opt/c", Some("web-*"), None),
        v("first", "/opt/d", None, Some(100)),
        v("second", "/opt/e", None, Some(100)),
    ]);
    let bin = |host: &str| {
        rules
            .version(&h(host))
            .and_then(|r| r.sidecar.as_ref())
            .map(|s| s.binary.as_str())
    };
    assert_eq!(bin("web-1"), Some("/opt/b"));
    assert_eq!(bin("web-2"), Some("/opt/c"));
    assert_eq!(bin("db-1"), Some("/opt/d"), "of equals, the first listed");
    assert_eq!(set(vec![]).version(&h("x")), None);
}

#[test]
fn malformed_rules_are_left_out_and_named() {
    let doc = br#"{"version":1,"rules":[
        {"id":"ok","mesh":"off","service":"orders"},
        {"id":"both","mesh":"off","sidecar":{"binary":"/x"}},
        {"id":"neither"},
        {"id":"pct","mesh":"on","percent":140},
        {"id":"sel","mesh":"on","hosts":"a","percent":5},
        {"id":"bad name","mesh":"on"},
        {"id":"rel","sidecar":{"binary":"relative/path"}},
        {"id":"svcver","sidecar":{"binary":"/x"},"service":"orders"},
        {"id":"base","sidecar":{"baseline":true,"binary":"/x"}},
        {"id":"ok","mesh":"on"},
        {"mesh":"sideways"},
        "garbage"
    ]}"#;
    let (set, errors) = RuleSet::parse(doc).unwrap();
    assert_eq!(set.rules.len(), 1);
    assert_eq!(set.rules[0].id, "ok");
    let named: Vec<&str> = errors.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        named,
        [
            "both", "neither", "pct", "sel", "bad name", "rel", "svcver", "base", "ok", "#10",
            "#11"
        ]
    );
    assert!(RuleSet::parse(b"{\"version\":2,\"rules\":[]}").is_err());
    assert!(RuleSet::parse(b"\x00\xff").is_err());
    assert!(set.check().is_ok());
}

#[test]
fn globs() {
    for (p, t, want) in [
        ("web-*", "web-1", true),
        ("web-*", "web-", true),
        ("web-*", "db-1", false),
        ("*", "", true),
        ("a?c", "abc", true),
        ("a?c", "ac", false),
        ("*.eu-*", "orders.eu-west", true),
        ("orders", "orders", true),
        ("orders", "orders2", false),
        ("**x", "abx", true),
    ] {
        assert_eq!(glob(p, t), want, "{p} ~ {t}");
    }
}
