//! The etcd back-end against a real etcd: registration under a lease, watches, host status,
//! garbage values, lease expiry, an etcd restart, a watcher cut off (resumed without a list) or
//! away during a compaction (listed again), one keep-alive stream per lease, a client that
//! follows only the gray rules (a watchdog's), and a sidecar routing from it.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::Arc;
use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_proto::{
    AppProtocol, Endpoint, EndpointSet, HostId, HostStatus, InstanceId, ServiceName, SidecarState,
};
use detour_registry::etcd::{EtcdOptions, EtcdRegistry};
use detour_registry::{Registry, now_unix_ms};
use detour_tests::etcd::Etcd;
use detour_tests::{Mesh, Offer, body_text};
use detour_thin_sdk::body::empty;
use tokio::sync::watch;

fn opts(url: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![url.to_owned()],
        prefix: "/detour/test".into(),
        ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        watch_check: Duration::from_secs(1),
        security: Default::default(),
    }
}

fn ep(host: &str, instance: &str, port: u16) -> Endpoint {
    Endpoint::new(
        ServiceName::new("echo").unwrap(),
        InstanceId::new(instance).unwrap(),
        HostId::new(host).unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
}

async fn until(
    rx: &mut watch::Receiver<Arc<EndpointSet>>,
    what: &str,
    pred: impl Fn(&EndpointSet) -> bool,
) {
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if pred(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(r.is_ok(), "{what}: last seen {:?}", rx.borrow());
}

#[tokio::test]
async fn register_watch_deregister_status_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let b = EtcdRegistry::open(HostId::new("h2").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let echo = ServiceName::new("echo").unwrap();
    let mut rx = b.watch(&echo).await.unwrap();

    a.register(ep("h1", "i1", 1)).await.unwrap();
    a.register(ep("h1", "i2", 2)).await.unwrap();
    until(&mut rx, "two instances", |s| {
        s.known && s.endpoints.len() == 2
    })
    .await;

    // Garbage next to good values: skipped, the rest of the service keeps working.
    let mut raw = etcd.raw().await;
    raw.put("/detour/test/services/echo/broken", "{not json", None)
        .await
        .unwrap();
    a.register(ep("h1", "i3", 3)).await.unwrap();
    until(&mut rx, "garbage skipped", |s| s.endpoints.len() == 3).await;

    a.deregister(&echo, &InstanceId::new("i1").unwrap())
        .await
        .unwrap();
    until(&mut rx, "deregistered", |s| {
        s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.instance.as_str() != "i1")
    })
    .await;

    let status = HostStatus {
        host: HostId::new("h1").unwrap(),
        sidecar: SidecarState::Draining,
        version: "t".into(),
        updated_unix_ms: now_unix_ms(),
        watchdog: None,
        metrics: None,
    };
    a.set_host_status(status.clone()).await.unwrap();
    let mut hosts = b.watch_hosts();
    tokio::time::timeout(
        Duration::from_secs(10),
        hosts.wait_for(|h| h.get(&status.host) == Some(&status)),
    )
    .await
    .unwrap()
    .unwrap();
    // The values are readable JSON.
    let got = raw.get("/detour/test/hosts/h1", None).await.unwrap();
    let text = got.kvs()[0].value_str().unwrap().to_owned();
    assert!(text.contains("\"draining\""), "{text}");
}

#[tokio::test]
async fn a_client_that_stops_keeping_alive_disappears_after_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let watcher = EtcdRegistry::open(HostId::new("h2").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let mut rx = watcher
        .watch(&ServiceName::new("echo").unwrap())
        .await
        .unwrap();
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    a.register(ep("h1", "i1", 1)).await.unwrap();
    until(&mut rx, "registered", |s| s.endpoints.len() == 1).await;
    drop(a); // as a crash: no withdraw, no keep-alive
    until(&mut rx, "expired with the lease", |s| {
        s.endpoints.is_empty() && s.known
    })
    .await;
}

#[tokio::test]
async fn registrations_and_watches_survive_an_etcd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path()).await;
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let (_b, mut rx) = echo_watcher("h2", &opts(&etcd.url)).await;
    a.register(ep("h1", "i1", 1)).await.unwrap();
    until(&mut rx, "registered", |s| s.endpoints.len() == 1).await;
    etcd.stop().await;
    // Registering while etcd is down is kept and written once it is back.
    a.register(ep("h1", "i2", 2)).await.ok();
    etcd.restart().await;
    until(&mut rx, "both after the restart", |s| {
        s.endpoints.len() == 2
    })
    .await;
}

