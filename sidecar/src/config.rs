//! The sidecar's configuration: one TOML file, every key overridable by a `DETOUR_…`
//! environment variable, validated as a whole before anything starts.
//!
//! `docs/configuration.md` lists every key; keep the two in step.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_core::link::LinkConfig;
use detour_proto::config_file::{self, ConfigError};
use detour_proto::{AppProtocol, HostId, InstanceId, ServiceName};
use detour_registry::client_config::{RegistryClient, RegistryDirRaw, RegistryEtcdRaw};
use detour_registry::protection::ProtectionPolicy;
use serde::Deserialize;

use crate::tls::identity::SpiffeId;

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
    pub limits: crate::config_limits::LimitsRaw,
    /// Outlier ejection.
    pub outlier: crate::config_limits::OutlierRaw,
    /// Mutual TLS between sidecars.
    pub tls: crate::config_tls::TlsRaw,
    /// The CA's retry budget.
    pub retry: crate::config_limits::RetryRaw,
    /// Per-service traffic policy.
    pub policy: crate::policy::PolicyRaw,
    /// Local providers this sidecar serves inbound and registers.
    pub provide: Vec<ProvideRaw>,
    /// The watchdog this sidecar runs under.
    pub watchdog: WatchdogRaw,
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

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            host: String::new(),
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
            limits: crate::config_limits::LimitsRaw::default(),
            outlier: crate::config_limits::OutlierRaw::default(),
            tls: crate::config_tls::TlsRaw::default(),
            retry: crate::config_limits::RetryRaw::default(),
            policy: crate::policy::PolicyRaw::default(),
            provide: Vec::new(),
            watchdog: WatchdogRaw::default(),
        }
    }
}

/// `[outbound]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutboundRaw {
    /// Loopback TCP address for local callers (`""` disables it).
    pub listen: String,
    /// Unix socket path, relative to `run_dir` unless absolute (`""` disables it).
    pub unix: String,
    /// The group the Unix socket belongs to (a name from `/etc/group`, or a number), so local
    /// callers in it may connect (mode 0660); `""`: the sidecar's own group.
    pub unix_group: String,
}

impl Default for OutboundRaw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4140".into(),
            unix: "outbound.sock".into(),
            unix_group: String::new(),
        }
    }
}

/// `[inbound]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct InboundRaw {
    /// The host address remote sidecars connect to.
    pub listen: String,
    /// How often each local provider is health-checked.
    pub check_interval_ms: u64,
    /// Time one health check of a local provider may take.
    pub check_timeout_ms: u64,
}

impl Default for InboundRaw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4143".into(),
            check_interval_ms: 1000,
            check_timeout_ms: 500,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminRaw {
    /// Loopback address of the admin API.
    pub listen: String,
}

impl Default for AdminRaw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4191".into(),
        }
    }
}

/// `[proxy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxyRaw {
    /// `p2c` (least loaded of two random picks) or `round-robin`.
    pub balance: String,
    /// Upstream connect timeout.
    pub connect_timeout_ms: u64,
    /// Time allowed for a response head to arrive, over every attempt.
    pub request_timeout_ms: u64,
    /// Time allowed for one attempt's response head (0: only the request timeout).
    pub try_timeout_ms: u64,
    /// Most requests in flight from this CA to one endpoint (0: no limit).
    pub max_concurrent_per_endpoint: u32,
    /// Largest request head accepted (bytes); larger gets 431.
    pub max_header_bytes: usize,
    /// How long an endpoint that refused a connection is passed over.
    pub eject_ms: u64,
    /// Request bodies up to this size are kept so a failed attempt can be retried.
    pub max_replay_bytes: u64,
    /// The protocol from this CA to remote PAs: `http2` (one multiplexed connection per PA) or
    /// `http1` (a keep-alive pool per PA).
    pub pa_protocol: String,
}

impl Default for ProxyRaw {
    fn default() -> Self {
        Self {
            balance: "p2c".into(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 30_000,
            try_timeout_ms: 0,
            max_concurrent_per_endpoint: 0,
            max_header_bytes: 16 * 1024,
            eject_ms: 2000,
            max_replay_bytes: 64 * 1024,
            pa_protocol: "http2".into(),
        }
    }
}

/// `[lifecycle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LifecycleRaw {
    /// Upper bound on a graceful stop.
    pub drain_timeout_ms: u64,
    /// How long a drain is announced (control stream, registry, `/detour/ping`) before the
    /// listeners close, so callers switch paths first.
    pub announce_ms: u64,
}

impl Default for LifecycleRaw {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            announce_ms: 1000,
        }
    }
}

