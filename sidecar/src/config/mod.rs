//! The sidecar's configuration: one TOML file, every key overridable by a `DETOUR_…`
//! environment variable, validated as a whole before anything starts.
//!
//! `docs/configuration.md` lists every key; keep the two in step.

//! Each section is a module with its raw form (named defaults), its validation (every problem
//! collected) and its validated form; this module puts them together. The room imports
//! nothing of the sidecar but `tls::identity` (a value type): every other room imports it.

pub mod limits;
pub mod listen;
pub mod policy;
pub mod provide;
pub mod proxy;
pub mod tls;
pub mod traces;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_core::link::LinkConfig;
use detour_core::probe::ProbePace;
use detour_proto::config_file::{self, ConfigError};
use detour_proto::{AppProtocol, HostId, ServiceName};
use detour_registry::client_config::{RegistryClient, RegistryDirRaw, RegistryEtcdRaw};
use detour_registry::protection::ProtectionPolicy;
use detour_registry::telemetry::LogFormat;
use serde::Deserialize;

pub use listen::{AdminRaw, InboundRaw, MetricsListen, MetricsRaw, OutboundRaw};
pub use provide::{Provide, ProvideRaw, ZonePreference};
pub use proxy::{Balance, LifecycleRaw, LinkRaw, ProxyRaw};

pub use detour_registry::protection_config::ProtectionRaw;

/// Prefix of the environment variables that override config keys
/// (`DETOUR_SIDECAR__ADMIN__LISTEN` sets `[admin] listen`).
pub const ENV_PREFIX: &str = "DETOUR_SIDECAR__";

/// The sidecar's configuration as written in the file (before validation).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// This host's id in the registry. Required.
    pub host: String,
    /// This host's failure domain (zone): the CA and its SDKs prefer providers of the same
    /// zone, and local providers without a zone of their own are registered in it. `""`: none.
    pub zone: String,
    /// Directory for the sidecar's own files (Unix socket, address file). Created if missing.
    pub run_dir: PathBuf,
    /// Directory for what must survive a restart and a reboot (the catalog's disk cache, the
    /// registry documents followed): persistent storage, not a tmpfs. `""`: `run_dir`.
    pub state_dir: PathBuf,
    /// Registry back-end: `dir:PATH`.
    pub registry: String,
    /// Outbound (CA) listeners for local callers.
    pub outbound: OutboundRaw,
    /// Inbound (PA) listener for remote callers' sidecars.
    pub inbound: InboundRaw,
    /// Admin listener.
    pub admin: AdminRaw,
    /// Proxy behaviour.
    pub proxy: ProxyRaw,
    /// Lifecycle.
    pub lifecycle: LifecycleRaw,
    /// Directory-registry tuning.
    pub registry_dir: RegistryDirRaw,
    /// The CA half of the link state machine.
    pub link: LinkRaw,
    /// etcd-registry tuning.
    pub registry_etcd: RegistryEtcdRaw,
    /// The catalog's disk cache (redb), relative to `state_dir` unless absolute; `""` disables.
    pub catalog_cache: String,
    /// Registry self-protection.
    pub protection: ProtectionRaw,
    /// Limits on the data listeners.
    pub limits: limits::LimitsRaw,
    /// Outlier ejection.
    pub outlier: limits::OutlierRaw,
    /// Mutual TLS between sidecars.
    pub tls: tls::TlsRaw,
    /// The CA's retry budget.
    pub retry: limits::RetryRaw,
    /// Per-service traffic policy.
    pub policy: policy::PolicyRaw,
    /// Local providers this sidecar serves inbound and registers.
    pub provide: Vec<ProvideRaw>,
    /// The watchdog this sidecar runs under.
    pub watchdog: WatchdogRaw,
    /// Logging.
    pub log: LogRaw,
    /// The scrapeable metrics listener.
    pub metrics: MetricsRaw,
    /// The access log.
    pub access_log: AccessLogRaw,
    /// Trace export.
    pub tracing: traces::TracingRaw,
}

/// `[access_log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AccessLogRaw {
    /// Where lines go: a file (relative to `run_dir` unless absolute; opened again on SIGHUP),
    /// `-` for stdout, `""` for no access log.
    pub path: String,
    /// Share of requests logged, 0 to 1.
    pub sample: f64,
    /// Most lines a second (0: no cap); more are dropped and counted.
    pub max_per_second: u32,
}

impl Default for AccessLogRaw {
    fn default() -> Self {
        Self {
            path: String::new(),
            sample: 1.0,
            max_per_second: 1000,
        }
    }
}

/// `[access_log]` validated.
#[derive(Debug, Clone, Default)]
pub struct AccessLogSettings {
    /// Where lines go (`-`: stdout); `None`: no access log.
    pub path: Option<PathBuf>,
    /// Share of requests logged.
    pub sample: f64,
    /// Most lines a second (0: no cap).
    pub max_per_second: u32,
}

