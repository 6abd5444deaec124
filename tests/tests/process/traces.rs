//! Traces on real processes: one call is one trace from the SDK through the CA and the PA to
//! the provider, with a span per hop and per attempt, exported over OTLP/HTTP to a receiver;
//! trace context from the app is kept (and, unsampled, passed on untouched); a failover under
//! load (the PA killed, the caller's sidecar killed) shows as a path switch in the trace.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use detour_proto::sync::Mutex;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use detour_core::trace::{OtlpEndpoint, TraceConfig};
use detour_tests::otlp::{OtlpReceiver, ReceivedSpan};
use detour_tests::raw::{self, RawProvider};
use detour_tests::{Mesh, Offer, metric, wait_until};
use detour_thin_sdk::body::empty;
use detour_thin_sdk::{Client, ServiceName};
use nix::sys::signal::Signal;

/// A provider on 127.0.0.2 that records the `traceparent` and `tracestate` lines of each
/// request it reads.
async fn provider() -> (RawProvider, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let p = RawProvider::start("127.0.0.2", Duration::ZERO, move |head| {
        let lines: Vec<&str> = head.lines().filter(|l| l.starts_with("trace")).collect();
        s.lock().push(lines.join("\n"));
        raw::ok("ok")
    })
    .await;
    (p, seen)
}

/// Caller host h1 and provider host h2 (offering `hello`), both exporting to `rx`.
async fn traced_mesh(rx: &OtlpReceiver, p: &RawProvider) -> Mesh {
    let extra = format!("[tracing]\notlp_endpoint = \"{}\"\n", rx.url());
    let mut mesh = Mesh::new();
    mesh.start_with("h2", "127.0.0.2", &[Offer::http1("hello", p.addr)], &extra)
        .await;
    mesh.start_with("h1", "127.0.0.1", &[], &extra).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    mesh
}

/// An SDK client of h1 exporting as `shop`, with a snapshot of `hello` (so it can go direct).
async fn traced_sdk(mesh: &Mesh, rx: &OtlpReceiver, snapshot: &Path) -> Client {
    let mut cfg = TraceConfig::new(OtlpEndpoint::parse(&rx.url()).unwrap(), "shop");
    cfg.flush = Duration::from_millis(50);
    let client = Client::builder(mesh.outbound("h1"))
        .app("shop")
        .timeout(Duration::from_secs(20))
        .snapshot_file(snapshot)
        .tracing(cfg)
        .build();
    assert!(client.wait_ready(Duration::from_secs(10)).await);
    let hello = ServiceName::new("hello").unwrap();
    let first = client.send(&hello, get()).await.unwrap();
    assert_eq!(first.status(), 200);
    wait_until("a snapshot of hello", Duration::from_secs(5), || {
        client
            .snapshot(&hello)
            .is_some_and(|s| !s.endpoints.is_empty())
            && snapshot.exists()
    })
    .await;
    client
}

fn get() -> http::Request<detour_thin_sdk::BoxBody> {
    http::Request::get("/").body(empty()).unwrap()
}

/// `(trace id, parent id)` of a recorded `traceparent: 00-…` line.
fn traceparent(lines: &str) -> (String, String) {
    let v = lines
        .lines()
        .find_map(|l| l.strip_prefix("traceparent:"))
        .unwrap_or_else(|| panic!("no traceparent in {lines:?}"))
        .trim();
    let f: Vec<&str> = v.split('-').collect();
    (f[1].to_owned(), f[2].to_owned())
}

fn child<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.parent.as_deref() == Some(&parent.span_id) && s.name == name)
        .unwrap_or_else(|| panic!("no {name:?} under {parent:#?} in {spans:#?}"))
}

