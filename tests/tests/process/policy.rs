//! Traffic policy on real sidecars: an endpoint answering server errors in a row is ejected,
//! and returns after its ejection.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_proto::AppProtocol;
use detour_tests::raw::{RawProvider, Reply};
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer, metric};
use detour_thin_sdk::body::empty;

/// A provider that answers every request `500`, keeping connections alive.
async fn failing_provider() -> std::net::SocketAddr {
    let answer =
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nx-served-by: bad\r\n\r\n";
    RawProvider::start("127.0.0.3", Duration::ZERO, |_| {
        Reply::Send(answer.to_vec())
    })
    .await
    .addr
}

#[tokio::test]
async fn an_endpoint_answering_server_errors_is_ejected_and_returns() {
    let good = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "good")
        .await
        .unwrap();
    let bad = failing_provider().await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", good.addr())])
        .await;
    mesh.start("h3", "127.0.0.3", &[Offer::http1("hello", bad)])
        .await;
    mesh.start_with(
        "h1",
        "127.0.0.1",
        &[],
        "[outlier]\nconsecutive_5xx = 5\nbase_ejection_ms = 2000\n",
    )
    .await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let errors = |n: usize| {
        let client = client.clone();
        async move {
            let mut errors = 0;
            for _ in 0..n {
                let req = http::Request::get("/").body(empty()).unwrap();
                let resp = client.send(&hello(), req).await.unwrap();
                if resp.status() == 500 {
                    errors += 1;
                }
            }
            errors
        }
    };
    let first = errors(200).await;
    let ejections = metric(&mesh.admin("h1"), "detour_outlier_ejections_total", "")
        .await
        .unwrap_or(0.0);
    println!("OUTLIER first 200 calls: {first} server errors, {ejections} ejections");
    assert_eq!(ejections, 1.0);
    // Five in a row eject (one of them may have been the request that made h1 watch hello).
    assert!(
        (4..=6).contains(&first),
        "{first} errors: ejected after five in a row"
    );
    // After the ejection (2 s) the endpoint is tried again, and ejected again (for 4 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = errors(200).await;
    let ejections = metric(&mesh.admin("h1"), "detour_outlier_ejections_total", "")
        .await
        .unwrap_or(0.0);
    println!("OUTLIER after the ejection: {second} server errors, {ejections} ejections");
    assert!((5..=6).contains(&second), "{second}");
    assert_eq!(ejections, 2.0);
}

#[tokio::test]
async fn the_pa_rate_limit_holds_and_callers_do_not_take_it_for_a_sick_sidecar() {
    use detour_thin_sdk::{LinkState, MeshErrorKind, mesh_error};
    let p = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "p")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    // 50 requests a second, bursts of 10, for the provider behind h2's PA.
    let mut cfg = mesh.config("h2", "127.0.0.2", &[Offer::http1("hello", p.addr())], "");
    cfg.push_str("rate_limit_rps = 50\nrate_limit_burst = 10\n");
    mesh.start_config("h2", &cfg).await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let before = p.received();
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut other) = (0u32, 0u32, 0u32);
            let end = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < end {
                let req = http::Request::get("/").body(empty()).unwrap();
                let resp = client.send(&hello(), req).await.unwrap();
                match (resp.status().as_u16(), mesh_error(&resp)) {
                    (200, None) => ok += 1,
                    (429, Some(MeshErrorKind::RateLimited)) => limited += 1,
                    _ => other += 1,
                }
            }
            (ok, limited, other)
        }));
    }
    let (mut ok, mut limited, mut other) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.unwrap();
        (ok, limited, other) = (ok + a, limited + b, other + c);
    }
    let secs = started.elapsed().as_secs_f64();
    let seen = p.received() - before;
    let bound = 10.0 + 50.0 * secs;
    println!(
        "RATE {secs:.2} s: ok={ok} limited={limited} other={other}; provider saw {seen} (bound {bound:.0})"
    );
    assert_eq!(other, 0);
    assert!(limited > 0, "the limit never engaged");
    assert!(
        f64::from(seen as u32) <= bound + 1.0,
        "the provider saw {seen} > {bound}"
    );
    assert_eq!(
        u64::from(ok),
        seen,
        "every request the provider saw was answered 200"
    );
    assert_eq!(
        client.link_state(),
        LinkState::Primary,
        "429s are no sign of a sick sidecar"
    );
}
