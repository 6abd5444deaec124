//! Traffic policy on real sidecars: an endpoint answering server errors in a row is ejected,
//! and returns after its ejection.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_proto::AppProtocol;
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer, metric};
use detour_thin_sdk::body::empty;
use detour_watchdog::provider::DemoProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A provider that answers every request `500`, keeping connections alive.
async fn failing_provider() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.3:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
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
                        let answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nx-served-by: bad\r\n\r\n";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
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
