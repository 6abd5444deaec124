//! The pool against real loopback servers and in-memory upstreams.

use super::*;

#[tokio::test]
async fn connect_refused_never_left() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let pool = Pool::new(PoolOptions::default());
    let req = Request::get("/").body(crate::body::empty()).unwrap();
    let err = pool
        .send(&Dial::Tcp(addr), AppProtocol::Http1, req)
        .await
        .unwrap_err();
    assert!(
        err.request.is_some(),
        "a request that never left comes back"
    );
    assert!(err.error.never_left(), "{}", err.error);
    assert!(
        matches!(err.error, TransportError::Connect { .. }),
        "{}",
        err.error
    );
}

/// Connects to nothing, ever (a host that drops SYNs).
struct Silent;

impl crate::connect::Connect for Silent {
    fn connect<'a>(&'a self, _dial: &'a Dial) -> crate::connect::Connecting<'a> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_request_can_carry_its_own_connect_timeout() {
    let pool = Pool::with_connector(PoolOptions::default(), Arc::new(Silent));
    let dial = Dial::Tcp("127.0.0.1:9".parse().unwrap());
    for proto in [AppProtocol::Http1, AppProtocol::Http2] {
        let mut req = Request::get("http://x/")
            .body(crate::body::empty())
            .unwrap();
        req.extensions_mut()
            .insert(ConnectTimeout(Duration::from_millis(30)));
        let err = pool.send(&dial, proto, req).await.unwrap_err();
        match err.error {
            TransportError::ConnectTimeout { after, .. } => {
                assert_eq!(after, Duration::from_millis(30), "{proto:?}")
            }
            other => panic!("{proto:?}: {other}"),
        }
        assert!(err.request.is_some(), "it never left");
    }
}

#[test]
fn a_target_rewrites_the_request_for_the_next_hops_protocol() {
    let target = Target::new("hello").unwrap();
    let forms = [
        "/a/b?c=1",
        "http://caller.example:8080/a/b?c=1",
        "https://other/a/b?c=1",
    ];
    for uri in forms {
        let req = || {
            Request::get(uri)
                .header(http::header::HOST, "caller.example")
                .body(crate::body::empty())
                .unwrap()
        };
        let h1 = to_target(&target, AppProtocol::Http1, req()).unwrap();
        assert_eq!(h1.uri().to_string(), "/a/b?c=1", "{uri}");
        assert_eq!(h1.headers()[http::header::HOST], "hello", "{uri}");
        assert_eq!(h1.version(), http::Version::HTTP_11);
        let h2 = to_target(&target, AppProtocol::Http2, req()).unwrap();
        assert_eq!(h2.uri().to_string(), "http://hello/a/b?c=1", "{uri}");
        assert!(h2.headers().get(http::header::HOST).is_none(), "{uri}");
        assert_eq!(h2.version(), http::Version::HTTP_2);
    }
    // A request without a path goes to "/"; a target may carry a port.
    let bare = Request::get("http://caller.example")
        .body(crate::body::empty())
        .unwrap();
    let h2 = set_target("hello:8080", AppProtocol::Http2, bare).unwrap();
    assert_eq!(h2.uri().to_string(), "http://hello:8080/");
    assert!(Target::new("not a name").is_err());
}
