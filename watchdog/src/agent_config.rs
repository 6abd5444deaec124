//! The watchdog's configuration: one TOML file, every key overridable by a
//! `DETOUR_WATCHDOG__<SECTION>__<KEY>` environment variable, validated as a whole before anything
//! starts. The host, registry, run and state directories are the sidecar's: the watchdog reads
//! them from the sidecar's own config file (`sidecar.config`), so the two can never disagree —
//! those keys only ([`SidecarView`]): every other key of that file is the sidecar's business,
//! so a sidecar release that adds a key never stops an older watchdog.
//!
//! `docs/configuration.md` lists every key; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_proto::HostId;
use detour_proto::config_file::{self, ConfigError};
use detour_registry::client_config::{RegistryClient, RegistryDirRaw, RegistryEtcdRaw};
use serde::Deserialize;

use crate::supervise::Policy;

/// Prefix of the environment variables that override watchdog config keys.
pub const ENV_PREFIX: &str = "DETOUR_WATCHDOG__";

/// The watchdog's configuration as written (before validation).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// The sidecar it runs.
    pub sidecar: SidecarRaw,
    /// Its own admin API.
    pub admin: AdminRaw,
    /// Restarts.
    pub restart: RestartRaw,
    /// Crash loops.
    pub crash_loop: CrashLoopRaw,
    /// Liveness probes of the sidecar.
    pub probe: ProbeRaw,
    /// The sidecar's memory ceiling.
    pub memory: MemoryRaw,
    /// Upgrades.
    pub upgrade: UpgradeRaw,
}

/// `[sidecar]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct SidecarRaw {
    /// The `detour-sidecar` binary (`""`: the one beside `detour-watchdog`).
    pub binary: String,
    /// The sidecar's config file. Required.
    pub config: String,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminRaw {
    /// Loopback address of the read-only admin API.
    pub listen: String,
    /// Unix socket (mode 0600) of the whole API, relative to the sidecar's run directory.
    pub unix: String,
}

impl Default for AdminRaw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4192".into(),
            unix: "watchdog.sock".into(),
        }
    }
}

/// `[restart]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RestartRaw {
    /// First delay before restarting a sidecar that exited.
    pub backoff_ms: u64,
    /// Longest such delay.
    pub max_backoff_ms: u64,
    /// Ready this long: the delay starts again from `backoff_ms`.
    pub stable_ms: u64,
    /// Time a (re)started sidecar has to become ready before it is killed and started again.
    pub ready_timeout_ms: u64,
}

impl Default for RestartRaw {
    fn default() -> Self {
        Self {
            backoff_ms: 100,
            max_backoff_ms: 5000,
            stable_ms: 10_000,
            ready_timeout_ms: 30_000,
        }
    }
}

/// `[crash_loop]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CrashLoopRaw {
    /// Unplanned exits within `window_ms` that mark the host `failed`.
    pub crashes: u32,
    /// The window.
    pub window_ms: u64,
    /// Restart delay while the host is marked `failed`.
    pub retry_ms: u64,
    /// Ready this long clears the mark.
    pub clear_after_ms: u64,
}

impl Default for CrashLoopRaw {
    fn default() -> Self {
        Self {
            crashes: 5,
            window_ms: 60_000,
            retry_ms: 10_000,
            clear_after_ms: 10_000,
        }
    }
}

/// `[probe]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProbeRaw {
    /// Interval of `/live` probes of a ready sidecar.
    pub interval_ms: u64,
    /// Time one probe may take.
    pub timeout_ms: u64,
    /// Consecutive failed probes that make the sidecar hung (killed and restarted).
    pub fail_after: u32,
}

impl Default for ProbeRaw {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            timeout_ms: 1000,
            fail_after: 3,
        }
    }
}

/// `[memory]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MemoryRaw {
    /// Resident memory above which the sidecar is replaced without loss; 0 = no ceiling.
    pub limit_mb: u64,
}

/// `[upgrade]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpgradeRaw {
    /// Time a new sidecar has to become ready before the upgrade is abandoned (the running one
    /// serves on).
    pub ready_timeout_ms: u64,
    /// The local directory a gray version rule's binary must be in (owned by root or the
    /// watchdog's user, not writable by group or others); `""`: the directory of
    /// `sidecar.binary`.
    pub binaries_dir: String,
}

