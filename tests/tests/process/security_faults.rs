//! Security that holds when things fail, on real processes: a PA that is not trusted gets no
//! request by any path; a provider on its host's loopback is reached through its PA only; an
//! app's mesh headers never reach a provider; a host cannot take another host's PA address;
//! held admin connections do not get a healthy sidecar killed; a stream longer than the idle
//! timeout arrives whole; the outbound Unix socket serves its group.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use detour_proto::sync::Mutex;
use std::sync::Arc;
use std::time::Duration;

use detour_kit::certs::{Authority, DEFAULT_VALIDITY};
use detour_kit::provider::DemoProvider;
use detour_proto::AppProtocol;
use detour_tests::raw::{self, RawProvider};
use detour_tests::scenario::hello;
use detour_tests::{
    Mesh, Offer, TRUST_DOMAIN, admin_get_json, body_text, detourctl, dir_registry, metric,
    wait_value,
};
use detour_thin_sdk::body::empty;
use detour_thin_sdk::{Client, MeshErrorKind, PathTaken};
use nix::sys::signal::Signal;

/// A plain client of `host`'s CA (no control session: the CA alone decides the path).
fn plain(mesh: &Mesh, host: &str) -> Client {
    Client::builder(mesh.outbound(host))
        .control(false)
        .timeout(Duration::from_secs(10))
        .build()
}

/// One GET of `hello` with `headers`: status, mesh error, path, body.
async fn get(
    client: &Client,
    headers: &[(&str, &str)],
) -> (u16, Option<MeshErrorKind>, Option<PathTaken>, String) {
    let mut req = http::Request::get("/");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match client.send(&hello(), req.body(empty()).unwrap()).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let kind = detour_thin_sdk::mesh_error(&resp);
            let path = detour_thin_sdk::path_taken(&resp);
            (status, kind, path, body_text(resp).await)
        }
        Err(e) => (0, None, None, e.to_string()),
    }
}

#[tokio::test]
async fn a_pa_with_a_certificate_of_another_authority_gets_no_request_by_any_path() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    // h2's sidecar holds a certificate of another CA, for the same trust domain and host name.
    let other = Authority::new(TRUST_DOMAIN).unwrap();
    let dir = mesh.root().join("pki-other").join("h2");
    other.write_host(&dir, "h2", DEFAULT_VALIDITY).unwrap();
    let tls = format!(
        "[tls]\ntrust_domain = \"{TRUST_DOMAIN}\"\ncert = \"{d}/cert.pem\"\nkey = \"{d}/key.pem\"\nbundle = \"{d}/bundle.pem\"\n",
        d = dir.display()
    );
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        &tls,
    )
    .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    let admin = mesh.admin("h1");
    mesh.wait_endpoints("h1", "hello", 1).await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let sdk = Client::builder(mesh.outbound("h1"))
        .app("test")
        .timeout(Duration::from_secs(10))
        .snapshot_file(&snap)
        .build();
    assert!(sdk.wait_ready(Duration::from_secs(10)).await);
    let plain = plain(&mesh, "h1");
    for i in 0..40 {
        let client = if i % 2 == 0 { &sdk } else { &plain };
        let (status, kind, _, body) = get(client, &[]).await;
        assert_eq!(
            (status, kind),
            (502, Some(MeshErrorKind::UntrustedPeer)),
            "call {i}: {body}"
        );
    }
    // A POST too: refused, never sent around the PA.
    let post = http::Request::post("/")
        .body(detour_thin_sdk::body::full("x"))
        .unwrap();
    let resp = sdk.send(&hello(), post).await.unwrap();
    assert_eq!(
        detour_thin_sdk::mesh_error(&resp),
        Some(MeshErrorKind::UntrustedPeer)
    );
    assert_eq!(provider.received(), 0, "no request reached the provider");
    let st = admin_get_json(&admin, "/state").await;
    assert_eq!(st["links"]["h2"], "via_pa", "the link stays: {st}");
    assert!(
        metric(&admin, "detour_untrusted_peer_refusals_total", "")
            .await
            .unwrap_or(0.0)
            >= 41.0
    );
}

