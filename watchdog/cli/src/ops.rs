//! The operator's commands on the registry — what `detourctl gray | rollback | status` run:
//! gray rules (set, list, clear), the one-command rollback (the mesh off for a scope, or
//! sidecar versions back to their baseline) with its record, its undo and its history, and the
//! status of every host and service.
//!
//! Every change is one compare-and-swap of the rules document (with the rollback record and the
//! audit record, `audit.rs`, in the same write): an operator never overwrites a change they have
//! not seen, and nothing is ever applied half-way.

use detour_proto::{HostId, HostStatus, ServiceName};
use detour_registry::gray::{FORMAT, Mesh, Origin, Rule, RuleError, RuleSet, SidecarVersion};
use detour_registry::now_unix_ms;
use detour_registry::store::{Doc, Expect, Store, StoreError, Write};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Actor};

/// The rules document's key.
pub const RULES: &str = "gray/rules";

/// Why a command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The registry could not be reached, or changed meanwhile.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The service has no instance in the registry.
    #[error("unknown service {0}: the registry has no instance of it")]
    UnknownService(String),
    /// The host has no status in the registry.
    #[error("unknown host {0}: no live host of that name in the registry")]
    UnknownHost(String),
    /// A rule is not well formed.
    #[error("malformed input: {0}")]
    Malformed(String),
    /// The command cannot be carried out as asked.
    #[error("{0}")]
    Refused(String),
}

impl OpsError {
    /// The exit status `detourctl` ends with: 2 bad input, 3 registry unreachable, 4 a
    /// concurrent change or nothing to do.
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::Store(StoreError::Unavailable(_)) => 3,
            OpsError::Store(StoreError::Conflict { .. }) | OpsError::Refused(_) => 4,
            _ => 2,
        }
    }
}

/// One rollback, as recorded under `rollback/{id}` (kept for audit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRecord {
    /// Format version (1).
    pub version: u32,
    /// Sortable id: `rb-{unix ms}-{hex}`.
    pub id: String,
    /// When.
    pub at_unix_ms: u64,
    /// Who (the OS user that ran the command).
    pub user: String,
    /// Why, in the operator's words.
    pub reason: String,
    /// `mesh` (the mesh switched off) or `version` (sidecars back to their baseline).
    pub kind: String,
    /// The service in scope (none: every service).
    #[serde(default)]
    pub service: Option<String>,
    /// The host in scope (none: every host).
    #[serde(default)]
    pub host: Option<String>,
    /// The rule the rollback added.
    pub rule: String,
    /// The rules document it replaced (`None`: there was none).
    pub replaced: Option<String>,
    /// The rules document it wrote.
    pub wrote: String,
    /// When and by whom it was undone.
    #[serde(default)]
    pub undone: Option<Undone>,
}

/// An undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Undone {
    /// When.
    pub at_unix_ms: u64,
    /// Who.
    pub user: String,
}

/// What a rollback covers.
#[derive(Debug, Clone)]
pub struct RollbackRequest {
    /// One service (none: every service).
    pub service: Option<ServiceName>,
    /// One host (none: every host).
    pub host: Option<HostId>,
    /// Sidecar versions back to their baseline, instead of the mesh off.
    pub version: bool,
    /// Why.
    pub reason: String,
    /// Who.
    pub user: String,
}

/// The operator's view of the registry.
pub struct Ops {
    store: Box<dyn Store>,
}

/// The rules as read: the document (with its revision), the well-formed rules, the others.
#[derive(Debug)]
pub struct Rules {
    /// The document, if any.
    pub doc: Option<Doc>,
    /// Its well-formed rules.
    pub set: RuleSet,
    /// The rules left out (each sidecar leaves them out too).
    pub malformed: Vec<RuleError>,
}

impl Ops {
    /// Commands on `store`.
    pub fn new(store: Box<dyn Store>) -> Ops {
        Ops { store }
    }

    /// The registry's documents (for commands on other documents than the rules).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// The rules in force.
    pub async fn rules(&self) -> Result<Rules, OpsError> {
        let doc = self.store.get(RULES).await?;
        let (set, malformed) = match &doc {
            None => (empty(), Vec::new()),
            Some(d) => RuleSet::parse(&d.bytes).map_err(|e| {
                OpsError::Refused(format!(
                    "the rules document in the registry is unreadable ({e}); every sidecar keeps its last good rules — write a good one with `detourctl gray clear --all`"
                ))
            })?,
        };
        Ok(Rules {
            doc,
            set,
            malformed,
        })
    }

