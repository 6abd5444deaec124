//! The etcd registry behind TLS with client certificates and etcd's own authentication: real
//! sidecars register and route through it with the configured CA, certificate and password;
//! a client without the password reads nothing, and a sidecar with a wrong one registers
//! nothing and says why.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_proto::AppProtocol;
use detour_tests::etcd_tls::SecureEtcd;
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer};
use detour_thin_sdk::body::empty;

fn registry_section(etcd: &SecureEtcd, password_file: &std::path::Path) -> String {
    registry_section_of(etcd, "root", password_file)
}

/// `[registry_etcd]` with the TLS files of `etcd` and `user`'s password file.
fn registry_section_of(etcd: &SecureEtcd, user: &str, password_file: &std::path::Path) -> String {
    format!(
        "[registry_etcd]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nuser = \"{user}\"\npassword_file = \"{}\"\n",
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

/// `detourctl --registry … --etcd-* …` as `user` (TLS files of `etcd`).
fn as_user<'a>(etcd: &'a SecureEtcd, user: &'a str, password_file: &'a str) -> Vec<String> {
    vec![
        "--etcd-ca".into(),
        etcd.ca.display().to_string(),
        "--etcd-cert".into(),
        etcd.client_cert.display().to_string(),
        "--etcd-key".into(),
        etcd.client_key.display().to_string(),
        "--etcd-user".into(),
        user.into(),
        "--etcd-password-file".into(),
        password_file.into(),
    ]
}

async fn ctl(etcd: &SecureEtcd, args: &[&str], cred: &[String]) -> (i32, String, String) {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(cred.iter().map(String::as_str));
    detour_tests::detourctl(&format!("etcd:{}", etcd.url), &all).await
}

#[tokio::test]
async fn a_hosts_credentials_write_only_its_own_keys_and_operators_write_the_rules() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "p")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let etcd = SecureEtcd::start(mesh.root(), &mesh.ca).await;
    etcd.enable_auth("r00t").await;
    let pw = |name: &str, text: &str| {
        let p = mesh.root().join(name);
        std::fs::write(&p, format!("{text}\n")).unwrap();
        p.display().to_string()
    };
    let (root_pw, h1_pw, h2_pw, ops_pw) = (
        pw("root.pw", "r00t"),
        pw("h1.pw", "one"),
        pw("h2.pw", "two"),
        pw("ops.pw", "ops"),
    );
    let root = as_user(&etcd, "root", &root_pw);
    for args in [
        vec![
            "etcd-roles",
            "host",
            "--host",
            "h2",
            "--provide",
            "hello",
            "--password-file",
            &h2_pw,
        ],
        vec![
            "etcd-roles",
            "host",
            "--host",
            "h1",
            "--password-file",
            &h1_pw,
        ],
        vec![
            "etcd-roles",
            "operator",
            "--user",
            "ops",
            "--password-file",
            &ops_pw,
        ],
    ] {
        let (code, out, err) = ctl(&etcd, &args, &root).await;
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    // Each host's sidecar runs with its own user: it registers and routes as before.
    let section =
        |user: &str, password_file: &str| registry_section_of(&etcd, user, password_file.as_ref());
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        &section("detour-host-h2", &h2_pw),
    )
    .await;
    mesh.start_with("h1", "127.0.0.1", &[], &section("detour-host-h1", &h1_pw))
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let req = http::Request::get("/").body(empty()).unwrap();
    let resp = client.send(&hello(), req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-detour-path"], "mesh");

    // h2's credentials: reading is allowed, writing anything but its own keys is not.
    let mut h2 = etcd.client(Some(("detour-host-h2", "two"))).await.unwrap();
    let all = h2
        .get(
            "/detour/v1/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert!(all.kvs().len() >= 3, "h2 reads the registry");
    for key in [
        "/detour/v1/gray/rules",
        "/detour/v1/policy/services",
        "/detour/v1/services/hello/h1-fake",
        "/detour/v1/hosts/h1",
        "/detour/v1/rollback/1",
        "/detour/v1/audit/1",
    ] {
        let e = h2.put(key, "x", None).await.unwrap_err();
        assert!(e.to_string().contains("permission denied"), "{key}: {e}");
    }
    assert!(h2.put("/detour/v1/hosts/h2", "x", None).await.is_ok());
    // ... and through detourctl: a host cannot change the rules, an operator can.
    let gray = [
        "gray",
        "set",
        "--id",
        "off",
        "--mesh",
        "off",
        "--service",
        "hello",
    ];
    let (code, _, err) = ctl(&etcd, &gray, &as_user(&etcd, "detour-host-h2", &h2_pw)).await;
    assert_ne!(code, 0, "a host wrote the gray rules");
    assert!(err.contains("permission denied"), "{err}");
    let (code, out, err) = ctl(&etcd, &gray, &as_user(&etcd, "ops", &ops_pw)).await;
    assert_eq!(code, 0, "{out}{err}");
    // Running it again after the host's providers change replaces the role: the old key is
    // no longer writable.
    let (code, out, err) = ctl(
        &etcd,
        &[
            "etcd-roles",
            "host",
            "--host",
            "h2",
            "--provide",
            "other",
            "--password-file",
            &h2_pw,
        ],
        &root,
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("password replaced"), "{out}");
    let mut h2 = etcd.client(Some(("detour-host-h2", "two"))).await.unwrap();
    assert!(
        h2.put("/detour/v1/services/other/h2-other", "x", None)
            .await
            .is_ok()
    );
    let e = h2
        .put("/detour/v1/services/hello/h2-hello", "x", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("permission denied"), "{e}");
}