#[tokio::test]
async fn a_provider_on_its_hosts_loopback_is_reached_through_its_pa_only() {
    // h2 (127.0.0.2) offers a provider listening on 127.0.0.1: another host's own loopback.
    let (provider, mut mesh) = detour_tests::hello_mesh("127.0.0.1", "h2-hello").await;
    let admin = mesh.admin("h1");
    let st = admin_get_json(&admin, "/state").await;
    assert_eq!(
        st["services"]["hello"]["endpoints"][0]["no_direct"], true,
        "{st}"
    );
    let client = plain(&mesh, "h1");
    assert_eq!(get(&client, &[]).await.2, Some(PathTaken::Mesh));
    // An SDK with the endpoint snapshot, for later.
    let snap = mesh.root().join("sdk-snapshot.json");
    let sdk = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    assert!(
        sdk.snapshot(&hello()).unwrap().endpoints[0].no_direct,
        "the SDK learns it too"
    );
    // A rollback turns the mesh off: a provider reached through its PA only stays on it.
    let registry = dir_registry(&mesh);
    let (code, _, err) = detourctl(&registry, &["rollback", "--service", "hello"]).await;
    assert_eq!(code, 0, "{err}");
    wait_rules(&mesh, "h1", 1).await;
    for _ in 0..5 {
        let (status, _, path, body) = get(&client, &[]).await;
        assert_eq!((status, path), (200, Some(PathTaken::Mesh)), "{body}");
    }
    // h2's sidecar gone: no path skips it, so nothing dials 127.0.0.1 from h1.
    let before = provider.received();
    mesh.stop_with("h2", Signal::SIGKILL).await;
    for _ in 0..5 {
        let (status, kind, _, body) = get(&client, &[]).await;
        assert_eq!(
            (status, kind),
            (502, Some(MeshErrorKind::UpstreamConnect)),
            "{body}"
        );
    }
    // Nor does the SDK once its own sidecar is gone too: it has no path to offer.
    mesh.stop_with("h1", Signal::SIGKILL).await;
    let (status, _, _, text) = get(&sdk, &[]).await;
    assert_eq!(status, 0, "{text}");
    assert!(text.contains("through its host's sidecar only"), "{text}");
    assert_eq!(provider.received(), before, "no direct call reached it");
}

/// Waits until `host` holds `n` gray rules.
async fn wait_rules(mesh: &Mesh, host: &str, n: usize) {
    let admin = mesh.admin(host);
    wait_value(
        "the rules applied",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                admin_get_json(&admin, "/state").await["gray"]["rules"]["rules"]
                    .as_array()
                    .map_or(0, Vec::len)
            }
        },
        |have| *have == n,
    )
    .await;
}

/// A raw provider on `ip` that records the request heads it reads.
async fn recording(ip: &str) -> (RawProvider, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let p = RawProvider::start(ip, Duration::ZERO, move |head| {
        h.lock().push(head.to_owned());
        raw::ok("ok")
    })
    .await;
    (p, heads)
}

fn last_head(heads: &Arc<Mutex<Vec<String>>>) -> String {
    heads.lock().last().cloned().unwrap()
}

