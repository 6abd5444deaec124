//! The cost of the routing decision per request, as the CA pays it (`Routes::route`: the
//! compiled routes of the service, the rules matched, the subset counted) and as the pure
//! function alone (`ServiceRoutes::select`), for a service without routes and for one with 20
//! match rules. Run by `bench/route-cost.sh`; prints one line per case, ns per request.

#![allow(clippy::disallowed_types, clippy::disallowed_methods)] // a benchmark reads the wall clock

use std::sync::Arc;
use std::time::Instant;

use detour_core::route::{RequestView, ServiceRoutes};
use detour_proto::{Endpoint, EndpointSet, HostId, InstanceId, ServiceName};
use detour_sidecar::outbound::routes::Routes;
use http::{HeaderMap, HeaderValue, Method};

/// 20 rules on headers, paths and cookies; none matches the plain request, the last matches the
/// request with `x-rule: 19`.
fn twenty_rules() -> String {
    let mut rules = Vec::new();
    for i in 0..20 {
        let m = match i % 3 {
            0 => format!(r#"{{"headers":{{"x-rule":"{i}"}}}}"#),
            1 => format!(r#"{{"path_prefix":"/r{i}/","method":"POST"}}"#),
            _ => format!(r#"{{"cookies":{{"rule":"{i}"}},"headers":{{"x-rule":"{i}"}}}}"#),
        };
        rules.push(format!(r#"{{"match":{m},"to":"v{}"}}"#, 1 + i % 2));
    }
    format!(
        r#"{{"subsets":{{"v1":{{"version":"1"}},"v2":{{"version":"2"}}}},"rules":[{}],"default":{{"v1":95,"v2":5}}}}"#,
        rules.join(",")
    )
}

fn endpoints() -> Arc<EndpointSet> {
    let eps = (0..10)
        .map(|i| {
            let mut e = Endpoint::new(
                ServiceName::new("hello").expect("name"),
                InstanceId::new(format!("i{i}")).expect("id"),
                HostId::new(format!("h{i}")).expect("host"),
                format!("127.0.0.{}:80", i + 2).parse().expect("addr"),
            );
            e.version = if i < 5 { "1" } else { "2" }.into();
            e
        })
        .collect();
    Arc::new(EndpointSet::known(eps))
}

fn time(label: &str, n: u32, mut f: impl FnMut() -> usize) {
    let mut sink = 0usize;
    for _ in 0..n / 10 {
        sink = sink.wrapping_add(f());
    }
    let start = Instant::now();
    for _ in 0..n {
        sink = sink.wrapping_add(f());
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
    println!(
        "route_cost: case={label} ns_per_request={ns:.0} (sink {})",
        sink % 2
    );
}

fn main() {
    let n = 1_000_000;
    let hello = ServiceName::new("hello").expect("name");
    let set = endpoints();
    let plain = HeaderMap::new();
    let mut last = HeaderMap::new();
    last.insert("x-rule", HeaderValue::from_static("18"));
    last.insert("cookie", HeaderValue::from_static("a=b; rule=18"));

    let routes = Routes::new();
    time("ca_without_routes", n, || {
        let req = RequestView {
            method: &Method::GET,
            path: "/x",
            headers: &plain,
        };
        usize::from(routes.route(&hello, &req, &set).members.is_some())
    });
    let doc = format!(
        r#"{{"version":1,"services":{{"hello":{}}}}}"#,
        twenty_rules()
    );
    routes.apply(Some(doc.as_bytes()));
    time("ca_20_rules_no_match", n, || {
        let req = RequestView {
            method: &Method::GET,
            path: "/x",
            headers: &plain,
        };
        usize::from(routes.route(&hello, &req, &set).members.is_some())
    });
    time("ca_20_rules_last_matches", n, || {
        let req = RequestView {
            method: &Method::GET,
            path: "/x",
            headers: &last,
        };
        usize::from(routes.route(&hello, &req, &set).members.is_some())
    });
    let pure = ServiceRoutes::parse(&twenty_rules()).expect("routes");
    let mut roll = 0u64;
    time("select_20_rules_no_match", n, || {
        roll = roll.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let req = RequestView {
            method: &Method::GET,
            path: "/x",
            headers: &plain,
        };
        pure.select(&req, roll, |_| true).subset.unwrap_or(9)
    });
    time("select_20_rules_last_matches", n, || {
        let req = RequestView {
            method: &Method::GET,
            path: "/x",
            headers: &last,
        };
        pure.select(&req, roll, |_| true).subset.unwrap_or(9)
    });
}