/// A registry client for `host` and its watch of service `echo`.
async fn echo_watcher(
    host: &str,
    opts: &EtcdOptions,
) -> (EtcdRegistry, watch::Receiver<Arc<EndpointSet>>) {
    let r = EtcdRegistry::open(HostId::new(host).unwrap(), opts.clone())
        .await
        .unwrap();
    let rx = r.watch(&ServiceName::new("echo").unwrap()).await.unwrap();
    (r, rx)
}

/// etcd; registry `a` on it; registry `b` reaching it only through a proxy the test can cut,
/// watching `echo`, once it has seen `a`'s first instance.
async fn watcher_behind_a_proxy(
    dir: &std::path::Path,
) -> (
    Etcd,
    detour_tests::proxy::CutProxy,
    EtcdRegistry,
    EtcdRegistry,
    watch::Receiver<Arc<EndpointSet>>,
) {
    let etcd = Etcd::start(dir).await;
    let etcd_addr: std::net::SocketAddr = etcd.url.trim_start_matches("http://").parse().unwrap();
    let proxy = detour_tests::proxy::CutProxy::start(etcd_addr).await;
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let (b, mut rx) = echo_watcher("h2", &opts(&format!("http://{}", proxy.addr))).await;
    a.register(ep("h1", "i1", 1)).await.unwrap();
    until(&mut rx, "registered", |s| s.endpoints.len() == 1).await;
    (etcd, proxy, a, b, rx)
}

#[tokio::test]
async fn a_watcher_cut_off_resumes_from_its_revision_without_listing_again() {
    let dir = tempfile::tempdir().unwrap();
    let (_etcd, proxy, a, b, mut rx) = watcher_behind_a_proxy(dir.path()).await;
    assert_eq!(b.lists(), 1, "listed once at start");
    // Three cuts, each with changes made while the watcher is away (no compaction).
    for round in 0..3u16 {
        proxy.cut();
        a.register(ep("h1", &format!("r{round}"), 10 + round))
            .await
            .unwrap();
        assert_eq!(rx.borrow().endpoints.len(), 1 + usize::from(round));
        // The cut closed the watcher's connections; let its retries meet the cut for a while.
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.restore();
        until(&mut rx, "the change made while cut off", |s| {
            s.endpoints.len() == 2 + usize::from(round)
        })
        .await;
    }
    assert_eq!(
        b.lists(),
        1,
        "every reconnect resumed the watch from its revision"
    );
}

#[tokio::test]
async fn every_key_of_one_transaction_reaches_a_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_b, mut rx) = echo_watcher("h2", &opts(&etcd.url)).await;
    // Another registration system writes five instances in one transaction: one revision.
    let ops: Vec<etcd_client::TxnOp> = (0..5)
        .map(|i| {
            let v = serde_json::json!({"version": 1, "endpoint": ep("h9", &format!("t{i}"), 9)});
            etcd_client::TxnOp::put(
                format!("/detour/test/services/echo/t{i}"),
                v.to_string(),
                None,
            )
        })
        .collect();
    let mut raw = etcd.raw().await;
    raw.txn(etcd_client::Txn::new().and_then(ops))
        .await
        .unwrap();
    until(&mut rx, "all five instances", |s| s.endpoints.len() == 5).await;
}

