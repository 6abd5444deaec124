//! The fleet's hosts: HOSTS real sidecar processes, each on its own loopback address
//! (127.20.x.y), each providing a few services, each started directly or by its own
//! `detour-watchdog`; started together, and probed for the registry revision each has applied.

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
    /// The sidecar, or the watchdog that runs it.
    child: ChildGuard,
    watched: bool,
    /// Its addresses, once ready.
    pub addrs: Option<SidecarAddresses>,
}

impl Host {
    /// The sidecar's pid (its address file's, once ready).
    pub fn pid(&self) -> u32 {
        self.addrs.as_ref().map_or(self.child.pid(), |a| a.pid)
    }

    /// The watchdog's pid, for a watched host.
    pub fn watchdog_pid(&self) -> Option<u32> {
        self.watched.then(|| self.child.pid())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A watchdog's sidecar outlives its watchdog by design: stopped by its own pid.
        if self.watched
            && let Some(a) = &self.addrs
            && let Ok(pid) = i32::try_from(a.pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// How the hosts run.
pub struct Launch<'a> {
    /// The directory of `detour-sidecar` (and `detour-watchdog`).
    pub bin: &'a Path,
    /// Where each host's run directory is made.
    pub root: &'a Path,
    /// The registry spec.
    pub registry: &'a str,
    /// TOML appended to every sidecar's config.
    pub extra: &'a str,
    /// The provider every host provides.
    pub app: SocketAddr,
    /// Each sidecar under its own watchdog.
    pub watched: bool,
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

/// Writes every host's config and starts every sidecar (or watchdog) at once.
pub fn spawn_all(
    l: &Launch<'_>,
    (hosts, per_host, services): (usize, usize, usize),
) -> std::io::Result<Vec<Host>> {
    let mut out = Vec::with_capacity(hosts);
    for i in 0..hosts {
        let name = format!("f{i:04}");
        let run_dir = l.root.join(&name);
        std::fs::create_dir_all(&run_dir)?;
        let mut toml = SidecarToml::new(&name, &ip_of(i), &run_dir)
            .registry(l.registry)
            .unix("")
            .extra(l.extra);
        for svc in services_of(i, per_host, services) {
            toml = toml.provide(&svc, &l.app.to_string(), None);
        }
        let config = run_dir.join("sidecar.toml");
        std::fs::write(&config, toml.render())?;
        let (program, config, log) = if l.watched {
            let watchdog = run_dir.join("watchdog.toml");
            let sidecar = l.bin.join("detour-sidecar");
            let text = format!(
                "[sidecar]\nbinary = \"{}\"\nconfig = \"sidecar.toml\"\n[admin]\nlisten = \"{}:0\"\n",
                sidecar.display(),
                ip_of(i)
            );
            std::fs::write(&watchdog, text)?;
            ("detour-watchdog", watchdog, "watchdog.log")
        } else {
            ("detour-sidecar", config, "sidecar.log")
        };
        let log = std::fs::File::create(run_dir.join(log))?;
        let mut cmd = Command::new(l.bin.join(program));
        cmd.arg("--config")
            .arg(&config)
            .current_dir(&run_dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let child = ChildGuard::spawn(cmd, name.clone())?;
        out.push(Host {
            name,
            run_dir,
            child,
            watched: l.watched,
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
                && (h.watched || a.pid == h.child.pid())
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

/// Every watchdog's CPU and RSS now (none when the hosts are not watched).
pub fn sample_watchdogs(hosts: &[Host]) -> Vec<measure::ProcSample> {
    hosts
        .iter()
        .filter_map(|h| Some(measure::proc_sample(h.watchdog_pid()?)))
        .collect()
}
