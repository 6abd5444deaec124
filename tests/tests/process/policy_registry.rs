//! Per-service traffic policy on real sidecars, changed through the registry with
//! `detourctl policy` while they run (no restart): a request timeout (on the directory registry
//! and on a real etcd), a per-try timeout that sends an idempotent request on to a healthy
//! endpoint, an in-flight limit per endpoint, and a PA rate limit.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::atomic::Ordering;
use std::time::Duration;

use detour_proto::AppProtocol;
use detour_tests::raw::{self, RawProvider};
use detour_tests::scenario::hello;
use detour_tests::{
    Mesh, Offer, admin_get_json, body_text, detourctl, dir_registry, metric, wait_value,
};
use detour_thin_sdk::Client;
use detour_thin_sdk::body::empty;

/// `detourctl policy ARGS` on `mesh`'s directory registry; it must succeed.
async fn policy(mesh: &Mesh, args: &[&str]) {
    policy_on(&dir_registry(mesh), args).await;
}

/// `detourctl policy ARGS` on `registry`; it must succeed.
async fn policy_on(registry: &str, args: &[&str]) {
    let mut all = vec!["policy"];
    all.extend_from_slice(args);
    let (code, out, err) = detourctl(registry, &all).await;
    assert_eq!(code, 0, "detourctl {all:?}: {out}{err}");
}

/// Waits until `host`'s sidecar holds `want` as the registry's overrides of `hello`
/// (`Null`: none).
async fn wait_override(mesh: &Mesh, host: &str, want: serde_json::Value) {
    let admin = mesh.admin(host);
    wait_value(
        "the sidecar applies the policy",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move { admin_get_json(&admin, "/state").await["policy_overrides"]["hello"].clone() }
        },
        |v| *v == want,
    )
    .await;
}

/// One GET of `hello`: status, `x-detour-error`, body.
async fn get(client: &Client) -> (u16, String, String) {
    let req = http::Request::get("/").body(empty()).unwrap();
    let resp = client.send(&hello(), req).await.unwrap();
    let status = resp.status().as_u16();
    let error = resp
        .headers()
        .get("x-detour-error")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, error, body_text(resp).await)
}

#[tokio::test]
async fn a_request_timeout_set_in_the_registry_applies_without_a_restart() {
    // The provider answers after 1.5 s; the sidecar's own timeout is 30 s.
    let slow = RawProvider::start("127.0.0.2", Duration::from_millis(1500), |_| {
        raw::ok("slow")
    })
    .await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", slow.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let pid = mesh.sidecar("h1").child.pid();
    assert_eq!(get(&client).await, (200, String::new(), "slow".into()));

    policy(
        &mesh,
        &["set", "--service", "hello", "--request-timeout-ms", "300"],
    )
    .await;
    wait_override(&mesh, "h1", serde_json::json!({"request_timeout_ms": 300})).await;
    let (status, error, _) = get(&client).await;
    assert_eq!((status, error.as_str()), (504, "timeout"));

    // Cleared: the sidecar's own timeout again.
    policy(&mesh, &["clear", "--service", "hello"]).await;
    wait_override(&mesh, "h1", serde_json::Value::Null).await;
    assert_eq!(get(&client).await.0, 200);
    assert_eq!(mesh.sidecar("h1").child.pid(), pid, "no restart");

    // A document that is no policy at all leaves the last good one in force, and is counted.
    policy(
        &mesh,
        &["set", "--service", "hello", "--request-timeout-ms", "300"],
    )
    .await;
    wait_override(&mesh, "h1", serde_json::json!({"request_timeout_ms": 300})).await;
    let file = mesh.root().join("registry/policy/services.json");
    std::fs::write(&file, b"{\"version\": 1, \"services\": [").unwrap();
    let admin = mesh.admin("h1");
    detour_tests::wait_metric(&admin, "detour_policy_invalid_total", "", 1.0).await;
    assert_eq!(get(&client).await.0, 504, "the last good policy stays");
}

#[tokio::test]
async fn a_try_timeout_sends_an_idempotent_request_on_to_a_healthy_endpoint() {
    let slow = RawProvider::start("127.0.0.2", Duration::from_secs(2), |_| raw::ok("slow")).await;
    let fast = RawProvider::start("127.0.0.3", Duration::ZERO, |_| raw::ok("fast")).await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", slow.addr)])
        .await;
    mesh.start("h3", "127.0.0.3", &[Offer::http1("hello", fast.addr)])
        .await;
    // p2c: the slow endpoint keeps its half of the first attempts (peak-ewma passes it over
    // once it has answered slowly), so the try timeouts are the policy's to count.
    mesh.start_with("h1", "127.0.0.1", &[], "[proxy]\nbalance = \"p2c\"\n")
        .await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    policy(
        &mesh,
        &[
            "set",
            "--service",
            "hello",
            "--try-timeout-ms",
            "200",
            "--request-timeout-ms",
            "5000",
        ],
    )
    .await;
    wait_override(
        &mesh,
        "h1",
        serde_json::json!({"request_timeout_ms": 5000, "try_timeout_ms": 200}),
    )
    .await;
    let client = mesh.client("h1", AppProtocol::Http1);
    // `wait_endpoints` touched the service before the policy was in place (and waited for
    // the answer); only what the GETs below bring to the slow endpoint counts.
    let before = slow.requests.load(Ordering::Relaxed);
    let n = 30;
    let mut answers = Vec::new();
    for _ in 0..n {
        answers.push(get(&client).await);
    }
    let tried_slow = slow.requests.load(Ordering::Relaxed) - before;
    let timeouts = metric(&mesh.admin("h1"), "detour_try_timeouts_total", "")
        .await
        .unwrap_or(0.0);
    println!("TRY-TIMEOUT {n} GETs: slow endpoint tried {tried_slow}, try timeouts {timeouts}");
    for a in &answers {
        assert_eq!(*a, (200, String::new(), "fast".into()));
    }
    assert!(tried_slow >= 1, "the slow endpoint was tried");
    assert!(timeouts >= tried_slow as f64, "{timeouts} < {tried_slow}");
}

