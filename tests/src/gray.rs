//! What the gray-rule tests share: `detourctl` that must succeed, its status, one call's path.

use detour_thin_sdk::{Client, PathTaken, ServiceName};
use serde_json::Value;

use crate::detourctl;

/// Like [`detourctl`], and it must succeed; its stdout.
pub async fn ok(registry: &str, args: &[&str]) -> String {
    let (code, out, err) = detourctl(registry, args).await;
    assert_eq!(code, 0, "detourctl {args:?}: {out}{err}");
    out
}

/// `detourctl status --json`.
pub async fn status(registry: &str) -> Value {
    serde_json::from_str(&ok(registry, &["status", "--json"]).await).expect("status --json is JSON")
}

/// One GET to `service` through `client`: the path it took.
pub async fn path_of(client: &Client, service: &str) -> PathTaken {
    let req = http::Request::get("/")
        .body(detour_thin_sdk::body::empty())
        .expect("a call");
    let resp = client
        .send(&ServiceName::new(service).expect("a call"), req)
        .await
        .expect("a call");
    assert_eq!(resp.status(), 200);
    detour_thin_sdk::path_taken(&resp).expect("a call")
}

/// A gray rule switching `hello` off the mesh on h1.
pub async fn set_h1_off(reg: &str) {
    ok(
        reg,
        &[
            "gray",
            "set",
            "--id",
            "h1-off",
            "--mesh",
            "off",
            "--service",
            "hello",
            "--hosts",
            "h1",
        ],
    )
    .await;
}
