//! What the watchdog tests share: a caller host run by a watchdog with fast supervision, the
//! watchdog's `/state`, and waiting for its next ready sidecar.

use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_kit::watched::{WatchdogProcess, call};
use detour_thin_sdk::{Client, Dial};
use http::Method;

use crate::{Mesh, Offer, wait_value};

/// Fast supervision for tests: probes every 250 ms, hung after 3 missed.
pub const FAST: &str = "[probe]\ninterval_ms = 250\ntimeout_ms = 250\nfail_after = 3\n";

/// A provider host h2 (a plain sidecar) and a caller host h1 run by a watchdog; an SDK on h1
/// with its snapshot of `hello` ready.
pub async fn watched_caller(watchdog_extra: &str) -> (Mesh, DemoProvider, Client) {
    let provider = DemoProvider::start("127.0.0.2:0".parse().expect("an address"), "h2-hello")
        .await
        .expect("the demo provider starts");
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start_watched("h1", "127.0.0.1", &[], "", watchdog_extra, None)
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let client = crate::ready_sdk(&mesh, "h1", "hello", &snap).await;
    (mesh, provider, client)
}

/// The watchdog's `/state` (through its loopback admin port).
pub async fn state(w: &WatchdogProcess) -> serde_json::Value {
    let (status, text) = call(
        &Dial::Tcp(w.admin),
        Method::GET,
        "/state",
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("the watchdog's API answers");
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("/state is JSON")
}

/// Waits until the watchdog runs a ready sidecar other than `old`; returns its pid.
pub async fn new_ready_sidecar(w: &WatchdogProcess, old: u32, within: Duration) -> u32 {
    let s = wait_value(
        "a new ready sidecar",
        within,
        || state(w),
        |s| {
            s["watchdog"]["sidecar_state"] == "ready"
                && s["watchdog"]["sidecar_pid"]
                    .as_u64()
                    .is_some_and(|p| p != u64::from(old))
        },
    )
    .await;
    s["watchdog"]["sidecar_pid"].as_u64().unwrap_or(0) as u32
}