#[tokio::test]
async fn one_call_is_one_trace_from_the_sdk_through_the_ca_and_the_pa_to_the_provider() {
    let rx = OtlpReceiver::start().await;
    let (p, seen) = provider().await;
    let mesh = traced_mesh(&rx, &p).await;
    let dir = tempfile::tempdir().unwrap();
    let client = traced_sdk(&mesh, &rx, &dir.path().join("snap.json")).await;
    let hello = ServiceName::new("hello").unwrap();

    // No context from the app: the SDK starts the trace.
    assert_eq!(client.send(&hello, get()).await.unwrap().status(), 200);
    let (trace, parent) = traceparent(&seen.lock().last().cloned().unwrap());
    let spans = rx.trace(&trace, 6).await;
    let call = spans.iter().find(|s| s.parent.is_none()).unwrap();
    assert_eq!(
        (call.service.as_str(), call.name.as_str()),
        ("shop", "call hello")
    );
    let sdk_try = child(&spans, call, "attempt");
    assert_eq!(sdk_try.attr("detour.path"), "mesh");
    let ca = child(&spans, sdk_try, "ca hello");
    assert_eq!((ca.host.as_deref(), ca.kind), (Some("h1"), 2));
    assert_eq!(ca.attr("http.response.status_code"), "200");
    let ca_try = child(&spans, ca, "attempt");
    assert_eq!(ca_try.attr("detour.path"), "mesh");
    let pa = child(&spans, ca_try, "pa hello");
    assert_eq!((pa.host.as_deref(), pa.kind), (Some("h2"), 2));
    let pa_try = child(&spans, pa, "attempt");
    assert_eq!(pa_try.attr("detour.path"), "local");
    assert_eq!(
        parent, pa_try.span_id,
        "the provider's parent is the PA's attempt"
    );
    assert_eq!(spans.len(), 6, "{spans:#?}");
    assert!(spans.iter().all(|s| !s.failed));

    // The app's unsampled context crosses every hop untouched, and nothing is recorded; its
    // sampled context is the call's parent, with its tracestate passed on.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let req = http::Request::get("/")
        .header("traceparent", unsampled)
        .body(empty())
        .unwrap();
    assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
    let got = seen.lock().last().cloned().unwrap();
    assert_eq!(got, format!("traceparent: {unsampled}"));
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let req = http::Request::get("/")
        .header("traceparent", sampled)
        .header("tracestate", "congo=t61rcWkgMzE")
        .body(empty())
        .unwrap();
    assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
    let got = seen.lock().last().cloned().unwrap();
    assert!(got.contains("tracestate: congo=t61rcwkgmze"), "{got}");
    let (trace, _) = traceparent(&got);
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    let spans = rx.trace(&trace, 6).await;
    let call = spans
        .iter()
        .find(|s| s.service == "shop" && s.name == "call hello");
    assert_eq!(call.unwrap().parent.as_deref(), Some("b7ad6b7169203331"));
    let none = rx.spans();
    assert!(
        none.iter()
            .all(|s| s.trace_id != "11111111111111111111111111111111")
    );
}