impl Default for UpgradeRaw {
    fn default() -> Self {
        Self {
            ready_timeout_ms: 30_000,
            binaries_dir: String::new(),
        }
    }
}

/// The prefix of the sidecar's environment variables (they apply to its file here too).
const SIDECAR_ENV_PREFIX: &str = "DETOUR_SIDECAR__";

/// The keys of the sidecar's config file the watchdog reads, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct SidecarViewRaw {
    host: String,
    run_dir: PathBuf,
    state_dir: PathBuf,
    registry: String,
    registry_dir: RegistryDirRaw,
    registry_etcd: RegistryEtcdRaw,
    lifecycle: LifecycleView,
}

impl Default for SidecarViewRaw {
    fn default() -> Self {
        Self {
            host: String::new(),
            run_dir: PathBuf::from("run"),
            state_dir: PathBuf::new(),
            registry: "dir:registry".into(),
            registry_dir: RegistryDirRaw::default(),
            registry_etcd: RegistryEtcdRaw::default(),
            lifecycle: LifecycleView::default(),
        }
    }
}

/// `[lifecycle]` of the sidecar: how long its stop may take.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct LifecycleView {
    drain_timeout_ms: u64,
    announce_ms: u64,
}

impl Default for LifecycleView {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            announce_ms: 1000,
        }
    }
}

/// What the watchdog knows of its sidecar's config (with the sidecar's defaults).
#[derive(Debug, Clone)]
pub struct SidecarView {
    /// The host.
    pub host: HostId,
    /// The sidecar's run directory (sockets, pid and address files).
    pub run_dir: PathBuf,
    /// The host's state directory (persistent): the watchdog keeps its own state there too.
    pub state_dir: PathBuf,
    /// The registry.
    pub registry: RegistryClient,
    /// The sidecar's graceful-stop bound.
    pub drain_timeout: Duration,
    /// How long the sidecar announces a drain.
    pub announce: Duration,
}

