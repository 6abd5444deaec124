//! Mutual TLS between real sidecars: the PA refuses callers without a certificate of the
//! mesh's trust domain (none, another CA, another trust domain, expired, or plaintext);
//! allow-lists refuse other identities with `denied` and the provider learns the verified
//! caller; certificates rotated under steady load lose no request, and a bad new file is
//! refused while traffic goes on.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use detour_kit::certs::{Authority, Issued};
use detour_kit::provider::DemoProvider;
use detour_proto::{AppProtocol, ServiceName};
use detour_sidecar::tls::verify::PaVerifier;
use detour_tests::raw::{self, RawProvider};
use detour_tests::scenario::{at, counts_line, hello, spawn_load};
use detour_tests::{Mesh, Offer, TRUST_DOMAIN, body_text, metric, wait_metric};
use detour_thin_sdk::body::empty;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS client config trusting `ca`, presenting `cert` (or nothing).
fn client_config(ca: &Authority, cert: Option<&Issued>) -> rustls::ClientConfig {
    let provider = rustls::crypto::ring::default_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.bundle_pem().as_bytes()).unwrap())
        .unwrap();
    let verifier = PaVerifier::new(Arc::new(roots), TRUST_DOMAIN, &provider);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    }
}

/// Sends the PA's ping over TLS with `cfg`; the answer's text, or why there was none. Also
/// returns the certificate the PA presented.
async fn ping_over_tls(
    pa: SocketAddr,
    cfg: rustls::ClientConfig,
) -> (Result<String, String>, Option<Vec<u8>>) {
    let tcp = tokio::net::TcpStream::connect(pa).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::IpAddress(pa.ip().into());
    let mut tls = match connector.connect(name, tcp).await {
        Ok(t) => t,
        Err(e) => return (Err(format!("handshake: {e}")), None),
    };
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    let exchange = async {
        tls.write_all(
            b"GET /detour/ping HTTP/1.1\r\nhost: detour.control\r\nconnection: close\r\n\r\n",
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        tls.read_to_end(&mut out)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(String::from_utf8_lossy(&out).into_owned())
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()));
    (answer, presented)
}

fn answered_ok(r: &Result<String, String>) -> bool {
    r.as_ref().is_ok_and(|t| t.starts_with("HTTP/1.1 200"))
}

#[tokio::test]
async fn the_pa_refuses_callers_without_a_certificate_of_the_trust_domain() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "p")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    let pa = mesh.sidecar("h2").addrs.inbound;
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    // A certificate of the mesh's CA and trust domain is answered.
    let good = mesh.ca.issue_host("h9", Duration::from_secs(3600)).unwrap();
    let (answer, _) = ping_over_tls(pa, client_config(&mesh.ca, Some(&good))).await;
    assert!(answered_ok(&answer), "{answer:?}");

    let other_ca = Authority::new(TRUST_DOMAIN).unwrap();
    let cases = [
        ("no certificate", None),
        (
            "another CA",
            Some(
                other_ca
                    .issue_host("h9", Duration::from_secs(3600))
                    .unwrap(),
            ),
        ),
        (
            "another trust domain",
            Some(
                mesh.ca
                    .issue("spiffe://elsewhere.example/host/h9", now - day, now + day)
                    .unwrap(),
            ),
        ),
        (
            "expired",
            Some(
                mesh.ca
                    .issue(
                        &format!("spiffe://{TRUST_DOMAIN}/host/h9"),
                        now - 3 * day,
                        now - day,
                    )
                    .unwrap(),
            ),
        ),
    ];
    for (what, cert) in &cases {
        let (answer, _) = ping_over_tls(pa, client_config(&mesh.ca, cert.as_ref())).await;
        assert!(!answered_ok(&answer), "{what}: {answer:?}");
        if let Ok(text) = &answer {
            assert!(!text.contains("HTTP/1.1"), "{what}: {text}");
        }
    }

    // Plaintext gets no HTTP answer either.
    let mut plain = tokio::net::TcpStream::connect(pa).await.unwrap();
    plain
        .write_all(b"GET /detour/ping HTTP/1.1\r\nhost: detour.control\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("HTTP/1.1"),
        "{out:?}"
    );

    // Counted once the handshake ended on the PA's handshake thread, which may be just after
    // the caller saw its connection closed.
    let admin = mesh.admin("h2");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut failures;
    loop {
        failures = metric(&admin, "detour_tls_handshake_failures_total", "inbound")
            .await
            .unwrap_or(0.0);
        if failures >= 5.0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failures >= 5.0, "handshake failures counted: {failures}");
}

/// A provider that answers every request with the `x-detour-caller` it received (or `none`).
async fn caller_echo() -> SocketAddr {
    let echo = |head: &str| {
        let callers: Vec<&str> = head
            .lines()
            .filter_map(|l| l.strip_prefix("x-detour-caller:"))
            .map(str::trim)
            .collect();
        raw::ok(&if callers.is_empty() {
            "none".to_owned()
        } else {
            callers.join(",")
        })
    };
    RawProvider::start("127.0.0.2", Duration::ZERO, echo)
        .await
        .addr
}