#[tokio::test]
async fn the_in_flight_limit_per_endpoint_refuses_beyond_it() {
    let provider =
        RawProvider::start("127.0.0.2", Duration::from_millis(500), |_| raw::ok("ok")).await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    policy(
        &mesh,
        &[
            "set",
            "--service",
            "hello",
            "--max-concurrent-per-endpoint",
            "4",
        ],
    )
    .await;
    wait_override(
        &mesh,
        "h1",
        serde_json::json!({"max_concurrent_per_endpoint": 4}),
    )
    .await;
    let before = provider.requests.load(Ordering::Relaxed);
    let client = mesh.client("h1", AppProtocol::Http2);
    let calls = (0..10).map(|_| {
        let client = client.clone();
        async move { get(&client).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let refused = answers
        .iter()
        .filter(|a| a.0 == 503 && a.1 == "overloaded")
        .count();
    let seen = provider.requests.load(Ordering::Relaxed) - before;
    println!("LIMIT 10 at once, limit 4: ok={ok} refused={refused} provider saw {seen}");
    assert_eq!(ok, 4, "{answers:?}");
    assert_eq!(refused, 6, "{answers:?}");
    assert_eq!(seen, 4);
    let counted = metric(&mesh.admin("h1"), "detour_overloaded_total", "")
        .await
        .unwrap_or(0.0);
    assert_eq!(counted, 6.0);
    // The SDK did not take the refusals for a sick sidecar: its link stays on the sidecar.
    assert_eq!(client.link_state(), detour_thin_sdk::LinkState::Primary);
    let (status, _, _) = get(&client).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_rate_limit_set_in_the_registry_holds_at_the_pa() {
    let provider = RawProvider::start("127.0.0.2", Duration::ZERO, |_| raw::ok("ok")).await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    policy(
        &mesh,
        &[
            "set",
            "--service",
            "hello",
            "--rate-limit-rps",
            "5",
            "--rate-limit-burst",
            "5",
        ],
    )
    .await;
    // The PA's sidecar (h2) applies it.
    wait_override(
        &mesh,
        "h2",
        serde_json::json!({"rate_limit_rps": 5, "rate_limit_burst": 5}),
    )
    .await;
    let before = provider.requests.load(Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    let mut answers = Vec::new();
    for _ in 0..40 {
        answers.push(get(&client).await);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let seen = provider.requests.load(Ordering::Relaxed) - before;
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let limited = answers
        .iter()
        .filter(|a| a.0 == 429 && a.1 == "rate-limited")
        .count();
    println!(
        "RATE 40 GETs in {elapsed:.2} s at 5/s burst 5: ok={ok} limited={limited} provider saw {seen}"
    );
    assert_eq!(ok + limited, 40, "{answers:?}");
    let bound = 5.0 + 5.0 * elapsed;
    assert!((seen as f64) <= bound, "{seen} > {bound}");
    assert!(limited >= 1, "the limit refused some");
    assert_eq!(seen as usize, ok);

    // Cleared: no limit again.
    policy(&mesh, &["clear", "--all"]).await;
    wait_override(&mesh, "h2", serde_json::Value::Null).await;
    for _ in 0..20 {
        assert_eq!(get(&client).await.0, 200);
    }
}

#[tokio::test]
async fn a_policy_written_to_etcd_applies_and_a_bad_value_is_refused() {
    let slow = RawProvider::start("127.0.0.2", Duration::from_millis(1500), |_| {
        raw::ok("slow")
    })
    .await;
    let mut mesh = Mesh::new();
    let etcd = detour_tests::etcd::Etcd::start(mesh.root()).await;
    let registry = format!("etcd:{}", etcd.url);
    mesh.use_registry(&registry);
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", slow.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    // A value out of range is refused by detourctl (exit 2) and nothing is written.
    let (code, _, err) = detourctl(
        &registry,
        &[
            "policy",
            "set",
            "--service",
            "hello",
            "--retry-budget-ratio",
            "1.5",
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("retry_budget_ratio"), "{err}");
    policy_on(
        &registry,
        &["set", "--service", "hello", "--request-timeout-ms", "300"],
    )
    .await;
    wait_override(&mesh, "h1", serde_json::json!({"request_timeout_ms": 300})).await;
    let (status, error, _) = get(&client).await;
    assert_eq!((status, error.as_str()), (504, "timeout"));
    policy_on(&registry, &["clear", "--service", "hello"]).await;
    wait_override(&mesh, "h1", serde_json::Value::Null).await;
    assert_eq!(get(&client).await.0, 200);
}