    /// Adds `rule`, or replaces the rule with its id.
    pub async fn gray_set(&self, rule: Rule, actor: &Actor) -> Result<RuleSet, OpsError> {
        rule.check()
            .map_err(|e| OpsError::Malformed(e.to_string()))?;
        if let Some(s) = rule.service.as_deref()
            && !s.contains(['*', '?'])
        {
            self.known_service(s).await?;
        }
        if let Some(h) = rule.hosts.as_deref()
            && !h.contains(['*', '?'])
        {
            self.known_host(h).await?;
        }
        let r = self.rules().await?;
        let mut set = r.set;
        match set.rules.iter_mut().find(|x| x.id == rule.id) {
            Some(x) => *x = rule,
            None => set.rules.push(rule),
        }
        self.write_rules(&r.doc, &set, Vec::new(), actor, "gray set")
            .await?;
        Ok(set)
    }

    /// Removes the rule `id` (every rule when `None`).
    pub async fn gray_clear(&self, id: Option<&str>, actor: &Actor) -> Result<RuleSet, OpsError> {
        let doc = self.store.get(RULES).await?;
        let mut set = match &doc {
            Some(d) => RuleSet::parse(&d.bytes)
                .map(|(s, _)| s)
                .unwrap_or_else(|_| empty()),
            None => empty(),
        };
        match id {
            None => set.rules.clear(),
            Some(id) => {
                let before = set.rules.len();
                set.rules.retain(|r| r.id != id);
                if set.rules.len() == before {
                    return Err(OpsError::Refused(format!("no rule {id:?}")));
                }
            }
        }
        self.write_rules(&doc, &set, Vec::new(), actor, "gray clear")
            .await?;
        Ok(set)
    }