impl AccessLogRaw {
    /// Validates `[access_log]`; a relative path is under `run_dir`.
    fn validate(&self, run_dir: &Path, p: &mut Vec<String>) -> AccessLogSettings {
        if !(0.0..=1.0).contains(&self.sample) {
            p.push(format!(
                "access_log.sample: {} is not between 0 and 1",
                self.sample
            ));
        }
        let path = match self.path.as_str() {
            "" => None,
            "-" => Some(PathBuf::from("-")),
            f if Path::new(f).is_absolute() => Some(PathBuf::from(f)),
            f => Some(run_dir.join(f)),
        };
        AccessLogSettings {
            path,
            sample: self.sample,
            max_per_second: self.max_per_second,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogRaw {
    /// `text` (readable lines; colours only on a terminal) or `json` (one object a line).
    pub format: String,
}

impl LogRaw {
    /// `log.format`: `text` or `json`.
    fn validate(&self, p: &mut Vec<String>) -> LogFormat {
        LogFormat::parse(&self.format).unwrap_or_else(|| {
            p.push(format!(
                "log.format: {:?} is not one of \"text\", \"json\"",
                self.format
            ));
            LogFormat::Text
        })
    }
}

/// `path` under `dir` unless absolute; `None` when empty (the file is not kept).
fn under(dir: &Path, path: &str) -> Option<PathBuf> {
    (!path.is_empty()).then(|| {
        let c = PathBuf::from(path);
        if c.is_absolute() { c } else { dir.join(c) }
    })
}

impl Default for LogRaw {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
            zone: String::new(),
            run_dir: PathBuf::from("run"),
            state_dir: PathBuf::new(),
            registry: "dir:registry".into(),
            outbound: OutboundRaw::default(),
            inbound: InboundRaw::default(),
            admin: AdminRaw::default(),
            proxy: ProxyRaw::default(),
            lifecycle: LifecycleRaw::default(),
            registry_dir: RegistryDirRaw::default(),
            link: LinkRaw::default(),
            registry_etcd: RegistryEtcdRaw::default(),
            catalog_cache: "catalog.redb".into(),
            protection: ProtectionRaw::default(),
            limits: limits::LimitsRaw::default(),
            outlier: limits::OutlierRaw::default(),
            tls: tls::TlsRaw::default(),
            retry: limits::RetryRaw::default(),
            policy: policy::PolicyRaw::default(),
            provide: Vec::new(),
            watchdog: WatchdogRaw::default(),
            log: LogRaw::default(),
            metrics: MetricsRaw::default(),
            access_log: AccessLogRaw::default(),
            tracing: traces::TracingRaw::default(),
        }
    }
}

/// `[watchdog]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct WatchdogRaw {
    /// The watchdog's Unix socket; when set, registrations and the host status are published
    /// through it (the watchdog sets this when it starts the sidecar).
    pub socket: String,
    /// How long the watchdog may leave publications untaken before this sidecar keeps the
    /// host's registrations alive itself (0: a third of the registry's time-to-live).
    pub takeover_ms: u64,
}

