//! Sidecars on a real etcd under steady SDK load: a full registry outage with the caller's
//! sidecar restarted meanwhile, a mass de-registration (self-protection), and a deliberate one.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_kit::load::Stats;
use detour_kit::provider::DemoProvider;
use detour_proto::{Endpoint, HostId, InstanceId};
use detour_registry::Registry;
use detour_registry::etcd::{EtcdOptions, EtcdRegistry};
use detour_registry::now_unix_ms;
use detour_tests::etcd::Etcd;
use detour_tests::scenario::{hello, spawn_load};
use detour_tests::{Mesh, Offer, admin_get_json, metric, wait_value};
use nix::sys::signal::Signal;

fn registrar_opts(url: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![url.to_owned()],
        prefix: "/detour/v1".into(),
        ttl: Duration::from_secs(10),
        request_timeout: Duration::from_secs(1),
        watch_check: Duration::from_secs(1),
        security: Default::default(),
    }
}

/// A provider registered straight into etcd (its host has no sidecar).
fn bare(host: &str, instance: &str, p: &DemoProvider) -> Endpoint {
    Endpoint::new(
        hello(),
        InstanceId::new(instance).unwrap(),
        HostId::new(host).unwrap(),
        p.addr(),
    )
}

fn line(name: &str, s: &Stats) -> String {
    detour_tests::scenario::counts_line("ETCD", name, s)
}

#[tokio::test]
async fn a_full_outage_with_a_sidecar_restart_loses_nothing_and_converges() {
    let _serial = detour_tests::serial().await;
    let mut mesh = Mesh::new();
    let mut etcd = Etcd::start(mesh.root()).await;
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    let p2 = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let px = DemoProvider::start("127.0.0.4:0".parse().unwrap(), "x1")
        .await
        .unwrap();
    let py = DemoProvider::start("127.0.0.5:0".parse().unwrap(), "x2")
        .await
        .unwrap();
    let a = EtcdRegistry::open(HostId::new("hx").unwrap(), registrar_opts(&etcd.url))
        .await
        .unwrap();
    a.register(bare("hx", "x1", &px)).await.unwrap();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", p2.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;

    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 22);
    tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
    etcd.stop().await; // for 12 s: longer than the registrations' TTL (10 s)
    tokio::time::sleep_until(t0 + Duration::from_secs(5)).await;
    mesh.stop_with("h1", Signal::SIGTERM).await;
    mesh.restart("h1").await; // etcd is down: ready from its disk cache alone
    let h1 = mesh.admin("h1");
    let state = admin_get_json(&h1, "/state").await;
    let svc = &state["services"]["hello"];
    println!("restarted during the outage: {svc}");
    assert_eq!(svc["source"], "disk-cache", "{svc}");
    assert_eq!(svc["endpoints"].as_array().unwrap().len(), 2, "{svc}");
    tokio::time::sleep_until(t0 + Duration::from_secs(13)).await;
    // The restarted sidecar carries the traffic again while etcd is still down (its link
    // comes back about 2.5 s after its restart: some 2,500 requests by now).
    let outbound = metric(&h1, "detour_requests_total", "direction=\"outbound\"")
        .await
        .unwrap_or(0.0);
    assert!(
        outbound > 1_500.0,
        "the restarted sidecar carried only {outbound} requests during the outage"
    );
    tokio::time::sleep_until(t0 + Duration::from_secs(14)).await;
    etcd.restart().await;
    // Changes made once etcd is back: one instance added, one removed.
    a.deregister(&hello(), &InstanceId::new("x1").unwrap())
        .await
        .unwrap();
    let b = EtcdRegistry::open(HostId::new("hy").unwrap(), registrar_opts(&etcd.url))
        .await
        .unwrap();
    b.register(bare("hy", "x2", &py)).await.unwrap();
    let s = load.await.unwrap();
    line("outage", &s);
    assert_eq!(s.sent, 11_000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert!(
        s.paths.get("direct").copied().unwrap_or(0) > 0,
        "the SDK rode through on the direct path"
    );
    assert!(
        s.served_by.contains_key("x2"),
        "the added instance took traffic; h1's log:\n{}",
        std::fs::read_to_string(mesh.sidecar("h1").run_dir.join("sidecar.log")).unwrap_or_default()
    );
    // The catalog converged: h2-hello and x2, not x1, from the registry.
    let hello_state = || {
        let c = mesh.admin("h1");
        async move { admin_get_json(&c, "/state").await["services"]["hello"].clone() }
    };
    wait_value("convergence", Duration::from_secs(10), hello_state, |svc| {
        let mut ids: Vec<&str> = svc["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["instance"].as_str().unwrap())
            .collect();
        ids.sort();
        ids == ["h2-hello", "x2"] && svc["source"] == "registry"
    })
    .await;
}

/// Five providers registered straight into etcd, and the caller's sidecar h1 (config `h1_extra`
/// appended).
async fn five(mesh: &mut Mesh, etcd: &Etcd, h1_extra: &str) -> (EtcdRegistry, Vec<DemoProvider>) {
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    let reg = EtcdRegistry::open(HostId::new("hx").unwrap(), registrar_opts(&etcd.url))
        .await
        .unwrap();
    let mut ps = Vec::new();
    for i in 0..5 {
        let p = DemoProvider::start("127.0.0.2:0".parse().unwrap(), &format!("x{i}"))
            .await
            .unwrap();
        reg.register(bare("hx", &format!("x{i}"), &p))
            .await
            .unwrap();
        ps.push(p);
    }
    mesh.start_with("h1", "127.0.0.1", &[], h1_extra).await;
    mesh.wait_endpoints("h1", "hello", 5).await;
    (reg, ps)
}

#[tokio::test]
async fn a_mass_deregistration_engages_protection_and_loses_nothing() {
    let _serial = detour_tests::serial().await;
    let mut mesh = Mesh::new();
    let etcd = Etcd::start(mesh.root()).await;
    let checked = "[protection]\ncheck_path = \"/healthz\"\n";
    let (reg, ps) = five(&mut mesh, &etcd, checked).await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 12);
    tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
    for i in 1..5 {
        reg.deregister(&hello(), &InstanceId::new(format!("x{i}")).unwrap())
            .await
            .unwrap();
    }
    let after: Vec<u64> = ps.iter().map(DemoProvider::received).collect();
    let hello_state = |mesh: &Mesh| {
        let c = mesh.admin("h1");
        async move { admin_get_json(&c, "/state").await["services"]["hello"].clone() }
    };
    let ten = Duration::from_secs(10);
    let svc = wait_value(
        "protection",
        ten,
        || hello_state(&mesh),
        |s| s["protected"] == true,
    )
    .await;
    assert_eq!(svc["endpoints"].as_array().unwrap().len(), 5, "{svc}");
    // x4 keeps accepting connections but its health check answers 503: it alone leaves.
    ps[4].set_healthy(false);
    let svc = wait_value(
        "the failing instance leaves",
        ten,
        || hello_state(&mesh),
        |s| s["endpoints"].as_array().unwrap().len() == 4,
    )
    .await;
    assert!(
        !svc["endpoints"].to_string().contains("\"x4\""),
        "the failing instance left: {svc}"
    );
    let x4_out = ps[4].received();
    let s = load.await.unwrap();
    line("mass-deregistration", &s);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    for (i, p) in ps.iter().enumerate().take(4).skip(1) {
        assert!(
            p.received() > after[i] + 50,
            "x{i} left rotation although it is healthy"
        );
    }
    assert!(
        ps[4].received() <= x4_out + 2,
        "x4 kept receiving after its check failed: {} -> {}",
        x4_out,
        ps[4].received()
    );
}