#[tokio::test]
async fn mesh_headers_from_an_app_never_reach_a_provider() {
    let (p, heads) = recording("127.0.0.2").await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", p.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let forged = [
        ("x-detour-caller", "spiffe://detour.local/host/admin"),
        ("x-detour-anything", "1"),
    ];
    let client = plain(&mesh, "h1");
    // Over the mesh: the PA sets the caller's verified identity, nothing of the app's.
    let (status, _, path, _) = get(&client, &forged).await;
    assert_eq!((status, path), (200, Some(PathTaken::Mesh)));
    let head = last_head(&heads);
    assert!(
        head.contains("x-detour-caller: spiffe://detour.local/host/h1"),
        "{head}"
    );
    assert!(
        !head.contains("host/admin") && !head.contains("x-detour-anything"),
        "{head}"
    );
    // The mesh's own hop count: the CA's, then the PA's.
    assert!(head.contains("x-detour-hops: 2"), "{head}");
    // An SDK that has its snapshot, for the direct path later.
    let snap = mesh.root().join("sdk-snapshot.json");
    let sdk = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    // Around the PA (mesh off for the service): no mesh header but the CA's hop count.
    let (code, _, err) = detourctl(&dir_registry(&mesh), &["rollback", "--service", "hello"]).await;
    assert_eq!(code, 0, "{err}");
    wait_rules(&mesh, "h1", 1).await;
    let (status, _, path, _) = get(&client, &forged).await;
    assert_eq!((status, path), (200, Some(PathTaken::CaDirect)));
    let head = last_head(&heads);
    let mesh_lines: Vec<&str> = (head.lines())
        .filter(|l| l.to_ascii_lowercase().starts_with("x-detour-"))
        .collect();
    assert_eq!(mesh_lines, ["x-detour-hops: 1"], "{head}");
    // Straight from the SDK (its sidecar gone): none either.
    mesh.stop_with("h1", Signal::SIGKILL).await;
    let (status, _, path, body) = get(&sdk, &forged).await;
    assert_eq!((status, path), (200, Some(PathTaken::Direct)), "{body}");
    let head = last_head(&heads);
    assert!(!head.contains("x-detour-"), "{head}");
}

#[tokio::test]
async fn a_host_cannot_take_another_hosts_pa_address() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let (impostor, impostor_heads) = recording("127.0.0.9").await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    // A registered host h9 claims h2's PA address for an endpoint of its own.
    let pa = mesh.sidecar("h2").addrs.inbound;
    let record = serde_json::json!({
        "format": 1,
        "host": "h9",
        "heartbeat_unix_ms": detour_registry::now_unix_ms(),
        "ttl_ms": 600_000,
        "endpoints": [{
            "service": "hello", "instance": "h9-hello", "host": "h9",
            "app_address": impostor.addr.to_string(), "pa_address": pa.to_string(),
        }],
    });
    std::fs::write(
        mesh.root().join("registry").join("h9.json"),
        record.to_string(),
    )
    .unwrap();
    mesh.wait_endpoints("h1", "hello", 2).await;
    let client = plain(&mesh, "h1");
    for i in 0..30 {
        let (status, _, _, body) = get(&client, &[]).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "hello from h2-hello\n"),
            "call {i}"
        );
    }
    assert!(impostor_heads.lock().is_empty(), "the impostor got nothing");
    let admin = mesh.admin("h1");
    assert!(
        metric(&admin, "detour_pa_address_conflicts_total", "")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
}

