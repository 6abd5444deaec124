//! The catalog's disk cache on real sidecar processes with the registry unreachable: a valid
//! cache carries the traffic, a garbage entry is skipped and counted, and a damaged cache file is
//! reported and moved aside without stopping the sidecar.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use detour_kit::provider::DemoProvider;
use detour_proto::{AppProtocol, Endpoint, EndpointSet, HostId, InstanceId, ServiceName};
use detour_registry::cache::DiskCache;
use detour_tests::{Mesh, admin_get, admin_get_json, body_text, metric};
use detour_thin_sdk::body::empty;
use http::Request;

/// A loopback etcd address nothing listens on (bound, then released).
fn dead_etcd() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("etcd:http://{}", l.local_addr().unwrap())
}

#[tokio::test]
async fn a_cache_with_garbage_still_routes_what_it_can_while_the_registry_is_down() {
    let mut mesh = Mesh::new();
    mesh.use_registry(&dead_etcd());
    let p = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "p1")
        .await
        .unwrap();
    let hello = ServiceName::new("hello").unwrap();
    {
        let cache = DiskCache::open(&mesh.root().join("h1").join("catalog.redb")).unwrap();
        let ep = Endpoint::new(
            hello.clone(),
            InstanceId::new("p1").unwrap(),
            HostId::new("h9").unwrap(),
            p.addr(),
        );
        cache.put(&hello, &EndpointSet::known(vec![ep]), 1_000);
        cache.put_raw("broken", b"\x00{not json at all");
        cache.flush();
    }
    mesh.start("h1", "127.0.0.1", &[]).await;
    let admin = mesh.admin("h1");
    let state = admin_get_json(&admin, "/state").await;
    let svc = &state["services"]["hello"];
    assert_eq!(svc["source"], "disk-cache", "{state}");
    assert_eq!(svc["endpoints"].as_array().unwrap().len(), 1, "{svc}");
    assert!(state["services"].get("broken").is_none(), "{state}");
    assert_eq!(
        metric(&admin, "detour_catalog_cache_errors_total", "op=\"parse\"").await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &admin,
            "detour_catalog_from_disk_cache",
            "service=\"hello\""
        )
        .await,
        Some(1.0)
    );
    // The cached endpoint carries a call (no PA: CA goes straight to the provider).
    let client = mesh.client("h1", AppProtocol::Http1);
    let resp = client
        .send(&hello, Request::get("/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(body_text(resp).await, "hello from p1\n");
}

#[tokio::test]
async fn a_damaged_cache_is_reported_moved_aside_and_the_sidecar_serves_without_it() {
    let mut mesh = Mesh::new();
    mesh.use_registry(&dead_etcd());
    // Garbage where the cache file should be.
    let h1 = mesh.root().join("h1");
    std::fs::create_dir_all(&h1).unwrap();
    std::fs::write(h1.join("catalog.redb"), vec![0x42; 256 << 10]).unwrap();
    mesh.start("h1", "127.0.0.1", &[]).await;
    let admin = mesh.admin("h1");
    assert_eq!(admin_get(&admin, "/ready").await.0, 200);
    assert_eq!(
        metric(&admin, "detour_catalog_cache_errors_total", "op=\"open\"").await,
        Some(1.0)
    );
    let log = std::fs::read_to_string(mesh.sidecar("h1").run_dir.join("sidecar.log")).unwrap();
    assert!(log.contains("catalog disk cache damaged"), "{log}");
    assert!(h1.join("catalog.corrupt").exists(), "kept aside for a look");
    // With neither registry nor cache, a call gets a clear answer rather than a hang.
    let hello = ServiceName::new("hello").unwrap();
    let client = mesh.client("h1", AppProtocol::Http1);
    let resp = client
        .send(&hello, Request::get("/").body(empty()).unwrap())
        .await;
    match resp {
        Ok(r) => assert!(r.status().is_server_error(), "{}", r.status()),
        Err(e) => assert!(e.to_string().contains("hello"), "{e}"),
    }
}