impl SidecarView {
    /// Reads the keys the watchdog needs from the sidecar's config `text` (environment
    /// overrides apply as they do for the sidecar); every other key is ignored.
    pub fn parse(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<SidecarView, ConfigError> {
        let loaded =
            config_file::load_known::<SidecarViewRaw>(name, text, SIDECAR_ENV_PREFIX, env)?;
        loaded.validate(name, |raw| {
            let mut p = Vec::new();
            let host = HostId::new(raw.host.clone())
                .map_err(|e| p.push(format!("host: {e}")))
                .ok();
            let registry = RegistryClient::validate(
                &raw.registry,
                &raw.registry_dir,
                &raw.registry_etcd,
                &raw.run_dir,
                &mut p,
            );
            let state_dir = detour_registry::client_config::state_dir(&raw.run_dir, &raw.state_dir);
            match (host, registry) {
                (Some(host), Some(registry)) if p.is_empty() => Ok(SidecarView {
                    host,
                    run_dir: raw.run_dir,
                    state_dir,
                    registry,
                    drain_timeout: Duration::from_millis(raw.lifecycle.drain_timeout_ms),
                    announce: Duration::from_millis(raw.lifecycle.announce_ms),
                }),
                _ => Err(p),
            }
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The sidecar binary to run (until an upgrade says otherwise).
    pub sidecar_binary: PathBuf,
    /// The sidecar's config file.
    pub sidecar_config: PathBuf,
    /// The keys of the sidecar's config the watchdog reads (host, registry, directories).
    pub sidecar: SidecarView,
    /// The read-only admin listener.
    pub admin_listen: SocketAddr,
    /// The whole API's Unix socket.
    pub admin_unix: PathBuf,
    /// Restart and crash-loop thresholds.
    pub policy: Policy,
    /// Time a (re)started sidecar has to become ready.
    pub ready_timeout: Duration,
    /// Liveness probe interval.
    pub probe_interval: Duration,
    /// Liveness probe timeout.
    pub probe_timeout: Duration,
    /// Failed probes that make a sidecar hung.
    pub fail_after: u32,
    /// Memory ceiling in bytes.
    pub memory_limit: Option<u64>,
    /// Time a new sidecar has to become ready in an upgrade.
    pub upgrade_timeout: Duration,
    /// Where a version rule's binary must be.
    pub binaries_dir: PathBuf,
    /// Environment variables with the prefix that named no key (logged at start).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads `path` with the process environment and validates it (the sidecar's config too).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (_, text) = config_file::read(path)?;
        Self::parse(path, &text, std::env::vars())
    }

    /// Parses and validates config text (`path` locates relative paths).
    pub fn parse(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let name = path.display().to_string();
        let loaded = config_file::load::<RawConfig>(&name, text, ENV_PREFIX, env.clone())?;
        let base = path.parent().unwrap_or(Path::new("."));
        let (raw, mut problems, warnings) = (loaded.value, loaded.problems, loaded.warnings);
        let (sidecar_config, sidecar) = sidecar_view(&raw.sidecar.config, base, env, &mut problems);
        let sidecar_binary = if raw.sidecar.binary.is_empty() {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("detour-sidecar")))
                .unwrap_or_else(|| PathBuf::from("detour-sidecar"))
        } else {
            base.join(&raw.sidecar.binary)
        };
        let binaries_dir = if raw.upgrade.binaries_dir.is_empty() {
            sidecar_binary
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        } else {
            base.join(&raw.upgrade.binaries_dir)
        };
        let admin_listen = loopback(&raw.admin.listen, &mut problems);
        let mut ms = |key: &str, v: u64| positive_ms(&mut problems, key, v);
        let policy = Policy {
            backoff: ms("restart.backoff_ms", raw.restart.backoff_ms),
            max_backoff: ms("restart.max_backoff_ms", raw.restart.max_backoff_ms),
            stable: ms("restart.stable_ms", raw.restart.stable_ms),
            crashes: raw.crash_loop.crashes.max(1),
            window: ms("crash_loop.window_ms", raw.crash_loop.window_ms),
            loop_retry: ms("crash_loop.retry_ms", raw.crash_loop.retry_ms),
            clear_after: ms("crash_loop.clear_after_ms", raw.crash_loop.clear_after_ms),
        };
        let ready_timeout = ms("restart.ready_timeout_ms", raw.restart.ready_timeout_ms);
        let probe_interval = ms("probe.interval_ms", raw.probe.interval_ms);
        let probe_timeout = ms("probe.timeout_ms", raw.probe.timeout_ms);
        let upgrade_timeout = ms("upgrade.ready_timeout_ms", raw.upgrade.ready_timeout_ms);
        if raw.probe.fail_after == 0 {
            problems.push("probe.fail_after: must be at least 1".into());
        }
        match (sidecar, admin_listen) {
            (Some(sidecar), Ok(admin_listen)) if problems.is_empty() => {
                let unix = PathBuf::from(&raw.admin.unix);
                let admin_unix = if unix.is_absolute() {
                    unix
                } else {
                    sidecar.run_dir.join(unix)
                };
                Ok(Config {
                    sidecar_binary,
                    sidecar_config,
                    sidecar,
                    admin_listen,
                    admin_unix,
                    policy,
                    ready_timeout,
                    probe_interval,
                    probe_timeout,
                    fail_after: raw.probe.fail_after,
                    memory_limit: (raw.memory.limit_mb > 0).then_some(raw.memory.limit_mb << 20),
                    upgrade_timeout,
                    binaries_dir,
                    warnings,
                })
            }
            _ => Err(ConfigError {
                source_name: name,
                problems,
            }),
        }
    }
}

/// The sidecar's config file (`sidecar.config`, relative to `base`) and the keys of it the
/// watchdog reads; each problem pushed onto `problems`.
fn sidecar_view(
    config: &str,
    base: &Path,
    env: Vec<(String, String)>,
    problems: &mut Vec<String>,
) -> (PathBuf, Option<SidecarView>) {
    let sidecar_config = if config.is_empty() {
        problems.push("sidecar.config: the sidecar's config file is required".to_owned());
        PathBuf::new()
    } else {
        base.join(config)
    };
    let sidecar = if sidecar_config.as_os_str().is_empty() {
        None
    } else {
        let text = std::fs::read_to_string(&sidecar_config);
        match text {
            Ok(t) => {
                let n = sidecar_config.display().to_string();
                SidecarView::parse(&n, &t, env)
                    .map_err(|e| problems.push(format!("sidecar.config: {e}")))
                    .ok()
            }
            Err(e) => {
                problems.push(format!(
                    "sidecar.config: cannot read {}: {e}",
                    sidecar_config.display()
                ));
                None
            }
        }
    };
    (sidecar_config, sidecar)
}

/// `v` milliseconds, with a problem named `key` when it is 0.
fn positive_ms(problems: &mut Vec<String>, key: &str, v: u64) -> Duration {
    if v == 0 {
        problems.push(format!("{key}: must be greater than 0"));
    }
    Duration::from_millis(v)
}

/// `admin.listen`: `ip:port` on loopback.
fn loopback(listen: &str, problems: &mut Vec<String>) -> Result<SocketAddr, ()> {
    let addr = listen
        .parse::<SocketAddr>()
        .map_err(|_| problems.push(format!("admin.listen: {listen:?} is not ip:port")));
    if let Ok(a) = addr
        && !a.ip().is_loopback()
    {
        problems.push(format!("admin.listen: {a} is not a loopback address"));
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn reads_the_sidecar_config_and_its_own_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sidecar.toml"),
            "host = \"h1\"\nrun_dir = \"/tmp/run-h1\"\n",
        )
        .unwrap();
        let path = dir.path().join("watchdog.toml");
        let cfg = Config::parse(
            &path,
            "[sidecar]\nconfig = \"sidecar.toml\"\n[probe]\nfail_after = 2\n",
            env(&[
                ("DETOUR_WATCHDOG__PROBE__INTERVAL_MS", "250"),
                ("DETOUR_WATCHDOG_CONFIG", "/etc/detour/watchdog.toml"),
                ("DETOUR_SIDECAR_BIN", "/usr/bin/detour-sidecar"),
                ("DETOUR_WATCHDOG__NOT_A_KEY", "1"),
                ("DETOUR_SIDECAR__HOST", "h7"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg.sidecar.host.as_str(),
            "h7",
            "the sidecar's own variables apply"
        );
        assert_eq!(cfg.probe_interval, Duration::from_millis(250));
        assert_eq!(cfg.fail_after, 2);
        assert_eq!(cfg.admin_unix, PathBuf::from("/tmp/run-h1/watchdog.sock"));
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    }

    #[test]
    fn the_deploy_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = dir.path().join("sidecar.toml");
        std::fs::write(&sidecar, include_str!("../../deploy/sidecar.toml")).unwrap();
        let text = include_str!("../../deploy/watchdog.toml")
            .replace("/etc/detour/sidecar.toml", &sidecar.display().to_string());
        let cfg = Config::parse(&dir.path().join("watchdog.toml"), &text, Vec::new()).unwrap();
        assert_eq!(cfg.memory_limit, Some(512 << 20));
        assert_eq!(cfg.admin_unix, PathBuf::from("/run/detour/watchdog.sock"));
        assert_eq!(cfg.sidecar.state_dir, PathBuf::from("/var/lib/detour"));
    }

    #[test]
    fn keys_of_a_newer_sidecar_are_not_the_watchdogs_business() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sidecar.toml"),
            "host = \"h1\"\nrun_dir = \"/tmp/r\"\nstate_dir = \"/tmp/s\"\nfeature_of_tomorrow = 1\n[new_section]\nkey = \"v\"\n[proxy]\nbalance = \"p2c\"\nnot_yet_known = true\n",
        )
        .unwrap();
        let cfg = Config::parse(
            &dir.path().join("watchdog.toml"),
            "[sidecar]\nconfig = \"sidecar.toml\"\n",
            env(&[("DETOUR_SIDECAR__ANOTHER__NEW_KEY", "1")]),
        )
        .unwrap();
        assert_eq!(cfg.sidecar.state_dir, PathBuf::from("/tmp/s"));
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        // A key the watchdog reads must still be right.
        std::fs::write(
            dir.path().join("sidecar.toml"),
            "host = \"\"\nregistry = \"zk:x\"\n",
        )
        .unwrap();
        let err = Config::parse(
            &dir.path().join("watchdog.toml"),
            "[sidecar]\nconfig = \"sidecar.toml\"\n",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("host") && err.contains("registry"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::parse(
            &dir.path().join("w.toml"),
            "[admin]\nlisten = \"10.0.0.1:1\"\n[probe]\ninterval_ms = 0\n[nope]\nx = 1\n",
            Vec::new(),
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "sidecar.config",
            "admin.listen",
            "probe.interval_ms",
            "nope",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }
}
