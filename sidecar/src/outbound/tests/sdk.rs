//! An app's SDK in front of the CA on the same in-memory network: it goes around a CA that is
//! gone (refusing) or sick (answering with its own errors), calls the providers it knows from
//! its snapshot file, and comes back to the mesh when the CA serves again.

use detour_core::PathTaken;
use detour_thin_sdk::{Client, LinkState, path_taken};

use super::*;

#[tokio::test(start_paused = true)]
async fn an_sdk_goes_around_a_ca_that_is_gone_and_comes_back_when_it_is_served_again() {
    let mut w = World::one_pa(P::Ok).await;
    // The app's SDK, on the same in-memory network: C→CA→PA→P.
    let client = w.app().timeout(Duration::from_secs(5)).build();
    assert!(client.wait_ready(Duration::from_secs(5)).await);
    let resp = client.send(&svc(), app_request(Method::GET)).await.unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    while client.snapshot(&svc()).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The CA gone (its socket refuses): every call goes straight to the provider, once.
    w.net.set(Dial::Unix(CA.into()), Upstream::Refuse);
    let posts = w.got("p2", Method::POST);
    for i in 0..20 {
        let resp = client
            .send(&svc(), app_request(alternating(i)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    }
    assert_eq!(w.got("p2", Method::POST) - posts, 10, "each POST ran once");
    // A CA served again (a new `Outbound`, as after a restart): the link's probes and a new
    // control session bring the calls back to the mesh.
    w.ca();
    let mut paths = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let resp = client.send(&svc(), app_request(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        paths.push(path_taken(&resp));
        if paths.ends_with(&[Some(PathTaken::Mesh); 5]) {
            return;
        }
    }
    panic!("the calls never settled back on the mesh: {paths:?}");
}

/// An SDK for `hello` on `w`'s network that keeps its snapshot in `file`.
fn sdk(w: &World, file: &std::path::Path) -> Client {
    w.app()
        .app("late-app")
        .timeout(Duration::from_secs(20))
        .snapshot_file(file)
        .build()
}

#[tokio::test(start_paused = true)]
async fn an_app_started_while_its_ca_is_down_calls_directly_then_through_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sdk-snapshot.json");
    let mut w = World::one_pa(P::Ok).await;
    // An earlier run of the app left its snapshot file.
    let earlier = sdk(&w, &file);
    assert!(earlier.wait_ready(Duration::from_secs(5)).await);
    let resp = earlier
        .send(&svc(), app_request(Method::GET))
        .await
        .unwrap();
    assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    for _ in 0..100 {
        if file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(file.exists(), "the first run wrote its snapshot file");
    drop(earlier);
    // The CA is down when the app starts; it comes back after 40 calls.
    w.net.set(Dial::Unix(CA.into()), Upstream::Refuse);
    let client = sdk(&w, &file);
    let posts = w.got("p2", Method::POST);
    let mut paths = Vec::new();
    for i in 0..200 {
        if i == 40 {
            w.ca();
        }
        let resp = client
            .send(&svc(), app_request(alternating(i)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "call {i}");
        paths.push(path_taken(&resp).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = paths
        .iter()
        .rposition(|p| *p == PathTaken::Direct)
        .unwrap_or(0)
        + 1;
    println!("late-app: direct for calls 0..{back}, the CA served again from call 40");
    assert!(
        paths[..40].iter().all(|p| *p == PathTaken::Direct),
        "{paths:?}"
    );
    assert!(
        paths[150..].iter().all(|p| *p == PathTaken::Mesh),
        "{paths:?}"
    );
    assert_eq!(w.got("p2", Method::POST) - posts, 100, "each POST ran once");
    assert_eq!(client.link_state(), LinkState::Primary);
    // With neither a CA nor a snapshot, the error names the cause.
    w.net.set(Dial::Unix(CA.into()), Upstream::Refuse);
    let bare = w.app().build();
    let err = bare
        .send(&svc(), app_request(Method::GET))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "no_route", "{err}");
    assert!(
        err.to_string().contains("no endpoint of hello is known"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sick_ca_is_bypassed_while_direct_calls_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sdk-snapshot.json");
    // The CA looks at an empty registry: it answers every call with its own mesh error. The
    // app knows the provider from its snapshot file.
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.ca();
    let endpoint = serde_json::json!({
        "service": "hello", "instance": "h2-hello", "host": "h2",
        "app_address": "10.0.2.1:80", "pa_address": null,
    });
    let snapshot = serde_json::json!({"format": 1, "services": {"hello": [endpoint]}});
    std::fs::write(&file, snapshot.to_string()).unwrap();
    let client = sdk(&w, &file);
    assert!(client.wait_ready(Duration::from_secs(10)).await);
    for i in 0..200 {
        let resp = client
            .send(&svc(), app_request(alternating(i)))
            .await
            .unwrap();
        // The CA's own routing error means the call never reached a provider: it goes direct
        // at once, whatever its method.
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get(ERROR_HEADER).is_none(), "{resp:?}");
        assert_eq!(path_taken(&resp), Some(PathTaken::Direct));
    }
    assert_eq!(w.got("p2", Method::GET) + w.got("p2", Method::POST), 200);
    assert_eq!(
        w.got("p2", Method::POST),
        100,
        "each POST reached the provider once"
    );
    // After a window of such errors the link leaves the sick CA: it stops being asked.
    let asked = w.ca_errors.load(std::sync::atomic::Ordering::Relaxed);
    println!("sick-ca: the CA answered {asked} of 200 calls with its own error");
    assert!(
        (20..=60).contains(&asked),
        "the window trips after about 20 of the CA's own errors: {asked}"
    );
    assert_ne!(client.link_state(), LinkState::Primary);
}

#[tokio::test(start_paused = true)]
async fn a_providers_own_errors_never_move_the_link() {
    let w = World::one_pa(P::Fails).await;
    let client = w.app().build();
    assert!(client.wait_ready(Duration::from_secs(5)).await);
    for _ in 0..60 {
        let resp = client.send(&svc(), app_request(Method::GET)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(path_taken(&resp), Some(PathTaken::Mesh));
    }
    assert_eq!(client.link_state(), LinkState::Primary);
    assert_eq!(w.got("p2", Method::GET), 60);
}

/// GET for even calls, POST for odd ones.
fn alternating(i: usize) -> Method {
    if i.is_multiple_of(2) {
        Method::GET
    } else {
        Method::POST
    }
}
