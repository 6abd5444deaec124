//! The fleet benchmark behind `bench/fleet.sh`: a real 3-member etcd on loopback and HOSTS real
//! sidecar processes started together, each on its own loopback address and providing a few
//! services. It measures the registration storm, how long one provider change takes to reach
//! every sidecar, etcd's cost at rest and under churn, each sidecar's own CPU and memory, the
//! recovery from a whole-cluster etcd outage under steady load, each sidecar's CPU at rest after
//! that load, and (with `--catalog N`) what N services × 5 endpoints cost each sidecar. Prints
//! `key: value` lines.
//!
//! `fleet HOSTS [SERVICES] [--per-host K] [--outage-secs S] [--catalog N] [--watch-check-ms N]
//! [--watched] [--bin DIR]`

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)] // a benchmark's report

mod hosts;
mod measure;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

use detour_kit::provider::DemoProvider;
use detour_proto::{Endpoint, HostId, InstanceId, ServiceName};
use detour_registry::etcd::EndpointValue;
use detour_registry::now_unix_ms;
use detour_tests::etcd::EtcdCluster;
use etcd_client::{Client, GetOptions, Txn, TxnOp};
use hosts::Host;
use measure::{EtcdSample, etcd_sample, per_second, spread};

const PREFIX: &str = "/detour/v1";

struct Args {
    hosts: usize,
    services: usize,
    per_host: usize,
    outage_secs: u64,
    catalog: usize,
    watch_check_ms: Option<u64>,
    watched: bool,
    bin: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        hosts: 50,
        services: 20,
        per_host: 3,
        outage_secs: 30,
        catalog: 0,
        watch_check_ms: None,
        watched: false,
        bin: std::path::absolute("target/release").expect("the working directory"),
    };
    let mut it = std::env::args().skip(1);
    let mut positional = 0;
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the option");
        match arg.as_str() {
            "--per-host" => a.per_host = value().parse().expect("--per-host N"),
            "--outage-secs" => a.outage_secs = value().parse().expect("--outage-secs S"),
            "--catalog" => a.catalog = value().parse().expect("--catalog N"),
            "--watch-check-ms" => {
                a.watch_check_ms = Some(value().parse().expect("--watch-check-ms N"));
            }
            // Absolute: every host process runs in its own run directory.
            "--bin" => a.bin = std::path::absolute(value()).expect("--bin DIR"),
            "--watched" => a.watched = true,
            n if positional == 0 => {
                a.hosts = n.parse().expect("HOSTS");
                positional += 1;
            }
            n => a.services = n.parse().expect("SERVICES"),
        }
    }
    a
}

/// A value of service `fleet-probe`, instance `probe-{n}`: what a provider change writes.
fn probe_value(n: u64, weight: u32, healthy: bool) -> (String, String) {
    let mut ep = Endpoint::new(
        ServiceName::new("fleet-probe").unwrap(),
        InstanceId::new(format!("probe-{n}")).unwrap(),
        HostId::new("fleet-driver").unwrap(),
        SocketAddr::from(([127, 0, 0, 9], 9)),
    );
    ep.weight = weight;
    ep.healthy = healthy;
    let key = format!("{PREFIX}/services/fleet-probe/probe-{n}");
    let value = serde_json::to_string(&EndpointValue {
        version: 1,
        endpoint: ep,
    })
    .unwrap();
    (key, value)
}

/// Change number `n` of the probe service (add, weight, status, remove in turn); its revision.
async fn change(etcd: &mut Client, n: u64) -> u64 {
    let instance = n / 4;
    let rev = match n % 4 {
        0 => etcd.put_kv(probe_value(instance, 1, true)).await,
        1 => etcd.put_kv(probe_value(instance, 5, true)).await,
        2 => etcd.put_kv(probe_value(instance, 5, false)).await,
        _ => etcd
            .delete(
                format!("{PREFIX}/services/fleet-probe/probe-{instance}"),
                None,
            )
            .await
            .map(|r| r.header().map_or(0, |h| h.revision())),
    };
    u64::try_from(rev.expect("etcd takes the change")).unwrap_or(0)
}

