//! The mesh path end to end on real processes: C→CA→PA→P over HTTP/1.1, HTTP/2 and gRPC,
//! bad input, streaming, drain. Load sharing and the mesh's own errors (no provider, no
//! service, a provider's 500 left unmarked) are tested in process
//! (`sidecar/src/outbound/tests/errors.rs`).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use bytes::Bytes;
use detour_kit::provider::SERVED_BY;
use detour_proto::{AppProtocol, ERROR_HEADER, ServiceName};
use detour_tests::grpc::GrpcProvider;
use detour_tests::grpc::pb::echo_client::EchoClient;
use detour_tests::grpc::pb::{CountRequest, EchoRequest};
use detour_tests::{Mesh, Offer, body_text, caller_and_provider, wait_until};
use detour_thin_sdk::body::{empty, full};
use detour_thin_sdk::{Client, MeshErrorKind, mesh_error};
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn svc(name: &str) -> ServiceName {
    ServiceName::new(name).unwrap()
}

async fn get(
    client: &Client,
    service: &str,
    path: &str,
) -> http::Response<detour_thin_sdk::BoxBody> {
    let req = Request::get(path).body(empty()).unwrap();
    client.send(&svc(service), req).await.unwrap()
}

#[tokio::test]
async fn http1_get_and_post_cross_the_mesh() {
    let (mesh, provider) = caller_and_provider("").await;
    for client in [
        mesh.client("h1", AppProtocol::Http1),
        mesh.tcp_client("h1", AppProtocol::Http1),
    ] {
        let resp = get(&client, "hello", "/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[SERVED_BY], "h2-hello");
        assert_eq!(body_text(resp).await, "hello from h2-hello\n");

        let req = Request::post("/upload")
            .body(full(vec![7u8; 100_000]))
            .unwrap();
        let resp = client.send(&svc("hello"), req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body_text(resp).await, "100000\n");
    }
    assert!(provider.served() >= 4);
}

#[tokio::test]
async fn http2_callers_cross_the_mesh() {
    let (mesh, _provider) = caller_and_provider("").await;
    for client in [
        mesh.client("h1", AppProtocol::Http2),
        mesh.tcp_client("h1", AppProtocol::Http2),
    ] {
        let resp = get(&client, "hello", "/x?y=1").await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(body_text(resp).await, "hello from h2-hello\n");
        let req = Request::post("/").body(full(vec![1u8; 5000])).unwrap();
        let resp = client.send(&svc("hello"), req).await.unwrap();
        assert_eq!(body_text(resp).await, "5000\n");
    }
}

/// The soak's load (`detourctl load --method SOAK`) crosses the mesh whole: GET, POST, gRPC
/// calls through the SDK's gRPC channel (checked by their `grpc-status`) and 2-second streams
/// (checked chunk by chunk), from an HTTP/1.1 and an HTTP/2 caller.
#[tokio::test]
async fn the_soak_mix_crosses_the_mesh_whole() {
    use detour_kit::load::{self, LoadSpec, MethodMix, Target};
    let (mesh, _provider) = caller_and_provider("").await;
    for protocol in [AppProtocol::Http1, AppProtocol::Http2] {
        let spec = LoadSpec {
            methods: MethodMix::Soak,
            ..detour_tests::scenario::spec(100, 3)
        };
        let client = mesh.client("h1", protocol);
        let stats = load::run(
            &spec,
            &Target::Sdk(client),
            |_, _| {},
            std::future::pending(),
        )
        .await;
        assert_eq!(
            (stats.sent, stats.ok),
            (300, 300),
            "{protocol:?}: {}",
            stats.failure_line()
        );
        assert_eq!(
            (stats.grpc, stats.streams),
            (30, 15),
            "{}",
            stats.kinds_line()
        );
        assert_eq!(stats.paths.get("mesh"), Some(&300));
    }
}

#[tokio::test]
async fn grpc_unary_and_streaming_calls() {
    let grpc = GrpcProvider::start("127.0.0.2", "h2-echo").await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::grpc("echo", grpc.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "echo", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let mut echo = EchoClient::new(client.grpc(svc("echo")));

    let reply = echo
        .say(EchoRequest { text: "hi".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "hi");
    assert_eq!(reply.served_by, "h2-echo");

    let mut stream = echo
        .count(CountRequest { n: 50 })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(item) = stream.message().await.unwrap() {
        got.push(item.text.parse::<u32>().unwrap());
    }
    assert_eq!(got, (1..=50).collect::<Vec<_>>());

    // A gRPC call to a service nobody provides gets a gRPC status, not an HTTP error.
    let mut nowhere = EchoClient::new(client.grpc(svc("nowhere")));
    let status = nowhere
        .say(EchoRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert_eq!(
        status.metadata().get(ERROR_HEADER).unwrap(),
        "unknown-service"
    );
}

#[tokio::test]
async fn names_from_the_network_that_no_service_has_leave_no_state() {
    let (mesh, _p) = caller_and_provider("").await;
    let client = mesh.client("h1", AppProtocol::Http1);
    assert_eq!(get(&client, "hello", "/").await.status(), StatusCode::OK);
    let admin = mesh.admin("h1");
    let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
    let (_, before) = detour_tests::admin_get(&admin, "/metrics").await;
    let pid = mesh.sidecar("h1").child.pid();
    let rss_before = detour_tests::rss_kib(pid);
    let n = 5_000;
    for i in 0..n {
        let resp = get(&client, &format!("nosuch-{i}"), "/").await;
        assert_eq!(mesh_error(&resp), Some(MeshErrorKind::UnknownService));
    }
    let rss_after = detour_tests::rss_kib(pid);
    let (_, after) = detour_tests::admin_get(&admin, "/metrics").await;
    let state = detour_tests::admin_get_json(&admin, "/state").await;
    let slots = state["services"].as_object().map_or(0, |m| m.len());
    println!(
        "UNKNOWN {n} names: catalog slots {slots}, metric samples {} -> {}, RSS {rss_before} -> {rss_after} KiB",
        series(&before),
        series(&after)
    );
    assert_eq!(
        slots, 1,
        "only hello has a catalog slot: {}",
        state["services"]
    );
    // A handful of new samples (the counter of unknown lookups, the error classes), not one
    // per name.
    assert!(
        series(&after) < series(&before) + 20,
        "{} -> {}",
        series(&before),
        series(&after)
    );
    // Before, each name kept a slot, a feeder task and a cache entry: 29 MB for 5,000 names.
    assert!(
        rss_after < rss_before + 10 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("sidecar answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes`, shuts the sending side down (as `shutdown(SHUT_WR)`), and reads the answer
/// to its end.
async fn half_closed_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("sidecar answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_caller_that_half_closes_after_its_request_gets_the_answer() {
    let (mesh, _p) = caller_and_provider("").await;
    let addr = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();
    // RFC 9112, 9.6: a half-closed connection does not mean the caller lost interest.
    let requests: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nhost:hello\r\ncontent-length: 5\r\n\r\nhello",
        b"GET / HTTP/1.0\r\nhost: hello\r\n\r\n",
    ];
    for req in requests {
        let out = half_closed_exchange(addr, req).await;
        assert!(
            out.starts_with("HTTP/1.") && out.contains(" 200 OK"),
            "{out}"
        );
        assert!(out.contains("x-detour-path: mesh"), "{out}");
    }
    // Two requests, then the half-close: both answered, in order.
    let two = b"GET /a HTTP/1.1\r\nhost: hello\r\n\r\nGET /b HTTP/1.1\r\nhost: hello\r\n\r\n";
    let out = half_closed_exchange(addr, two).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    // Garbage, half-closed, gets its 400 as before.
    let out = half_closed_exchange(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_clear_errors_and_break_nothing() {
    let (mesh, _p) = caller_and_provider("").await;
    let addr = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();

    let out = raw_exchange(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-detour-error: malformed-request"), "{out}");

    let big = format!(
        "GET / HTTP/1.1\r\nhost: hello\r\nx-big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let out = raw_exchange(addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(out.contains("x-detour-error: header-too-large"), "{out}");

    let out = raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nhost: bad name!\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-detour-error: malformed-request"), "{out}");

    // Two Host headers: proxies that picked different ones would route it two ways.
    for order in ["hello\r\nhost: nosuch", "nosuch\r\nhost: hello"] {
        let req = format!("GET / HTTP/1.1\r\nhost: {order}\r\nconnection: close\r\n\r\n");
        let out = raw_exchange(addr, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains("more than one Host header"), "{out}");
    }

    // A later request on a kept-alive connection with an oversized head: 431 from the proxy.
    let client = mesh.client("h1", AppProtocol::Http1);
    assert_eq!(get(&client, "hello", "/").await.status(), StatusCode::OK);
    let req = Request::get("/")
        .header("x-big", "b".repeat(20_000))
        .body(empty())
        .unwrap();
    let resp = client.send(&svc("hello"), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(mesh_error(&resp), Some(MeshErrorKind::HeaderTooLarge));

    // Everything still works afterwards.
    let resp = get(&client, "hello", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(&mesh.client("h1", AppProtocol::Http2), "hello", "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_caller_whose_body_breaks_or_who_asks_for_a_tunnel_is_answered_and_nothing_is_blamed() {
    let (mesh, provider) = caller_and_provider("").await;
    let addr = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();
    let client = mesh.client("h1", AppProtocol::Http1);
    assert_eq!(get(&client, "hello", "/").await.status(), StatusCode::OK);
    let admin = mesh.admin("h1");
    let blamed = || async {
        let links = detour_tests::metric(&admin, "detour_link_transitions_total", "").await;
        let ejected = detour_tests::metric(&admin, "detour_outlier_ejections_total", "").await;
        (links.unwrap_or(0.0), ejected.unwrap_or(0.0))
    };
    assert_eq!(blamed().await, (0.0, 0.0));

    // A chunked body whose framing breaks: it streams (its size is unknown), so it is found
    // broken only once on its way to the PA. Before, the PA took the blame (the link to h2
    // went straight to the provider).
    let out = raw_exchange(
        addr,
        b"POST / HTTP/1.1\r\nhost: hello\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-detour-error: malformed-request"), "{out}");
    assert!(out.contains("reading the request body"), "{out}");

    // A caller that stops sending in the middle of a large upload (it streams: over 64 KiB)
    // and waits for the answer.
    let head = b"POST /upload HTTP/1.1\r\nhost: hello\r\ncontent-length: 1000000\r\n\r\n";
    let mut partial = head.to_vec();
    partial.extend_from_slice(&[0x5a; 200_000]);
    let out = half_closed_exchange(addr, &partial).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("reading the request body"), "{out}");

    // A tunnel is no request to route.
    let out = raw_exchange(
        addr,
        b"CONNECT hello:80 HTTP/1.1\r\nhost: hello:80\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("CONNECT is not supported"), "{out}");

    // The SDK, over HTTP/1.1 and HTTP/2: the app's own body breaks on its way through the
    // sidecar (over HTTP/2 the CA sees the stream reset).
    let h2 = mesh.client("h1", AppProtocol::Http2);
    for c in [&client, &h2] {
        let frames = futures_util::stream::iter([
            Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
            Err(std::io::Error::other("the upload source broke")),
        ]);
        let req = Request::post("/upload")
            .body(http_body_util::StreamBody::new(frames))
            .unwrap();
        match c.send(&svc("hello"), req).await {
            Err(detour_thin_sdk::Error::InvalidRequest(why)) => {
                assert!(why.contains("the upload source broke"), "{why}")
            }
            other => panic!("expected the app's own body error, got {other:?}"),
        }
        assert_eq!(c.link_state(), detour_thin_sdk::LinkState::Primary);
    }

    // Nothing was blamed: no link left the mesh path, no endpoint was ejected, and the next
    // requests go the way they went before.
    assert_eq!(blamed().await, (0.0, 0.0));
    let before = provider.received();
    for _ in 0..5 {
        let resp = get(&client, "hello", "/").await;
        assert_eq!(resp.status(), StatusCode::OK);
        let path = detour_thin_sdk::path_taken(&resp);
        assert_eq!(path, Some(detour_thin_sdk::PathTaken::Mesh));
    }
    assert_eq!(provider.received() - before, 5);
}

#[tokio::test]
async fn a_256_mib_upload_streams_without_growing_the_sidecars() {
    const TOTAL: u64 = 256 << 20;
    const CHUNK: usize = 1 << 20;
    let (mesh, _p) = caller_and_provider("").await;
    let ca = mesh.sidecar("h1").child.pid();
    let pa = mesh.sidecar("h2").child.pid();
    let (ca_before, pa_before) = (
        detour_tests::peak_rss_kib(ca),
        detour_tests::peak_rss_kib(pa),
    );
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    let frames = futures_util::stream::iter(
        (0..(TOTAL as usize / CHUNK))
            .map(move |_| Ok::<_, std::io::Error>(http_body::Frame::data(chunk.clone()))),
    );
    let body = http_body_util::StreamBody::new(frames);
    let req = Request::post("/upload").body(body).unwrap();
    let resp = mesh
        .client("h1", AppProtocol::Http1)
        .send(&svc("hello"), req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, format!("{TOTAL}\n"));
    let (ca_after, pa_after) = (
        detour_tests::peak_rss_kib(ca),
        detour_tests::peak_rss_kib(pa),
    );
    let (ca_growth, pa_growth) = (ca_after - ca_before, pa_after - pa_before);
    println!(
        "upload-256MiB: ca_peak_rss_kib before={ca_before} after={ca_after} growth={ca_growth}; \
         pa_peak_rss_kib before={pa_before} after={pa_after} growth={pa_growth}"
    );
    // Streaming holds at most flow-control windows in memory, nowhere near the body size.
    assert!(ca_growth < 64 * 1024, "CA peak RSS grew {ca_growth} KiB");
    assert!(pa_growth < 64 * 1024, "PA peak RSS grew {pa_growth} KiB");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_before_exit() {
    let (mut mesh, provider) = caller_and_provider("").await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let h2client = mesh.client("h1", AppProtocol::Http2);
    let before = provider.received();
    let mut calls = Vec::new();
    for i in 0..20 {
        let c = if i % 2 == 0 {
            client.clone()
        } else {
            h2client.clone()
        };
        let method = if i % 4 < 2 { "GET" } else { "POST" };
        calls.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(method)
                .uri("/slow?ms=1500")
                .body(full("x"))
                .unwrap();
            let resp = c.send(&svc("hello"), req).await?;
            let status = resp.status();
            body_text(resp).await;
            Ok::<_, detour_thin_sdk::Error>(status)
        }));
    }
    // Wait until every call reached the provider: they are all in flight.
    wait_until(
        "every call reaches the provider",
        Duration::from_secs(10),
        || provider.received() - before >= 20,
    )
    .await;
    let ca = mesh.sidecars.get_mut("h1").unwrap();
    ca.child.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    for call in calls {
        let status = call
            .await
            .unwrap()
            .expect("in-flight request survives the drain");
        assert_eq!(status, StatusCode::OK);
    }
    let exit = ca.child.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert!(exit.expect("sidecar exits after draining").success());
    let unix = ca.addrs.outbound_unix.clone().unwrap();
    assert!(!unix.exists(), "the Unix socket is removed on exit");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (mesh, _p) = caller_and_provider("[limits]\nidle_timeout_ms = 1000\n").await;
    let addr = mesh.sidecar("h1").addrs.outbound_tcp.unwrap();
    // HTTP/2: the preface and empty SETTINGS, then nothing.
    let mut h2 = tokio::net::TcpStream::connect(addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // HTTP/1.1: one request answered, then the kept-alive connection left idle.
    let mut h1 = tokio::net::TcpStream::connect(addr).await.unwrap();
    h1.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for (name, s) in [("h2", &mut h2), ("h1", &mut h1)] {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the idle {name} connection is still open");
        println!(
            "IDLE {name} closed after {} ms",
            started.elapsed().as_millis()
        );
    }
}

#[tokio::test]
async fn the_outbound_unix_socket_is_group_writable_for_the_configured_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut mesh = detour_tests::Mesh::new();
    let cfg = mesh.config("h1", "127.0.0.1", &[], "").replace(
        "unix = \"outbound.sock\"",
        "unix = \"outbound.sock\"\nunix_group = \"4321\"",
    );
    mesh.start_config("h1", &cfg).await;
    let unix = mesh.sidecar("h1").addrs.outbound_unix.clone().unwrap();
    let meta = std::fs::metadata(&unix).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 4321);
    let run_dir = std::fs::metadata(mesh.root().join("h1")).unwrap();
    assert_eq!(run_dir.permissions().mode() & 0o777, 0o750);
}
