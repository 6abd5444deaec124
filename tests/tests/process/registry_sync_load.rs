//! `detour-registry-sync` under steady SDK load through real sidecars, with a real ZooKeeper and
//! a real etcd: a smooth application release, a ZooKeeper outage, a mass removal.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;
use tokio::time::Instant;

use detour_kit::load::Stats;
use detour_kit::provider::DemoProvider;
use detour_tests::etcd::Etcd;
use detour_tests::scenario::spawn_load;
use detour_tests::sync::{PREFIX, SyncProcess, providers, synced, url, wait_synced, zk_config};
use detour_tests::zookeeper::{Registrar, ZooKeeper};
use detour_tests::{Mesh, ProviderProcess, wait_value};

const HELLO: &str = "com.acme.Hello";
const MAP_HELLO: &str = "\n[source.services]\n\"com.acme.Hello\" = \"hello\"\n";

fn line(name: &str, s: &Stats) -> String {
    detour_tests::scenario::counts_line("SYNC", name, s)
}

/// ZooKeeper, etcd, the agent, and a mesh whose caller `h1` routes `hello` from etcd.
struct Release {
    root: tempfile::TempDir,
    zk: ZooKeeper,
    etcd: Etcd,
    mesh: Mesh,
    reg: Registrar,
}

impl Release {
    /// Registers `addrs` under com.acme.Hello, starts the agent and the caller `h1`; returns the
    /// agent and an SDK client on h1 once etcd holds every entry and h1 routes them.
    async fn serve(
        &mut self,
        addrs: &[std::net::SocketAddr],
    ) -> (SyncProcess, detour_thin_sdk::Client) {
        for a in addrs {
            self.reg.register(HELLO, &url(a, HELLO, 100)).await;
        }
        let agent = SyncProcess::start(
            self.root.path(),
            "sync-a",
            &zk_config("a", &self.zk.addr, &self.etcd.url, MAP_HELLO),
        )
        .await;
        wait_synced(
            &mut self.etcd.raw().await,
            addrs.len(),
            Duration::from_secs(10),
        )
        .await;
        self.mesh.start("h1", "127.0.0.1", &[]).await;
        self.mesh.wait_endpoints("h1", "hello", addrs.len()).await;
        let snap = self.mesh.root().join("snap.json");
        let client = detour_tests::ready_sdk(&self.mesh, "h1", "hello", &snap).await;
        (agent, client)
    }
}

async fn release_setup() -> Release {
    let root = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(root.path()).await;
    let etcd = Etcd::start(root.path()).await;
    let reg = Registrar::new(&zk).await;
    let mut mesh = Mesh::new();
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    Release {
        root,
        zk,
        etcd,
        mesh,
        reg,
    }
}