#[tokio::test]
async fn one_keep_alive_stream_holds_a_lease_taken_only_once_something_is_owned() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let streams = || {
        etcd.metric(
            "grpc_server_started_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        )
    };
    let before = streams().await;
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    // A client that owns nothing (a sidecar under a watchdog) takes no lease.
    let _rx = a.watch(&ServiceName::new("echo").unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let granted = || etcd.metric("etcd_debugging_lease_granted_total", &[]);
    assert_eq!(granted().await, 0.0, "no lease while nothing is owned");
    // TTL 2 s: renewed every 500–667 ms, so at least six renewals in the next four seconds.
    a.register(ep("h1", "i1", 1)).await.unwrap();
    let renewals_before = etcd.metric("etcd_debugging_lease_renewed_total", &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let renewed = etcd.metric("etcd_debugging_lease_renewed_total", &[]).await - renewals_before;
    assert!(renewed >= 4.0, "the lease was renewed ({renewed} times)");
    assert_eq!(granted().await, 1.0, "one lease once something is owned");
    assert_eq!(
        streams().await - before,
        1.0,
        "every renewal went over one stream"
    );
    drop(a);
}

#[tokio::test]
async fn a_watcher_that_missed_a_compaction_relists_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, proxy, a, b, mut rx) = watcher_behind_a_proxy(dir.path()).await;
    // Disconnect the watcher; change things and compact the history it would resume from.
    proxy.cut();
    let mut raw = etcd.raw().await;
    for i in 10..20 {
        let v = serde_json::json!({"version": 1, "endpoint": ep("h9", &format!("x{i}"), 9)});
        raw.put(
            format!("/detour/test/services/echo/x{i}"),
            v.to_string(),
            None,
        )
        .await
        .unwrap();
    }
    raw.delete("/detour/test/services/echo/x10", None)
        .await
        .unwrap();
    a.deregister(
        &ServiceName::new("echo").unwrap(),
        &InstanceId::new("i1").unwrap(),
    )
    .await
    .unwrap();
    let rev = raw
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    raw.compact(rev, None).await.unwrap();
    assert_eq!(rx.borrow().endpoints.len(), 1, "the watcher is cut off");
    proxy.restore();
    until(&mut rx, "converged after compaction", |s| {
        s.endpoints.len() == 9
            && s.endpoints
                .iter()
                .all(|e| !["x10", "i1"].contains(&e.instance.as_str()))
    })
    .await;
    assert_eq!(b.lists(), 2, "listed at start and after the compaction");
}

#[tokio::test]
async fn a_sidecar_routes_from_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let p = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", p.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let resp = client
        .send(
            &ServiceName::new("hello").unwrap(),
            http::Request::get("/").body(empty()).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        detour_thin_sdk::path_taken(&resp),
        Some(detour_thin_sdk::PathTaken::Mesh)
    );
    assert_eq!(body_text(resp).await, "hello from h2-hello\n");
}

