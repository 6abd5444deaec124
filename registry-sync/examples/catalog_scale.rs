//! Catalog at scale against a real etcd (run by `bench/catalog-scale.sh`): N services × M
//! instances; time to full load from etcd and from the disk cache, resident memory, and the
//! delay from an etcd write to the catalog update.
//!
//! `catalog_scale ETCD_URL N M CACHE_DIR` writes the keys, loads them, measures propagation and
//! leaves the disk cache in CACHE_DIR; `catalog_scale --from-cache CACHE_DIR N M` is a fresh
//! process starting with etcd unreachable, as a restarted sidecar would.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_proto::{AppProtocol, Endpoint, HostId, InstanceId, ServiceName, Source};
use detour_registry::cache::DiskCache;
use detour_registry::catalog::{Catalog, CatalogOptions};
use detour_registry::etcd::{EtcdOptions, EtcdRegistry};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn endpoint(s: usize, i: usize, weight: u32) -> Endpoint {
    Endpoint {
        service: ServiceName::new(format!("svc{s}")).expect("name"),
        instance: InstanceId::new(format!("svc{s}-i{i}")).expect("name"),
        host: HostId::new(format!("host{i}")).expect("name"),
        app_address: format!("127.0.{}.{}:{}", s / 250 % 250, s % 250 + 1, 8000 + i)
            .parse()
            .expect("addr"),
        pa_address: Some(
            format!("127.0.{}.{}:4143", s / 250 % 250, s % 250 + 1)
                .parse()
                .expect("addr"),
        ),
        protocol: AppProtocol::Http1,
        weight,
        zone: String::new(),
        version: String::new(),
        source: Source::Native,
        labels: Default::default(),
        healthy: true,
        no_direct: false,
    }
}

fn value(ep: &Endpoint) -> String {
    serde_json::json!({"version": 1, "endpoint": ep}).to_string()
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,detour_registry::catalog=info".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: catalog_scale ETCD_URL N M CACHE_DIR | catalog_scale --from-cache CACHE_DIR N M";
    let (url, dir) = match (args.get(1), args.get(2), args.get(4)) {
        (Some(flag), Some(dir), _) if flag == "--from-cache" => (None, dir.clone()),
        (Some(url), _, Some(dir)) => (Some(url.clone()), dir.clone()),
        _ => return Err(usage.into()),
    };
    let (n_arg, m_arg) = if url.is_some() { (2, 3) } else { (3, 4) };
    let n: usize = args.get(n_arg).ok_or(usage)?.parse()?;
    let m: usize = args.get(m_arg).ok_or(usage)?.parse()?;
    let cache_path = std::path::Path::new(&dir).join("catalog.redb");
    match url {
        Some(url) => from_etcd(url, n, m, &cache_path).await,
        None => from_cache(&cache_path, n, m).await,
    }
}

async fn from_etcd(url: String, n: usize, m: usize, cache_path: &std::path::Path) -> Res<()> {
    let raw = etcd_client::Client::connect([url.as_str()], None).await?;
    write_services(&raw, n, m).await?;
    let (catalog, mut receivers) = load(url, n, m, cache_path).await?;
    propagation(&raw, &mut receivers, n).await?;
    catalog.flush_cache();
    Ok(())
}