/// `[link]`: how this sidecar's CA watches the PAs it uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LinkRaw {
    /// Interval of active probes to each PA in use.
    pub probe_interval_ms: u64,
    /// Time a probe may take.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before going straight to the provider.
    pub fail_after: u32,
    /// Consecutive good probes (with the host ready) before ramping back.
    pub recover_after: u32,
    /// Duration of the ramp back to 100% via the PA.
    pub ramp_ms: u64,
}

impl Default for LinkRaw {
    fn default() -> Self {
        Self {
            probe_interval_ms: 200,
            probe_timeout_ms: 250,
            fail_after: 2,
            recover_after: 3,
            ramp_ms: 2000,
        }
    }
}

/// One `[[provide]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvideRaw {
    /// Service name.
    pub service: String,
    /// Where the local provider listens.
    pub address: String,
    /// `http1` (default), `http2` or `grpc`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Relative share of traffic.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Instance id (default `{host}-{service}`).
    #[serde(default)]
    pub instance: Option<String>,
    /// Path the health check `GET`s (HTTP/1.1 providers); absent: a TCP connect decides.
    #[serde(default)]
    pub check_path: Option<String>,
    /// Most requests a second this sidecar hands the provider (the rest get 429
    /// `rate-limited`); absent: no limit.
    #[serde(default)]
    pub rate_limit_rps: Option<u32>,
    /// Burst allowed above the rate (default: the rate).
    #[serde(default)]
    pub rate_limit_burst: Option<u32>,
    /// Caller identities (SPIFFE IDs of their sidecars) allowed through this PA; absent: every
    /// sidecar of the trust domain. Needs `tls.mode = "mutual"`.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// `allow`: callers may reach the provider on paths that skip this PA (C→P, C→CA→P) when
    /// the PA is unreachable; `deny`: only through this PA. Default: `deny` with an `allow`
    /// list (the list would be skipped otherwise), else `allow`.
    #[serde(default)]
    pub direct: Option<String>,
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Power of two choices, least in-flight requests.
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
}

/// A validated local provider.
#[derive(Debug, Clone)]
pub struct Provide {
    /// Service name.
    pub service: ServiceName,
    /// Instance id.
    pub instance: InstanceId,
    /// Where the provider listens.
    pub address: SocketAddr,
    /// Its protocol.
    pub protocol: AppProtocol,
    /// Its weight.
    pub weight: u32,
    /// Path its health check `GET`s, if any.
    pub check_path: Option<String>,
    /// Rate limit at this PA: requests a second and burst.
    pub rate_limit: Option<(u32, u32)>,
    /// Caller identities allowed; `None`: every sidecar of the trust domain.
    pub allow: Option<Vec<SpiffeId>>,
    /// Whether callers may reach the provider on a path that skips this PA.
    pub direct: bool,
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
    pub limits: crate::config_limits::Limits,
    /// Outlier ejection.
    pub outlier: crate::balance::Outlier,
    /// Mutual TLS between sidecars, or plaintext.
    pub tls: crate::config_tls::TlsMode,
    /// Which connections the PA spends a TLS handshake on.
    pub handshake: crate::tls::guard::HandshakeLimits,
    /// The retry budget per service.
    pub retry_budget: crate::budget::BudgetConfig,
    /// Graceful-stop bound.
    pub drain_timeout: Duration,
    /// How long a drain is announced before listeners close.
    pub announce: Duration,
    /// The CA link machine's thresholds.
    pub link: LinkConfig,
    /// Probe interval to PAs.
    pub probe_interval: Duration,
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
    /// Environment variables with the prefix that named no key (logged at start).
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads `path` (or only defaults and environment when `None`) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (name, text) = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (p.display().to_string(), t),
                Err(e) => {
                    return Err(ConfigError {
                        source_name: p.display().to_string(),
                        problems: vec![format!("cannot read: {e}")],
                    });
                }
            },
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
        let warnings = loaded.warnings.clone();
        let mut cfg = loaded.validate(name, RawConfig::validate)?;
        cfg.warnings = warnings;
        Ok(cfg)
    }
}