#[tokio::test]
async fn allow_lists_refuse_other_callers_and_the_provider_learns_who_called() {
    let echo = caller_echo().await;
    let mut mesh = Mesh::new();
    let extra = format!(
        "[[provide]]\nservice = \"who\"\naddress = \"{echo}\"\ninstance = \"h2-who\"\nallow = [\"spiffe://{TRUST_DOMAIN}/host/h3\"]\n"
    );
    mesh.start_with("h2", "127.0.0.2", &[Offer::http1("hello", echo)], &extra)
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.start("h3", "127.0.0.3", &[]).await;
    for h in ["h1", "h3"] {
        mesh.wait_endpoints(h, "who", 1).await;
        mesh.wait_endpoints(h, "hello", 1).await;
    }
    let who = ServiceName::new("who").unwrap();
    let call = |host: &'static str, service: ServiceName, forged: bool| {
        let client = mesh.client(host, AppProtocol::Http1);
        async move {
            let mut req = http::Request::get("/").body(empty()).unwrap();
            if forged {
                req.headers_mut().insert(
                    "x-detour-caller",
                    http::HeaderValue::from_static("spiffe://detour.local/host/admin"),
                );
            }
            let resp = client.send(&service, req).await.unwrap();
            let status = resp.status().as_u16();
            let error = resp
                .headers()
                .get("x-detour-error")
                .map(|v| v.to_str().unwrap().to_owned());
            let path = resp
                .headers()
                .get("x-detour-path")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, error, path, body_text(resp).await)
        }
    };

    // (Waiting for the endpoints sent requests too.)
    let denied_before = metric(&mesh.admin("h2"), "detour_denied_total", "who")
        .await
        .unwrap_or(0.0);
    // h1 is not on the list: refused at the PA, not sent anywhere else.
    let (status, error, _, _) = call("h1", who.clone(), false).await;
    assert_eq!(status, 403);
    assert_eq!(error.as_deref(), Some("denied"));
    // h3 is: the provider is told who called, whatever the caller claimed.
    let (status, _, path, body) = call("h3", who.clone(), true).await;
    assert_eq!((status, path.as_deref()), (200, Some("mesh")), "{body}");
    assert_eq!(body, format!("spiffe://{TRUST_DOMAIN}/host/h3"));
    // A service with no list takes every sidecar of the trust domain.
    let (status, _, _, body) = call("h1", hello(), true).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!("spiffe://{TRUST_DOMAIN}/host/h1"));

    let denied = metric(&mesh.admin("h2"), "detour_denied_total", "who")
        .await
        .unwrap_or(0.0);
    assert_eq!(denied - denied_before, 1.0);
    // The CA did not take the refusal for a sick PA.
    let (status, error, _, _) = call("h1", who, false).await;
    assert_eq!((status, error.as_deref()), (403, Some("denied")));
}

#[tokio::test]
async fn certificates_rotated_under_load_lose_no_request() {
    let (_provider, mesh) = detour_tests::hello_mesh("127.0.0.2", "p").await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let start = tokio::time::Instant::now();
    let load = spawn_load(&client, 200, 8);

    at(start, 3.0).await;
    for host in ["h1", "h2"] {
        mesh.ca
            .write_host(&mesh.pki_dir(host), host, Duration::from_secs(7200))
            .unwrap();
    }
    for host in ["h1", "h2"] {
        let admin = mesh.admin(host);
        wait_metric(&admin, "detour_tls_reloads_total", "ok", 1.0).await;
    }
    let stats = load.await.unwrap();
    let line = counts_line("mtls", "rotation", &stats);
    assert_eq!(stats.failed, 0, "{line}");
    assert_eq!(stats.sent, stats.ok, "{line}");
    assert_eq!(
        stats.paths.get("mesh").copied().unwrap_or(0),
        stats.ok,
        "every answer over the mesh: {line}"
    );

    // New connections get the new certificate.
    let pa = mesh.sidecar("h2").addrs.inbound;
    let me = mesh.ca.issue_host("h9", Duration::from_secs(3600)).unwrap();
    let (answer, presented) = ping_over_tls(pa, client_config(&mesh.ca, Some(&me))).await;
    assert!(answered_ok(&answer), "{answer:?}");
    let now_on_disk = std::fs::read(mesh.pki_dir("h2").join("cert.pem")).unwrap();
    let expected = CertificateDer::from_pem_slice(&now_on_disk)
        .unwrap()
        .to_vec();
    assert_eq!(
        presented,
        Some(expected),
        "the PA presents the rotated certificate"
    );

    // A broken new file is refused; the current material stays in use.
    std::fs::write(mesh.pki_dir("h2").join("cert.pem"), b"not a certificate").unwrap();
    wait_metric(&mesh.admin("h2"), "detour_tls_reloads_total", "error", 1.0).await;
    let (answer, _) = ping_over_tls(pa, client_config(&mesh.ca, Some(&me))).await;
    assert!(answered_ok(&answer), "{answer:?}");
    let req = http::Request::get("/").body(empty()).unwrap();
    let resp = client.send(&hello(), req).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_sidecar_without_its_certificate_refuses_to_start_and_says_why() {
    let mesh = Mesh::new();
    let cfg = mesh.config(
        "h1",
        "127.0.0.1",
        &[],
        &format!(
            "[tls]\ncert = \"{0}/missing/cert.pem\"\nkey = \"{0}/missing/key.pem\"\nbundle = \"{0}/missing/bundle.pem\"\n",
            mesh.root().display()
        ),
    );
    let path = mesh.root().join("h1.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = tokio::process::Command::new(mesh.sidecar_binary())
        .arg("--config")
        .arg(&path)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mutual TLS")
            && stderr.contains("plaintext")
            && stderr.contains("missing/cert.pem"),
        "{stderr}"
    );
}