impl WatchdogRaw {
    /// Validates `[watchdog]` against the registry's time-to-live: the socket and the
    /// take-over time.
    fn validate(
        &self,
        registry: Option<&RegistryClient>,
        p: &mut Vec<String>,
    ) -> (Option<PathBuf>, Duration) {
        let takeover = match (self.takeover_ms, registry) {
            (0, Some(r)) => r.ttl() / 3,
            (0, None) => Duration::from_secs(3),
            (ms, r) => {
                let t = Duration::from_millis(ms);
                if let Some(r) = r
                    && t >= r.ttl()
                {
                    p.push(format!(
                        "watchdog.takeover_ms: {ms} must be shorter than the registry's time-to-live ({} ms)",
                        r.ttl().as_millis()
                    ));
                }
                t
            }
        };
        let socket = (!self.socket.is_empty()).then(|| PathBuf::from(&self.socket));
        (socket, takeover)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This host.
    pub host: HostId,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The state directory (persistent).
    pub state_dir: PathBuf,
    /// The registry back-end and its client settings.
    pub registry: RegistryClient,
    /// Outbound TCP listener.
    pub outbound_tcp: Option<SocketAddr>,
    /// Outbound Unix socket.
    pub outbound_unix: Option<PathBuf>,
    /// The group id of the outbound Unix socket, when one is configured.
    pub outbound_unix_group: Option<u32>,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// How often local providers are health-checked.
    pub provider_check_interval: Duration,
    /// Time one provider health check may take.
    pub provider_check_timeout: Duration,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Load balancing.
    pub balance: Balance,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Response-head timeout, over every attempt.
    pub request_timeout: Duration,
    /// Response-head timeout of one attempt.
    pub try_timeout: Option<Duration>,
    /// Most requests in flight from this CA to one endpoint (0: no limit).
    pub max_concurrent_per_endpoint: usize,
    /// Per-service overrides of the traffic policy.
    pub policies: std::collections::HashMap<ServiceName, detour_registry::policy::PolicyOverride>,
    /// Request-head size limit.
    pub max_header_bytes: usize,
    /// Ejection time after a refused connection.
    pub eject: Duration,
    /// Request bodies kept for retries up to this size.
    pub max_replay_bytes: u64,
    /// The protocol from this CA to remote PAs.
    pub pa_protocol: AppProtocol,
    /// Limits on the data listeners.
    pub limits: limits::Limits,
    /// Outlier ejection.
    pub outlier: limits::Outlier,
    /// Mutual TLS between sidecars, or plaintext.
    pub tls: tls::TlsMode,
    /// Which connections the PA spends a TLS handshake on.
    pub handshake: tls::HandshakeLimits,
    /// The retry budget per service.
    pub retry_budget: limits::BudgetConfig,
    /// Graceful-stop bound.
    pub drain_timeout: Duration,
    /// How long a drain is announced before listeners close.
    pub announce: Duration,
    /// The CA link machine's thresholds.
    pub link: LinkConfig,
    /// How often PAs are probed.
    pub probe: ProbePace,
    /// Probe timeout.
    pub probe_timeout: Duration,
    /// The catalog's disk cache.
    pub catalog_cache: Option<PathBuf>,
    /// Self-protection settings, global and per service.
    pub protection: ProtectionPolicy,
    /// Local providers.
    pub provide: Vec<Provide>,
    /// Where registrations and the host status go instead of this sidecar's own registry
    /// client: the watchdog's socket, when it runs under one.
    pub watchdog_socket: Option<PathBuf>,
    /// How long the watchdog may be away before this sidecar keeps the registrations itself.
    pub watchdog_takeover: Duration,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// The scrapeable metrics listener and its token file.
    pub metrics: MetricsListen,
    /// The access log.
    pub access_log: AccessLogSettings,
    /// Trace export (`None`: spans are not recorded).
    pub tracing: Option<detour_core::trace::TraceConfig>,
    /// This host's zone, and the share of its endpoints a zone must have usable for callers to
    /// stay in it (`None`: no zone).
    pub zone: Option<ZonePreference>,
    /// Environment variables with the prefix that named no key (logged at start).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads `path` (or only defaults and environment when `None`) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => config_file::read(p)?,
            None => ("defaults".to_owned(), String::new()),
        };
        Self::parse(&name, &text, std::env::vars())
    }

    /// Parses and validates config text with the given environment.
    pub fn parse(
        name: &str,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let loaded = config_file::load::<RawConfig>(name, text, ENV_PREFIX, env)?;
        loaded.validate_keeping_warnings(name, RawConfig::validate, |c, w| c.warnings = w)
    }
}

impl RawConfig {
    /// Checks every value, section by section, collecting every problem.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        let sections = self.sections(&mut p);
        let handshake = self.tls.handshake_limits();
        let (Some(host), Some(registry), Some(inbound), Some(admin), Some(balance)) = (
            sections.host.clone(),
            sections.registry.clone(),
            sections.inbound.addr,
            sections.admin,
            sections.proxy.balance,
        ) else {
            return Err(p);
        };
        if !p.is_empty() {
            return Err(p);
        }
        let required = Required {
            host,
            registry,
            inbound,
            admin,
            balance,
        };
        Ok(sections.into_config(self.run_dir, handshake, required))
    }

    /// Each section checked on its own; its problems are added to `p`.
    fn sections(&self, p: &mut Vec<String>) -> Sections {
        let host = HostId::new(self.host.clone())
            .map_err(|e| p.push(format!("host: {e}")))
            .ok();
        let registry = RegistryClient::validate(
            &self.registry,
            &self.registry_dir,
            &self.registry_etcd,
            &self.run_dir,
            p,
        );
        let state_dir = detour_registry::client_config::state_dir(&self.run_dir, &self.state_dir);
        // In the order of the sections' problems in an error.
        let outbound = self.outbound.validate(&self.run_dir, p);
        let inbound = self.inbound.validate(p);
        let admin = self.admin.validate(p);
        let metrics = self.metrics.validate(&self.run_dir, p);
        let access_log = self.access_log.validate(&self.run_dir, p);
        let tracing = self.tracing.validate(&self.host, p);
        let proxy = self.proxy.validate(p);
        let limits = self.limits.validate(p);
        let outlier = self.outlier.validate(p);
        let tls = self.tls.validate(&self.run_dir, p);
        let retry_budget = self.retry.validate(p);
        let policies = self.policy.validate(p);
        let lifecycle = self.lifecycle.validate(p);
        let protection = self.protection.validate(p);
        let link = self.link.validate(p);
        let log_format = self.log.validate(p);
        let watchdog = self.watchdog.validate(registry.as_ref(), p);
        let trust_domain = &self.tls.trust_domain;
        let provide = provide::validate(&self.provide, &self.host, &tls, trust_domain, p);
        let zone = provide::zone(&self.zone, proxy.zone_min_healthy_percent, p);
        Sections {
            host,
            registry,
            catalog_cache: under(&state_dir, &self.catalog_cache),
            state_dir,
            outbound,
            inbound,
            admin,
            metrics,
            access_log,
            tracing,
            proxy,
            limits,
            outlier,
            tls,
            retry_budget,
            policies,
            lifecycle,
            protection,
            link,
            log_format,
            watchdog,
            provide,
            zone,
        }
    }
}

