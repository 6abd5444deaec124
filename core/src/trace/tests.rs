//! The tracer: propagation when off, sampling, parent/child, and export to a receiver.

use detour_proto::sync::Mutex;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::*;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn with(tp: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(TRACEPARENT, HeaderValue::from_str(tp).unwrap());
    h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
    h
}

#[test]
fn off_nothing_is_read_or_written() {
    for tp in [PARENT, "00-zz-00f067aa0ba902b7-01"] {
        let mut h = with(tp);
        let before = h.clone();
        let span = Tracer::off().begin(&mut h, "hop", SpanKind::Server);
        assert!(!span.is_recording());
        assert_eq!(span.trace_id(), None);
        span.child("attempt", SpanKind::Client).inject(&mut h);
        assert_eq!(h, before);
    }
    let mut h = HeaderMap::new();
    Tracer::off()
        .begin(&mut h, "hop", SpanKind::Server)
        .inject(&mut h);
    assert!(h.is_empty());
}

/// A tracer that exports (to nowhere) and records none of the traces it starts.
fn unsampling() -> Tracer {
    let mut cfg = TraceConfig::new(OtlpEndpoint::parse("http://127.0.0.1:9").unwrap(), "unit");
    cfg.sample = 0.0;
    Tracer::start(cfg)
}

