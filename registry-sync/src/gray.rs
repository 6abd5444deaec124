//! Gray rules, pure: which hosts and services use the mesh path, and which sidecar binary each
//! host runs — parsed from the registry's `gray/rules` document and evaluated in one function.
//!
//! A rule has one action — `"mesh": "on" | "off"`, or `"sidecar": {"binary": …, "version": …}` —
//! and a scope: `service` (an exact name or a glob with `*` and `?`; absent: every service; mesh
//! rules only) and at most one host selector: `hosts` (exact or glob) or `percent` (0–100: the
//! hosts whose stable hash falls below it, so the sample only grows as the percentage does).
//!
//! **Precedence.** Rules written by `detourctl rollback` (`"origin": "rollback"`) win over gray
//! rules. Within the same origin the most specific rule wins: a service named exactly counts 4,
//! by glob 2, any 0; a host named exactly counts 4, by glob 2, by percentage 1, any 0; the sum
//! decides. Between equally specific rules, `off` wins over `on` (and for versions, the rule
//! listed first). No rule: the mesh is on, and a host runs the binary it runs.

use std::collections::BTreeSet;

use detour_proto::{HostId, ServiceName};
use serde::{Deserialize, Serialize};

/// The document's format version.
pub const FORMAT: u32 = 1;

/// Every rule in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleSet {
    /// Format version ([`FORMAT`]).
    pub version: u32,
    /// The rules.
    pub rules: Vec<Rule>,
}

/// Who wrote a rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// An operator's gray rollout (`detourctl gray set`).
    #[default]
    Gray,
    /// `detourctl rollback`: wins over every gray rule.
    Rollback,
}

impl Origin {
    fn is_gray(&self) -> bool {
        *self == Origin::Gray
    }
}

/// Mesh on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mesh {
    /// Calls take the mesh path.
    On,
    /// Calls go straight to providers (SDKs: C→P; a CA: C→CA→P).
    Off,
}

/// The sidecar binary a host group runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarVersion {
    /// The binary on the hosts: a file of each watchdog's binaries directory (its name, or its
    /// absolute path there).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub binary: String,
    /// The binary's sha256 (64 hexadecimal digits): a watchdog runs nothing else.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// A label for people (`detourctl status`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Instead of a binary: the one each host ran before a version rule moved it (what
    /// `detourctl rollback --version` writes).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub baseline: bool,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// A name, unique in the set (what `detourctl gray clear` removes).
    pub id: String,
    /// Mesh on or off (a mesh rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Mesh>,
    /// The binary to run (a version rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarVersion>,
    /// The services it covers (exact or glob); none: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The hosts it covers (exact or glob); none: see `percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<String>,
    /// The share of hosts it covers (0–100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// Who wrote it.
    #[serde(default, skip_serializing_if = "Origin::is_gray")]
    pub origin: Origin,
}

/// A rule that is not well formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {id:?}: {reason}")]
pub struct RuleError {
    /// The rule's id (or its position when it has none).
    pub id: String,
    /// What is wrong.
    pub reason: String,
}

impl Rule {
    /// Checks the rule on its own (actions, selectors, names).
    pub fn check(&self) -> Result<(), RuleError> {
        let fail = |reason: &str| RuleError {
            id: self.id.clone(),
            reason: reason.to_owned(),
        };
        if self.id.is_empty() || self.id.len() > 128 || !valid_pattern(&self.id, false) {
            return Err(fail(
                "the id must be 1–128 letters, digits, '-', '_' or '.'",
            ));
        }
        match (&self.mesh, &self.sidecar) {
            (Some(_), None) => {}
            (None, Some(v)) => {
                if self.service.is_some() {
                    return Err(fail("a sidecar version applies to hosts, not to services"));
                }
                match (v.baseline, v.binary.as_str()) {
                    (true, "") if v.sha256.is_empty() => {}
                    (true, _) => return Err(fail("a baseline rule names no binary")),
                    (false, b) if !b.is_empty() && b.len() <= 4096 && !b.contains('\0') => {
                        let hex =
                            v.sha256.len() == 64 && v.sha256.bytes().all(|c| c.is_ascii_hexdigit());
                        if !hex {
                            return Err(fail(
                                "sidecar.sha256 must be the binary's sha256 (64 hexadecimal digits)",
                            ));
                        }
                    }
                    (false, _) => return Err(fail("sidecar.binary must name the binary")),
                }
            }
            _ => return Err(fail("give exactly one of \"mesh\" and \"sidecar\"")),
        }
        if self.hosts.is_some() && self.percent.is_some() {
            return Err(fail("give at most one of \"hosts\" and \"percent\""));
        }
        if self.percent.is_some_and(|p| p > 100) {
            return Err(fail("percent must be 0–100"));
        }
        for (what, p) in [("service", &self.service), ("hosts", &self.hosts)] {
            if let Some(p) = p
                && (p.is_empty() || p.len() > 253 || !valid_pattern(p, true))
            {
                return Err(fail(&format!(
                    "{what} must be a name or a glob of letters, digits, '-', '_', '.', '*', '?'"
                )));
            }
        }
        Ok(())
    }

