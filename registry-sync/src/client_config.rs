//! The registry client settings every process of a host shares — the sidecar config's
//! `registry`, `[registry_dir]` and `[registry_etcd]` keys — validated in one place and opened
//! with [`RegistryClient::open`]. The sidecar parses them as part of its config; the watchdog
//! reads the same keys from the sidecar's file (and nothing else of it).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use detour_proto::HostId;
use serde::Deserialize;

use crate::dir::{DirOptions, DirRegistry};
use crate::etcd::{EtcdOptions, EtcdRegistry, Follows};
use crate::etcd_security::{EtcdSecurity, EtcdSecurityFiles};
use crate::{Registry, RegistryError, RegistrySpec};

/// `[registry_dir]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RegistryDirRaw {
    /// Time-to-live of this host's record without a heartbeat.
    pub ttl_ms: u64,
    /// How often the directory is rescanned.
    pub poll_ms: u64,
}

impl Default for RegistryDirRaw {
    fn default() -> Self {
        Self {
            ttl_ms: 10_000,
            poll_ms: 250,
        }
    }
}

/// `[registry_etcd]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RegistryEtcdRaw {
    /// Key prefix.
    pub prefix: String,
    /// Lease time-to-live.
    pub ttl_ms: u64,
    /// Time allowed for one request to one member.
    pub request_timeout_ms: u64,
    /// A watch silent this long is asked for its progress.
    pub watch_check_ms: u64,
    /// The members' CA (PEM), relative to `run_dir` unless absolute: TLS, `https://` URLs.
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

impl Default for RegistryEtcdRaw {
    fn default() -> Self {
        Self {
            prefix: "/detour/v1".into(),
            ttl_ms: 10_000,
            request_timeout_ms: 1000,
            watch_check_ms: 1000,
            ca: String::new(),
            cert: String::new(),
            key: String::new(),
            user: String::new(),
            password_file: String::new(),
        }
    }
}

/// A validated registry client configuration.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    /// The back-end.
    pub spec: RegistrySpec,
    /// Directory-registry tuning.
    pub dir: DirOptions,
    /// etcd key prefix, without a trailing slash.
    pub etcd_prefix: String,
    /// etcd lease time-to-live.
    pub etcd_ttl: Duration,
    /// etcd per-request timeout.
    pub etcd_request_timeout: Duration,
    /// How long an etcd watch may be silent before it is asked for its progress.
    pub etcd_watch_check: Duration,
    /// TLS and credentials towards etcd (files read at validation).
    pub etcd_security: EtcdSecurity,
}

/// The state directory a config names: `state_dir`, or `run_dir` when it names none.
pub fn state_dir(run_dir: &Path, state_dir: &Path) -> std::path::PathBuf {
    if state_dir.as_os_str().is_empty() {
        run_dir.to_path_buf()
    } else {
        state_dir.to_path_buf()
    }
}

impl RegistryClient {
    /// Validates the settings (paths relative to `base`), pushing every problem onto `p`.
    pub fn validate(
        registry: &str,
        dir: &RegistryDirRaw,
        etcd: &RegistryEtcdRaw,
        base: &Path,
        p: &mut Vec<String>,
    ) -> Option<RegistryClient> {
        let before = p.len();
        let spec = registry
            .parse::<RegistrySpec>()
            .map_err(|e| p.push(format!("registry: {e}")))
            .ok();
        let mut positive = |key: &str, v: u64| {
            if v == 0 {
                p.push(format!("{key}: must be greater than 0"));
            }
            Duration::from_millis(v)
        };
        let dir_opts = DirOptions {
            ttl: positive("registry_dir.ttl_ms", dir.ttl_ms),
            poll_interval: positive("registry_dir.poll_ms", dir.poll_ms),
        };
        let etcd_ttl = positive("registry_etcd.ttl_ms", etcd.ttl_ms);
        let etcd_request_timeout =
            positive("registry_etcd.request_timeout_ms", etcd.request_timeout_ms);
        let etcd_watch_check = positive("registry_etcd.watch_check_ms", etcd.watch_check_ms);
        let etcd_prefix = etcd.prefix.trim_end_matches('/').to_owned();
        if !etcd_prefix.starts_with('/') {
            p.push("registry_etcd.prefix: must start with '/'".into());
        }
        let etcd_security = etcd_security(etcd, spec.as_ref(), base, p);
        let spec = spec?;
        (p.len() == before).then_some(RegistryClient {
            spec,
            dir: dir_opts,
            etcd_prefix,
            etcd_ttl,
            etcd_request_timeout,
            etcd_watch_check,
            etcd_security,
        })
    }

