//! `detour-registry-sync`'s configuration: TOML (environment overrides with the prefix
//! `DETOUR_SYNC__`), every problem reported at once. Keys are documented in
//! `docs/registry-sync.md`.

use detour_registry::etcd_security::{EtcdSecurity, EtcdSecurityFiles};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_proto::config_file::{self, ConfigError};
use detour_proto::{AppProtocol, ServiceName};
use serde::Deserialize;

use crate::legacy::dubbo::Mapping;
use detour_registry::protection::ProtectionPolicy;
use detour_registry::protection_config::ProtectionRaw;

/// The environment prefix.
pub const ENV_PREFIX: &str = "DETOUR_SYNC__";

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// The legacy registry's name: mirrored entries carry `source = "sync:<name>"`, and the
    /// replicas of one mirror share it. Required.
    pub name: String,
    /// This replica's id (default: `<hostname>-<pid>`).
    pub replica: String,
    /// Where to read.
    pub source: SourceRaw,
    /// Where to write.
    pub target: TargetRaw,
    /// Self-protection against the source (the sidecar's `[protection]` keys).
    pub protection: ProtectionRaw,
    /// How often held instances are health-checked, milliseconds.
    pub check_interval_ms: u64,
    /// The admin listener.
    pub admin: AdminRaw,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            replica: String::new(),
            source: SourceRaw::default(),
            target: TargetRaw::default(),
            protection: ProtectionRaw::default(),
            check_interval_ms: 1000,
            admin: AdminRaw::default(),
        }
    }
}

/// `[source]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SourceRaw {
    /// `zookeeper` or `dir`.
    pub kind: String,
    /// ZooKeeper: `host:port[,host:port…]`.
    pub servers: String,
    /// ZooKeeper: the Dubbo root.
    pub root: String,
    /// ZooKeeper: the session timeout asked for, milliseconds.
    pub session_timeout_ms: u64,
    /// ZooKeeper: URL scheme → `http1` | `http2` (replaces the default table when given).
    pub protocols: BTreeMap<String, String>,
    /// ZooKeeper: interface → service name.
    pub services: BTreeMap<String, String>,
    /// ZooKeeper: URL parameters not kept as labels.
    pub ignored_params: Option<Vec<String>>,
    /// ZooKeeper: most providers taken per interface.
    pub max_per_interface: usize,
    /// dir: the directory registry to mirror.
    pub path: String,
    /// dir: how often it is read, milliseconds.
    pub poll_interval_ms: u64,
    /// How long a removal waits for the rest of its batch before it is judged, milliseconds
    /// (0: at once).
    pub settle_ms: u64,
}

impl Default for SourceRaw {
    fn default() -> Self {
        Self {
            kind: "zookeeper".into(),
            servers: String::new(),
            root: "/dubbo".into(),
            session_timeout_ms: 10_000,
            protocols: BTreeMap::new(),
            services: BTreeMap::new(),
            ignored_params: None,
            max_per_interface: 10_000,
            path: String::new(),
            poll_interval_ms: 500,
            settle_ms: 100,
        }
    }
}

/// `[target]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TargetRaw {
    /// etcd member URLs.
    pub etcd: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// The election lease, seconds: a dead leader is replaced within it.
    pub election_ttl_s: u64,
    /// The lease mirrored entries are attached to, seconds (longer than the election's).
    pub lease_ttl_s: u64,
    /// Time allowed for one request to one member, milliseconds.
    pub request_timeout_ms: u64,
    /// How often the target is read in full and compared, milliseconds.
    pub resync_interval_ms: u64,
    /// The etcd members' CA (PEM): TLS, with `https://` URLs.
    pub ca: String,
    /// A client certificate (PEM), for members started with `--client-cert-auth`.
    pub cert: String,
    /// Its private key (PEM).
    pub key: String,
    /// An etcd user, with `password_file`.
    pub user: String,
    /// A file whose first line is the user's password.
    pub password_file: String,
}

impl Default for TargetRaw {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: "/detour/v1".into(),
            election_ttl_s: 5,
            lease_ttl_s: 30,
            request_timeout_ms: 2000,
            resync_interval_ms: 30_000,
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            user: String::new(),
            password_file: String::new(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminRaw {
    /// Loopback address of the read-only admin API (port 0: any).
    pub listen: String,
    /// A file to write the bound address to (for scripts), if set.
    pub address_file: String,
}

impl Default for AdminRaw {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9190".into(),
            address_file: String::new(),
        }
    }
}

