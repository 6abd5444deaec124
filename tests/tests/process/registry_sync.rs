//! `detour-registry-sync` against a real ZooKeeper (Dubbo's layout) and a real etcd: mirroring
//! and its lag, malformed entries, a leader killed with `kill -9`, the directory source. The
//! scenarios under load through real sidecars are in `registry_sync_load.rs`.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;
use tokio::time::Instant;

use detour_tests::etcd::Etcd;
use detour_tests::scenario::hello;
use detour_tests::sync::{PREFIX, SyncProcess, synced, url, wait_synced, zk_config};
use detour_tests::wait_value;
use detour_tests::zookeeper::{Registrar, ZooKeeper};
use etcd_client::{EventType, WatchOptions};
use nix::sys::signal::Signal;

const HELLO: &str = "com.acme.Hello";
const MAP_HELLO: &str = "\n[source.services]\n\"com.acme.Hello\" = \"hello\"\n";

/// Which etcd event completes a change.
type Wanted = dyn Fn(&serde_json::Value, EventType) -> bool;

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_thousand_providers_are_mirrored_and_changes_follow_with_their_lag_measured() {
    let _serial = detour_tests::serial().await;
    let root = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(root.path()).await;
    let etcd = Etcd::start(root.path()).await;
    let reg = Registrar::new(&zk).await;
    let addr = |i: usize, j: usize| format!("10.1.{i}.{}:8080", j + 1);
    let iface = |i: usize| format!("com.acme.Svc{i:03}");
    for i in 0..100 {
        let name = iface(i);
        let batch: Vec<String> = (0..10).map(|j| url(addr(i, j), &name, 100)).collect();
        futures_util::future::join_all(batch.iter().map(|u| reg.register(&name, u))).await;
    }
    let agent = SyncProcess::start(
        root.path(),
        "sync-a",
        &zk_config("a", &zk.addr, &etcd.url, ""),
    )
    .await;
    let mut ec = etcd.raw().await;
    let t0 = Instant::now();
    let all = wait_synced(&mut ec, 1000, Duration::from_secs(30)).await;
    println!(
        "SYNC initial: 1000 providers in 100 interfaces mirrored in {} ms",
        t0.elapsed().as_millis()
    );
    let one = &all["/detour/v1/services/com.acme.Svc007/10.1.7.3-8080"];
    assert_eq!(one["weight"], 100);
    assert_eq!(one["version"], "1.0");
    assert_eq!(one["app_address"], "10.1.7.3:8080");
    assert_eq!(one["labels"]["application"], "app");
    assert!(one.get("pa_address").is_none_or(|v| v.is_null()), "{one}");
    assert_eq!(agent.state().await["role"], "leader");

    // 100 changes, one at a time, each timed from the ZooKeeper write to the etcd event.
    let mut events = ec
        .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut lags = Vec::new();
    let mut expect = all
        .keys()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>();
    for k in 0..100usize {
        let i = k % 100;
        let started = Instant::now();
        let (key, wanted): (String, Box<Wanted>) = match k % 3 {
            0 => {
                // add
                let a = format!("10.2.{i}.1:9090");
                reg.register(&iface(i), &url(&a, &iface(i), 100)).await;
                let key = format!("{PREFIX}{}/10.2.{i}.1-9090", iface(i));
                expect.insert(key.clone());
                (key, Box::new(|_, t| t == EventType::Put))
            }
            1 => {
                // weight change: re-registered with another weight, as Dubbo does
                let a = addr(i, 0);
                reg.deregister(&iface(i), &url(&a, &iface(i), 100)).await;
                reg.register(&iface(i), &url(&a, &iface(i), 7)).await;
                let key = format!("{PREFIX}{}/10.1.{i}.1-8080", iface(i));
                (
                    key,
                    Box::new(|v, t| t == EventType::Put && v["endpoint"]["weight"] == 7),
                )
            }
            _ => {
                // remove
                let a = addr(i, 9);
                reg.deregister(&iface(i), &url(&a, &iface(i), 100)).await;
                let key = format!("{PREFIX}{}/10.1.{i}.10-8080", iface(i));
                expect.remove(&key);
                (key, Box::new(|_, t| t == EventType::Delete))
            }
        };
        'seen: loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .unwrap_or_else(|_| panic!("change {k} on {key} not mirrored in 10 s"))
                .unwrap()
                .unwrap();
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
                if kv.key_str().unwrap() == key && wanted(&v, ev.event_type()) {
                    break 'seen;
                }
            }
        }
        lags.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let (p50, p99) = (percentile(&mut lags, 0.5), percentile(&mut lags, 0.99));
    println!(
        "SYNC lag ZooKeeper→etcd over 100 changes: p50={p50:.1} ms p99={p99:.1} ms max={:.1} ms",
        lags.last().unwrap()
    );
    let now = synced(&mut ec).await;
    assert_eq!(
        now.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expect
    );
    let state = agent.state().await;
    println!("SYNC agent lag: {}", state["lag_ms"]);
    assert!(state["lag_ms"]["count"].as_u64().unwrap() > 0, "{state}");
    let (_, metrics) = agent.get("/metrics").await;
    assert!(
        metrics.contains("detour_sync_lag_seconds_bucket"),
        "{metrics}"
    );
}