    fn specificity(&self) -> u8 {
        let pattern = |p: &Option<String>| match p {
            None => 0,
            Some(p) if is_glob(p) => 2,
            Some(_) => 4,
        };
        let host = match (&self.hosts, self.percent) {
            (Some(_), _) => pattern(&self.hosts),
            (None, Some(_)) => 1,
            (None, None) => 0,
        };
        pattern(&self.service) + host
    }

    fn covers_host(&self, host: &HostId) -> bool {
        match (&self.hosts, self.percent) {
            (Some(p), _) => glob(p, host.as_str()),
            (None, Some(pct)) => in_sample(host, pct),
            (None, None) => true,
        }
    }

    fn covers_service(&self, service: &ServiceName) -> bool {
        self.service
            .as_deref()
            .is_none_or(|p| glob(p, service.as_str()))
    }
}

impl RuleSet {
    /// Parses the `gray/rules` document, keeping every well-formed rule: returns the set and
    /// one error per rule left out (or the error of a document that is not a rule set at all).
    pub fn parse(bytes: &[u8]) -> Result<(RuleSet, Vec<RuleError>), String> {
        #[derive(Deserialize)]
        struct Raw {
            version: u32,
            #[serde(default)]
            rules: Vec<serde_json::Value>,
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| format!("not a rule set: {e}"))?;
        if raw.version != FORMAT {
            return Err(format!(
                "rule set format {} (this version reads {FORMAT})",
                raw.version
            ));
        }
        let mut set = RuleSet {
            version: FORMAT,
            rules: Vec::new(),
        };
        let mut errors = Vec::new();
        let mut ids = BTreeSet::new();
        for (i, v) in raw.rules.into_iter().enumerate() {
            let id = v
                .get("id")
                .and_then(|x| x.as_str())
                .map_or_else(|| format!("#{i}"), str::to_owned);
            let rule = match serde_json::from_value::<Rule>(v) {
                Ok(r) => r,
                Err(e) => {
                    errors.push(RuleError {
                        id,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            if let Err(e) = rule.check() {
                errors.push(e);
            } else if !ids.insert(rule.id.clone()) {
                errors.push(RuleError {
                    id,
                    reason: "the id is used twice".into(),
                });
            } else {
                set.rules.push(rule);
            }
        }
        Ok((set, errors))
    }

    /// The whole set checked, for a writer (`detourctl`): every problem, or nothing.
    pub fn check(&self) -> Result<(), Vec<RuleError>> {
        let bytes = serde_json::to_vec(self).map_err(|e| {
            vec![RuleError {
                id: "-".into(),
                reason: e.to_string(),
            }]
        })?;
        match RuleSet::parse(&bytes) {
            Ok((_, errors)) if errors.is_empty() => Ok(()),
            Ok((_, errors)) => Err(errors),
            Err(e) => Err(vec![RuleError {
                id: "-".into(),
                reason: e,
            }]),
        }
    }

    /// Whether calls from `host` to `service` take the mesh path, and the rule that decides.
    pub fn mesh(&self, host: &HostId, service: &ServiceName) -> (Mesh, Option<&Rule>) {
        let best = self
            .rules
            .iter()
            .filter(|r| r.mesh.is_some() && r.covers_host(host) && r.covers_service(service))
            .max_by_key(|r| {
                (
                    r.origin == Origin::Rollback,
                    r.specificity(),
                    r.mesh == Some(Mesh::Off),
                )
            });
        match best {
            Some(r) => (r.mesh.unwrap_or(Mesh::On), Some(r)),
            None => (Mesh::On, None),
        }
    }

    /// The sidecar binary `host` should run, if a rule says.
    pub fn version(&self, host: &HostId) -> Option<&Rule> {
        let covering = self
            .rules
            .iter()
            .filter(|r| r.sidecar.is_some() && r.covers_host(host));
        // The first of the most specific (max_by_key keeps the last of equals).
        covering
            .rev()
            .max_by_key(|r| (r.origin == Origin::Rollback, r.specificity()))
    }

    /// Whether any mesh rule could switch anything off for `host` (a fast path for callers).
    pub fn any_mesh_off_for(&self, host: &HostId) -> bool {
        self.rules
            .iter()
            .any(|r| r.mesh == Some(Mesh::Off) && r.covers_host(host))
    }
}

/// Whether `host` is among the `percent` of hosts: a stable hash (FNV-1a, 64 bits) of its
/// name, modulo 100, below `percent`. The same host is in for every percentage above its value.
pub fn in_sample(host: &HostId, percent: u8) -> bool {
    host_bucket(host) < u64::from(percent)
}

/// A host's bucket, 0–99, for percentage rules.
pub fn host_bucket(host: &HostId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % 100
}

fn is_glob(p: &str) -> bool {
    p.contains(['*', '?'])
}

fn valid_pattern(p: &str, wildcards: bool) -> bool {
    p.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.')
            || (wildcards && matches!(b, b'*' | b'?'))
    })
}

/// Glob match: `*` any run (possibly empty), `?` one character, everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
#[path = "gray_tests.rs"]
mod tests;