trait PutKv {
    async fn put_kv(&mut self, kv: (String, String)) -> Result<i64, etcd_client::Error>;
}

impl PutKv for Client {
    async fn put_kv(&mut self, (k, v): (String, String)) -> Result<i64, etcd_client::Error> {
        self.put(k, v, None)
            .await
            .map(|r| r.header().map_or(0, |h| h.revision()))
    }
}

/// Makes one change and measures how long each sidecar took to apply it (ms after the put).
async fn converge_one(fleet: &[Host], etcd: &mut Client, n: u64) -> (Vec<f64>, usize) {
    let put_at = now_unix_ms();
    let rev = change(etcd, n).await;
    let applied = hosts::wait_applied(fleet, rev, Duration::from_secs(30)).await;
    let lat = applied
        .values()
        .map(|&(_, at)| at.saturating_sub(put_at) as f64)
        .collect();
    (lat, fleet.len() - applied.len())
}

/// etcd's and the sidecars' rates between two samples `secs` apart.
fn cost_line(label: &str, a: &EtcdSample, b: &EtcdSample, secs: f64, sidecar_cpu: &[f64]) {
    let mut cpu = sidecar_cpu.to_vec();
    println!(
        "{label}: etcd_msgs_per_s={:.0} (watch={:.0} keepalive={:.0}) puts_per_s={:.1} etcd_cpu_pct={:.1} etcd_rss_mb={:.0} watchers={:.0} keys={:.0} db_mb={:.1} sidecar_cpu_pct_{}",
        (b.messages - a.messages) / secs,
        (b.watch_messages - a.watch_messages) / secs,
        (b.keepalive_messages - a.keepalive_messages) / secs,
        (b.puts - a.puts) / secs,
        100.0 * (b.cpu_secs - a.cpu_secs) / secs,
        b.rss_bytes / 1e6,
        b.watchers,
        b.keys,
        b.db_bytes / 1e6,
        spread_f(&mut cpu),
    );
}

fn spread_f(v: &mut [f64]) -> String {
    format!(
        "p50={:.3} p99={:.3} max={:.3}",
        measure::quantile(v, 0.5),
        measure::quantile(v, 0.99),
        measure::quantile(v, 1.0)
    )
}

/// Measures etcd and every sidecar over `secs` while `during` runs.
async fn window(
    label: &str,
    urls: &[String],
    fleet: &[Host],
    secs: u64,
    during: impl std::future::Future<Output = ()>,
) -> f64 {
    let (e0, p0, t0) = (
        etcd_sample(urls).await,
        hosts::sample(fleet),
        Instant::now(),
    );
    during.await;
    let rest = Duration::from_secs(secs).saturating_sub(t0.elapsed());
    tokio::time::sleep(rest).await;
    let (e1, p1, dt) = (
        etcd_sample(urls).await,
        hosts::sample(fleet),
        t0.elapsed().as_secs_f64(),
    );
    let cpu: Vec<f64> = p0
        .iter()
        .zip(&p1)
        .map(|(a, b)| 100.0 * (b.cpu_secs - a.cpu_secs) / dt)
        .collect();
    cost_line(label, &e0, &e1, dt, &cpu);
    (e1.messages - e0.messages) / dt
}

