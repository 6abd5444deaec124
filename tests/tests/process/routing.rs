//! Routes by version and label on real sidecars: a header route, a weighted split and a pinned
//! user hold on all three paths (mesh C→CA→PA→P, CA-direct C→CA→P, SDK-direct C→P), set and
//! undone with `detourctl route`; absolute-form requests (what `http_proxy` clients send) are
//! routed by the URI's authority.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::collections::BTreeMap;
use std::time::Duration;

use detour_kit::provider::{DemoProvider, SERVED_BY};
use detour_proto::ServiceName;
use detour_tests::{
    Mesh, admin_get_json, detourctl, dir_registry, ready_sdk, wait_until, wait_value,
};
use detour_thin_sdk::{Client, PathTaken};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[[provide]]` of `hello` at `addr`, version `version`.
fn provide(addr: std::net::SocketAddr, version: &str) -> String {
    format!("[[provide]]\nservice = \"hello\"\naddress = \"{addr}\"\nversion = \"{version}\"\n")
}

const ROUTES: &str = r#"{"subsets":{"v1":{"version":"1"},"v2":{"version":"2"}},
    "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v2"}],
    "default":{"v1":80,"v2":20},
    "hash":{"cookie":"user"}}"#;

/// Who answered `n` GETs with `headers`, and on which paths.
async fn served(
    client: &Client,
    n: usize,
    headers: &[(&str, &str)],
) -> (BTreeMap<String, usize>, BTreeMap<String, usize>) {
    let hello = ServiceName::new("hello").unwrap();
    let mut by = BTreeMap::new();
    let mut paths = BTreeMap::new();
    for _ in 0..n {
        let mut req = http::Request::get("/");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(detour_thin_sdk::body::empty()).unwrap();
        let resp = client.send(&hello, req).await.expect("call answered");
        assert_eq!(resp.status(), 200);
        let who = resp.headers()[SERVED_BY].to_str().unwrap().to_owned();
        let path = match resp.extensions().get::<PathTaken>() {
            Some(PathTaken::Direct) => "direct".to_owned(),
            _ => resp
                .headers()
                .get("x-detour-path")
                .map_or("?".into(), |v| v.to_str().unwrap().to_owned()),
        };
        *by.entry(who).or_default() += 1;
        *paths.entry(path).or_default() += 1;
    }
    (by, paths)
}

/// The header route, the split and the pin, over `client`, every answer on `path`.
async fn routes_hold(client: &Client, path: &str) {
    let (by, paths) = served(client, 30, &[("x-canary", "1")]).await;
    assert_eq!(by.get("h3-hello"), Some(&30), "{path}: canary calls {by:?}");
    assert_eq!(paths.get(path), Some(&30), "{path}: {paths:?}");
    let (by, _) = served(client, 30, &[("cookie", "user=alice")]).await;
    assert_eq!(
        by.len(),
        1,
        "{path}: a pinned user stays on one provider: {by:?}"
    );
    let (by, paths) = served(client, 400, &[]).await;
    let v2 = by.get("h3-hello").copied().unwrap_or(0);
    // 20% of 400 (sd 2 points): within 7 points.
    assert!(
        (52..=108).contains(&v2),
        "{path}: v2 took {v2} of 400 ({by:?})"
    );
    assert_eq!(paths.get(path), Some(&400), "{path}: {paths:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_routes_splits_and_pins_hold_on_the_mesh_ca_direct_and_sdk_direct_paths() {
    let p2 = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let p3 = DemoProvider::start("127.0.0.3:0".parse().unwrap(), "h3-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start_with("h2", "127.0.0.2", &[], &provide(p2.addr(), "1"))
        .await;
    mesh.start_with("h3", "127.0.0.3", &[], &provide(p3.addr(), "2"))
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    let reg = dir_registry(&mesh);
    let (code, out, err) = detourctl(
        &reg,
        &["route", "set", "--service", "hello", "--routes", ROUTES],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let admin = mesh.admin("h1");
    wait_value(
        "h1 applies the routes",
        Duration::from_secs(10),
        || async {
            admin_get_json(&admin, "/state").await["routes"]["hello"]["routes"].is_object()
        },
        |applied| *applied,
    )
    .await;

    // Mesh path: the SDK through h1's sidecar.
    let snapshot = mesh.root().join("sdk-snapshot.json");
    let sdk = ready_sdk(&mesh, "h1", "hello", &snapshot).await;
    let hello = ServiceName::new("hello").unwrap();
    wait_until("the SDK has the routes", Duration::from_secs(10), || {
        sdk.snapshot(&hello).is_some_and(|s| s.routes.is_some())
    })
    .await;
    routes_hold(&sdk, "mesh").await;
    let st = admin_get_json(&admin, "/state").await;
    assert!(
        st["routes"]["hello"]["requests"]["v2"].as_u64().unwrap() >= 30,
        "{st}"
    );

    // CA-direct: the mesh off for the service at h1; a caller without a direct path of its
    // own goes through the CA, which calls the providers straight.
    let (code, out, err) = detourctl(
        &reg,
        &[
            "gray",
            "set",
            "--id",
            "off",
            "--mesh",
            "off",
            "--service",
            "hello",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let plain = Client::builder(mesh.outbound("h1")).control(false).build();
    wait_value(
        "h1 turns the mesh off for hello",
        Duration::from_secs(10),
        || async { served(&plain, 1, &[]).await.1.contains_key("ca-direct") },
        |off| *off,
    )
    .await;
    routes_hold(&plain, "ca-direct").await;
    let (code, out, err) = detourctl(&reg, &["gray", "clear", "--id", "off"]).await;
    assert_eq!(code, 0, "{out}{err}");

    // SDK-direct: h1's sidecar killed; the SDK calls the providers from its snapshot, by the
    // routes it got with it.
    mesh.stop_with("h1", nix::sys::signal::Signal::SIGKILL)
        .await;
    routes_hold(&sdk, "direct").await;

    // Undo: the routes go back to none.
    let (code, out, err) = detourctl(&reg, &["route", "undo"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = detourctl(&reg, &["route", "list"]).await;
    assert_eq!((code, out.as_str()), (0, "no routes\n"));
    let (code, _, err) = detourctl(&reg, &["route", "undo"]).await;
    assert_eq!(code, 0, "undoing the undo puts them back: {err}");
    let (code, _, err) = detourctl(
        &reg,
        &[
            "route",
            "set",
            "--service",
            "hello",
            "--routes",
            r#"{"default":"v9"}"#,
        ],
    )
    .await;
    assert_eq!(code, 2, "a route to an unknown subset is refused: {err}");
    assert!(err.contains("no subset named"), "{err}");
}

#[tokio::test]
async fn absolute_form_requests_are_routed_by_their_authority() {
    let (mesh, _p) = detour_tests::caller_and_provider("").await;
    let addr = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();
    // What curl sends with http_proxy=http://CA.
    let req = b"GET http://hello/x?y=1 HTTP/1.1\r\nHost: hello\r\nProxy-Connection: Keep-Alive\r\nConnection: close\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the CA answers and closes")
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("hello from h2-hello"), "{out}");
}