    /// The time-to-live of what this host registers (a record left without its keeper
    /// disappears after it).
    pub fn ttl(&self) -> Duration {
        match self.spec {
            RegistrySpec::Dir(_) => self.dir.ttl,
            RegistrySpec::Etcd(_) => self.etcd_ttl,
        }
    }

    /// Opens a client of this registry for `host`.
    pub async fn open(&self, host: HostId) -> Result<Arc<dyn Registry>, RegistryError> {
        self.open_following(host, Follows::Everything).await
    }

    /// [`Self::open`], an etcd client listing and watching only what `follows` says (a
    /// directory registry reads what it is asked for anyway).
    pub async fn open_following(
        &self,
        host: HostId,
        follows: Follows,
    ) -> Result<Arc<dyn Registry>, RegistryError> {
        Ok(match &self.spec {
            RegistrySpec::Dir(dir) => Arc::new(DirRegistry::open(dir, host, self.dir).await?),
            RegistrySpec::Etcd(endpoints) => {
                let opts = EtcdOptions {
                    endpoints: endpoints.clone(),
                    prefix: self.etcd_prefix.clone(),
                    ttl: self.etcd_ttl,
                    request_timeout: self.etcd_request_timeout,
                    watch_check: self.etcd_watch_check,
                    security: self.etcd_security.clone(),
                };
                Arc::new(EtcdRegistry::open_following(host, opts, follows).await?)
            }
        })
    }
}

/// Checks `[registry_etcd]`'s TLS and credential settings against the registry and reads their
/// files.
fn etcd_security(
    r: &RegistryEtcdRaw,
    registry: Option<&RegistrySpec>,
    base: &Path,
    p: &mut Vec<String>,
) -> EtcdSecurity {
    let files = EtcdSecurityFiles {
        ca: r.ca.clone(),
        cert: r.cert.clone(),
        key: r.key.clone(),
        user: r.user.clone(),
        password_file: r.password_file.clone(),
    };
    let urls = match registry {
        Some(RegistrySpec::Etcd(urls)) => urls.clone(),
        _ => {
            if files != EtcdSecurityFiles::default() {
                p.push("registry_etcd: TLS and credentials need an etcd registry".into());
            }
            return EtcdSecurity::default();
        }
    };
    let before = p.len();
    files.validate("registry_etcd", &urls, p);
    if p.len() > before {
        return EtcdSecurity::default();
    }
    files.load(base).unwrap_or_else(|e| {
        p.push(format!("registry_etcd: {e}"));
        EtcdSecurity::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported() {
        let mut p = Vec::new();
        let etcd = RegistryEtcdRaw {
            prefix: "x".into(),
            ttl_ms: 0,
            watch_check_ms: 0,
            ..RegistryEtcdRaw::default()
        };
        let dir = RegistryDirRaw {
            poll_ms: 0,
            ..RegistryDirRaw::default()
        };
        assert!(RegistryClient::validate("zk:x", &dir, &etcd, Path::new("."), &mut p).is_none());
        let all = p.join("\n");
        for k in [
            "registry:",
            "registry_dir.poll_ms",
            "registry_etcd.ttl_ms",
            "registry_etcd.watch_check_ms",
            "registry_etcd.prefix",
        ] {
            assert!(all.contains(k), "{k} missing from {all}");
        }
        let mut p = Vec::new();
        let ok = RegistryClient::validate(
            "etcd:http://127.0.0.1:1",
            &RegistryDirRaw::default(),
            &RegistryEtcdRaw::default(),
            Path::new("."),
            &mut p,
        )
        .unwrap();
        assert_eq!(ok.ttl(), Duration::from_secs(10));
        assert_eq!(ok.etcd_prefix, "/detour/v1");
    }

    #[test]
    fn a_client_of_the_gray_rules_alone_checks_its_watch_five_times_less_often() {
        let check = Duration::from_millis(1000);
        for (follows, want) in [(Follows::Everything, 1000), (Follows::GrayRules, 5000)] {
            assert_eq!(follows.watch_check(check), Duration::from_millis(want));
        }
    }
}
