//! `detourctl stat`'s arithmetic on scraped text.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{parse, quantile, rows};

fn text(ok: u64, errors: u64, direct: u64, fast: u64, slow: u64) -> String {
    format!(
        "# HELP detour_service_requests_total x\n\
         detour_service_requests_total{{direction=\"outbound\",service=\"hello\",path=\"mesh\",class=\"2xx\"}} {ok}\n\
         detour_service_requests_total{{direction=\"outbound\",service=\"hello\",path=\"mesh\",class=\"5xx\"}} {errors}\n\
         detour_service_requests_total{{direction=\"outbound\",service=\"hello\",path=\"ca_direct\",class=\"2xx\"}} {direct}\n\
         detour_service_requests_total{{direction=\"inbound\",service=\"hello\",path=\"local\",class=\"2xx\"}} 999\n\
         detour_service_response_seconds_bucket{{direction=\"outbound\",service=\"hello\",path=\"mesh\",le=\"0.001\"}} {fast}\n\
         detour_service_response_seconds_bucket{{direction=\"outbound\",service=\"hello\",path=\"mesh\",le=\"0.01\"}} {all}\n\
         detour_service_response_seconds_bucket{{direction=\"outbound\",service=\"hello\",path=\"mesh\",le=\"+Inf\"}} {all}\n",
        all = fast + slow
    )
}

#[test]
fn a_window_gives_rate_success_latency_and_paths() {
    let before: BTreeMap<String, _> = [
        ("h1".to_owned(), parse(&text(100, 0, 0, 100, 0))),
        ("h3".to_owned(), parse(&text(0, 0, 0, 0, 0))),
    ]
    .into();
    // In 10 s: h1 900 good + 100 errors over the mesh, 1000 straight; h3 1000 good.
    let after: BTreeMap<String, _> = [
        ("h1".to_owned(), parse(&text(1000, 100, 1000, 600, 500))),
        ("h3".to_owned(), parse(&text(1000, 0, 0, 1000, 0))),
    ]
    .into();
    let all = rows(&before, &after, Duration::from_secs(10), false, None);
    assert_eq!(all.len(), 1);
    let r = &all[0];
    assert_eq!((r.service.as_str(), r.requests), ("hello", 3000));
    assert!((r.rps - 300.0).abs() < 1e-9);
    assert!((r.success.unwrap() - 2900.0 / 3000.0).abs() < 1e-9);
    assert!((r.paths["mesh"] - 2000.0 / 3000.0).abs() < 1e-9);
    assert!((r.paths["ca_direct"] - 1000.0 / 3000.0).abs() < 1e-9);
    // Mesh latencies in the window: 1500 under 1 ms, 500 between 1 and 10 ms.
    let p50 = r.p50_ms.unwrap();
    assert!(p50 > 0.0 && p50 <= 1.0, "{p50}");
    let p99 = r.p99_ms.unwrap();
    assert!(p99 > 1.0 && p99 <= 10.0, "{p99}");
    // Per host.
    let by_host = rows(
        &before,
        &after,
        Duration::from_secs(10),
        true,
        Some("hello"),
    );
    assert_eq!(by_host.len(), 2);
    assert_eq!(by_host[0].host.as_deref(), Some("h1"));
    assert_eq!(by_host[0].requests, 2000);
    assert!(
        rows(
            &before,
            &after,
            Duration::from_secs(10),
            false,
            Some("world")
        )
        .is_empty()
    );
}

#[test]
fn a_restarted_sidecar_counts_from_zero() {
    let before: BTreeMap<String, _> = [("h1".to_owned(), parse(&text(5000, 0, 0, 5000, 0)))].into();
    let after: BTreeMap<String, _> = [("h1".to_owned(), parse(&text(40, 0, 0, 40, 0)))].into();
    let r = &rows(&before, &after, Duration::from_secs(1), false, None)[0];
    assert_eq!(r.requests, 40);
    assert!(r.p50_ms.unwrap() <= 1.0);
}

#[test]
fn quantiles_interpolate_within_a_bucket() {
    let b = [(0.1, 50.0), (0.2, 100.0), (f64::INFINITY, 100.0)];
    assert!((quantile(&b, 0.5).unwrap() - 0.1).abs() < 1e-9);
    assert!((quantile(&b, 0.75).unwrap() - 0.15).abs() < 1e-9);
    assert_eq!(quantile(&[(0.1, 0.0)], 0.5), None);
}

#[test]
fn odd_lines_are_passed_over() {
    let s = parse(
        "detour_service_requests_total{direction=\"outbound\",service=\"a\\\"b\",path=\"mesh\",class=\"2xx\"} 3\n\
         detour_service_requests_total{broken 3\n\
         detour_service_requests_total{direction=\"outbound\"} not-a-number\n",
    );
    assert_eq!(s.requests.len(), 1);
    let key = ("a\"b".to_owned(), "mesh".to_owned(), "2xx".to_owned());
    assert_eq!(s.requests[&key], 3.0);
}
