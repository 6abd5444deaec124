//! A connection as the listeners serve it: an HTTP/2 connection to a sidecar that stalled
//! (SIGSTOP, a host frozen) while its caller gave up on many requests and reset their streams
//! (once it runs again, the requests still waiting on the connection are answered, not dropped
//! with it); the bound on headers in every HTTP/1.1 head.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::*;

struct Answer;

impl Handler for Answer {
    async fn handle(
        self: Arc<Self>,
        _req: Request<Incoming>,
        _conn: ConnInfo,
    ) -> Response<BoxBody> {
        Response::new(detour_core::body::full("ok"))
    }
}

fn options() -> ConnOptions {
    let mut problems = Vec::new();
    let limits = crate::config::limits::LimitsRaw::default().validate(&mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    ConnOptions {
        max_header_bytes: 64 * 1024,
        head_timeout: Duration::from_secs(5),
        proxy: "test".into(),
        limits,
        tls: None,
        handshakes: None,
        provider_share: true,
        half_close: true,
    }
}

#[test]
fn a_stalled_sidecar_keeps_the_requests_its_caller_still_waits_for() {
    // The sidecar: a runtime on its own thread, which the test stalls as a SIGSTOP would.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let (stall, stalls) = std::sync::mpsc::channel::<Duration>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let (io, _) = l.accept().await.unwrap();
            let lifecycle = Lifecycle::new();
            let opts = options();
            let serving = serve_conn(io, Arc::new(Answer), &lifecycle, &opts, None);
            tokio::pin!(serving);
            loop {
                tokio::select! {
                    r = &mut serving => return r.map_err(|e| e.to_string()),
                    () = tokio::time::sleep(Duration::from_millis(5)) => {
                        if let Ok(d) = stalls.try_recv() {
                            std::thread::sleep(d);
                        }
                    }
                }
            }
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let io = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake::<_, BoxBody>(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let get = || {
            Request::get("http://hello/")
                .body(detour_core::body::empty())
                .unwrap()
        };
        assert_eq!(sender.send_request(get()).await.unwrap().status(), 200);
        // The sidecar stalls for a second. A POST is sent and waits; 100 requests are sent
        // and given up on (each reset a few milliseconds later), as a caller that went
        // elsewhere does.
        stall.send(Duration::from_secs(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut waiting = sender.clone();
        let post = tokio::spawn(async move {
            let req = Request::post("http://hello/")
                .body(detour_core::body::full("one order"))
                .unwrap();
            waiting.send_request(req).await
        });
        for _ in 0..100 {
            sender.ready().await.unwrap();
            let _ =
                tokio::time::timeout(Duration::from_millis(5), sender.send_request(get())).await;
        }
        let answered = tokio::time::timeout(Duration::from_secs(10), post)
            .await
            .expect("answered within 10 s")
            .unwrap();
        let resp = answered.expect("the POST is answered once the sidecar runs again");
        assert_eq!(resp.status(), 200);
    });
    // The connection closes with the client's runtime; the sidecar's thread ends.
    drop(rt);
    server.join().unwrap().unwrap();
}

/// A raw HTTP/1.1 head with `n` headers besides `Host`.
fn head_with(n: usize) -> String {
    let mut head = String::from("GET / HTTP/1.1\r\nhost: hello\r\n");
    for i in 1..n {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head + "\r\n"
}

/// The status of each answer read from `io` until it closes.
async fn statuses(io: &mut tokio::net::TcpStream) -> Vec<u16> {
    use tokio::io::AsyncReadExt;
    let mut text = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut text)).await;
    let text = String::from_utf8_lossy(&text).into_owned();
    (text.match_indices("HTTP/1.1 "))
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn every_http1_head_may_carry_a_hundred_headers_and_no_more() {
    use tokio::io::AsyncWriteExt;
    let max = crate::http::detect::MAX_HEADERS;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let lifecycle = Lifecycle::new();
        let opts = options();
        while let Ok((io, _)) = listener.accept().await {
            let _ = serve_conn(io, Arc::new(Answer), &lifecycle, &opts, None).await;
        }
    });
    // The first head (read by the protocol detection), then two more on the same connection
    // (read by hyper): the one over the bound ends the connection with 431.
    let mut io = tokio::net::TcpStream::connect(addr).await.unwrap();
    let heads = [head_with(max), head_with(max), head_with(max + 1)].concat();
    io.write_all(heads.as_bytes()).await.unwrap();
    assert_eq!(statuses(&mut io).await, [200, 200, 431]);
    // Over the bound in the first head.
    let mut io = tokio::net::TcpStream::connect(addr).await.unwrap();
    io.write_all(head_with(max + 1).as_bytes()).await.unwrap();
    assert_eq!(statuses(&mut io).await, [431]);
}
