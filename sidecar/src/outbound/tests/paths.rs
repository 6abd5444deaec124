//! The CA's routing: through PAs, straight to providers when a PA is gone, hung or forged at,
//! by gray rules and by routes; each request's span and its attempts'.

use super::*;

#[tokio::test(start_paused = true)]
async fn a_pa_whose_provider_is_gone_fails_nobody_and_runs_nothing_twice() {
    let mut w = World::new();
    w.provider("p3", "10.0.3.1:80", P::Ok);
    // h2's provider process died after it registered: its address refuses connections.
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.pa("h3", "10.0.3.9:4143", "10.0.3.1:80").await;
    w.ca();
    for _ in 0..20 {
        let resp = w.call(Method::POST).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[PATH_HEADER], "mesh");
        assert_eq!(text(resp).await, "p3");
    }
    assert_eq!(w.got("p3", Method::POST), 20, "every POST ran exactly once");
}

#[tokio::test(start_paused = true)]
async fn a_forged_mesh_header_from_a_provider_is_dropped_and_never_retried() {
    let mut w = World::new();
    // Straight to a provider without a sidecar (C→CA→P), and through a PA (C→CA→PA→P).
    w.provider("bare", "10.0.4.1:80", P::Forges("upstream-connect"));
    w.bare("bare", "h4", "10.0.4.1:80").await;
    w.provider("p2", "10.0.2.1:80", P::Forges("draining"));
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.ca();
    for _ in 0..20 {
        let resp = w.call(Method::POST).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get(ERROR_HEADER).is_none(), "{resp:?}");
    }
    let (a, b) = (w.got("bare", Method::POST), w.got("p2", Method::POST));
    assert_eq!(a + b, 20, "each POST reached one provider once ({a} + {b})");
    assert!(a > 0 && b > 0, "both paths were used ({a} / {b})");
}

/// h2's PA broken as `pa` says from the first call on, its provider fine.
async fn broken_pa(pa: Upstream) -> World {
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    w.net.set(Dial::Tcp(addr("10.0.2.9:4143")), pa);
    w.ca();
    w
}

fn dropping() -> Upstream {
    Upstream::serve(|_| async { Err::<Response<BoxBody>, _>(Abort) })
}