/// Where the mirror reads.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    /// ZooKeeper in Dubbo's layout.
    ZooKeeper {
        /// `host:port,…`.
        servers: String,
        /// The Dubbo root.
        root: String,
        /// Session timeout.
        session_timeout: Duration,
        /// URL mapping.
        mapping: Mapping,
        /// Most providers per interface.
        max_per_interface: usize,
    },
    /// A directory registry.
    Dir {
        /// Its directory.
        path: PathBuf,
        /// Poll interval.
        poll_interval: Duration,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The legacy name.
    pub name: String,
    /// This replica's id.
    pub replica: String,
    /// The source.
    pub source: SourceSpec,
    /// etcd members.
    pub etcd: Vec<String>,
    /// Key prefix.
    pub prefix: String,
    /// Election lease.
    pub election_ttl: Duration,
    /// Entries' lease.
    pub lease_ttl: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// TLS and credentials towards etcd.
    pub etcd_security: EtcdSecurity,
    /// Full comparison interval.
    pub resync_interval: Duration,
    /// Health-check interval of held instances.
    pub check_interval: Duration,
    /// How long a removal waits for the rest of its batch.
    pub settle: Duration,
    /// Self-protection.
    pub protection: ProtectionPolicy,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Where to write the admin address.
    pub admin_address_file: Option<PathBuf>,
    /// Environment variables that named no key.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let (name, text) = config_file::read(path)?;
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
    /// Checks every value, collecting every problem.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        validate_name(&self.name, &mut p);
        let source = self.source.validate(&self.name, &mut p);
        let target = self.target.validate(&mut p);
        let admin_listen = self.admin.validate(&mut p);
        let protection = self.protection.validate(&mut p);
        let check_interval = ms(&mut p, "check_interval_ms", self.check_interval_ms);
        let replica = if self.replica.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        } else {
            self.replica.clone()
        };
        // The credentials are read only once every key is right.
        let etcd_security = match p.is_empty() {
            true => target.files.load(Path::new(".")).unwrap_or_else(|e| {
                p.push(format!("target: {e}"));
                EtcdSecurity::default()
            }),
            false => EtcdSecurity::default(),
        };
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Config {
            name: self.name,
            replica,
            source,
            etcd: self.target.etcd,
            prefix: self.target.prefix.trim_end_matches('/').to_owned(),
            election_ttl: target.election_ttl,
            lease_ttl: target.lease_ttl,
            request_timeout: target.request_timeout,
            etcd_security,
            resync_interval: target.resync_interval,
            check_interval,
            settle: Duration::from_millis(self.source.settle_ms.min(10_000)),
            protection,
            admin_listen,
            admin_address_file: (!self.admin.address_file.is_empty())
                .then(|| PathBuf::from(self.admin.address_file)),
            warnings: Vec::new(),
        })
    }
}

/// `name`: required, letters, digits, `-` and `_`.
fn validate_name(name: &str, p: &mut Vec<String>) {
    if name.is_empty() {
        p.push("name: required (the legacy registry's name, e.g. \"zk\")".into());
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        p.push(format!(
            "name: {name:?} may hold only letters, digits, '-' and '_'"
        ));
    }
}

/// `v` milliseconds, with a problem named `key` when it is 0.
fn ms(p: &mut Vec<String>, key: &str, v: u64) -> Duration {
    if v == 0 {
        p.push(format!("{key}: must be greater than 0"));
    }
    Duration::from_millis(v.max(1))
}

/// `v` seconds, with a problem named `key` when it is 0.
fn secs(p: &mut Vec<String>, key: &str, v: u64) -> Duration {
    if v == 0 {
        p.push(format!("{key}: must be at least 1"));
    }
    Duration::from_secs(v.max(1))
}

impl SourceRaw {
    /// `[source]` checked; `legacy`: the legacy registry's name.
    fn validate(&self, legacy: &str, p: &mut Vec<String>) -> SourceSpec {
        match self.kind.as_str() {
            "zookeeper" => self.zookeeper(legacy, p),
            "dir" => {
                if self.path.is_empty() {
                    p.push("source.path: required for kind = \"dir\"".into());
                }
                SourceSpec::Dir {
                    path: PathBuf::from(&self.path),
                    poll_interval: ms(p, "source.poll_interval_ms", self.poll_interval_ms),
                }
            }
            other => {
                p.push(format!(
                    "source.kind: {other:?} is not \"zookeeper\" or \"dir\""
                ));
                SourceSpec::Dir {
                    path: PathBuf::new(),
                    poll_interval: Duration::from_secs(1),
                }
            }
        }
    }