#[tokio::test]
async fn a_deliberate_deregistration_stops_traffic_within_a_second() {
    let _serial = detour_tests::serial().await;
    let mut mesh = Mesh::new();
    let etcd = Etcd::start(mesh.root()).await;
    let (reg, ps) = five(&mut mesh, &etcd, "").await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    let load = spawn_load(&client, 500, 6);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = &ps[2];
    let t = now_unix_ms();
    reg.deregister(&hello(), &InstanceId::new("x2").unwrap())
        .await
        .unwrap();
    let mut last_seen = victim.received();
    let mut last_change = t;
    while now_unix_ms() < t + 3000 {
        let n = victim.received();
        if n != last_seen {
            last_seen = n;
            last_change = now_unix_ms();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = load.await.unwrap();
    line("deregister-one", &s);
    let deregister_ms = last_change - t;
    println!("ETCD deregister-one: deregister_ms={deregister_ms}");
    assert!(
        deregister_ms < 1000,
        "x2 got requests {deregister_ms} ms after its de-registration"
    );
    assert_eq!(s.failed, 0, "{:?}", s.failures);
}

#[tokio::test]
async fn losing_etcd_members_fails_nothing_and_watches_continue() {
    let _serial = detour_tests::serial().await;
    let mut mesh = Mesh::new();
    let mut cluster = detour_tests::etcd::EtcdCluster::start(mesh.root()).await;
    mesh.use_registry(&cluster.spec());
    let p2 = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let px = DemoProvider::start("127.0.0.4:0".parse().unwrap(), "x1")
        .await
        .unwrap();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", p2.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 15);
    tokio::time::sleep_until(t0 + Duration::from_secs(2)).await;
    let leader = cluster.leader().await;
    cluster.kill(leader).await;
    // A registration made while the leader is gone reaches the watchers.
    let mut opts = registrar_opts(&cluster.urls[0]);
    opts.endpoints = cluster.urls.clone();
    let reg = EtcdRegistry::open(HostId::new("hx").unwrap(), opts)
        .await
        .unwrap();
    reg.register(bare("hx", "x1", &px)).await.unwrap();
    mesh.wait_endpoints("h1", "hello", 2).await;
    tokio::time::sleep_until(t0 + Duration::from_secs(7)).await;
    cluster.restart(leader).await;
    let now_leader = cluster.leader().await;
    let follower = (0..3).find(|i| *i != now_leader).unwrap_or(0);
    cluster.kill(follower).await;
    reg.deregister(&hello(), &InstanceId::new("x1").unwrap())
        .await
        .unwrap();
    mesh.wait_endpoints("h1", "hello", 1).await;
    let s = load.await.unwrap();
    line("member-loss", &s);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert!(
        s.served_by.contains_key("x1"),
        "the instance registered during the loss took traffic"
    );
}