#[tokio::test]
async fn an_instance_removed_from_zookeeper_before_its_process_stops_loses_nothing() {
    let _serial = detour_tests::serial().await;
    let mut r = release_setup().await;
    let grace_ms: u64 = std::env::var("SYNC_RELEASE_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let keep: Vec<DemoProvider> =
        providers((2..4).map(|i| (format!("127.0.0.{i}"), format!("p{i}")))).await;
    let mut leaving =
        ProviderProcess::start("127.0.0.4:0".parse().unwrap(), "p4", r.root.path()).await;
    let addrs = [keep[0].addr(), keep[1].addr(), leaving.addr];
    let (_agent, client) = r.serve(&addrs).await;
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 10);
    tokio::time::sleep_until(t0 + Duration::from_secs(3)).await;
    let removed_ms = detour_registry::now_unix_ms();
    r.reg
        .deregister(HELLO, &url(leaving.addr, HELLO, 100))
        .await;
    tokio::time::sleep(Duration::from_millis(grace_ms)).await;
    let stopped_ms = detour_registry::now_unix_ms();
    leaving.child.stop(Duration::from_secs(5)).await.unwrap();
    let s = load.await.unwrap();
    line("app-release", &s);
    let last = s.served_last_unix_ms.get("p4").copied().unwrap_or(0);
    println!(
        "SYNC app-release: p4 last answered {} ms after its removal (stopped after {grace_ms} ms)",
        last.saturating_sub(removed_ms)
    );
    assert_eq!(s.sent, 5000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert!(
        s.served_by.get("p4").copied().unwrap_or(0) > 0,
        "p4 took traffic before its release"
    );
    assert!(last < stopped_ms, "p4 answered after its process stopped?");
    assert!(
        last.saturating_sub(removed_ms) < grace_ms,
        "p4 still got traffic at the end of the grace"
    );
}

#[tokio::test]
async fn a_zookeeper_outage_deletes_nothing_and_traffic_rides_through() {
    let _serial = detour_tests::serial().await;
    let mut r = release_setup().await;
    let outage_s: u64 = std::env::var("SYNC_ZK_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let ps: Vec<DemoProvider> =
        providers((2..6).map(|i| (format!("127.0.0.{i}"), format!("p{i}")))).await;
    let addrs: Vec<_> = ps[..3].iter().map(DemoProvider::addr).collect();
    let (agent, client) = r.serve(&addrs).await;
    let mut ec = r.etcd.raw().await;
    let before = synced(&mut ec).await;
    let load = spawn_load(&client, 300, outage_s + 12);
    tokio::time::sleep(Duration::from_secs(2)).await;
    r.zk.stop().await;
    let down = Instant::now();
    let mut min = usize::MAX;
    let mut saw_disconnected = false;
    while down.elapsed() < Duration::from_secs(outage_s) {
        min = min.min(synced(&mut ec).await.len());
        saw_disconnected |= agent.state().await["source"]["connected"] == false;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.zk.restart().await;
    // The application side re-registers on its new session, as Dubbo does; then one provider is
    // added and one removed.
    let reg2 = Registrar::new(&r.zk).await;
    for p in &ps[..3] {
        reg2.register(HELLO, &url(p.addr(), HELLO, 100)).await;
    }
    reg2.register(HELLO, &url(ps[3].addr(), HELLO, 100)).await;
    reg2.deregister(HELLO, &url(ps[0].addr(), HELLO, 100)).await;
    let s = load.await.unwrap();
    line("zookeeper-outage", &s);
    println!(
        "SYNC zookeeper-outage: {outage_s} s down, entries min={min} (3 before), source seen disconnected={saw_disconnected}"
    );
    assert_eq!(before.len(), 3);
    assert_eq!(min, 3, "an entry was deleted during the outage");
    assert!(
        saw_disconnected,
        "/state never showed the source disconnected"
    );
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    let want =
        |p: &DemoProvider| format!("{PREFIX}hello/{}", p.addr().to_string().replace(':', "-"));
    wait_value(
        "convergence after the outage",
        Duration::from_secs(20),
        || {
            let e = r.etcd.raw();
            async move { serde_json::json!(synced(&mut e.await).await.keys().collect::<Vec<_>>()) }
        },
        |v| {
            let mut keys: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect();
            keys.sort();
            let mut w: Vec<String> = ps[1..].iter().map(want).collect();
            w.sort();
            keys == w
        },
    )
    .await;
}

#[tokio::test]
async fn a_mass_removal_of_live_providers_is_held_and_health_checked() {
    let _serial = detour_tests::serial().await;
    let mut r = release_setup().await;
    let mut ps: Vec<DemoProvider> =
        providers((0..10).map(|i| (format!("127.0.1.{}", i + 1), format!("p{i}")))).await;
    let addrs: Vec<_> = ps.iter().map(DemoProvider::addr).collect();
    let (agent, client) = r.serve(&addrs).await;
    let mut ec = r.etcd.raw().await;
    let load = spawn_load(&client, 500, 10);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in &ps[2..] {
        r.reg.deregister(HELLO, &url(p.addr(), HELLO, 100)).await;
    }
    let st = wait_value(
        "protection",
        Duration::from_secs(10),
        || agent.state(),
        |s| s["held_deletions"] == 8,
    )
    .await;
    println!("SYNC mass-removal: {}", st["protected"]);
    assert_eq!(
        synced(&mut ec).await.len(),
        10,
        "held entries stay mirrored"
    );
    let s = load.await.unwrap();
    line("mass-removal", &s);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert_eq!(synced(&mut ec).await.len(), 10, "still held after the load");
    // A held instance that dies fails its check and only it is removed.
    let dead = ps.remove(9);
    let dead_addr = dead.addr();
    drop(dead);
    let gone = format!("{PREFIX}hello/{}", dead_addr.to_string().replace(':', "-"));
    wait_value(
        "the dead held instance removed",
        Duration::from_secs(10),
        || {
            let e = r.etcd.raw();
            async move { serde_json::json!(synced(&mut e.await).await.keys().collect::<Vec<_>>()) }
        },
        |v| v.as_array().unwrap().len() == 9 && !v.as_array().unwrap().iter().any(|k| k == &gone),
    )
    .await;
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.contains("detour_sync_protection_total{event=\"entered\"} 1"),
        "{metrics}"
    );
}
