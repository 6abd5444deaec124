//! `[outbound]`, `[inbound]`, `[admin]` and `[metrics]`: where the sidecar listens, each
//! section validated on its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{addr, positive};

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

/// `[outbound]` validated.
#[derive(Debug, Clone)]
pub struct OutboundListen {
    /// The TCP listener, if any.
    pub tcp: Option<SocketAddr>,
    /// The Unix socket, if any.
    pub unix: Option<PathBuf>,
    /// The Unix socket's group.
    pub unix_group: Option<u32>,
}

impl OutboundRaw {
    /// Validates `[outbound]`; a relative Unix socket path is under `run_dir`.
    pub fn validate(&self, run_dir: &Path, p: &mut Vec<String>) -> OutboundListen {
        let tcp = if self.listen.is_empty() {
            None
        } else {
            addr(p, "outbound.listen", &self.listen)
        };
        let unix = (!self.unix.is_empty()).then(|| {
            let u = PathBuf::from(&self.unix);
            if u.is_absolute() { u } else { run_dir.join(u) }
        });
        let unix_group = match self.unix_group.as_str() {
            "" => None,
            g => group_id(g, "/etc/group")
                .map_err(|e| p.push(format!("outbound.unix_group: {e}")))
                .ok(),
        };
        if tcp.is_none() && unix.is_none() && self.listen.is_empty() {
            p.push("outbound: at least one of listen and unix must be set".into());
        }
        OutboundListen {
            tcp,
            unix,
            unix_group,
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

/// `[inbound]` validated.
#[derive(Debug, Clone)]
pub struct InboundListen {
    /// The listener (`None` when invalid; the problem is pushed).
    pub addr: Option<SocketAddr>,
    /// How often local providers are health-checked.
    pub check_interval: Duration,
    /// Time one health check may take.
    pub check_timeout: Duration,
}

impl InboundRaw {
    /// Validates `[inbound]`.
    pub fn validate(&self, p: &mut Vec<String>) -> InboundListen {
        InboundListen {
            addr: addr(p, "inbound.listen", &self.listen),
            check_interval: positive(p, "inbound.check_interval_ms", self.check_interval_ms),
            check_timeout: positive(p, "inbound.check_timeout_ms", self.check_timeout_ms),
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

impl AdminRaw {
    /// Validates `[admin]`: a loopback address.
    pub fn validate(&self, p: &mut Vec<String>) -> Option<SocketAddr> {
        let admin = addr(p, "admin.listen", &self.listen);
        if let Some(a) = admin
            && !a.ip().is_loopback()
        {
            p.push(format!("admin.listen: {a} is not a loopback address"));
        }
        admin
    }
}

/// `[metrics]`: an optional listener serving only `GET /metrics`, on any address (a central
/// Prometheus scrapes it; the admin API stays on loopback).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MetricsRaw {
    /// `ip:port` (`""`: no such listener).
    pub listen: String,
    /// A file holding the bearer token scrapers must send (`Authorization: Bearer TOKEN`),
    /// relative to `run_dir` unless absolute; `""`: none asked.
    pub token_file: String,
}

/// `[metrics]` validated.
#[derive(Debug, Clone, Default)]
pub struct MetricsListen {
    /// The listener, if any.
    pub listen: Option<SocketAddr>,
    /// The token file, if any.
    pub token_file: Option<PathBuf>,
}

impl MetricsRaw {
    /// Validates `[metrics]`; a relative token file is under `run_dir`.
    pub fn validate(&self, run_dir: &Path, p: &mut Vec<String>) -> MetricsListen {
        let listen = match self.listen.as_str() {
            "" => None,
            l => addr(p, "metrics.listen", l),
        };
        let token_file = (!self.token_file.is_empty()).then(|| {
            let f = PathBuf::from(&self.token_file);
            if f.is_absolute() { f } else { run_dir.join(f) }
        });
        if token_file.is_some() && self.listen.is_empty() {
            p.push("metrics.token_file: needs metrics.listen".into());
        }
        MetricsListen { listen, token_file }
    }
}

/// The id of group `name` (or `name` itself when it is a number), from the group file `file`.
pub(super) fn group_id(name: &str, file: &str) -> Result<u32, String> {
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
