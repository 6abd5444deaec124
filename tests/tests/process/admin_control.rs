//! The admin API, the control stream the SDK subscribes to, configuration errors, and the
//! drain timeout — on real sidecar processes.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;
use tokio::time::Instant;

use detour_kit::provider::DemoProvider;
use detour_kit::sidecar::find_sidecar_binary;
use detour_proto::{AppProtocol, ServiceName, SidecarState};
use detour_tests::{Mesh, admin_get, admin_get_json, caller_and_provider, wait_until};
use detour_thin_sdk::body::empty;
use detour_thin_sdk::{Client, Dial};
use http::Request;

async fn provider_mesh() -> (Mesh, DemoProvider) {
    caller_and_provider("").await
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let (mesh, _p) = provider_mesh().await;
    let admin = mesh.admin("h1");
    assert_eq!(admin_get(&admin, "/live").await.0, 200);
    assert_eq!(admin_get(&admin, "/ready").await.0, 200);
    assert_eq!(admin_get(&admin, "/nope").await.0, 404);

    let state = admin_get_json(&admin, "/state").await;
    assert_eq!(state["host"], "h1");
    assert_eq!(state["state"], "ready");
    assert!(state["version"].is_string());
    assert_eq!(
        state["roles"],
        serde_json::json!(["ca"]),
        "h1 has no providers"
    );
    assert!(state["listeners"]["inbound"].is_string());
    let svc = &state["services"]["hello"];
    assert_eq!(svc["source"], "registry", "{svc}");
    assert_eq!(svc["protected"], false, "{svc}");
    assert!(svc["stale_ms"].is_u64(), "{svc}");
    let eps = state["services"]["hello"]["endpoints"].as_array().unwrap();
    // PA registered its provider with its own inbound address.
    let pa = mesh.sidecar("h2").addrs.inbound.to_string();
    assert_eq!(eps[0]["pa_address"], pa.as_str());
    assert_eq!(eps[0]["instance"], "h2-hello");

    assert_eq!(state["links"]["h2"], "via_pa", "{state}");

    let (status, metrics) = admin_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains("detour_requests_total{direction=\"outbound\",path=\"mesh\",class=\"2xx\"}"),
        "{metrics}"
    );
    let pa_admin = mesh.admin("h2");
    let pa_state = admin_get_json(&pa_admin, "/state").await;
    assert_eq!(pa_state["roles"], serde_json::json!(["ca", "pa"]));
    let (_, pa_metrics) = admin_get(&pa_admin, "/metrics").await;
    assert!(pa_metrics.contains("direction=\"inbound\""), "{pa_metrics}");
}

#[tokio::test]
async fn control_stream_reports_ready_and_snapshots() {
    let (mesh, p) = provider_mesh().await;
    let client = mesh.client("h1", AppProtocol::Http1);
    assert!(
        client.wait_ready(Duration::from_secs(5)).await,
        "sidecar reported ready"
    );
    assert_eq!(client.sidecar_state(), Some(SidecarState::Ready));
    let hello = ServiceName::new("hello").unwrap();
    let resp = client
        .send(&hello, Request::get("/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_until("a snapshot", Duration::from_secs(5), || {
        client.snapshot(&hello).is_some()
    })
    .await;
    let snap = client.snapshot(&hello).unwrap();
    assert_eq!(snap.endpoints.len(), 1);
    assert_eq!(
        snap.endpoints[0].app_address,
        p.addr(),
        "direct path needs the app address"
    );

    // Draining is announced on the stream before the sidecar goes away.
    let mut mesh = mesh;
    let ca = mesh.sidecars.get_mut("h1").unwrap();
    let admin = Client::builder(Dial::Tcp(ca.addrs.admin))
        .control(false)
        .build();
    let localhost = ServiceName::new("localhost").unwrap();
    let post = |auth: Option<String>| {
        let mut r = Request::post("/drain");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.body(empty()).unwrap()
    };
    // Without the run directory's token, or from a page that names another host: refused.
    let resp = admin.send(&localhost, post(None)).await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = admin
        .send(&localhost, post(Some("Bearer wrong".into())))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let token = std::fs::read_to_string(ca.run_dir.join("admin.token")).unwrap();
    let resp = admin
        .send(
            &ServiceName::new("rebound.example").unwrap(),
            post(Some(format!("Bearer {token}"))),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(ca.child.try_wait().unwrap(), None, "still running");
    let resp = admin
        .send(&localhost, post(Some(format!("Bearer {token}"))))
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    wait_until("the drain announced", Duration::from_secs(5), || {
        client.sidecar_state() != Some(SidecarState::Ready)
    })
    .await;
    let exit = ca.child.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(exit.expect("exits after POST /drain").success());
}

#[tokio::test]
async fn drain_is_bounded_by_the_drain_timeout() {
    let (mut mesh, p) = caller_and_provider("[lifecycle]\ndrain_timeout_ms = 500\n").await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let call = tokio::spawn(async move {
        // Not idempotent: when the drain timeout cuts it off, it must not be retried.
        let req = Request::post("/slow?ms=20000").body(empty()).unwrap();
        client.send(&ServiceName::new("hello").unwrap(), req).await
    });
    wait_until(
        "the call reaches the provider",
        Duration::from_secs(10),
        || p.received() > 0,
    )
    .await;
    let ca = mesh.sidecars.get_mut("h1").unwrap();
    let t0 = Instant::now();
    ca.child.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = ca.child.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(exit.is_some(), "sidecar still running 10 s after SIGTERM");
    println!(
        "drain-timeout: exited {:?} after SIGTERM (limit 500 ms)",
        t0.elapsed()
    );
    // The long call could not finish inside the drain window; it fails, it does not hang, and
    // the app is told its outcome is unknown.
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), "outcome_unknown", "{err}");
}

#[test]
fn a_bad_config_is_refused_with_every_problem_listed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "host = \"h1\"\nregistri = \"dir:/tmp/x\"\n[proxy]\nbalance = \"random\"\n[admin]\nlisten = \"nope\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(find_sidecar_binary().unwrap())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["unknown key `registri`", "proxy.balance", "admin.listen"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

#[tokio::test]
async fn a_half_sent_head_on_the_admin_port_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mesh, _p) = caller_and_provider("").await;
    let mut s = tokio::net::TcpStream::connect(mesh.admin_addr("h1"))
        .await
        .unwrap();
    s.write_all(b"GET /state HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = Vec::new();
    // The head-read timeout is 5 s; the connection must be closed well within 20 s.
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "a half-sent head kept the connection open");
    println!(
        "ADMIN half-sent head closed after {} ms",
        started.elapsed().as_millis()
    );
}
