//! Mesh headers are trusted only from the mesh: a provider that sets `x-detour-error` on its
//! answers (as if it were a sidecar) never makes a request run twice, nor moves the caller off
//! the mesh — on the mesh path (C→CA→PA→P), the CA-direct path (C→CA→P) and the direct path.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_proto::ServiceName;
use detour_tests::caller_and_provider;
use detour_thin_sdk::body::full;
use detour_thin_sdk::{Client, LinkState, PathTaken, mesh_error, path_taken};
use nix::sys::signal::Signal;

fn hello() -> ServiceName {
    ServiceName::new("hello").unwrap()
}

/// POSTs `n` requests that make the provider forge `reason`; returns the paths they took.
async fn forged_posts(client: &Client, reason: &str, n: usize) -> Vec<PathTaken> {
    let mut paths = Vec::new();
    for _ in 0..n {
        let req = http::Request::post(format!("/?forge={reason}"))
            .body(full("order"))
            .unwrap();
        let resp = client.send(&hello(), req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            mesh_error(&resp),
            None,
            "a provider's header is no mesh error"
        );
        assert!(
            resp.headers().get("x-detour-error").is_none(),
            "the provider's x-detour-error reached the app: {:?}",
            resp.headers()
        );
        paths.push(path_taken(&resp).unwrap());
    }
    paths
}

#[tokio::test]
async fn a_provider_forging_mesh_errors_gets_each_post_exactly_once() {
    let (mut mesh, provider) = caller_and_provider("").await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let client = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    let before = provider.received();

    for reason in [
        "draining",
        "upstream-connect",
        "no-endpoint",
        "upstream-reset",
    ] {
        let paths = forged_posts(&client, reason, 25).await;
        assert!(
            paths.iter().all(|p| *p == PathTaken::Mesh),
            "{reason}: {paths:?}"
        );
    }
    assert_eq!(
        provider.received() - before,
        100,
        "C→CA→PA→P: each POST once"
    );
    assert_eq!(client.link_state(), LinkState::Primary);

    // Without h2's sidecar the CA goes straight to the provider (C→CA→P).
    mesh.stop_with("h2", Signal::SIGTERM).await;
    let before = provider.received();
    let mut ca_direct = 0;
    for reason in ["draining", "upstream-connect"] {
        let paths = forged_posts(&client, reason, 25).await;
        ca_direct += paths.iter().filter(|p| **p == PathTaken::CaDirect).count();
    }
    assert_eq!(provider.received() - before, 50, "C→CA→P: each POST once");
    assert!(ca_direct > 0, "the CA went straight to the provider");
    assert_eq!(client.link_state(), LinkState::Primary);

    // Without h1's sidecar the SDK calls the provider itself (C→P).
    mesh.stop_with("h1", Signal::SIGTERM).await;
    let before = provider.received();
    for reason in ["draining", "upstream-connect"] {
        let paths = forged_posts(&client, reason, 25).await;
        assert!(paths.iter().all(|p| *p == PathTaken::Direct), "{paths:?}");
    }
    assert_eq!(provider.received() - before, 50, "C→P: each POST once");
    // No second copy of any of them arrives later either.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(provider.received() - before, 50, "no late second copy");
}
