//! Gray rules and the one-command rollback on real processes, under steady SDK load with every
//! request counted: `detourctl rollback` (one service, then everything) moves every caller off
//! the mesh and `--undo` brings them back without losing a request; a percentage rule keeps the
//! same hosts as it grows; malformed rules and an unreachable registry change nothing
//! (`gray_versions.rs`: version rules, and rules through an etcd outage).
//!
//! The tests run one at a time (they share two cores with the processes they measure).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::path::Path;
use std::time::Duration;

use detour_kit::load::Stats;
use detour_kit::provider::DemoProvider;
use detour_proto::{HostId, HostStatus, ServiceName, SidecarState};
use detour_registry::dir::{DirOptions, DirRegistry};
use detour_registry::{Registry, now_unix_ms};
use detour_tests::gray::{ok, path_of, set_h1_off, status};
use detour_tests::scenario::{at, spawn_load};
use detour_tests::{Mesh, Offer, admin_get_json, detourctl, dir_registry, metric, wait_value};
use detour_thin_sdk::{Client, LinkState, PathTaken};
use serde_json::Value;

/// Provider host h2 (`hello` and `world`), caller hosts h1, h3, h4 — each with an SDK whose
/// snapshot of `hello` is ready.
async fn three_callers() -> (Mesh, DemoProvider, Vec<(String, Client)>) {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start(
        "h2",
        "127.0.0.2",
        &[
            Offer::http1("hello", provider.addr()),
            Offer::http1("world", provider.addr()),
        ],
    )
    .await;
    let mut clients = Vec::new();
    for (host, ip) in [
        ("h1", "127.0.0.1"),
        ("h3", "127.0.0.3"),
        ("h4", "127.0.0.4"),
    ] {
        mesh.start(host, ip, &[]).await;
        mesh.wait_endpoints(host, "hello", 1).await;
        mesh.wait_endpoints(host, "world", 1).await;
        let snap = mesh.root().join(format!("{host}-snapshot.json"));
        let client = detour_tests::ready_sdk(&mesh, host, "hello", &snap).await;
        clients.push((host.to_owned(), client));
    }
    (mesh, provider, clients)
}

fn switches(all: &[(String, Stats)], rolled: u64, undone: u64) -> Vec<u64> {
    all.iter()
        .map(|(_, s)| {
            s.last_mesh_answer_between(rolled, undone)
                .map_or(0, |t| t.saturating_sub(rolled))
        })
        .collect()
}