/// The values a sidecar cannot run without, once present.
struct Required {
    host: HostId,
    registry: RegistryClient,
    inbound: SocketAddr,
    admin: SocketAddr,
    balance: Balance,
}

/// Every section's checked values, before they are known to be complete.
struct Sections {
    host: Option<HostId>,
    registry: Option<RegistryClient>,
    state_dir: PathBuf,
    catalog_cache: Option<PathBuf>,
    outbound: listen::OutboundListen,
    inbound: listen::InboundListen,
    admin: Option<SocketAddr>,
    metrics: MetricsListen,
    access_log: AccessLogSettings,
    tracing: Option<detour_core::trace::TraceConfig>,
    proxy: proxy::ProxySettings,
    limits: limits::Limits,
    outlier: limits::Outlier,
    tls: tls::TlsMode,
    retry_budget: limits::BudgetConfig,
    policies: std::collections::HashMap<ServiceName, detour_registry::policy::PolicyOverride>,
    /// The drain timeout and the announce time.
    lifecycle: (Duration, Duration),
    protection: ProtectionPolicy,
    link: proxy::LinkSettings,
    log_format: LogFormat,
    /// The watchdog's socket and the take-over time.
    watchdog: (Option<PathBuf>, Duration),
    provide: Vec<Provide>,
    zone: Option<ZonePreference>,
}

impl Sections {
    /// The `Config` of sections that all checked.
    fn into_config(self, run_dir: PathBuf, handshake: tls::HandshakeLimits, r: Required) -> Config {
        let (proxy, link) = (self.proxy, self.link);
        Config {
            host: r.host,
            run_dir,
            state_dir: self.state_dir,
            registry: r.registry,
            outbound_tcp: self.outbound.tcp,
            outbound_unix: self.outbound.unix,
            outbound_unix_group: self.outbound.unix_group,
            inbound: r.inbound,
            provider_check_interval: self.inbound.check_interval,
            provider_check_timeout: self.inbound.check_timeout,
            admin: r.admin,
            balance: r.balance,
            connect_timeout: proxy.connect_timeout,
            request_timeout: proxy.request_timeout,
            try_timeout: proxy.try_timeout,
            max_concurrent_per_endpoint: proxy.max_concurrent_per_endpoint,
            policies: self.policies,
            max_header_bytes: proxy.max_header_bytes,
            eject: proxy.eject,
            max_replay_bytes: proxy.max_replay_bytes,
            pa_protocol: proxy.pa_protocol,
            limits: self.limits,
            outlier: self.outlier,
            tls: self.tls,
            handshake,
            retry_budget: self.retry_budget,
            drain_timeout: self.lifecycle.0,
            announce: self.lifecycle.1,
            link: link.machine,
            probe: link.probe,
            probe_timeout: link.probe_timeout,
            catalog_cache: self.catalog_cache,
            protection: self.protection,
            provide: self.provide,
            watchdog_socket: self.watchdog.0,
            watchdog_takeover: self.watchdog.1,
            log_format: self.log_format,
            metrics: self.metrics,
            access_log: self.access_log,
            tracing: self.tracing,
            zone: self.zone,
            warnings: Vec::new(),
        }
    }
}

/// `v` as `ip:port`, or a problem named `key`.
fn addr(p: &mut Vec<String>, key: &str, v: &str) -> Option<SocketAddr> {
    v.parse()
        .map_err(|_| p.push(format!("{key}: {v:?} is not ip:port")))
        .ok()
}

/// `v` milliseconds, with a problem named `key` when it is 0.
fn positive(p: &mut Vec<String>, key: &str, v: u64) -> Duration {
    if v == 0 {
        p.push(format!("{key}: must be greater than 0"));
    }
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests;