/// Writes `n` services of `m` endpoints each, one transaction per service, 64 at a time.
async fn write_services(raw: &etcd_client::Client, n: usize, m: usize) -> Res<()> {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..n {
        let mut c = raw.clone();
        tasks.spawn(async move {
            let ops: Vec<etcd_client::TxnOp> = (0..m)
                .map(|i| {
                    let ep = endpoint(s, i, 1);
                    etcd_client::TxnOp::put(
                        format!("/detour/v1/services/svc{s}/svc{s}-i{i}"),
                        value(&ep),
                        None,
                    )
                })
                .collect();
            c.txn(etcd_client::Txn::new().and_then(ops))
                .await
                .map(|_| ())
        });
        while tasks.len() >= 64 {
            tasks.join_next().await.ok_or("join")???;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    println!(
        "bench: wrote {} keys in {:.1} s",
        n * m,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The registry listed from etcd and a catalog subscribed to every service; its time and memory
/// printed.
async fn load(
    url: String,
    n: usize,
    m: usize,
    cache_path: &std::path::Path,
) -> Res<(Catalog, Vec<Receiver>)> {
    let opts = EtcdOptions {
        endpoints: vec![url],
        prefix: "/detour/v1".into(),
        ttl: Duration::from_secs(10),
        request_timeout: Duration::from_secs(5),
        watch_check: Duration::from_secs(1),
        security: Default::default(),
    };
    let rss0 = rss_kib();
    let t = Instant::now();
    let reg = EtcdRegistry::open(HostId::new("bench").expect("name"), opts).await?;
    while !detour_registry::Registry::synced(&reg) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let listed = t.elapsed();
    let rss_view = rss_kib();
    let cache = DiskCache::open(cache_path).ok_or("cache")?;
    let catalog = Catalog::with_options(
        Arc::new(reg),
        CatalogOptions {
            cache: Some(cache.clone()),
            ..CatalogOptions::default()
        },
    );
    let mut receivers = Vec::with_capacity(n);
    for s in 0..n {
        let name = ServiceName::new(format!("svc{s}")).expect("name");
        receivers.push(catalog.subscribe(&name).await?);
    }
    let loaded = t.elapsed();
    let total: usize = receivers.iter().map(|r| r.borrow().endpoints.len()).sum();
    assert_eq!(total, n * m, "every endpoint is in the catalog");
    let rss1 = rss_kib();
    println!(
        "bench: load from etcd: list {:.0} ms, catalog of {n} services x {m} ready in {:.0} ms; rss {} MiB -> {} MiB (registry view alone {} MiB)",
        listed.as_secs_f64() * 1000.0,
        loaded.as_secs_f64() * 1000.0,
        rss0 / 1024,
        rss1 / 1024,
        rss_view / 1024,
    );
    Ok((catalog, receivers))
}

/// Propagation: one instance changes, 200 times; the time until the catalog shows it.
async fn propagation(raw: &etcd_client::Client, receivers: &mut [Receiver], n: usize) -> Res<()> {
    let mut c = raw.clone();
    let mut delays = Vec::new();
    let mut commits = Vec::new();
    for k in 0..200 {
        let s = (k * 7919) % n;
        let ep = endpoint(s, 0, 2 + k as u32);
        let rx = &mut receivers[s];
        rx.borrow_and_update();
        let t = Instant::now();
        c.put(
            format!("/detour/v1/services/svc{s}/svc{s}-i0"),
            value(&ep),
            None,
        )
        .await?;
        commits.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|set| set.endpoints.iter().any(|e| e.weight == ep.weight)),
        )
        .await??;
        delays.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "bench: etcd write -> catalog update: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (200 changes)",
        pct(&mut delays, 0.5),
        pct(&mut delays, 0.99),
        pct(&mut delays, 1.0)
    );
    println!(
        "bench:   of which the etcd put itself (commit, fsync): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(&mut commits, 0.5),
        pct(&mut commits, 0.99),
        pct(&mut commits, 1.0)
    );
    Ok(())
}

/// A catalog's view of one service.
type Receiver = tokio::sync::watch::Receiver<Arc<detour_proto::EndpointSet>>;

/// A fresh process with etcd unreachable: everything from the disk cache.
async fn from_cache(cache_path: &std::path::Path, n: usize, m: usize) -> Res<()> {
    let dead = EtcdOptions {
        endpoints: vec!["http://127.0.0.1:9".into()],
        prefix: "/detour/v1".into(),
        ttl: Duration::from_secs(10),
        request_timeout: Duration::from_millis(200),
        watch_check: Duration::from_secs(1),
        security: Default::default(),
    };
    let rss0 = rss_kib();
    let t = Instant::now();
    let reg = EtcdRegistry::open(HostId::new("bench2").expect("name"), dead).await?;
    let reg_opened = t.elapsed();
    let cache = DiskCache::open(cache_path).ok_or("cache reopen")?;
    let cache_opened = t.elapsed();
    let catalog = Catalog::with_options(
        Arc::new(reg),
        CatalogOptions {
            cache: Some(cache),
            ..CatalogOptions::default()
        },
    );
    let services = catalog.preload().await?;
    let ready = t.elapsed();
    let mut total = 0;
    for s in 0..n {
        let name = ServiceName::new(format!("svc{s}")).expect("name");
        total += catalog.endpoints(&name).await?.endpoints.len();
    }
    assert_eq!(total, n * m, "every endpoint came from the disk cache");
    println!(
        "bench: load from disk cache (etcd down): {services} services, {total} endpoints ready in {:.0} ms (registry client {:.0} ms, cache open {:.0} ms, catalog {:.0} ms); rss {} MiB -> {} MiB",
        ready.as_secs_f64() * 1000.0,
        reg_opened.as_secs_f64() * 1000.0,
        (cache_opened - reg_opened).as_secs_f64() * 1000.0,
        (ready - cache_opened).as_secs_f64() * 1000.0,
        rss0 / 1024,
        rss_kib() / 1024,
    );
    Ok(())
}