impl RawConfig {
    /// Checks every value, collecting every problem.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        let host = HostId::new(self.host.clone())
            .map_err(|e| p.push(format!("host: {e}")))
            .ok();
        let registry = RegistryClient::validate(
            &self.registry,
            &self.registry_dir,
            &self.registry_etcd,
            &self.run_dir,
            &mut p,
        );
        let state_dir = detour_registry::client_config::state_dir(&self.run_dir, &self.state_dir);
        let addr = |p: &mut Vec<String>, key: &str, v: &str| -> Option<SocketAddr> {
            v.parse()
                .map_err(|_| p.push(format!("{key}: {v:?} is not ip:port")))
                .ok()
        };
        let positive = |p: &mut Vec<String>, key: &str, v: u64| {
            if v == 0 {
                p.push(format!("{key}: must be greater than 0"));
            }
            Duration::from_millis(v)
        };
        let outbound_tcp = if self.outbound.listen.is_empty() {
            None
        } else {
            addr(&mut p, "outbound.listen", &self.outbound.listen)
        };
        let outbound_unix = (!self.outbound.unix.is_empty()).then(|| {
            let u = PathBuf::from(&self.outbound.unix);
            if u.is_absolute() {
                u
            } else {
                self.run_dir.join(u)
            }
        });
        let outbound_unix_group = match self.outbound.unix_group.as_str() {
            "" => None,
            g => group_id(g, "/etc/group")
                .map_err(|e| p.push(format!("outbound.unix_group: {e}")))
                .ok(),
        };
        if outbound_tcp.is_none() && outbound_unix.is_none() && self.outbound.listen.is_empty() {
            p.push("outbound: at least one of listen and unix must be set".into());
        }
        let inbound = addr(&mut p, "inbound.listen", &self.inbound.listen);
        let provider_check_interval = positive(
            &mut p,
            "inbound.check_interval_ms",
            self.inbound.check_interval_ms,
        );
        let provider_check_timeout = positive(
            &mut p,
            "inbound.check_timeout_ms",
            self.inbound.check_timeout_ms,
        );
        let admin = addr(&mut p, "admin.listen", &self.admin.listen);
        if let Some(a) = admin
            && !a.ip().is_loopback()
        {
            p.push(format!("admin.listen: {a} is not a loopback address"));
        }
        let balance = match self.proxy.balance.as_str() {
            "p2c" => Some(Balance::P2c),
            "round-robin" => Some(Balance::RoundRobin),
            other => {
                p.push(format!(
                    "proxy.balance: {other:?} is not one of \"p2c\", \"round-robin\""
                ));
                None
            }
        };
        let pa_protocol = match self.proxy.pa_protocol.as_str() {
            "http2" => AppProtocol::Http2,
            "http1" => AppProtocol::Http1,
            other => {
                p.push(format!(
                    "proxy.pa_protocol: {other:?} is not one of \"http2\", \"http1\""
                ));
                AppProtocol::Http2
            }
        };
        let limits = self.limits.validate(&mut p);
        let outlier = self.outlier.validate(&mut p);
        let tls = self.tls.validate(&self.run_dir, &mut p);
        let retry_budget = self.retry.validate(&mut p);
        let policies = self.policy.validate(&mut p);
        let global = detour_registry::policy::PolicyOverride {
            try_timeout_ms: Some(self.proxy.try_timeout_ms),
            max_concurrent_per_endpoint: Some(self.proxy.max_concurrent_per_endpoint),
            ..Default::default()
        };
        p.extend(global.problems("proxy"));
        let connect_timeout = positive(
            &mut p,
            "proxy.connect_timeout_ms",
            self.proxy.connect_timeout_ms,
        );
        let request_timeout = positive(
            &mut p,
            "proxy.request_timeout_ms",
            self.proxy.request_timeout_ms,
        );
        let drain_timeout = positive(
            &mut p,
            "lifecycle.drain_timeout_ms",
            self.lifecycle.drain_timeout_ms,
        );
        let protection = self.protection.validate(&mut p);
        let catalog_cache = (!self.catalog_cache.is_empty()).then(|| {
            let c = PathBuf::from(&self.catalog_cache);
            if c.is_absolute() {
                c
            } else {
                state_dir.join(c)
            }
        });
        let probe_interval = positive(
            &mut p,
            "link.probe_interval_ms",
            self.link.probe_interval_ms,
        );
        let probe_timeout = positive(&mut p, "link.probe_timeout_ms", self.link.probe_timeout_ms);
        if self.link.fail_after == 0 || self.link.recover_after == 0 {
            p.push("link.fail_after and link.recover_after: must be at least 1".into());
        }
        if !(1024..=1 << 20).contains(&self.proxy.max_header_bytes) {
            p.push("proxy.max_header_bytes: must be between 1024 and 1048576".into());
        }
        let watchdog_takeover = match (self.watchdog.takeover_ms, &registry) {
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
        let mut provide = Vec::new();
        for (i, raw) in self.provide.iter().enumerate() {
            let key = format!("provide[{i}]");
            let service = ServiceName::new(raw.service.clone())
                .map_err(|e| p.push(format!("{key}.service: {e}")))
                .ok();
            let address = addr(&mut p, &format!("{key}.address"), &raw.address);
            let protocol = match raw.protocol.as_deref() {
                None => Some(AppProtocol::Http1),
                Some(s) => AppProtocol::parse(s).or_else(|| {
                    p.push(format!("{key}.protocol: {s:?} is not http1, http2 or grpc"));
                    None
                }),
            };
            let instance_text = raw
                .instance
                .clone()
                .unwrap_or_else(|| format!("{}-{}", self.host, raw.service));
            let instance = InstanceId::new(instance_text)
                .map_err(|e| p.push(format!("{key}.instance: {e}")))
                .ok();
            if let Some(path) = raw.check_path.as_deref()
                && !path.starts_with('/')
            {
                p.push(format!("{key}.check_path: {path:?} must start with '/'"));
            }
            if raw.rate_limit_rps == Some(0) {
                p.push(format!(
                    "{key}.rate_limit_rps: must be greater than 0 (leave it out for no limit)"
                ));
            }
            if raw.rate_limit_burst.is_some() && raw.rate_limit_rps.is_none() {
                p.push(format!("{key}.rate_limit_burst: needs rate_limit_rps"));
            }
            let allow = raw
                .allow
                .as_ref()
                .map(|ids| allow_list(&mut p, &key, ids, &tls, &self.tls.trust_domain));
            let direct = match raw.direct.as_deref() {
                None => allow.is_none(),
                Some("allow") => true,
                Some("deny") => false,
                Some(other) => {
                    p.push(format!(
                        "{key}.direct: {other:?} is not one of \"allow\", \"deny\""
                    ));
                    false
                }
            };
            if let (Some(service), Some(address), Some(protocol), Some(instance)) =
                (service, address, protocol, instance)
            {
                if provide.iter().any(|x: &Provide| x.service == service) {
                    p.push(format!("{key}: service {service} is provided twice"));
                }
                provide.push(Provide {
                    service,
                    instance,
                    address,
                    protocol,
                    weight: raw.weight.unwrap_or(1).max(1),
                    check_path: raw.check_path.clone(),
                    rate_limit: raw
                        .rate_limit_rps
                        .map(|r| (r, raw.rate_limit_burst.unwrap_or(r))),
                    allow,
                    direct,
                });
            }
        }
        match (host, registry, inbound, admin, balance) {
            (Some(host), Some(registry), Some(inbound), Some(admin), Some(balance))
                if p.is_empty() =>
            {
                Ok(Config {
                    host,
                    run_dir: self.run_dir,
                    state_dir,
                    registry,
                    outbound_tcp,
                    outbound_unix,
                    outbound_unix_group,
                    inbound,
                    provider_check_interval,
                    provider_check_timeout,
                    admin,
                    balance,
                    connect_timeout,
                    request_timeout,
                    try_timeout: (self.proxy.try_timeout_ms > 0)
                        .then(|| Duration::from_millis(self.proxy.try_timeout_ms)),
                    max_concurrent_per_endpoint: self.proxy.max_concurrent_per_endpoint as usize,
                    policies,
                    max_header_bytes: self.proxy.max_header_bytes,
                    eject: Duration::from_millis(self.proxy.eject_ms),
                    max_replay_bytes: self.proxy.max_replay_bytes,
                    pa_protocol,
                    limits,
                    outlier,
                    tls,
                    handshake: self.tls.handshake_limits(),
                    retry_budget,
                    drain_timeout,
                    announce: Duration::from_millis(self.lifecycle.announce_ms),
                    link: LinkConfig {
                        fail_after: self.link.fail_after,
                        recover_after: self.link.recover_after,
                        ramp_start: 0.1,
                        ramp: Duration::from_millis(self.link.ramp_ms),
                    },
                    probe_interval,
                    probe_timeout,
                    catalog_cache,
                    protection,
                    provide,
                    watchdog_socket: (!self.watchdog.socket.is_empty())
                        .then(|| PathBuf::from(&self.watchdog.socket)),
                    watchdog_takeover,
                    warnings: Vec::new(),
                })
            }
            _ => Err(p),
        }
    }
}

/// The id of group `name` (or `name` itself when it is a number), from the group file `file`.
fn group_id(name: &str, file: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (n, _, gid) = (f.next()?, f.next()?, f.next()?);
            (n == name).then(|| gid.parse::<u32>().ok()).flatten()
        })
        .next()
        .ok_or_else(|| format!("no group {name:?} in {file}"))
}

/// Validates one provider's allow-list: SPIFFE IDs of this trust domain, and TLS on.
fn allow_list(
    p: &mut Vec<String>,
    key: &str,
    ids: &[String],
    tls: &crate::config_tls::TlsMode,
    trust_domain: &str,
) -> Vec<SpiffeId> {
    if tls.files().is_none() {
        p.push(format!(
            "{key}.allow: callers are only known with tls.mode = \"mutual\""
        ));
    }
    let mut out = Vec::new();
    for id in ids {
        match SpiffeId::parse(id) {
            Ok(id) if id.trust_domain() == trust_domain => out.push(id),
            Ok(id) => p.push(format!(
                "{key}.allow: {id} is not in the trust domain {trust_domain}"
            )),
            Err(e) => p.push(format!("{key}.allow: {e}")),
        }
    }
    out
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