/// Ms from `since` until every client's switch of `hello` is back on the mesh (the ramp done),
/// looking every 10 ms for at most `within`.
async fn until_all_on(clients: &[(String, Client)], since: u64, within: Duration) -> u64 {
    let hello = ServiceName::new("hello").unwrap();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let states: Vec<_> = clients.iter().map(|(_, c)| c.mesh_switch(&hello)).collect();
        if states
            .iter()
            .all(|s| s.is_none_or(|s| s == LinkState::Primary))
        {
            return now_unix_ms().saturating_sub(since);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every caller back on the mesh within {within:?}: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Rollback of `scope` at 3 s, undo at 6.5 s, under 150 requests a second from each of three
/// caller hosts for 12 s; every request counted.
async fn rollback_and_undo(name: &str, scope: &[&str]) {
    let (mesh, _p, clients) = three_callers().await;
    let reg = dir_registry(&mesh);
    // A caller without a control session (it cannot go direct): its sidecar's CA applies the
    // rule (C→CA→P).
    let plain = Client::builder(mesh.outbound("h4"))
        .control(false)
        .app("plain")
        .build();
    assert_eq!(path_of(&plain, "hello").await, PathTaken::Mesh);
    let t0 = tokio::time::Instant::now();
    let loads: Vec<_> = clients
        .iter()
        .map(|(_, c)| spawn_load(c, 150, 12))
        .collect();
    at(t0, 3.0).await;
    let rolled = now_unix_ms();
    let mut args = vec!["rollback", "--reason", "error rate up"];
    args.extend_from_slice(scope);
    let out = ok(&reg, &args).await;
    println!("GRAY {name}: {}", out.trim());
    at(t0, 5.0).await;
    assert_eq!(path_of(&plain, "hello").await, PathTaken::CaDirect);
    let world = path_of(&clients[0].1, "world").await;
    let st = status(&reg).await;
    let row = |s: &str| {
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == s)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("hello")["mesh"], "off", "{st}");
    let h1 = admin_get_json(&mesh.admin("h1"), "/state").await;
    assert_eq!(h1["gray"]["mesh"]["hello"], false, "{}", h1["gray"]);
    for (host, c) in &clients {
        let hello = ServiceName::new("hello").unwrap();
        assert_eq!(c.mesh_switch(&hello), Some(LinkState::Fallback), "{host}");
    }
    if scope.is_empty() {
        assert_ne!(world, PathTaken::Mesh, "everything is off");
        assert_eq!(row("world")["mesh"], "off", "{st}");
    } else {
        assert_eq!(world, PathTaken::Mesh, "only hello is off");
        assert_eq!(row("world")["mesh"], "on", "{st}");
    }
    at(t0, 6.5).await;
    let undone = now_unix_ms();
    let out = ok(&reg, &["rollback", "--undo"]).await;
    println!("GRAY {name}: {}", out.trim());
    let back = until_all_on(&clients, undone, Duration::from_secs(5)).await;
    let mut all = Vec::new();
    for ((host, _), load) in clients.iter().zip(loads) {
        all.push((host.clone(), load.await.unwrap()));
    }
    assert_eq!(path_of(&plain, "hello").await, PathTaken::Mesh);
    let switches = switches(&all, rolled, undone);
    let latest = switches.iter().copied().max().unwrap_or(0);
    let sum = |f: fn(&Stats) -> u64| all.iter().map(|(_, s)| f(s)).sum::<u64>();
    let path = |k: &'static str| {
        all.iter()
            .map(|(_, s)| s.paths.get(k).copied().unwrap_or(0))
            .sum::<u64>()
    };
    println!(
        "RESULT gray-{name}: sent={} ok={} failed={} mesh={} direct={} ca_direct={} rollback_ms={latest} undo_ms={back} switches_ms={switches:?}",
        sum(|s| s.sent),
        sum(|s| s.ok),
        sum(|s| s.failed),
        path("mesh"),
        path("direct"),
        path("ca_direct"),
    );
    for (host, s) in &all {
        assert_eq!(s.sent, 1800, "{host}");
        assert_eq!(s.failed, 0, "{host}: {:?}", s.failures);
        assert!(
            s.paths.get("direct").copied().unwrap_or(0) > 200,
            "{host}: {:?}",
            s.paths
        );
        assert!(
            s.last_mesh_answer_between(undone + back, u64::MAX)
                .is_some(),
            "{host} came back to the mesh"
        );
    }
    assert!(
        latest <= 2000,
        "the latest caller left the mesh {latest} ms after the rollback: {switches:?}"
    );
    // The record: who, why, what it replaced, and the undo.
    let history: Value =
        serde_json::from_str(&ok(&reg, &["rollback", "--history", "--json"]).await).unwrap();
    let records = history.as_array().unwrap();
    assert_eq!(records.len(), 1, "{history}");
    let r = &records[0];
    assert_eq!(r["reason"], "error rate up");
    assert_eq!(r["kind"], "mesh");
    assert!(!r["user"].as_str().unwrap().is_empty());
    assert!(r["at_unix_ms"].as_u64().unwrap() >= rolled);
    assert!(r["undone"]["at_unix_ms"].as_u64().unwrap() >= undone);
    assert_eq!(r["replaced"], Value::Null, "there were no rules before");
    let (code, _, err) = detourctl(&reg, &["rollback", "--undo"]).await;
    assert_eq!(code, 4, "nothing left to undo: {err}");
}

#[tokio::test]
async fn rollback_of_one_service_moves_every_caller_off_the_mesh_and_undo_brings_them_back() {
    let _serial = detour_tests::serial().await;
    rollback_and_undo("service", &["--service", "hello"]).await;
}

#[tokio::test]
async fn rollback_of_everything_and_its_undo_lose_nothing() {
    let _serial = detour_tests::serial().await;
    rollback_and_undo("global", &[]).await;
}

