//! Resilience policies on real sidecars: the CA's retry budget caps resends when a provider
//! fails, and the per-endpoint connection cap keeps one client connection with a thousand
//! streams from opening a thousand provider connections.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use detour_proto::AppProtocol;
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer, metric};
use detour_thin_sdk::body::empty;
use detour_watchdog::provider::DemoProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 provider on `ip`: counts connections that carried a request (health checks
/// only connect) and requests; each request is answered
/// after `delay` with 200, or, when `reset` is set, the connection is closed without an answer
/// (the request reached the provider and its outcome is unknown to the caller).
async fn raw_provider(
    ip: &str,
    delay: Duration,
    reset: bool,
) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let (c, r) = (conns.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (c, r) = (c.clone(), r.clone());
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if std::mem::take(&mut first) {
                            c.fetch_add(1, Ordering::Relaxed);
                        }
                        r.fetch_add(1, Ordering::Relaxed);
                        if reset {
                            return;
                        }
                        tokio::time::sleep(delay).await;
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, conns, requests)
}

#[tokio::test]
async fn the_retry_budget_caps_resends_when_a_provider_fails() {
    // Two endpoints: one breaks every connection after reading the request (half of the
    // traffic fails), one answers.
    let (bad, _, bad_seen) = raw_provider("127.0.0.2", Duration::ZERO, true).await;
    let good = DemoProvider::start("127.0.0.3:0".parse().unwrap(), "good")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", bad)])
        .await;
    mesh.start("h3", "127.0.0.3", &[Offer::http1("hello", good.addr())])
        .await;
    let budget = "[retry]\nbudget_ratio = 0.2\nmin_per_second = 1\nwindow_ms = 10000\n";
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
    let seen = bad_seen.load(Ordering::Relaxed);
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
    let (provider, conns, requests) =
        raw_provider("127.0.0.2", Duration::from_millis(40), false).await;
    let mut mesh = Mesh::new();
    let limits = "[limits]\nmax_connections_per_endpoint = 20\n";
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider)],
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