#[tokio::test]
async fn a_burst_of_registrations_right_after_open_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let (_b, mut rx) = echo_watcher("h2", &opts(&etcd.url)).await;
    let a = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    for i in 0..5 {
        a.register(ep("h1", &format!("i{i}"), 10 + i))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    until(&mut rx, "all five", |s| s.endpoints.len() == 5).await;
    let c = EtcdRegistry::open(HostId::new("h3").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let rx2 = c.watch(&ServiceName::new("echo").unwrap()).await.unwrap();
    assert_eq!(
        rx2.borrow().endpoints.len(),
        5,
        "a late client lists all five"
    );
}

#[tokio::test]
async fn a_frozen_member_stalls_neither_writes_nor_watches() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = detour_tests::etcd::EtcdCluster::start(dir.path()).await;
    let all = EtcdOptions {
        endpoints: cluster.urls.clone(),
        prefix: "/detour/test".into(),
        ttl: Duration::from_secs(6),
        request_timeout: Duration::from_secs(1),
        watch_check: Duration::from_secs(1),
        security: Default::default(),
    };
    // Both clients start on member 0, the first listed.
    let watcher = EtcdRegistry::open(HostId::new("w").unwrap(), all.clone())
        .await
        .unwrap();
    let a = EtcdRegistry::open(HostId::new("a").unwrap(), all.clone())
        .await
        .unwrap();
    let echo = ServiceName::new("echo").unwrap();
    let mut rx = watcher.watch(&echo).await.unwrap();
    a.register(ep("a", "a1", 1)).await.unwrap();
    until(&mut rx, "a1 before the freeze", |s| s.endpoints.len() == 1).await;

    cluster.signal(0, nix::sys::signal::Signal::SIGSTOP);
    let b = EtcdRegistry::open(HostId::new("b").unwrap(), opts(&cluster.urls[1]))
        .await
        .unwrap();
    b.register(ep("b", "b1", 2)).await.unwrap();
    a.register(ep("a", "a2", 3)).await.unwrap();
    let ids = |s: &EndpointSet| -> Vec<String> {
        s.endpoints.iter().map(|e| e.instance.to_string()).collect()
    };
    until(&mut rx, "writes during the freeze reach the watcher", |s| {
        ids(s) == ["a1", "a2", "b1"]
    })
    .await;
    cluster.signal(0, nix::sys::signal::Signal::SIGCONT);
}

#[tokio::test]
async fn a_client_following_only_the_gray_rules_writes_its_keys_and_hears_nothing_else() {
    use detour_registry::etcd::Follows;
    use detour_registry::{DocName, DocState};
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).await;
    let full = EtcdRegistry::open(HostId::new("h1").unwrap(), opts(&etcd.url))
        .await
        .unwrap();
    let h2 = HostId::new("h2").unwrap();
    let narrow = EtcdRegistry::open_following(h2, opts(&etcd.url), Follows::GrayRules)
        .await
        .unwrap();
    let echo = ServiceName::new("echo").unwrap();
    let mut everything = full.watch(&echo).await.unwrap();
    let mut nothing = narrow.watch(&echo).await.unwrap();
    let mut rules = narrow.watch_doc(DocName::GrayRules);
    // What the narrow client registers is seen by everyone else.
    narrow.register(ep("h2", "n1", 1)).await.unwrap();
    full.register(ep("h1", "f1", 2)).await.unwrap();
    until(&mut everything, "both instances", |s| {
        s.endpoints.len() == 2
    })
    .await;
    // The rules reach it; the policy document (not followed) stays unknown.
    let mut raw = etcd.raw().await;
    let doc = br#"{"version":1,"rules":[]}"#;
    raw.put("/detour/test/gray/rules", doc.to_vec(), None)
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let DocState::Known(d) = &*rules.borrow_and_update()
                && d.bytes.as_deref() == Some(&doc[..])
            {
                return;
            }
            rules.changed().await.unwrap();
        }
    })
    .await;
    assert!(read.is_ok(), "the rules never reached the narrow client");
    assert_eq!(
        *narrow.watch_doc(DocName::Policy).borrow(),
        DocState::Unknown
    );
    // A host status both write: the full client sees both, the narrow one neither.
    for (client, host) in [(&full, "h1"), (&narrow, "h2")] {
        let status = HostStatus {
            host: HostId::new(host).unwrap(),
            sidecar: SidecarState::Ready,
            version: "t".into(),
            updated_unix_ms: now_unix_ms(),
            watchdog: None,
            metrics: None,
        };
        client.set_host_status(status).await.unwrap();
    }
    let mut hosts = full.watch_hosts();
    tokio::time::timeout(Duration::from_secs(10), hosts.wait_for(|h| h.len() == 2))
        .await
        .unwrap()
        .unwrap();
    // Its view stayed empty: no event of the services or the hosts came to it.
    assert!(nothing.borrow_and_update().endpoints.is_empty());
    assert!(narrow.watch_hosts().borrow().is_empty());
    assert_eq!(narrow.lists(), 1);
}