/// Host `name`'s record in the directory registry, kept alive while the registry lives.
async fn host_record(dir: &Path, name: &str) -> DirRegistry {
    let host = HostId::new(name).unwrap();
    let r = DirRegistry::open(dir, host.clone(), DirOptions::default())
        .await
        .unwrap();
    r.set_host_status(HostStatus {
        host,
        sidecar: SidecarState::Ready,
        version: "test".into(),
        updated_unix_ms: now_unix_ms(),
        watchdog: None,
        metrics: None,
    })
    .await
    .unwrap();
    r
}

/// The hosts on the mesh for `hello`, as `detourctl status` computes them.
async fn on_hosts(reg: &str) -> Vec<String> {
    let st = status(reg).await;
    let hosts: Vec<String> = st["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap().to_owned())
        .collect();
    let row = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "hello")
        .cloned()
        .unwrap();
    let off: Vec<&str> = row["off_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(hosts.len(), 10, "{st}");
    hosts
        .into_iter()
        .filter(|h| !off.contains(&h.as_str()))
        .collect()
}

#[tokio::test]
async fn a_percentage_keeps_the_same_hosts_and_only_grows() {
    let _serial = detour_tests::serial().await;
    let (_provider, mesh) = detour_tests::hello_mesh("127.0.0.2", "h2-hello").await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    // Ten hosts: the two sidecars and eight more records.
    let dir = mesh.root().join("registry");
    let mut records = Vec::new();
    for i in 3..=10 {
        records.push(host_record(&dir, &format!("h{i}")).await);
    }
    let reg = dir_registry(&mesh);
    // The runbook's start: the mesh off everywhere, then on for a share of the hosts.
    ok(&reg, &["gray", "set", "--id", "base", "--mesh", "off"]).await;
    let mut before: Vec<String> = Vec::new();
    let mut shares = Vec::new();
    for pct in ["30", "60", "100"] {
        ok(
            &reg,
            &[
                "gray",
                "set",
                "--id",
                "share",
                "--mesh",
                "on",
                "--percent",
                pct,
            ],
        )
        .await;
        let on = on_hosts(&reg).await;
        for _ in 0..3 {
            assert_eq!(
                on_hosts(&reg).await,
                on,
                "the same hosts on every evaluation"
            );
        }
        for h in &before {
            assert!(
                on.contains(h),
                "{h} left the sample as it grew to {pct}%: {on:?}"
            );
        }
        // h1's sidecar decides as the status says (its SDK calls direct when off).
        let h1_on = on.iter().any(|h| h == "h1");
        let state = wait_value(
            "h1's sidecar to follow the rules",
            Duration::from_secs(5),
            || async {
                let _ = path_of(&client, "hello").await;
                admin_get_json(&mesh.admin("h1"), "/state").await
            },
            |s| {
                s["gray"]["rules"]["rules"].as_array().is_some_and(|r| {
                    r.iter().any(|r| {
                        r["percent"].as_u64().map(|p| p.to_string()).as_deref() == Some(pct)
                    })
                }) && s["gray"]["mesh"]["hello"] == h1_on
            },
        )
        .await;
        let path = wait_value(
            "h1's SDK to follow its sidecar",
            Duration::from_secs(5),
            || async { path_of(&client, "hello").await.as_str() },
            |p| (*p == "mesh") == h1_on,
        )
        .await;
        println!(
            "GRAY percent {pct}%: on the mesh {} of 10 hosts {on:?}; h1 {path} ({})",
            on.len(),
            state["gray"]["mesh"]
        );
        shares.push(on.len());
        before = on;
    }
    assert_eq!(shares[2], 10);
    assert!(
        (1..=6).contains(&shares[0]),
        "30% of 10 hosts by hash: {shares:?}"
    );
    drop(records);
}

fn rules_file(mesh: &Mesh) -> Option<Vec<u8>> {
    std::fs::read(mesh.root().join("registry/gray/rules.json")).ok()
}

#[tokio::test]
async fn malformed_rules_and_an_unreachable_registry_change_nothing() {
    let _serial = detour_tests::serial().await;
    let (_provider, mesh) = detour_tests::hello_mesh("127.0.0.2", "h2-hello").await;
    let reg = dir_registry(&mesh);
    let admin = mesh.admin("h1");
    set_h1_off(&reg).await;
    let good = rules_file(&mesh).unwrap();
    let h1_has = |rule: &'static str| {
        move |s: &Value| {
            s["gray"]["rules"]["rules"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r["id"] == rule))
        }
    };
    wait_value(
        "h1 to follow the rule",
        Duration::from_secs(5),
        || admin_get_json(&admin, "/state"),
        h1_has("h1-off"),
    )
    .await;
    // Bad input: exit 2, a clear reason, the document untouched, no rollback recorded.
    for (args, says) in [
        (
            vec![
                "gray",
                "set",
                "--id",
                "x",
                "--mesh",
                "off",
                "--percent",
                "150",
            ],
            "percent must be 0–100",
        ),
        (
            vec![
                "gray",
                "set",
                "--id",
                "x",
                "--mesh",
                "off",
                "--service",
                "nosuch",
            ],
            "unknown service nosuch",
        ),
        (
            vec!["gray", "set", "--id", "x", "--mesh", "off", "--hosts", "h9"],
            "unknown host h9",
        ),
        (
            vec!["gray", "set", "--id", "bad id!", "--mesh", "off"],
            "the id must be",
        ),
        (vec!["rollback", "--host", "h9"], "unknown host h9"),
        (vec!["rollback", "--service", "Not A Name"], "service"),
    ] {
        let (code, out, err) = detourctl(&reg, &args).await;
        assert_eq!(code, 2, "detourctl {args:?}: {out}{err}");
        assert!(err.contains(says), "detourctl {args:?}: {err}");
        assert_eq!(rules_file(&mesh).unwrap(), good, "detourctl {args:?}");
    }
    assert!(!mesh.root().join("registry/rollback").exists());
    // Unreachable registries: exit 3, nothing written anywhere.
    let missing = format!("dir:{}/no-such-registry", mesh.root().display());
    for r in [missing.as_str(), "etcd:http://127.0.0.1:9"] {
        for args in [
            vec!["gray", "list"],
            vec!["gray", "set", "--id", "x", "--mesh", "off"],
            vec!["rollback"],
            vec!["status"],
        ] {
            let (code, out, err) = detourctl(r, &args).await;
            assert_eq!(code, 3, "detourctl {args:?} on {r}: {out}{err}");
            assert!(
                err.contains("unreachable") || err.contains("unavailable"),
                "{err}"
            );
        }
    }
    assert!(!mesh.root().join("no-such-registry").exists());
    // A malformed rule among good ones is left out (and counted); the others apply.
    let invalid = || async {
        metric(&admin, "detour_gray_invalid_rules_total", "")
            .await
            .unwrap_or(0.0)
    };
    let before = invalid().await;
    std::fs::write(
        mesh.root().join("registry/gray/rules.json"),
        br#"{"version":1,"rules":[{"id":"h1-off","mesh":"off","service":"hello","hosts":"h1"},{"id":"odd","mesh":"sideways"},{"id":"more","mesh":"off","service":"w*"}]}"#,
    )
    .unwrap();
    wait_value(
        "h1 to take the good rules",
        Duration::from_secs(5),
        || admin_get_json(&admin, "/state"),
        h1_has("more"),
    )
    .await;
    assert!(invalid().await > before);
    let (code, out, _) = detourctl(&reg, &["gray", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("malformed (left out)") && out.contains("odd"),
        "{out}"
    );
    // A document that is no rule set at all: the sidecar keeps the last good rules.
    let before = invalid().await;
    std::fs::write(mesh.root().join("registry/gray/rules.json"), b"{ garbage").unwrap();
    wait_value(
        "h1 to count the broken document",
        Duration::from_secs(5),
        invalid,
        |n| *n > before,
    )
    .await;
    let st = admin_get_json(&admin, "/state").await;
    assert!(
        h1_has("h1-off")(&st) && h1_has("more")(&st),
        "{}",
        st["gray"]
    );
    let (code, _, err) = detourctl(&reg, &["gray", "list"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("unreadable"), "{err}");
    // An emergency rollback still works on a broken document, and records what it replaced.
    let out = ok(&reg, &["rollback", "--json"]).await;
    let rec: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["replaced"], "{ garbage");
    wait_value(
        "h1 to follow the rollback",
        Duration::from_secs(5),
        || admin_get_json(&admin, "/state"),
        |s| {
            s["gray"]["rules"]["rules"]
                .as_array()
                .is_some_and(|r| r.len() == 1)
        },
    )
    .await;
}