/// A provider answering one chunk a second for 10 s (HTTP/1.1, chunked).
async fn slow_streamer(ip: &str) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for i in 0..10 {
                    let chunk = format!("chunk {i}\n");
                    let frame = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                    let _ = s.write_all(frame.as_bytes()).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stream_longer_than_the_idle_timeout_arrives_whole() {
    let streamer = slow_streamer("127.0.0.2").await;
    let mut mesh = Mesh::new();
    let idle = "[limits]\nidle_timeout_ms = 2000\n";
    mesh.start_with("h2", "127.0.0.2", &[Offer::http1("hello", streamer)], idle)
        .await;
    mesh.start_with("h1", "127.0.0.1", &[], idle).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    // The app's connection to its CA is HTTP/2 as well: both idle closes are crossed.
    let client = Client::builder(mesh.outbound("h1"))
        .control(false)
        .protocol(AppProtocol::Http2)
        .timeout(Duration::from_secs(30))
        .build();
    let (status, _, path, body) = get(&client, &[]).await;
    assert_eq!((status, path), (200, Some(PathTaken::Mesh)));
    let want: String = (0..10).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(body, want, "the whole stream arrived");
}

#[tokio::test]
async fn held_admin_connections_do_not_get_a_healthy_sidecar_killed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start_watched(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        "",
        "[probe]\ninterval_ms = 300\ntimeout_ms = 300\nfail_after = 3\n",
        None,
    )
    .await;
    let pid = mesh.watched("h2").sidecar_pid().unwrap();
    let admin = mesh.admin_addr("h2");
    // A local user holds every admin connection slot, with a kept-alive `GET /live` each
    // second, for 10 s (33 probe intervals, 11 times the 3 missed probes that get a sidecar
    // killed).
    let mut holders = Vec::new();
    for _ in 0..80 {
        holders.push(tokio::spawn(async move {
            let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            for _ in 0..10 {
                if s.write_all(b"GET /live HTTP/1.1\r\nhost: localhost\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
        }));
    }
    for h in holders {
        let _ = h.await;
    }
    assert_eq!(
        mesh.watched("h2").sidecar_pid(),
        Some(pid),
        "the watchdog kept the healthy sidecar"
    );
}

#[tokio::test]
async fn the_outbound_unix_socket_serves_its_group() {
    if !nix::unistd::Uid::effective().is_root() {
        println!("skipped: needs root to run a client as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    // The caller, an unprivileged user in group `nogroup`, must reach the socket's directory.
    std::fs::set_permissions(mesh.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    let h1 = mesh.config("h1", "127.0.0.1", &[], "").replace(
        "unix = \"outbound.sock\"\n",
        "unix = \"outbound.sock\"\nunix_group = \"nogroup\"\n",
    );
    mesh.start_config("h1", &h1).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let socket = mesh.root().join("h1").join("outbound.sock");
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-s",
        ])
        .args(["-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
        .arg(&socket)
        .args(["-H", "Host: hello", "http://hello/"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "a member of the socket's group calls through it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The files a member of the group must not read stay closed to it.
    let token = mesh.root().join("h1").join("admin.token");
    let read = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(&token)
        .output()
        .await
        .unwrap();
    assert!(!read.status.success(), "the admin token is not the group's");
}

/// The bytes of a TLS ClientHello (what a stranger flooding a PA sends).
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), "pa.invalid".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

#[tokio::test]
async fn a_flood_of_client_hellos_is_turned_away_before_the_handshake() {
    use tokio::io::AsyncWriteExt;
    let (_provider, mesh) = detour_tests::hello_mesh("127.0.0.2", "h2-hello").await;
    let client = plain(&mesh, "h1");
    assert_eq!(get(&client, &[]).await.0, 200);
    let pa = mesh.sidecar("h2").addrs.inbound;
    let hello = Arc::new(client_hello());
    // 600 ClientHellos from one source address, as fast as they go.
    let mut flood = Vec::new();
    for _ in 0..600 {
        let hello = hello.clone();
        flood.push(tokio::spawn(async move {
            if let Ok(mut s) = tokio::net::TcpStream::connect(pa).await {
                let _ = s.write_all(&hello).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    // The mesh keeps serving meanwhile.
    for _ in 0..20 {
        assert_eq!(get(&client, &[]).await.0, 200);
    }
    for f in flood {
        let _ = f.await;
    }
    let h2 = mesh.admin("h2");
    let refused = metric(
        &h2,
        "detour_tls_handshakes_refused_total",
        "reason=\"source\"",
    )
    .await
    .unwrap_or(0.0);
    assert!(
        refused >= 400.0,
        "one source gets its share only: {refused}"
    );
    assert_eq!(detour_tests::admin_get(&h2, "/live").await.0, 200);
}

#[tokio::test]
async fn one_caller_connection_gets_its_share_of_the_providers() {
    let slow = RawProvider::start("127.0.0.2", Duration::from_millis(300), |_| raw::ok("ok")).await;
    let mut mesh = Mesh::new();
    mesh.start_with(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", slow.addr)],
        "[limits]\nmax_in_flight_per_connection = 20\n",
    )
    .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    // 200 requests at once from one app over one HTTP/2 connection; the CA carries them to the
    // PA on its one connection there.
    let client = Client::builder(mesh.outbound("h1"))
        .control(false)
        .protocol(AppProtocol::Http2)
        .timeout(Duration::from_secs(30))
        .build();
    let before = slow.conns.load(std::sync::atomic::Ordering::Relaxed);
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { get(&c, &[]).await.0 })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    let opened = slow.conns.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        opened <= 20,
        "one caller connection took {opened} provider connections, its share is 20"
    );
}