#[tokio::test]
async fn malformed_urls_and_unknown_protocols_are_skipped_and_counted_while_the_rest_syncs() {
    let _serial = detour_tests::serial().await;
    let root = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(root.path()).await;
    let etcd = Etcd::start(root.path()).await;
    let reg = Registrar::new(&zk).await;
    reg.register(HELLO, &url("10.0.0.1:80", HELLO, 100)).await;
    reg.register(HELLO, &format!("dubbo://10.0.0.2:20880/{HELLO}?weight=1"))
        .await;
    reg.register(
        HELLO,
        &url("10.0.0.3:80", HELLO, 100).replace("weight=100", "weight=lots"),
    )
    .await;
    reg.register_raw(HELLO, "garbage%ZZ").await;
    reg.register_raw(HELLO, "rest%3A%2F%2Fnot-an-address%2Fx")
        .await;
    reg.register("bad interface!", &url("10.0.0.5:80", "bad interface!", 1))
        .await;
    reg.register(HELLO, &url("10.0.0.6:80", HELLO, 100)).await;
    let agent = SyncProcess::start(
        root.path(),
        "sync-a",
        &zk_config("a", &zk.addr, &etcd.url, MAP_HELLO),
    )
    .await;
    let mut ec = etcd.raw().await;
    let got = wait_synced(&mut ec, 2, Duration::from_secs(20)).await;
    let keys: Vec<&str> = got.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "/detour/v1/services/hello/10.0.0.1-80",
            "/detour/v1/services/hello/10.0.0.6-80"
        ]
    );
    let (_, metrics) = agent.get("/metrics").await;
    let skipped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("detour_sync_skipped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(skipped, 5.0, "{metrics}");
    assert!(metrics.contains("reason=\"protocol\""), "{metrics}");
    assert!(
        agent.log().contains("legacy registry entry skipped"),
        "{}",
        agent.log()
    );
    // Still following: a good provider added later is mirrored.
    reg.register(HELLO, &url("10.0.0.7:80", HELLO, 100)).await;
    wait_synced(&mut ec, 3, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_leader_killed_with_sigkill_is_replaced_and_the_entries_never_drop() {
    let _serial = detour_tests::serial().await;
    let root = tempfile::tempdir().unwrap();
    let zk = ZooKeeper::start(root.path()).await;
    let etcd = Etcd::start(root.path()).await;
    let reg = Registrar::new(&zk).await;
    for i in 0..20 {
        let iface = format!("com.acme.Svc{i:02}");
        for j in 0..10 {
            reg.register(&iface, &url(format!("10.3.{i}.{}:80", j + 1), &iface, 100))
                .await;
        }
    }
    let mut a = SyncProcess::start(
        root.path(),
        "sync-a",
        &zk_config("a", &zk.addr, &etcd.url, ""),
    )
    .await;
    a.wait_role("leader", Duration::from_secs(10)).await;
    let b = SyncProcess::start(
        root.path(),
        "sync-b",
        &zk_config("b", &zk.addr, &etcd.url, ""),
    )
    .await;
    let sb = b.wait_role("standby", Duration::from_secs(10)).await;
    assert_eq!(sb["leader"], "a", "{sb}");
    let mut ec = etcd.raw().await;
    let before = wait_synced(&mut ec, 200, Duration::from_secs(20)).await;
    // Check etcd continuously from now on.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checker = {
        let (stop, mut ec) = (stop.clone(), etcd.raw().await);
        tokio::spawn(async move {
            let (mut min, mut max, mut reads) = (usize::MAX, 0, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = synced(&mut ec).await.len();
                (min, max, reads) = (min.min(n), max.max(n), reads + 1);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (min, max, reads)
        })
    };
    let killed = Instant::now();
    a.child.signal(Signal::SIGKILL).unwrap();
    let _ = a.child.wait_exit(Duration::from_secs(5)).await;
    b.wait_role("leader", Duration::from_secs(10)).await;
    let takeover = killed.elapsed();
    // Past the dead leader's entry lease (10 s): the successor re-attached every entry.
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (min, max, reads) = checker.await.unwrap();
    println!(
        "SYNC leader-kill9: takeover_ms={} entries min={min} max={max} over {reads} reads (200 before)",
        takeover.as_millis()
    );
    assert_eq!(before.len(), 200);
    assert_eq!(
        (min, max),
        (200, 200),
        "the entries changed during the takeover"
    );
    // Changes after the takeover still flow.
    reg.register(
        "com.acme.Svc00",
        &url("10.3.0.99:80", "com.acme.Svc00", 100),
    )
    .await;
    reg.deregister("com.acme.Svc01", &url("10.3.1.1:80", "com.acme.Svc01", 100))
        .await;
    wait_value(
        "changes after the takeover",
        Duration::from_secs(10),
        || {
            let e = etcd.raw();
            async move {
                let mut e = e.await;
                let s = synced(&mut e).await;
                serde_json::json!(s.keys().collect::<Vec<_>>())
            }
        },
        |v| {
            let keys: Vec<&str> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap())
                .collect();
            keys.len() == 200
                && keys.contains(&"/detour/v1/services/com.acme.Svc00/10.3.0.99-80")
                && !keys.contains(&"/detour/v1/services/com.acme.Svc01/10.3.1.1-80")
        },
    )
    .await;
    let st = b.state().await;
    assert_eq!(st["target"]["entries"], 200, "{st}");
}

#[tokio::test]
async fn a_directory_registry_is_mirrored_too() {
    use detour_registry::Registry;
    use detour_registry::dir::{DirOptions, DirRegistry};
    let _serial = detour_tests::serial().await;
    let root = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(root.path()).await;
    let legacy = root.path().join("legacy");
    std::fs::create_dir_all(&legacy).unwrap();
    let host = detour_proto::HostId::new("old1").unwrap();
    let old = DirRegistry::open(&legacy, host.clone(), DirOptions::default())
        .await
        .unwrap();
    for i in 1..=3 {
        let ep = detour_proto::Endpoint::new(
            hello(),
            detour_proto::InstanceId::new(format!("old1-{i}")).unwrap(),
            host.clone(),
            format!("10.9.0.{i}:80").parse().unwrap(),
        );
        old.register(ep).await.unwrap();
    }
    let cfg = format!(
        "name = \"zk\"\nreplica = \"d\"\n[source]\nkind = \"dir\"\npath = \"{}\"\npoll_interval_ms = 100\n\
         [target]\netcd = [\"{}\"]\nelection_ttl_s = 2\nlease_ttl_s = 10\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = \"admin.addr\"\n",
        legacy.display(),
        etcd.url
    );
    let _agent = SyncProcess::start(root.path(), "sync-d", &cfg).await;
    let mut ec = etcd.raw().await;
    let got = wait_synced(&mut ec, 3, Duration::from_secs(10)).await;
    assert!(
        got.contains_key("/detour/v1/services/hello/old1-2"),
        "{got:?}"
    );
    old.deregister(&hello(), &detour_proto::InstanceId::new("old1-2").unwrap())
        .await
        .unwrap();
    let got = wait_synced(&mut ec, 2, Duration::from_secs(10)).await;
    assert!(
        !got.contains_key("/detour/v1/services/hello/old1-2"),
        "{got:?}"
    );
}
