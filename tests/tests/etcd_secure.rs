//! The etcd registry behind TLS with client certificates and etcd's own authentication: real
//! sidecars register and route through it with the configured CA, certificate and password;
//! a client without the password reads nothing, and a sidecar with a wrong one registers
//! nothing and says why.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_proto::AppProtocol;
use detour_tests::etcd_tls::SecureEtcd;
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer};
use detour_thin_sdk::body::empty;
use detour_watchdog::provider::DemoProvider;

fn registry_section(etcd: &SecureEtcd, password_file: &std::path::Path) -> String {
    format!(
        "[registry_etcd]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nuser = \"root\"\npassword_file = \"{}\"\n",
        etcd.ca.display(),
        etcd.client_cert.display(),
        etcd.client_key.display(),
        password_file.display()
    )
}

#[tokio::test]
async fn sidecars_use_etcd_over_tls_with_a_client_certificate_and_a_password() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "p")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let etcd = SecureEtcd::start(mesh.root(), &mesh.ca).await;
    etcd.enable_auth("s3cret").await;
    let good = mesh.root().join("etcd-password");
    std::fs::write(&good, "s3cret\n").unwrap();
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    let extra = registry_section(&etcd, &good);
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        &extra,
    )
    .await;
    mesh.start_with("h1", "127.0.0.1", &[], &extra).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let req = http::Request::get("/").body(empty()).unwrap();
    let resp = client.send(&hello(), req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-path"], "mesh");

    // The certificate alone is no user: etcd refuses to read.
    let mut anonymous = etcd.client(None).await.unwrap();
    assert!(anonymous.get("/detour", None).await.is_err());
    let mut root = etcd.client(Some(("root", "s3cret"))).await.unwrap();
    let keys = root
        .get(
            "/detour/v1/services/hello/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(keys.kvs().len(), 1, "h2 registered its provider");

    // A wrong password: as with an unreachable etcd, the sidecar serves what it knows, but
    // nothing it registers reaches etcd, and its log says why.
    let bad = mesh.root().join("bad-password");
    std::fs::write(&bad, "wrong\n").unwrap();
    let p3 = DemoProvider::start("127.0.0.3:0".parse().unwrap(), "p3")
        .await
        .unwrap();
    mesh.start_with(
        "h3",
        "127.0.0.3",
        &[Offer::http1("other", p3.addr())],
        &registry_section(&etcd, &bad),
    )
    .await;
    let log = mesh.root().join("h3").join("sidecar.log");
    detour_tests::wait_until("h3 logs the refusal", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("authentication failed"))
    })
    .await;
    let other = root
        .get(
            "/detour/v1/services/other/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(other.kvs().len(), 0, "nothing of h3's reached etcd");
}
