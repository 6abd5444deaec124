//! `[[provide]]`: the local providers this sidecar serves inbound and registers, validated
//! entry by entry (every problem of every entry collected).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use detour_proto::{AppProtocol, InstanceId, ServiceName};
use serde::Deserialize;

pub use detour_core::route::ZonePreference;

use super::addr;
use super::tls::TlsMode;
use crate::tls::identity::SpiffeId;

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
    /// The provider's version, registered with it (route subsets select on it).
    #[serde(default)]
    pub version: Option<String>,
    /// Its failure domain, registered with it (route subsets select on it); absent: the
    /// sidecar's `zone`.
    #[serde(default)]
    pub zone: Option<String>,
    /// Free labels, registered with it (route subsets select on them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    /// Its version (empty: none).
    pub version: String,
    /// Its zone (empty: the sidecar's).
    pub zone: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// Most labels one provider registers.
const MAX_LABELS: usize = 16;

/// Whether `v` may be a version, zone, label name or value: 1–128 bytes of letters, digits and
/// `.-_/:`.
fn meta_ok(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_/:".contains(&b))
}

/// Validates the top-level `zone` (and `proxy.zone_min_healthy_percent`).
pub fn zone(zone: &str, min_healthy_percent: u8, p: &mut Vec<String>) -> Option<ZonePreference> {
    if zone.is_empty() {
        return None;
    }
    if !meta_ok(zone) {
        p.push(format!(
            "zone: {zone:?} is not 1-128 letters, digits or .-_/:"
        ));
    }
    if min_healthy_percent > 100 {
        p.push("proxy.zone_min_healthy_percent: must be between 0 and 100".into());
    }
    Some(ZonePreference {
        zone: zone.to_owned(),
        min_healthy_percent,
    })
}

/// Checks the version, zone and labels of entry `key`.
fn check_meta(p: &mut Vec<String>, key: &str, raw: &ProvideRaw) {
    let fields = [("version", &raw.version), ("zone", &raw.zone)];
    for (name, v) in fields {
        if let Some(v) = v
            && !meta_ok(v)
        {
            p.push(format!(
                "{key}.{name}: {v:?} is not 1-128 letters, digits or .-_/:"
            ));
        }
    }
    if raw.labels.len() > MAX_LABELS {
        p.push(format!("{key}.labels: more than {MAX_LABELS}"));
    }
    for (k, v) in &raw.labels {
        if !meta_ok(k) || !meta_ok(v) {
            p.push(format!(
                "{key}.labels.{k}: {v:?}: names and values are 1-128 letters, digits or .-_/:"
            ));
        }
    }
}

/// Validates every `[[provide]]` entry of host `host`; `tls` and `trust_domain` decide the
/// allow-lists.
pub fn validate(
    raws: &[ProvideRaw],
    host: &str,
    tls: &TlsMode,
    trust_domain: &str,
    p: &mut Vec<String>,
) -> Vec<Provide> {
    let mut provide: Vec<Provide> = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let key = format!("provide[{i}]");
        let Some(entry) = raw.validate(&key, host, tls, trust_domain, p) else {
            continue;
        };
        if provide.iter().any(|x| x.service == entry.service) {
            p.push(format!(
                "{key}: service {} is provided twice",
                entry.service
            ));
        }
        provide.push(entry);
    }
    provide
}

impl ProvideRaw {
    /// Validates one entry, named `key` in problems.
    fn validate(
        &self,
        key: &str,
        host: &str,
        tls: &TlsMode,
        trust_domain: &str,
        p: &mut Vec<String>,
    ) -> Option<Provide> {
        let service = ServiceName::new(self.service.clone())
            .map_err(|e| p.push(format!("{key}.service: {e}")))
            .ok();
        let address = addr(p, &format!("{key}.address"), &self.address);
        let protocol = match self.protocol.as_deref() {
            None => Some(AppProtocol::Http1),
            Some(s) => AppProtocol::parse(s).or_else(|| {
                p.push(format!("{key}.protocol: {s:?} is not http1, http2 or grpc"));
                None
            }),
        };
        let instance_text = self
            .instance
            .clone()
            .unwrap_or_else(|| format!("{host}-{}", self.service));
        let instance = InstanceId::new(instance_text)
            .map_err(|e| p.push(format!("{key}.instance: {e}")))
            .ok();
        if let Some(path) = self.check_path.as_deref()
            && !path.starts_with('/')
        {
            p.push(format!("{key}.check_path: {path:?} must start with '/'"));
        }
        if self.rate_limit_rps == Some(0) {
            p.push(format!(
                "{key}.rate_limit_rps: must be greater than 0 (leave it out for no limit)"
            ));
        }
        if self.rate_limit_burst.is_some() && self.rate_limit_rps.is_none() {
            p.push(format!("{key}.rate_limit_burst: needs rate_limit_rps"));
        }
        let allow = self
            .allow
            .as_ref()
            .map(|ids| allow_list(p, key, ids, tls, trust_domain));
        let direct = match self.direct.as_deref() {
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
        check_meta(p, key, self);
        Some(Provide {
            service: service?,
            instance: instance?,
            address: address?,
            protocol: protocol?,
            weight: self.weight.unwrap_or(1).max(1),
            check_path: self.check_path.clone(),
            rate_limit: self
                .rate_limit_rps
                .map(|r| (r, self.rate_limit_burst.unwrap_or(r))),
            allow,
            direct,
            version: self.version.clone().unwrap_or_default(),
            zone: self.zone.clone().unwrap_or_default(),
            labels: self.labels.clone(),
        })
    }
}

/// Validates one provider's allow-list: SPIFFE IDs of this trust domain, and TLS on.
fn allow_list(
    p: &mut Vec<String>,
    key: &str,
    ids: &[String],
    tls: &TlsMode,
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
