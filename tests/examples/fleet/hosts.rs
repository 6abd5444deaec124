//! The fleet's hosts: HOSTS real sidecar processes, each on its own loopback address
//! (127.20.x.y), each providing a few services; started together, and probed for the registry
//! revision each has applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use detour_kit::process::ChildGuard;
use detour_kit::sidecar_config::SidecarToml;
use detour_proto::{ADDRESS_FILE, SidecarAddresses};
use futures_util::StreamExt;

use crate::measure;

/// One host's sidecar.
pub struct Host {
    /// Its id (`f0042`).
    pub name: String,
    run_dir: PathBuf,
    child: ChildGuard,
    /// Its addresses, once ready.
    pub addrs: Option<SidecarAddresses>,
}

impl Host {
    /// The sidecar's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// The services host `i` provides: `per_host` consecutive ones of `services`.
pub fn services_of(i: usize, per_host: usize, services: usize) -> Vec<String> {
    (0..per_host)
        .map(|j| format!("fleet-svc-{}", (i * per_host + j) % services))
        .collect()
}

/// Host `i`'s loopback address.
pub fn ip_of(i: usize) -> String {
    format!("127.20.{}.{}", i / 250, i % 250 + 1)
}

/// Writes every host's config and starts every sidecar at once.
pub fn spawn_all(
    bin: &Path,
    root: &Path,
    registry: &str,
    extra: &str,
    app: SocketAddr,
    (hosts, per_host, services): (usize, usize, usize),
) -> std::io::Result<Vec<Host>> {
    let mut out = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let name = format!("f{i:04}");
        let run_dir = root.join(&name);
        std::fs::create_dir_all(&run_dir)?;
        let mut toml = SidecarToml::new(&name, &ip_of(i), &run_dir)
            .registry(registry)
            .unix("")
            .extra(extra);
        for svc in services_of(i, per_host, services) {
            toml = toml.provide(&svc, &app.to_string(), None);
        }
        let config = run_dir.join("sidecar.toml");
        std::fs::write(&config, toml.render())?;
        let log = std::fs::File::create(run_dir.join("sidecar.log"))?;
        let mut cmd = Command::new(bin.join("detour-sidecar"));
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = ChildGuard::spawn(cmd, name.clone())?;
        out.push(Host {
            name,
            run_dir,
            child,
            addrs: None,
        });
    }
    Ok(out)
}

/// Waits until every sidecar wrote its address file (it does once ready); returns when the
/// last one was, or the names of those still not ready at `within`.
pub async fn wait_ready(hosts: &mut [Host], within: Duration) -> Result<Instant, Vec<String>> {
    let deadline = Instant::now() + within;
    loop {
        for h in hosts.iter_mut().filter(|h| h.addrs.is_none()) {
            let file = h.run_dir.join(ADDRESS_FILE);
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(a) = serde_json::from_str::<SidecarAddresses>(&text)
                && a.pid == h.pid()
            {
                h.addrs = Some(a);
            }
        }
        if hosts.iter().all(|h| h.addrs.is_some()) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(hosts
                .iter()
                .filter(|h| h.addrs.is_none())
                .map(|h| h.name.clone())
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls every host's `/state` (64 at a time, rounds 50 ms apart) until each has applied
/// `revision`; returns, per host that did within `within`, the revision and when (Unix ms) it
/// applied it.
pub async fn wait_applied(
    hosts: &[Host],
    revision: u64,
    within: Duration,
) -> BTreeMap<String, (u64, u64)> {
    let deadline = Instant::now() + within;
    let mut done = BTreeMap::new();
    while done.len() < hosts.len() && Instant::now() < deadline {
        let pending: Vec<(String, SocketAddr)> = hosts
            .iter()
            .filter(|h| !done.contains_key(&h.name))
            .filter_map(|h| Some((h.name.clone(), h.addrs.as_ref()?.admin)))
            .collect();
        let seen: Vec<(String, Option<(u64, u64)>)> = futures_util::stream::iter(pending)
            .map(|(name, admin)| async move { (name, measure::applied(admin).await) })
            .buffer_unordered(64)
            .collect()
            .await;
        for (name, a) in seen {
            if let Some((rev, at)) = a
                && rev >= revision
            {
                done.insert(name, (rev, at));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done
}

/// How many times, over every sidecar's log, a local provider was marked unhealthy (the
/// shared demo provider not answering a health check in time: each is a registry write that
/// every sidecar is told of).
pub fn health_flips(hosts: &[Host]) -> usize {
    hosts
        .iter()
        .map(|h| {
            std::fs::read_to_string(h.run_dir.join("sidecar.log"))
                .unwrap_or_default()
                .matches("failed its health check")
                .count()
        })
        .sum()
}

/// Every sidecar's CPU and RSS now.
pub fn sample(hosts: &[Host]) -> Vec<measure::ProcSample> {
    hosts
        .iter()
        .map(|h| measure::proc_sample(h.pid()))
        .collect()
}