    /// `[source]` of kind `zookeeper`: servers, root, and how Dubbo providers map to endpoints.
    fn zookeeper(&self, legacy: &str, p: &mut Vec<String>) -> SourceSpec {
        if self.servers.is_empty() {
            p.push(
                "source.servers: required for kind = \"zookeeper\" (host:port[,host:port…])".into(),
            );
        }
        if !self.root.starts_with('/') {
            p.push(format!("source.root: {:?} must start with '/'", self.root));
        }
        let protocols = if self.protocols.is_empty() {
            Mapping::default_protocols()
        } else {
            let mut m = HashMap::new();
            for (scheme, proto) in &self.protocols {
                match AppProtocol::parse(proto) {
                    Some(a) => {
                        m.insert(scheme.to_ascii_lowercase(), a);
                    }
                    None => p.push(format!(
                        "source.protocols.{scheme}: {proto:?} is not http1 or http2"
                    )),
                }
            }
            m
        };
        let mut services = HashMap::new();
        for (iface, svc) in &self.services {
            match ServiceName::new(svc.clone()) {
                Ok(s) => {
                    services.insert(iface.clone(), s);
                }
                Err(e) => p.push(format!("source.services.{iface:?}: {e}")),
            }
        }
        SourceSpec::ZooKeeper {
            servers: self.servers.clone(),
            root: self.root.clone(),
            session_timeout: ms(p, "source.session_timeout_ms", self.session_timeout_ms),
            mapping: Mapping {
                legacy: legacy.to_owned(),
                protocols,
                services,
                ignored_params: self
                    .ignored_params
                    .clone()
                    .unwrap_or_else(Mapping::default_ignored),
            },
            max_per_interface: self.max_per_interface.max(1),
        }
    }
}

/// `[target]` checked (its credential files are read later, once every key is right).
struct Target {
    files: EtcdSecurityFiles,
    election_ttl: Duration,
    lease_ttl: Duration,
    request_timeout: Duration,
    resync_interval: Duration,
}

impl TargetRaw {
    fn validate(&self, p: &mut Vec<String>) -> Target {
        if self.etcd.is_empty() {
            p.push("target.etcd: at least one member URL is required".into());
        }
        for u in &self.etcd {
            if !u.starts_with("http://") && !u.starts_with("https://") {
                p.push(format!(
                    "target.etcd: {u:?} is not an http:// or https:// URL"
                ));
            }
        }
        let files = EtcdSecurityFiles {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            user: self.user.clone(),
            password_file: self.password_file.clone(),
        };
        files.validate("target", &self.etcd, p);
        if !self.prefix.starts_with('/') {
            p.push(format!(
                "target.prefix: {:?} must start with '/'",
                self.prefix
            ));
        }
        let election_ttl = secs(p, "target.election_ttl_s", self.election_ttl_s);
        let lease_ttl = secs(p, "target.lease_ttl_s", self.lease_ttl_s);
        if lease_ttl < election_ttl * 2 {
            p.push("target.lease_ttl_s: must be at least twice target.election_ttl_s (a successor must re-attach the entries before they expire)".into());
        }
        Target {
            files,
            election_ttl,
            lease_ttl,
            request_timeout: ms(p, "target.request_timeout_ms", self.request_timeout_ms),
            resync_interval: ms(p, "target.resync_interval_ms", self.resync_interval_ms),
        }
    }
}

impl AdminRaw {
    /// `[admin] listen`: a loopback address.
    fn validate(&self, p: &mut Vec<String>) -> SocketAddr {
        match self.listen.parse::<SocketAddr>() {
            Ok(a) if a.ip().is_loopback() => a,
            Ok(a) => {
                p.push(format!("admin.listen: {a} is not a loopback address"));
                a
            }
            Err(_) => {
                p.push(format!("admin.listen: {:?} is not ip:port", self.listen));
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("test", text, Vec::<(String, String)>::new())
    }

    #[test]
    fn a_minimal_zookeeper_config_takes_the_defaults() {
        let c = parse("name = \"zk\"\n[source]\nservers = \"127.0.0.1:2181\"\n[target]\netcd = [\"http://127.0.0.1:2379\"]\n").unwrap();
        assert_eq!(c.election_ttl, Duration::from_secs(5));
        assert_eq!(c.lease_ttl, Duration::from_secs(30));
        assert_eq!(c.prefix, "/detour/v1");
        let SourceSpec::ZooKeeper { root, mapping, .. } = c.source else {
            panic!("zookeeper")
        };
        assert_eq!(root, "/dubbo");
        assert_eq!(mapping.protocols.get("rest"), Some(&AppProtocol::Http1));
        assert!(!mapping.protocols.contains_key("dubbo"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let e = parse("name = \"a b\"\nbogus = 1\n[source]\nkind = \"zk\"\n[target]\netcd = [\"127.0.0.1:2379\"]\nelection_ttl_s = 10\nlease_ttl_s = 10\n[admin]\nlisten = \"0.0.0.0:1\"\n")
            .unwrap_err()
            .to_string();
        for want in [
            "unknown key `bogus`",
            "name:",
            "source.kind",
            "target.etcd",
            "lease_ttl_s",
            "admin.listen",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    #[test]
    fn zero_times_are_reported() {
        let e = parse("name = \"zk\"\ncheck_interval_ms = 0\n[source]\nservers = \"127.0.0.1:2181\"\n[target]\netcd = [\"http://127.0.0.1:2379\"]\nrequest_timeout_ms = 0\nresync_interval_ms = 0\n")
            .unwrap_err()
            .to_string();
        for want in [
            "check_interval_ms",
            "target.request_timeout_ms",
            "target.resync_interval_ms",
        ] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }
}
