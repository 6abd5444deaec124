//! `detourctl demo`: a three-host mesh on loopback (127.0.0.1–3), each host with its own
//! watchdog, the sidecar it keeps, and a run directory; a demo provider on hosts 2 and 3, the
//! directory registry, mutual TLS between the sidecars from a throw-away CA, and steady traffic
//! from an SDK client on host 1 — printed once a second.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use detour_proto::ServiceName;
use detour_thin_sdk::Client;
use http::Request;
use http_body_util::BodyExt;

use crate::certs::{Authority, DEFAULT_VALIDITY};
use crate::load::{self, LoadSpec, MethodKind, MethodMix, Stats, Target};
use crate::provider::{DemoProvider, SERVED_BY};
use crate::sidecar::{find_binary, find_sidecar_binary};
use crate::sidecar_config::{SidecarToml, TlsFiles};
use crate::watched::WatchdogProcess;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How long to drive traffic (until Ctrl-C when `None`).
    pub duration: Option<Duration>,
    /// Requests per second.
    pub rate: u32,
}

/// The sidecar config of demo host `n` (1–3): its certificate where `[tls]` looks by default
/// (`<run_dir>/tls`).
pub fn host_config(root: &Path, n: u8, provider: Option<std::net::SocketAddr>) -> String {
    let run_dir = root.join(format!("h{n}"));
    let mut t = SidecarToml::new(&format!("h{n}"), &format!("127.0.0.{n}"), &run_dir)
        .tls(TlsFiles::Omitted)
        .registry_dir("poll_ms = 100\nttl_ms = 3000")
        .extra("[lifecycle]\ndrain_timeout_ms = 5000");
    if let Some(addr) = provider {
        t = t.provide("hello", &addr.to_string(), None);
    }
    t.render()
}

/// Runs the demo, printing progress; returns the totals. `stop` ends it early (Ctrl-C).
pub async fn run(
    opts: &DemoOptions,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Stats> {
    let binary = find_sidecar_binary()?;
    let watchdog = find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN")?;
    let dir = tempfile::Builder::new()
        .prefix("detour-demo-")
        .tempdir()
        .context("creating the demo directory")?;
    let root = dir.path();
    let p2 = DemoProvider::start("127.0.0.2:0".parse()?, "h2-hello").await?;
    let p3 = DemoProvider::start("127.0.0.3:0".parse()?, "h3-hello").await?;
    // A throw-away CA: each sidecar finds its certificate where `[tls]` looks by default.
    let ca = Authority::new("detour.local")?;
    let mut hosts = Vec::new();
    for (n, provider) in [(1u8, None), (2, Some(p2.addr())), (3, Some(p3.addr()))] {
        let run_dir = root.join(format!("h{n}"));
        ca.write_host(&run_dir.join("tls"), &format!("h{n}"), DEFAULT_VALIDITY)?;
        let w = WatchdogProcess::start(
            &watchdog,
            &binary,
            &run_dir,
            &host_config(root, n, provider),
            &format!("127.0.0.{n}"),
            "",
            Duration::from_secs(20),
        )
        .await
        .with_context(|| format!("starting the watchdog of host h{n}"))?;
        let sc = w.sidecar()?;
        println!(
            "demo: host h{n} watchdog pid={} admin={} sidecar pid={} inbound={} admin={}{}",
            w.child.pid(),
            w.admin,
            sc.pid,
            sc.inbound,
            sc.admin,
            provider
                .map(|a| format!(" provider hello@{a}"))
                .unwrap_or_default()
        );
        hosts.push(w);
    }
    let service = ServiceName::new("hello")?;
    let outbound = hosts[0].outbound()?;
    let client = Client::builder(outbound.clone())
        .app("detour-demo")
        .timeout(Duration::from_secs(5))
        .build();
    warm_up(&client, &service).await?;
    println!(
        "demo: calling service hello from host h1 through {outbound} at {} req/s",
        opts.rate
    );
    let spec = LoadSpec {
        service,
        rate: opts.rate,
        duration: opts
            .duration
            .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
        methods: MethodMix::One(MethodKind::Get),
        body_bytes: 0,
        concurrency: 256,
        path: "/".into(),
        timeout: Duration::from_secs(5),
        slow: None,
        keys: None,
    };
    let stats = load::run(&spec, &Target::Sdk(client), print_tick, stop).await;
    for w in &hosts {
        if let Err(e) = crate::watched::shutdown(&w.unix).await {
            eprintln!("demo: stopping {}: {e}", w.run_dir.display());
        }
    }
    drop(hosts);
    drop((p2, p3));
    Ok(stats)
}

fn print_tick(second: u64, w: &Stats) {
    let by: Vec<String> = w
        .served_by
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "t={second}s requests={} ok={} failed={} p50_ms={:.2} p99_ms={:.2} answered_by: {}",
        w.sent,
        w.ok,
        w.failed,
        w.ms(0.5),
        w.ms(0.99),
        if by.is_empty() {
            "-".into()
        } else {
            by.join(" ")
        }
    );
}

/// Waits until both demo providers have answered through the mesh (registrations propagate
/// through the directory registry within its poll interval).
async fn warm_up(client: &Client, service: &ServiceName) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    while seen.len() < 2 {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the mesh did not answer from both providers within 15 s (saw {seen:?})");
        }
        let req = Request::get("/").body(detour_thin_sdk::body::empty())?;
        if let Ok(resp) = client.send(service, req).await {
            if let Some(by) = resp.headers().get(SERVED_BY).and_then(|v| v.to_str().ok()) {
                *seen.entry(by.to_owned()).or_default() += 1;
            }
            let _ = resp.into_body().collect().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