#[tokio::main]
async fn main() {
    let a = args();
    let root = tempfile::Builder::new()
        .prefix("detour-fleet-")
        .tempdir_in("/tmp")
        .expect("a temporary directory");
    std::fs::create_dir_all(root.path().join("etcd")).unwrap();
    let mut etcd = EtcdCluster::start(&root.path().join("etcd")).await;
    let urls = etcd.urls.clone();
    let mut kv = Client::connect(urls.clone(), None).await.expect("etcd");
    let app = DemoProvider::start(SocketAddr::from(([127, 0, 0, 1], 0)), "fleet-app")
        .await
        .expect("the demo provider");
    println!(
        "fleet: hosts={} services={} per_host={} endpoints={} etcd_members=3 watch_check_ms={} watched={}",
        a.hosts,
        a.services,
        a.per_host,
        a.hosts * a.per_host,
        a.watch_check_ms.unwrap_or(1000),
        a.watched
    );

    // 1. The registration storm.
    let start_ms = now_unix_ms();
    let t0 = Instant::now();
    let extra = a
        .watch_check_ms
        .map(|ms| format!("[registry_etcd]\nwatch_check_ms = {ms}"))
        .unwrap_or_default();
    let launch = hosts::Launch {
        bin: &a.bin,
        root: root.path(),
        registry: &etcd.spec(),
        extra: &extra,
        app: app.addr(),
        watched: a.watched,
    };
    let mut fleet =
        hosts::spawn_all(&launch, (a.hosts, a.per_host, a.services)).expect("sidecars start");
    let ready = hosts::wait_ready(&mut fleet, Duration::from_secs(120)).await;
    let ready_ms = match ready {
        Ok(at) => at.duration_since(t0).as_millis(),
        Err(missing) => panic!("{} sidecars not ready in 120 s: {missing:?}", missing.len()),
    };
    // Every provider and every host status written.
    let want = [
        ("services/fleet-svc-", a.hosts * a.per_host),
        ("hosts/", a.hosts),
    ];
    let mut reads_failed = 0u32;
    let registered_rev = 'written: loop {
        let mut rev = 0;
        let mut short = Vec::new();
        for (under, n) in want {
            let counted = kv
                .get(
                    format!("{PREFIX}/{under}"),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await;
            // A leader election in the storm fails a read: counted again on the next round.
            let r = match counted {
                Ok(r) => r,
                Err(e) => {
                    reads_failed += 1;
                    short.push(format!("{under}: not counted ({e})"));
                    continue;
                }
            };
            rev = rev.max(r.header().map_or(0, |h| h.revision()) as u64);
            if r.count() < n as i64 {
                short.push(format!("{under}: {}/{n}", r.count()));
            }
        }
        if short.is_empty() {
            break 'written rev;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "registrations: {short:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let registered_ms = t0.elapsed().as_millis();
    let seen = hosts::wait_applied(&fleet, registered_rev, Duration::from_secs(120)).await;
    let converged_ms = seen
        .values()
        .map(|&(_, at)| at)
        .max()
        .unwrap_or(start_ms)
        .saturating_sub(start_ms);
    println!(
        "storm: ready_all_ms={ready_ms} registered_all_ms={registered_ms} all_seen_everywhere_ms={converged_ms} sidecars_converged={}/{} driver_reads_failed={reads_failed}",
        seen.len(),
        a.hosts
    );
    tokio::time::sleep(Duration::from_secs(5)).await; // first health checks, host statuses

    // 2. At rest: etcd, and each sidecar's CPU and RSS.
    let rest_rate = window("rest", &urls, &fleet, 20, async {}).await;
    let mut rss: Vec<f64> = hosts::sample(&fleet)
        .iter()
        .map(|p| p.rss_bytes as f64 / 1e6)
        .collect();
    println!(
        "sidecar_rss_mb: {} provider_health_flips_so_far={}",
        spread_f(&mut rss),
        hosts::health_flips(&fleet)
    );
    if a.watched {
        let w0 = hosts::sample_watchdogs(&fleet);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let w1 = hosts::sample_watchdogs(&fleet);
        let mut cpu: Vec<f64> = w0
            .iter()
            .zip(&w1)
            .map(|(a, b)| 100.0 * (b.cpu_secs - a.cpu_secs) / 10.0)
            .collect();
        let mut rss: Vec<f64> = w1.iter().map(|p| p.rss_bytes as f64 / 1e6).collect();
        println!(
            "watchdog_at_rest: cpu_pct_{} rss_mb_{}",
            spread_f(&mut cpu),
            spread_f(&mut rss)
        );
    }

    // 3. Convergence of one change at a time.
    let mut all = Vec::new();
    let mut missed = 0;
    for n in 0..20 {
        let (lat, miss) = converge_one(&fleet, &mut kv, n).await;
        all.extend(lat);
        missed += miss;
    }
    println!(
        "convergence_ms (20 changes x {} sidecars, put to applied): {} missed={missed}",
        a.hosts,
        spread(&mut all)
    );

    // 4. Churn: 1 and 10 changes a second for 10 s each.
    let mut n = 100;
    for per_s in [1u64, 10] {
        let mut kv2 = kv.clone();
        let churn = async {
            let every = Duration::from_millis(1000 / per_s);
            for _ in 0..(10 * per_s) {
                change(&mut kv2, n).await;
                n += 1;
                tokio::time::sleep(every).await;
            }
        };
        window(&format!("churn_{per_s}_per_s"), &urls, &fleet, 10, churn).await;
        let (mut lat, miss) = converge_one(&fleet, &mut kv, n).await;
        n += 4 - n % 4; // the next change adds a fresh instance
        println!(
            "after_churn_{per_s}_per_s convergence_ms: {} missed={miss}",
            spread(&mut lat)
        );
    }

    // 5. The whole etcd cluster stopped for a while, under steady load.
    if a.outage_secs > 0 {
        outage(&a, &mut etcd, &urls, &fleet, rest_rate).await;
        rest_after_load(&fleet).await;
    }

    // 6. What a large catalog costs each sidecar.
    if a.catalog > 0 {
        let mut kv = Client::connect(urls.clone(), None).await.expect("etcd");
        catalog(&a, &mut kv, &urls, &fleet).await;
    }
    drop(fleet);
    drop(etcd);
}

/// Kills every etcd member for `outage_secs` under steady load through four sidecars, then
/// measures etcd's request rate each second after it returns, how long until every sidecar
/// applied a change made at its return, and what the load lost.
async fn outage(a: &Args, etcd: &mut EtcdCluster, urls: &[String], fleet: &[Host], rest: f64) {
    let secs = 10 + a.outage_secs + 25;
    let mut loads = Vec::new();
    for (i, h) in fleet.iter().take(4).enumerate() {
        let outbound = h.addrs.as_ref().and_then(|x| x.outbound_tcp).unwrap();
        let service = hosts::services_of((i + 1) % a.hosts, a.per_host, a.services)[0].clone();
        let child = tokio::process::Command::new(a.bin.join("detourctl"))
            .args([
                "load",
                "--sidecar",
                &outbound.to_string(),
                "--service",
                &service,
            ])
            .args(["--rate", "50", "--duration", &secs.to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("detourctl load");
        loads.push(child);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    etcd.kill_all().await;
    let down = now_unix_ms();
    tokio::time::sleep(Duration::from_secs(a.outage_secs)).await;
    // Sample etcd's counters every second from the restart on (they restart at 0).
    let sampler = {
        let urls = urls.to_vec();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(14) {
                let s = etcd_sample(&urls).await;
                if s.members == urls.len() {
                    samples.push((Instant::now(), s.messages));
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            samples
        })
    };
    etcd.start_all().await;
    let back = now_unix_ms();
    let down_ms = back - down;
    let mut kv = Client::connect(urls.to_vec(), None).await.expect("etcd");
    let rev = change(&mut kv, 1_000_000).await;
    let seen = hosts::wait_applied(fleet, rev, Duration::from_secs(60)).await;
    let last = seen.values().map(|&(_, at)| at).max().unwrap_or(back);
    let rates = per_second(&sampler.await.unwrap());
    let peak = rates.iter().copied().fold(0.0, f64::max);
    println!(
        "outage: etcd_down_ms={down_ms} converged_after_return_ms={} sidecars_converged={}/{} rest_msgs_per_s={rest:.0} recovery_msgs_per_s=[{}] peak_over_rest={:.2}",
        last.saturating_sub(back),
        seen.len(),
        fleet.len(),
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" "),
        peak / rest.max(1.0),
    );
    for (i, l) in loads.into_iter().enumerate() {
        let out = l.wait_with_output().await.expect("load output");
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.starts_with("load:"))
            .unwrap_or("load: -");
        println!("outage_load_{i}: {summary}");
    }
}

/// Each sidecar's CPU over 20 s at rest after the outage's load, from 12 s after it ended (the
/// links went idle after 10 s): the four callers still hold a link to every host of the service
/// they called, the other hosts were called or not.
async fn rest_after_load(fleet: &[Host]) {
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (p0, t0) = (hosts::sample(fleet), Instant::now());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (p1, dt) = (hosts::sample(fleet), t0.elapsed().as_secs_f64());
    let mut cpu: Vec<f64> = p0
        .iter()
        .zip(&p1)
        .map(|(a, b)| 100.0 * (b.cpu_secs - a.cpu_secs) / dt)
        .collect();
    let mut others = cpu.split_off(4.min(cpu.len()));
    println!(
        "rest_after_load: callers_cpu_pct_{} others_cpu_pct_{}",
        spread_f(&mut cpu),
        spread_f(&mut others)
    );
}

/// Writes `catalog` services × 5 endpoints and measures each sidecar's RSS before and after.
async fn catalog(a: &Args, kv: &mut Client, urls: &[String], fleet: &[Host]) {
    let before = hosts::sample(fleet);
    let t = Instant::now();
    let mut ops = Vec::new();
    let mut rev = 0;
    for s in 0..a.catalog {
        for i in 0..5 {
            let ep = Endpoint::new(
                ServiceName::new(format!("cat-{s:05}")).unwrap(),
                InstanceId::new(format!("cat-{s:05}-{i}")).unwrap(),
                HostId::new(format!("cat-host-{i}")).unwrap(),
                SocketAddr::from(([10, 1, (s / 250) as u8, (s % 250) as u8], 8080 + i as u16)),
            );
            let key = format!("{PREFIX}/services/cat-{s:05}/cat-{s:05}-{i}");
            let v = serde_json::to_string(&EndpointValue {
                version: 1,
                endpoint: ep,
            })
            .unwrap();
            ops.push(TxnOp::put(key, v, None));
            if ops.len() == 100 {
                let r = kv.txn(Txn::new().and_then(std::mem::take(&mut ops))).await;
                rev = r.expect("txn").header().map_or(0, |h| h.revision());
            }
        }
    }
    if !ops.is_empty() {
        let r = kv.txn(Txn::new().and_then(ops)).await.expect("txn");
        rev = r.header().map_or(0, |h| h.revision());
    }
    let written_ms = t.elapsed().as_millis();
    let seen = hosts::wait_applied(fleet, rev as u64, Duration::from_secs(300)).await;
    let applied_ms = t.elapsed().as_millis();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = hosts::sample(fleet);
    let endpoints = (a.catalog * 5) as f64;
    let mut per_ep: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, x)| (x.rss_bytes as f64 - b.rss_bytes as f64) / endpoints)
        .collect();
    let mut rss: Vec<f64> = after.iter().map(|p| p.rss_bytes as f64 / 1e6).collect();
    println!(
        "catalog: services={} endpoints={endpoints} written_ms={written_ms} applied_everywhere_ms={applied_ms} sidecars={}/{} rss_mb_{} rss_bytes_per_endpoint_{}",
        a.catalog,
        seen.len(),
        fleet.len(),
        spread_f(&mut rss),
        spread(&mut per_ep)
    );
    window("catalog_rest", urls, fleet, 10, async {}).await;
}