/// GETs through `client` from 4 tasks until `stop`; counts answered and failed calls.
fn load(
    client: &Client,
    stop: &Arc<AtomicBool>,
) -> (
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..4)
        .map(|_| {
            let (client, stop, ok, failed) =
                (client.clone(), stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let hello = ServiceName::new("hello").unwrap();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && tokio::time::Instant::now() < deadline {
                    match client.send(&hello, get()).await {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    (ok, failed, tasks)
}

/// Runs the load, `fault` once 200 calls were answered, and stops 300 answers later.
async fn under_load(client: &Client, fault: impl AsyncFnOnce()) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, tasks) = load(client, &stop);
    wait_until("200 answers", Duration::from_secs(20), || {
        ok.load(Ordering::Relaxed) >= 200
    })
    .await;
    fault().await;
    let after = ok.load(Ordering::Relaxed) + 300;
    wait_until("300 more answers", Duration::from_secs(30), || {
        ok.load(Ordering::Relaxed) >= after
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    failed.load(Ordering::Relaxed)
}

/// The first span `is_hop` accepts that has a `switch_path` or `hedge` event, once one arrived.
async fn switched(rx: &OtlpReceiver, is_hop: impl Fn(&ReceivedSpan) -> bool) -> ReceivedSpan {
    let mut found = None;
    wait_until("a span with a path switch", Duration::from_secs(10), || {
        found = rx.spans().into_iter().find(|s| {
            is_hop(s)
                && s.events
                    .iter()
                    .any(|(e, _)| e == "switch_path" || e == "hedge")
        });
        found.is_some()
    })
    .await;
    found.unwrap()
}

#[tokio::test]
async fn a_pa_killed_under_load_shows_as_a_path_switch_in_a_trace_and_in_the_metrics() {
    let rx = OtlpReceiver::start().await;
    let (p, _seen) = provider().await;
    let mut mesh = traced_mesh(&rx, &p).await;
    let dir = tempfile::tempdir().unwrap();
    let client = traced_sdk(&mesh, &rx, &dir.path().join("snap.json")).await;
    let failed = under_load(&client, async || {
        mesh.stop_with("h2", Signal::SIGKILL).await
    })
    .await;
    assert_eq!(failed, 0, "GETs are never lost");

    let hop = switched(&rx, |s| {
        s.name == "ca hello" && s.attr("detour.path") == "ca_direct"
    })
    .await;
    let (ev, attrs) = hop.events.iter().find(|(e, _)| e == "switch_path").unwrap();
    assert_eq!(ev, "switch_path");
    assert!(!attrs["detour.error"].is_empty(), "{attrs:?}");
    let spans = rx.trace(&hop.trace_id, 1).await;
    let tries: Vec<&ReceivedSpan> = (spans.iter())
        .filter(|s| s.parent.as_deref() == Some(&hop.span_id))
        .collect();
    let last = (tries.iter())
        .max_by_key(|t| t.attr("detour.attempt").parse::<u32>().unwrap())
        .unwrap();
    assert_eq!(
        (last.attr("detour.path"), last.failed),
        ("ca_direct", false),
        "{tries:#?}"
    );
    let through_pa = tries
        .iter()
        .find(|t| t.attr("detour.path") == "mesh")
        .unwrap();
    assert!(through_pa.failed, "{tries:#?}");
    assert_eq!(hop.attr("http.response.status_code"), "200");
    assert_eq!(hop.attr("detour.path"), "ca_direct");

    let label = r#"direction="outbound",service="hello",path="ca_direct",class="2xx""#;
    let direct = metric(&mesh.admin("h1"), "detour_service_requests_total", label).await;
    assert!(
        direct.unwrap_or(0.0) >= 1.0,
        "ca_direct calls counted: {direct:?}"
    );
}

#[tokio::test]
async fn a_call_sent_direct_while_its_sidecar_is_killed_is_one_trace_to_the_provider() {
    let rx = OtlpReceiver::start().await;
    let (p, seen) = provider().await;
    let mut mesh = traced_mesh(&rx, &p).await;
    let dir = tempfile::tempdir().unwrap();
    let client = traced_sdk(&mesh, &rx, &dir.path().join("snap.json")).await;
    let failed = under_load(&client, async || {
        mesh.stop_with("h1", Signal::SIGKILL).await
    })
    .await;
    assert_eq!(failed, 0, "GETs are never lost");

    // A call that was waiting on the sidecar when it died, and was answered direct (a hedged
    // call the sidecar answered first is answered by the mesh).
    let call = switched(&rx, |s| {
        s.service == "shop" && s.name == "call hello" && s.attr("detour.path") == "direct"
    })
    .await;
    let spans = rx.trace(&call.trace_id, 2).await;
    let direct = (spans.iter())
        .find(|s| s.parent.as_deref() == Some(&call.span_id) && s.attr("detour.path") == "direct")
        .unwrap_or_else(|| panic!("no direct attempt under {call:#?}: {spans:#?}"));
    assert!(!direct.failed);
    assert_eq!(direct.attr("server.address"), p.addr.to_string());
    let heads = seen.lock().clone();
    let reached = heads
        .iter()
        .any(|h| traceparent(h) == (call.trace_id.clone(), direct.span_id.clone()));
    assert!(
        reached,
        "the provider's request names the SDK's direct attempt as its parent"
    );
}

#[tokio::test]
async fn without_export_the_mesh_passes_trace_context_on_as_it_came() {
    let (p, seen) = provider().await;
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", p.addr)])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", detour_thin_sdk::AppProtocol::Http1);
    let hello = ServiceName::new("hello").unwrap();
    assert_eq!(client.send(&hello, get()).await.unwrap().status(), 200);
    assert_eq!(seen.lock().last().unwrap(), "", "no trace is started");
    // Even a malformed context is the app's business when nothing here traces.
    let odd = "00-zz-00f067aa0ba902b7-01";
    let req = http::Request::get("/")
        .header("traceparent", odd)
        .header("tracestate", "a=1")
        .body(empty())
        .unwrap();
    assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
    let got = seen.lock().last().cloned().unwrap();
    assert_eq!(got, format!("traceparent: {odd}\ntracestate: a=1"));
}