#[test]
fn on_an_unsampled_context_is_passed_on_unchanged() {
    let mut h = with(&PARENT.replace("-01", "-00"));
    let before = h.clone();
    let span = unsampling().begin(&mut h, "hop", SpanKind::Server);
    assert!(!span.is_recording());
    span.child("attempt", SpanKind::Client).inject(&mut h);
    assert_eq!(h, before);
    assert_eq!(
        span.trace_id().unwrap().hex(),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
}

#[test]
fn on_a_request_without_context_gets_a_new_trace() {
    let mut h = HeaderMap::new();
    let span = unsampling().begin(&mut h, "hop", SpanKind::Server);
    span.child("attempt", SpanKind::Client).inject(&mut h);
    let tp = TraceParent::of(&h).expect("a trace started");
    assert_eq!(Some(tp.trace_id), span.trace_id());
    assert!(!tp.sampled);
}

#[test]
fn on_an_invalid_context_is_replaced_and_its_state_dropped() {
    let mut h = with("00-zz-00f067aa0ba902b7-01");
    let span = unsampling().begin(&mut h, "hop", SpanKind::Server);
    assert!(h.get(TRACESTATE).is_none());
    assert!(h.get(TRACEPARENT).is_none());
    span.inject(&mut h);
    assert_eq!(Some(TraceParent::of(&h).unwrap().trace_id), span.trace_id());
}

/// An OTLP/HTTP receiver keeping every JSON body posted to it.
async fn receiver(status: u16) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let kept = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let kept = kept.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let kept = kept.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        kept.lock().push(serde_json::from_slice(&body).unwrap());
                        let resp = Response::builder().status(status);
                        Ok::<_, Infallible>(resp.body(Full::new(Bytes::new())).unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (url, got)
}

fn config(url: &str) -> TraceConfig {
    let mut cfg = TraceConfig::new(OtlpEndpoint::parse(url).unwrap(), "unit");
    cfg.flush = Duration::from_millis(20);
    cfg
}

async fn spans_of(got: &Arc<Mutex<Vec<serde_json::Value>>>, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..200 {
        let spans: Vec<_> = got
            .lock()
            .iter()
            .flat_map(|b| {
                b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap()
            })
            .collect();
        if spans.len() >= n {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} spans arrived");
}

#[tokio::test]
async fn a_sampled_hop_and_its_attempt_are_exported_as_parent_and_child() {
    let (url, got) = receiver(200).await;
    let tracer = Tracer::start(config(&url));
    let mut h = with(PARENT);
    let mut hop = tracer.begin(&mut h, "hop", SpanKind::Server);
    assert!(hop.is_recording());
    {
        let mut attempt = hop.child("attempt", SpanKind::Client);
        attempt.attr("detour.path", "mesh");
        attempt.fail(|| "refused".into());
        attempt.inject(&mut h);
        let sent = TraceParent::of(&h).unwrap();
        assert_eq!(Some(sent.parent_id), attempt.id());
        assert!(sent.sampled);
    }
    hop.event("switch", || vec![("detour.to", "ca_direct".into())]);
    hop.rename("ca hello");
    let hop_id = hop.id().unwrap().hex();
    drop(hop);
    let spans = spans_of(&got, 2).await;
    let attempt = &spans[0];
    let hop = &spans[1];
    assert_eq!(hop["name"], "ca hello");
    assert_eq!(hop["kind"], 2);
    assert_eq!(hop["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(hop["spanId"], hop_id.as_str());
    assert_eq!(hop["events"][0]["name"], "switch");
    assert_eq!(attempt["parentSpanId"], hop_id.as_str());
    assert_eq!(attempt["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(attempt["status"]["code"], 2);
    assert_eq!(attempt["attributes"][0]["value"]["stringValue"], "mesh");
    let resource = &got.lock()[0]["resourceSpans"][0]["resource"];
    assert_eq!(resource["attributes"][0]["value"]["stringValue"], "unit");
    assert_eq!(tracer.counts(), (2, 0));
}

#[tokio::test]
async fn an_endpoint_that_fails_or_a_full_queue_drops_spans_and_counts_them() {
    let (url, _got) = receiver(503).await;
    let mut cfg = config(&url);
    cfg.queue = 4;
    let tracer = Tracer::start(cfg);
    for _ in 0..100 {
        let mut h = HeaderMap::new();
        drop(tracer.begin(&mut h, "hop", SpanKind::Server));
    }
    for _ in 0..200 {
        if tracer.counts().1 == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(tracer.counts(), (0, 100));
}

#[test]
fn endpoints_are_http_urls_with_a_port() {
    let e = OtlpEndpoint::parse("http://127.0.0.1:4318").unwrap();
    assert_eq!(
        (e.authority.as_str(), e.path.as_str()),
        ("127.0.0.1:4318", "/v1/traces")
    );
    let e = OtlpEndpoint::parse("http://collector:4318/otlp/v1/traces").unwrap();
    assert_eq!(e.path, "/otlp/v1/traces");
    for bad in [
        "https://c:4318",
        "c:4318",
        "http://c/v1/traces",
        "http://u@c:1/",
        "http://c:1/a b",
    ] {
        assert!(OtlpEndpoint::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn the_opentelemetry_variables_configure_export() {
    let env = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    assert!(TraceConfig::from_env("app", env(&[])).unwrap().is_none());
    let c = TraceConfig::from_env(
        "app",
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            ("OTEL_SERVICE_NAME", "shop"),
        ]),
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        (c.endpoint.path.as_str(), c.service_name.as_str()),
        ("/v1/traces", "shop")
    );
    let c = TraceConfig::from_env(
        "app",
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/x"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ]),
    )
    .unwrap()
    .unwrap();
    assert_eq!((c.endpoint.authority.as_str(), c.sample), ("t:4318", 0.25));
    let bad = TraceConfig::from_env("app", env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "grpc://c")]));
    assert!(bad.unwrap_err().starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let bad = TraceConfig::from_env(
        "app",
        env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:1"),
            ("OTEL_TRACES_SAMPLER_ARG", "2"),
        ]),
    );
    assert!(bad.unwrap_err().starts_with("OTEL_TRACES_SAMPLER_ARG"));
}

#[test]
fn the_json_of_a_batch_parses_with_every_character_escaped() {
    use super::export::{Finished, encode};
    let tricky = "a \"quoted\" \\ back\nslash\t\u{1}é🙂";
    let span = Finished {
        trace_id: TraceId([1; 16]),
        id: SpanId([2; 8]),
        parent: None,
        name: tricky.to_owned().into(),
        kind: SpanKind::Internal,
        start: 1,
        end: 2,
        attributes: vec![("k", tricky.to_owned().into()), ("n", Value::Int(-5))],
        events: vec![Event {
            time: 3,
            name: "retry",
            attributes: vec![("why", tricky.to_owned().into())],
        }],
        error: Some(tricky.to_owned()),
    };
    let resource = "{\"attributes\":[]}";
    let doc: serde_json::Value = serde_json::from_slice(&encode(resource, &[span])).unwrap();
    let s = &doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
    assert_eq!(s["name"], tricky);
    assert_eq!(s["traceId"], "01010101010101010101010101010101");
    assert!(s.get("parentSpanId").is_none());
    assert_eq!(s["kind"], 1);
    assert_eq!(s["attributes"][0]["value"]["stringValue"], tricky);
    assert_eq!(s["attributes"][1]["value"]["intValue"], "-5");
    assert_eq!(
        s["events"][0]["attributes"][0]["value"]["stringValue"],
        tricky
    );
    assert_eq!(s["status"]["message"], tricky);
}
