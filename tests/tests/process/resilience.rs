//! Resilience policies on real sidecars: the CA's retry budget caps resends when a provider
//! fails, and the per-endpoint connection cap keeps one client connection with a thousand
//! streams from opening a thousand provider connections; a provider that answers garbage (a
//! 101 nobody asked for) is blamed, not the sidecars in front of it.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::sync::atomic::Ordering;
use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_proto::AppProtocol;
use detour_tests::raw::{self, RawProvider, Reply};
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer, metric};
use detour_thin_sdk::body::empty;

#[tokio::test]
async fn the_retry_budget_caps_resends_when_a_provider_fails() {
    // Two endpoints: one breaks every connection after reading the request (half of the
    // traffic fails), one answers.
    let bad = RawProvider::start("127.0.0.2", Duration::ZERO, |_| Reply::Close).await;
    let good = DemoProvider::start("127.0.0.3:0".parse().unwrap(), "good")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", bad.addr)])
        .await;
    mesh.start("h3", "127.0.0.3", &[Offer::http1("hello", good.addr())])
        .await;
    // p2c: the failing endpoint gets its half of the first attempts (peak-ewma would pass it
    // over after each failure), so the resends are the budget's to count.
    let budget = "[proxy]\nbalance = \"p2c\"\n[retry]\nbudget_ratio = 0.2\nmin_per_second = 1\nwindow_ms = 10000\n";
    mesh.start_with("h1", "127.0.0.1", &[], budget).await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    let admin = mesh.admin("h1");
    let retries_before = metric(&admin, "detour_retries_total", "")
        .await
        .unwrap_or(0.0);
    let client = mesh.client("h1", AppProtocol::Http1);
    let n = 400u32;
    let (mut ok, mut failed) = (0u32, 0u32);
    for _ in 0..n {
        let req = http::Request::get("/").body(empty()).unwrap();
        match client.send(&hello(), req).await {
            Ok(r) if r.status() == 200 => ok += 1,
            _ => failed += 1,
        }
    }
    let retries = metric(&admin, "detour_retries_total", "")
        .await
        .unwrap_or(0.0)
        - retries_before;
    let exhausted = metric(&admin, "detour_retry_budget_exhausted_total", "")
        .await
        .unwrap_or(0.0);
    let seen = bad.requests.load(Ordering::Relaxed);
    println!(
        "BUDGET {n} GETs: ok={ok} failed={failed}; the failing endpoint saw {seen}; resends={retries} refused by the budget={exhausted}"
    );
    // 20% of the requests in the window, plus 1 a second over 10 s (and the requests made
    // while waiting for the endpoints, at most a few, count as requests too).
    let bound = 0.2 * f64::from(n + 10) + 10.0;
    assert!(retries <= bound, "{retries} resends > {bound}");
    assert!(
        retries >= 50.0,
        "resends happen while the budget lasts: {retries}"
    );
    assert!(exhausted >= 1.0, "the budget ran out");
    assert_eq!(
        f64::from(failed),
        exhausted,
        "every failure is a resend the budget refused"
    );
    assert_eq!(ok + failed, n);
}

#[tokio::test]
async fn a_thousand_streams_on_one_connection_open_at_most_the_cap_of_provider_connections() {
    let provider =
        RawProvider::start("127.0.0.2", Duration::from_millis(40), |_| raw::ok("ok")).await;
    let (conns, requests) = (provider.conns.clone(), provider.requests.clone());
    let mut mesh = Mesh::new();
    let limits = "[limits]\nmax_connections_per_endpoint = 20\n";
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr)],
        limits,
    )
    .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let before = conns.load(Ordering::Relaxed);
    // One HTTP/2 connection from the app to its sidecar, a thousand streams at once.
    let client = mesh.client("h1", AppProtocol::Http2);
    let calls = (0..1000).map(|_| {
        let client = client.clone();
        async move {
            let req = http::Request::get("/").body(empty()).unwrap();
            client
                .send(&hello(), req)
                .await
                .map(|r| r.status().as_u16())
        }
    });
    let answers = futures_util::future::join_all(calls).await;
    let ok = answers.iter().filter(|a| matches!(a, Ok(200))).count();
    let opened = conns.load(Ordering::Relaxed);
    println!(
        "CAP 1000 streams: ok={ok}; provider connections {opened} (before {before}), requests {}",
        requests.load(Ordering::Relaxed)
    );
    assert_eq!(
        ok,
        1000,
        "{:?}",
        answers.iter().find(|a| !matches!(a, Ok(200)))
    );
    assert!(
        opened <= 20,
        "{opened} provider connections > the cap of 20"
    );
}

#[tokio::test]
async fn a_provider_that_answers_101_gets_the_blame_and_no_sidecar_does() {
    // A provider that answers every request with a protocol switch nobody asked for.
    let switch =
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
    let bad = RawProvider::start("127.0.0.2", Duration::ZERO, move |_| {
        Reply::Send(switch.to_vec())
    })
    .await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", bad.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", detour_proto::AppProtocol::Http1);
    let admin = mesh.admin("h1");
    for post in [false, true, false, true] {
        let method = if post {
            http::Method::POST
        } else {
            http::Method::GET
        };
        // The provider may have processed it: an unknown outcome, the PA's `upstream-reset`.
        let req = http::Request::builder().method(method).uri("/");
        match client.send(&hello(), req.body(empty()).unwrap()).await {
            Err(detour_thin_sdk::Error::OutcomeUnknown { detail, .. }) => {
                assert!(detail.contains("upstream-reset"), "{detail}")
            }
            other => panic!("expected an unknown outcome, got {other:?}"),
        }
    }
    // Before, the PA's HTTP/2 stream broke on the 101 and the CA took h2's PA for broken.
    let links = metric(&admin, "detour_link_transitions_total", "").await;
    assert_eq!(links.unwrap_or(0.0), 0.0, "the link to h2 stayed on its PA");
    assert_eq!(client.link_state(), detour_thin_sdk::LinkState::Primary);

    // Without h1's sidecar the SDK calls the provider itself: the same answer is an error.
    mesh.stop_with("h1", nix::sys::signal::Signal::SIGTERM)
        .await;
    let req = http::Request::post("/").body(empty()).unwrap();
    match client.send(&hello(), req).await {
        Err(detour_thin_sdk::Error::OutcomeUnknown { detail, .. }) => {
            assert!(detail.contains("101"), "{detail}")
        }
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
}

#[tokio::test]
async fn a_provider_address_that_leads_back_into_the_mesh_is_answered_as_a_loop() {
    // h2 provides `hello` at h1's own CA: every request would go CA → PA → CA → … for ever.
    let mut mesh = Mesh::new();
    mesh.start("h1", "127.0.0.1", &[]).await;
    let ca = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", ca)])
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let req = http::Request::get("/").body(empty()).unwrap();
    let resp = client.send(&hello(), req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::BAD_REQUEST);
    let body = detour_tests::body_text(resp).await;
    assert!(body.contains("forwarding loop"), "{body}");
    assert!(body.contains("passed 16 sidecars"), "{body}");
    // Nothing was taken for sick on the way.
    let links = metric(&mesh.admin("h1"), "detour_link_transitions_total", "").await;
    assert_eq!(links.unwrap_or(0.0), 0.0);
}
