//! What the mesh answers for itself and what it leaves alone: a provider that cannot be
//! reached (502, upstream-connect), a service nobody provides (503, unknown-service), both
//! from the caller's own sidecar; a provider's own 500 passes unmarked; two providers share the
//! load.

use detour_core::failure::PROXY_HEADER;

use super::*;

#[tokio::test(start_paused = true)]
async fn a_provider_that_is_down_gets_502_from_the_callers_sidecar() {
    let mut w = World::new();
    // h2's PA is up, its provider's address refuses.
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    for m in [Method::GET, Method::POST] {
        let resp = w.call(m).await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            MeshErrorKind::from_headers(resp.headers()),
            Some(MeshErrorKind::UpstreamConnect)
        );
        // The PA said its provider could not be reached; the CA tried the provider straight
        // too, then answered for itself.
        assert_eq!(resp.headers()[PROXY_HEADER], "h1");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unknown_service_gets_503_from_the_callers_sidecar() {
    let w = World::one_pa(P::Ok).await;
    let resp = w.call_to("nosuch", Method::GET, &[]).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        MeshErrorKind::from_headers(resp.headers()),
        Some(MeshErrorKind::UnknownService)
    );
    assert_eq!(resp.headers()[PROXY_HEADER], "h1");
    assert_eq!(w.ca_errors.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_providers_own_errors_are_not_marked_as_mesh_errors() {
    let w = World::one_pa(P::Fails).await;
    for m in [Method::GET, Method::POST] {
        let resp = w.call(m.clone()).await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()[PATH_HEADER], "mesh");
        assert!(resp.headers().get(ERROR_HEADER).is_none(), "{resp:?}");
        assert_eq!(w.got("p2", m), 1, "answered once, never retried");
    }
}

#[tokio::test(start_paused = true)]
async fn two_providers_share_the_load() {
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.provider("p3", "10.0.3.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.pa("h3", "10.0.3.9:4143", "10.0.3.1:80").await;
    w.ca();
    for _ in 0..200 {
        let resp = w.call(Method::GET).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[PATH_HEADER], "mesh");
    }
    let (n2, n3) = (w.got("p2", Method::GET), w.got("p3", Method::GET));
    assert_eq!(n2 + n3, 200);
    assert!(n2 >= 40 && n3 >= 40, "uneven split: {n2} / {n3}");
}
