//! Steady load for the failover scenarios: a fixed rate through an SDK client (GET and POST
//! alternating), timed from a common start, and the one-line summary each scenario prints.

use std::time::Duration;

use detour_kit::load::{self, LoadSpec, MethodMix, Stats, Target};
use detour_proto::ServiceName;
use detour_thin_sdk::Client;

/// The service every scenario calls.
pub fn hello() -> ServiceName {
    ServiceName::new("hello").expect("a valid name")
}

/// `rate` requests a second for `secs` seconds to `hello`, GET and POST alternating.
pub fn spec(rate: u32, secs: u64) -> LoadSpec {
    LoadSpec {
        service: hello(),
        rate,
        duration: Duration::from_secs(secs),
        methods: MethodMix::Mix,
        body_bytes: 256,
        concurrency: 4096,
        path: "/".into(),
        timeout: Duration::from_secs(20),
        slow: None,
        keys: None,
    }
}

/// Runs [`spec`] through `client` in the background.
pub fn spawn_load(client: &Client, rate: u32, secs: u64) -> tokio::task::JoinHandle<Stats> {
    let c = client.clone();
    tokio::spawn(async move {
        load::run(
            &spec(rate, secs),
            &Target::Sdk(c),
            |_, _| {},
            std::future::pending(),
        )
        .await
    })
}

/// Sleeps until `secs` seconds after `start`.
pub async fn at(start: tokio::time::Instant, secs: f64) {
    tokio::time::sleep_until(start + Duration::from_secs_f64(secs)).await;
}

/// The one-line summary (`{kind} {name}: sent=… ok=… …`), printed and returned; `fault_ms` and
/// `healed_ms` (Unix ms) give `switch_ms` and `back_ms`.
pub fn summary(kind: &str, name: &str, s: &Stats, fault_ms: u64, healed_ms: u64) -> String {
    let n = |k| s.paths.get(k).copied().unwrap_or(0);
    let switch = s
        .first_off_mesh_unix_ms
        .map_or("-".into(), |t| t.saturating_sub(fault_ms).to_string());
    let back = s
        .last_off_mesh_unix_ms
        .map_or("-".into(), |t| t.saturating_sub(healed_ms).to_string());
    let idem = |q: f64| s.latency_idem_us.value_at_quantile(q) as f64 / 1000.0;
    let line = format!(
        "{kind} {name}: sent={} ok={} failed={} failed_idempotent={} unknown_outcome={} mesh={} ca_direct={} direct={} switch_ms={switch} back_ms={back} failures={:?} p99_ms={:.1} max_ms={:.1} p99_idem_ms={:.1} max_idem_ms={:.1}",
        s.sent,
        s.ok,
        s.failed,
        s.failed_idempotent,
        s.unknown_outcome,
        n("mesh"),
        n("ca_direct"),
        n("direct"),
        s.failures,
        s.ms(0.99),
        s.latency_us.max() as f64 / 1000.0,
        idem(0.99),
        s.latency_idem_us.max() as f64 / 1000.0,
    );
    println!("{line}");
    line
}

/// A shorter summary, for scenarios where the path does not move: counts, paths, failures and
/// which instance answered (`{kind} {name}: sent=… served_by=…`), printed and returned.
pub fn counts_line(kind: &str, name: &str, s: &Stats) -> String {
    let n = |k| s.paths.get(k).copied().unwrap_or(0);
    let l = format!(
        "{kind} {name}: sent={} ok={} failed={} mesh={} ca_direct={} direct={} failures={:?} served_by={:?}",
        s.sent,
        s.ok,
        s.failed,
        n("mesh"),
        n("ca_direct"),
        n("direct"),
        s.failures,
        s.served_by
    );
    println!("{l}");
    l
}