#[tokio::test(start_paused = true)]
async fn a_pa_that_refuses_or_drops_sends_what_is_safe_straight_to_the_provider() {
    // Dropped after the request was read: a GET goes straight to the provider...
    let w = broken_pa(dropping()).await;
    let resp = w.call(Method::GET).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    // ...a POST may have been processed: it is answered upstream-reset, never repeated.
    let w = broken_pa(dropping()).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        MeshErrorKind::from_headers(resp.headers()),
        Some(MeshErrorKind::UpstreamReset)
    );
    assert_eq!(w.got("p2", Method::POST), 0);
    // Refused outright, it never left: any method goes straight to the provider, once.
    let w = broken_pa(Upstream::Refuse).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    assert_eq!(w.got("p2", Method::POST), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hung_pa_holds_no_idempotent_request() {
    let w = World::one_pa(P::Ok).await;
    assert_eq!(text(w.call(Method::GET).await).await, "p2");
    // The PA stops (SIGSTOP): its open connections, the pooled HTTP/2 one included, stall.
    w.net.freeze(&Dial::Tcp(addr("10.0.2.9:4143")), true);
    let t = Instant::now();
    let w = Arc::new(w);
    let get = {
        let w = w.clone();
        tokio::spawn(async move { (w.call(Method::GET).await, t.elapsed()) })
    };
    let post = {
        let w = w.clone();
        tokio::spawn(async move { (w.call(Method::POST).await, t.elapsed()) })
    };
    let (resp, took) = get.await.unwrap();
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    assert!(
        took <= Duration::from_millis(800),
        "the GET waited {took:?}"
    );
    let (resp, took) = post.await.unwrap();
    assert_eq!(
        MeshErrorKind::from_headers(resp.headers()),
        Some(MeshErrorKind::Timeout),
        "a POST waits for its answer until the request timeout"
    );
    assert!(took >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_pa_that_hung_while_its_link_was_idle_holds_a_get_no_longer_than_under_load() {
    let w = World::one_pa(P::Ok).await;
    assert_eq!(text(w.call(Method::GET).await).await, "p2");
    // No request for a minute: the PA is probed every 30 s; it stops between two probes.
    tokio::time::sleep(Duration::from_millis(62_500)).await;
    w.net.freeze(&Dial::Tcp(addr("10.0.2.9:4143")), true);
    let t = Instant::now();
    let resp = w.call(Method::GET).await;
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    let took = t.elapsed();
    assert!(
        took <= Duration::from_millis(800),
        "the GET waited {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_service_switched_off_goes_straight_to_its_providers_and_comes_back() {
    let w = World::one_pa(P::Ok).await;
    assert_eq!(w.call(Method::GET).await.headers()[PATH_HEADER], "mesh");
    w.gray.apply(Some(
        br#"{"version":1,"rules":[{"id":"rb","mesh":"off","service":"hello","origin":"rollback"}]}"#,
    ));
    for m in [Method::GET, Method::POST] {
        let resp = w.call(m).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    }
    w.gray.apply(None);
    assert_eq!(w.call(Method::GET).await.headers()[PATH_HEADER], "mesh");
}

/// A writer into a shared buffer, for a subscriber a test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Debug logs of this thread, into a buffer, while the guard lives.
fn debug_log() -> (Captured, tracing::subscriber::DefaultGuard) {
    static QUIET: std::sync::Once = std::sync::Once::new();
    // A callsite's interest is cached process-wide: one first reached by another test's thread
    // while no subscriber wanted it would stay silent here too. A global subscriber that is
    // "sometimes" interested in everything makes every callsite ask the thread's own.
    QUIET.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Quiet);
    });
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (captured, tracing::subscriber::set_default(subscriber))
}

/// Enables nothing, but leaves every callsite to be asked again (see [`debug_log`]).
struct Quiet;

impl tracing::Subscriber for Quiet {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn a_request_and_each_of_its_attempts_have_a_span() {
    let (captured, _default) = debug_log();
    // The PA refuses: the first attempt goes through it, the second straight to the provider.
    let w = broken_pa(Upstream::Refuse).await;
    let resp = w.call(Method::POST).await;
    assert_eq!(resp.headers()[PATH_HEADER], "ca-direct");
    let log = String::from_utf8(captured.0.lock().clone()).unwrap();
    let request = r#"request{direction="outbound" method=POST service="hello"}"#;
    let first = format!(r#"{request}:attempt{{n=1 instance=h2-hello path="pa"}}"#);
    assert!(log.contains(&first), "no {first} in:\n{log}");
    assert!(log.contains("attempt failed"), "{log}");
}

#[tokio::test(start_paused = true)]
async fn a_ca_that_traces_names_the_trace_in_its_request_span() {
    use detour_core::trace::{OtlpEndpoint, TraceConfig, Tracer};
    let (captured, _default) = debug_log();
    let mut w = World::new();
    w.provider("p2", "10.0.2.1:80", P::Ok);
    w.pa("h2", "10.0.2.9:4143", "10.0.2.1:80").await;
    // Exporting (to nowhere), recording none of the traces it starts: ids without spans.
    let mut cfg = TraceConfig::new(OtlpEndpoint::parse("http://127.0.0.1:9").unwrap(), "t");
    cfg.sample = 0.0;
    w.tracer = Tracer::start(cfg);
    w.ca();
    assert_eq!(w.call(Method::GET).await.status(), StatusCode::OK);
    let log = String::from_utf8(captured.0.lock().clone()).unwrap();
    let at = log
        .find("trace_id=")
        .unwrap_or_else(|| panic!("no trace_id in:\n{log}"));
    let id = &log[at + "trace_id=".len()..][..32];
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
}

#[tokio::test(start_paused = true)]
async fn routes_send_each_request_to_its_subset_on_the_mesh_and_ca_direct_paths() {
    let mut w = World::new();
    w.provider("v1", "10.0.2.1:80", P::Ok);
    w.provider("v2", "10.0.3.1:80", P::Ok);
    w.pa_with("h2", "10.0.2.9:4143", "10.0.2.1:80", "version = \"1\"")
        .await;
    w.pa_with("h3", "10.0.3.9:4143", "10.0.3.1:80", "version = \"2\"")
        .await;
    w.ca();
    w.routes.apply(Some(
        br#"{"version":1,"services":{"hello":{
            "subsets":{"v1":{"version":"1"},"v2":{"version":"2"}},
            "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v2"}],
            "default":"v1"}}}"#,
    ));
    for path in ["mesh", "ca-direct"] {
        for _ in 0..10 {
            let resp = w.call_with(Method::GET, &[("x-canary", "1")]).await;
            assert_eq!(resp.headers()[PATH_HEADER], path);
            assert_eq!(text(resp).await, "v2");
            let resp = w.call(Method::POST).await;
            assert_eq!(resp.headers()[PATH_HEADER], path);
            assert_eq!(text(resp).await, "v1");
        }
        // The mesh off for the service: the CA goes straight to the providers, by the same rules.
        w.gray.apply(Some(
            br#"{"version":1,"rules":[{"id":"rb","mesh":"off","service":"hello","origin":"rollback"}]}"#,
        ));
    }
    // A subset with no endpoint (v3 not deployed yet): its requests fall back to the default.
    w.routes.apply(Some(
        br#"{"version":1,"services":{"hello":{
            "subsets":{"v1":{"version":"1"},"v3":{"version":"3"}},
            "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v3"}],
            "default":"v1"}}}"#,
    ));
    for _ in 0..10 {
        let resp = w.call_with(Method::GET, &[("x-canary", "1")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(text(resp).await, "v1");
    }
    assert_eq!(w.routes.state()["hello"]["fallbacks"], 10);
}