    /// Writes `set` over `doc` (compare-and-swap), with `more` and the audit record of
    /// `command` by `actor` in the same transaction.
    async fn write_rules(
        &self,
        doc: &Option<Doc>,
        set: &RuleSet,
        mut more: Vec<Write>,
        actor: &Actor,
        command: &str,
    ) -> Result<Vec<u8>, OpsError> {
        set.check().map_err(|errors| {
            OpsError::Malformed(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let bytes =
            serde_json::to_vec_pretty(set).map_err(|e| OpsError::Malformed(e.to_string()))?;
        let expect = doc
            .as_ref()
            .map_or(Expect::Absent, |d| Expect::Revision(d.revision));
        let (_, trail) = audit::record(
            actor,
            command,
            RULES,
            doc.as_ref().map(|d| d.bytes.as_slice()),
            Some(&bytes),
        )?;
        more.insert(
            0,
            Write {
                key: RULES.into(),
                bytes: bytes.clone(),
                expect,
            },
        );
        more.push(trail);
        self.store.put_all(more).await?;
        Ok(bytes)
    }

    async fn known_service(&self, s: &str) -> Result<(), OpsError> {
        let known = self.store.services().await?;
        if known.keys().any(|k| k.as_str() == s) {
            Ok(())
        } else {
            Err(OpsError::UnknownService(s.into()))
        }
    }

    async fn known_host(&self, h: &str) -> Result<(), OpsError> {
        let hosts = self.store.hosts().await?;
        if hosts.iter().any(|x| x.host.as_str() == h) {
            Ok(())
        } else {
            Err(OpsError::UnknownHost(h.into()))
        }
    }

    /// Turns the mesh off for the scope (or sends its sidecars back to their baseline binary),
    /// in one write that also records who, when, why and the rules replaced.
    pub async fn rollback(&self, req: RollbackRequest) -> Result<RollbackRecord, OpsError> {
        if let Some(s) = &req.service {
            if req.version {
                return Err(OpsError::Refused(
                    "a version rollback applies to hosts, not to services".into(),
                ));
            }
            self.known_service(s.as_str()).await?;
        }
        if let Some(h) = &req.host {
            self.known_host(h.as_str()).await?;
        }
        let doc = self.store.get(RULES).await?;
        let mut set = match &doc {
            Some(d) => RuleSet::parse(&d.bytes)
                .map(|(s, _)| s)
                .unwrap_or_else(|_| empty()),
            None => empty(),
        };
        let at = now_unix_ms();
        let id = format!("rb-{at:013}-{:04x}", fastrand_u16());
        let rule = Rule {
            id: id.clone(),
            mesh: (!req.version).then_some(Mesh::Off),
            sidecar: req.version.then(|| SidecarVersion {
                baseline: true,
                ..SidecarVersion::default()
            }),
            service: req.service.as_ref().map(ToString::to_string),
            hosts: req.host.as_ref().map(ToString::to_string),
            percent: None,
            origin: Origin::Rollback,
        };
        set.rules.push(rule);
        let mut record = RollbackRecord {
            version: 1,
            id: id.clone(),
            at_unix_ms: at,
            user: req.user,
            reason: req.reason,
            kind: if req.version { "version" } else { "mesh" }.into(),
            service: req.service.map(|s| s.to_string()),
            host: req.host.map(|h| h.to_string()),
            rule: id.clone(),
            replaced: doc
                .as_ref()
                .map(|d| String::from_utf8_lossy(&d.bytes).into_owned()),
            wrote: String::new(),
            undone: None,
        };
        let bytes =
            serde_json::to_vec_pretty(&set).map_err(|e| OpsError::Malformed(e.to_string()))?;
        record.wrote = String::from_utf8_lossy(&bytes).into_owned();
        let record_bytes =
            serde_json::to_vec(&record).map_err(|e| OpsError::Malformed(e.to_string()))?;
        let key = format!("rollback/{id}");
        let actor = Actor {
            user: record.user.clone(),
            reason: record.reason.clone(),
        };
        self.write_rules(
            &doc,
            &set,
            vec![Write {
                key,
                bytes: record_bytes,
                expect: Expect::Absent,
            }],
            &actor,
            "rollback",
        )
        .await?;
        Ok(record)
    }

    /// Every rollback, oldest first.
    pub async fn history(&self) -> Result<Vec<RollbackRecord>, OpsError> {
        Ok(self
            .store
            .list("rollback/")
            .await?
            .values()
            .filter_map(|b| serde_json::from_slice::<RollbackRecord>(b).ok())
            .collect())
    }

    /// Restores the rules the last rollback (not undone yet) replaced — only if nobody changed
    /// them since.
    pub async fn undo(&self, user: String) -> Result<RollbackRecord, OpsError> {
        let history = self.history().await?;
        let Some(mut record) = history.into_iter().rev().find(|r| r.undone.is_none()) else {
            return Err(OpsError::Refused("no rollback to undo".into()));
        };
        let doc = self.store.get(RULES).await?;
        let now = doc.as_ref().map(|d| d.bytes.as_slice());
        if now != Some(record.wrote.as_bytes()) {
            return Err(OpsError::Refused(format!(
                "the rules changed since rollback {} (gray set/clear or another rollback); nothing was undone. The rules it replaced were:\n{}",
                record.id,
                record.replaced.as_deref().unwrap_or("(none)")
            )));
        }
        let key = format!("rollback/{}", record.id);
        let current_record = self.store.get(&key).await?;
        let restored = record
            .replaced
            .clone()
            .map(String::into_bytes)
            .unwrap_or_else(|| serde_json::to_vec_pretty(&empty()).unwrap_or_default());
        let (_, trail) = audit::record(
            &Actor {
                user: user.clone(),
                reason: format!("undo of {}", record.id),
            },
            "rollback undo",
            RULES,
            doc.as_ref().map(|d| d.bytes.as_slice()),
            Some(&restored),
        )?;
        record.undone = Some(Undone {
            at_unix_ms: now_unix_ms(),
            user,
        });
        let record_bytes =
            serde_json::to_vec(&record).map_err(|e| OpsError::Malformed(e.to_string()))?;
        let writes = vec![
            Write {
                key: RULES.into(),
                bytes: restored,
                expect: doc
                    .as_ref()
                    .map_or(Expect::Absent, |d| Expect::Revision(d.revision)),
            },
            Write {
                key,
                bytes: record_bytes,
                expect: current_record.map_or(Expect::Absent, |d| Expect::Revision(d.revision)),
            },
            trail,
        ];
        self.store.put_all(writes).await?;
        Ok(record)
    }

    /// The live hosts a `percent` rule covers now, and how many live hosts there are.
    pub async fn sample(&self, percent: u8) -> Result<(Vec<String>, usize), OpsError> {
        let hosts = self.store.hosts().await?;
        let covered = hosts
            .iter()
            .filter(|h| detour_registry::gray::in_sample(&h.host, percent))
            .map(|h| h.host.to_string())
            .collect();
        Ok((covered, hosts.len()))
    }

    /// Every host and service, with the rules in force.
    pub async fn status(&self) -> Result<StatusReport, OpsError> {
        let hosts = self.store.hosts().await?;
        let services = self.store.services().await?;
        let rules = self.rules().await?;
        let now = now_unix_ms();
        let host_rows = hosts.iter().map(|h| host_row(h, now)).collect();
        let ids: Vec<HostId> = hosts.iter().map(|h| h.host.clone()).collect();
        let service_rows = services
            .iter()
            .map(|(s, eps)| {
                let off_hosts: Vec<String> = ids
                    .iter()
                    .filter(|h| rules.set.mesh(h, s).0 == Mesh::Off)
                    .map(ToString::to_string)
                    .collect();
                let off = off_hosts.len();
                let mesh = match (off, ids.len()) {
                    (0, _) => "on".to_owned(),
                    (n, m) if n == m => "off".to_owned(),
                    (n, m) => format!("off on {n} of {m} hosts"),
                };
                let in_force = rules
                    .set
                    .rules
                    .iter()
                    .filter(|r| r.mesh.is_some())
                    .filter(|r| {
                        r.service
                            .as_deref()
                            .is_none_or(|p| detour_registry::gray::glob(p, s.as_str()))
                    })
                    .map(|r| r.id.clone())
                    .collect();
                ServiceRow {
                    service: s.to_string(),
                    instances: eps.len(),
                    healthy: eps.iter().filter(|e| e.healthy).count(),
                    mesh,
                    off_hosts,
                    rules: in_force,
                    protected: None,
                }
            })
            .collect();
        Ok(StatusReport {
            hosts: host_rows,
            services: service_rows,
            rules: rules.set.rules.len(),
            malformed_rules: rules.malformed.iter().map(ToString::to_string).collect(),
        })
    }
}

fn empty() -> RuleSet {
    RuleSet {
        version: FORMAT,
        rules: Vec::new(),
    }
}

fn fastrand_u16() -> u16 {
    // Time-seeded: two rollbacks in the same millisecond still get distinct ids.
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (n ^ (n >> 16) ^ std::process::id()) as u16
}

/// What `detourctl status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Every live host.
    pub hosts: Vec<HostRow>,
    /// Every service.
    pub services: Vec<ServiceRow>,
    /// Rules in force.
    pub rules: usize,
    /// Rules left out as malformed.
    pub malformed_rules: Vec<String>,
}

/// One host.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    /// The host.
    pub host: String,
    /// Its sidecar's state (`failed`: the watchdog marked a crash loop).
    pub state: String,
    /// Its sidecar's version.
    pub version: String,
    /// The binary its watchdog runs, and the rule's version label.
    pub binary: String,
    /// Seconds since its sidecar started.
    pub uptime_s: Option<u64>,
    /// Restarts.
    pub restarts: Option<u64>,
    /// Its CA links off their primary path (`host=state`).
    pub links: Vec<String>,
    /// A version rule its watchdog refused to run, and why (empty: none).
    pub refused: String,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceRow {
    /// The service.
    pub service: String,
    /// Registered instances.
    pub instances: usize,
    /// Of which healthy.
    pub healthy: usize,
    /// `on`, `off`, or `off on N of M hosts`.
    pub mesh: String,
    /// The hosts whose calls to it skip the mesh.
    pub off_hosts: Vec<String>,
    /// The mesh rules that cover it.
    pub rules: Vec<String>,
    /// Whether the local sidecar's catalog protects it (when asked).
    pub protected: Option<bool>,
}

fn host_row(h: &HostStatus, now: u64) -> HostRow {
    let w = h.watchdog.as_ref();
    HostRow {
        host: h.host.to_string(),
        state: h.sidecar.as_str().to_owned(),
        version: h.version.clone(),
        binary: w.map_or_else(String::new, |w| match w.rule_version.as_str() {
            "" => w.binary.clone(),
            v => format!("{} ({v})", w.binary),
        }),
        uptime_s: w
            .filter(|w| w.since_unix_ms > 0)
            .map(|w| now.saturating_sub(w.since_unix_ms) / 1000),
        restarts: w.map(|w| w.restarts),
        links: w
            .map(|w| w.links.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default(),
        refused: w.map(|w| w.refused.clone()).unwrap_or_default(),
    }
}

/// The OS user running this process.
pub fn os_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()))
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
