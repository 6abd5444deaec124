//! The gray rules as this sidecar applies them: followed from the registry (`gray/rules`, with
//! the copy saved in the state directory before the registry answers — `docs.rs` of the registry
//! library), parsed (a malformed rule is logged, counted and left out; a document that is no
//! rule set at all leaves the last good rules in force), and evaluated for this host. The CA asks
//! whether a service's calls take the mesh (off: straight to the provider, C→CA→P); control
//! sessions tell their SDKs (a `MeshSwitch`: off, the SDK calls the provider itself, C→P). While
//! the rules are unknown (no registry answer and no saved copy) every service takes the mesh,
//! and no `MeshSwitch` is sent: an SDK keeps the switches it has.

use detour_proto::fastmap::FastMap;
use std::sync::{Arc, OnceLock, RwLock};

use detour_proto::{HostId, ServiceName};
use detour_registry::docs::{DocStatus, Followed};
use detour_registry::gray::{Mesh, RuleSet};
use serde::Serialize;
use tokio::sync::watch;

/// Most decisions kept (one per service asked about while a mesh-off rule exists). Only
/// services the catalog has are kept (names come from the network: control sessions name the
/// services they call); past this many, or for a name no service has, a decision is made on
/// every call instead of being kept.
const MAX_DECIDED: usize = 10_000;

/// The rules in force for one host.
pub struct Gray {
    host: HostId,
    rules: watch::Sender<Arc<RuleSet>>,
    /// Decisions made since the rules last changed, by service.
    cache: RwLock<Decisions>,
    /// Where the rules in force came from (unknown until the registry or a saved copy says).
    doc: RwLock<DocStatus>,
    /// Which services' decisions are kept (unset: all, up to [`MAX_DECIDED`]).
    keep_if: OnceLock<KeepIf>,
}

/// Whether a decision for a service is kept.
type KeepIf = Box<dyn Fn(&ServiceName) -> bool + Send + Sync>;

#[derive(Default)]
struct Decisions {
    /// Whether any rule can switch anything off on this host (if not, everything is on).
    any_off: bool,
    by_service: FastMap<ServiceName, bool>,
}

/// What `/state` shows.
#[derive(Debug, Serialize)]
pub struct GrayState {
    /// Every rule in force (for every host).
    pub rules: RuleSet,
    /// Services this sidecar has decided for, and whether their calls take the mesh.
    pub mesh: std::collections::BTreeMap<String, bool>,
    /// Where the rules came from: `registry`, `disk` (saved by an earlier run, the registry
    /// has not answered) or `default` (nothing known: no rule applies).
    pub document: DocStatus,
}

impl Gray {
    /// Rules for `host`, none yet.
    pub fn new(host: HostId) -> Arc<Gray> {
        Arc::new(Gray {
            host,
            rules: watch::channel(Arc::new(RuleSet::default())).0,
            cache: RwLock::new(Decisions::default()),
            doc: RwLock::new(Followed::unknown().status()),
            keep_if: OnceLock::new(),
        })
    }

    /// Keeps decisions only for the services `keep` says (the catalog's): a stream of names no
    /// service has is decided call by call and leaves nothing behind. Set once.
    pub fn keep_only_if(&self, keep: impl Fn(&ServiceName) -> bool + Send + Sync + 'static) {
        let _ = self.keep_if.set(Box::new(keep));
    }

    /// Whether the rules are known (from the registry or a saved copy).
    pub fn known(&self) -> bool {
        self.doc.read().unwrap_or_else(|p| p.into_inner()).source
            != detour_registry::docs::DocSource::Default
    }

    /// Follows the rules document for as long as `doc` lives.
    pub fn follow(self: &Arc<Self>, doc: watch::Receiver<Followed>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        detour_registry::docs::apply_each(doc, move |d| me.apply_followed(d))
    }

    /// Takes the document as followed: unknown changes nothing.
    pub fn apply_followed(&self, doc: &Followed) {
        if !doc.known() {
            return;
        }
        let was_known = self.known();
        *self.doc.write().unwrap_or_else(|p| p.into_inner()) = doc.status();
        self.apply(doc.bytes.as_deref());
        if !was_known {
            // Control sessions hold their switches until the rules are known: wake them.
            self.rules.send_modify(|_| {});
        }
    }

    /// Takes a new rules document (`None`: there is none).
    pub fn apply(&self, doc: Option<&[u8]>) {
        let set = match doc {
            None => RuleSet::default(),
            Some(bytes) => match RuleSet::parse(bytes) {
                Ok((set, errors)) => {
                    for e in &errors {
                        tracing::warn!(error = %e, "ignoring a malformed gray rule");
                    }
                    metrics::counter!("detour_gray_invalid_rules_total")
                        .increment(errors.len() as u64);
                    set
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed gray rules document; the last good rules stay in force");
                    metrics::counter!("detour_gray_invalid_rules_total").increment(1);
                    return;
                }
            },
        };
        if **self.rules.borrow() == set {
            return;
        }
        tracing::info!(rules = set.rules.len(), "gray rules changed");
        metrics::gauge!("detour_gray_rules").set(set.rules.len() as f64);
        {
            // Re-decide every service decided so far (so its gauge and `/state` follow).
            let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
            c.any_off = set.any_mesh_off_for(&self.host);
            for (service, on) in c.by_service.iter_mut() {
                *on = set.mesh(&self.host, service).0 == Mesh::On;
                metrics::gauge!("detour_gray_mesh_off", "service" => detour_registry::labels::service(service))
                    .set(if *on { 0.0 } else { 1.0 });
            }
        }
        self.rules.send_replace(Arc::new(set));
    }

    /// Whether calls to `service` from this host take the mesh path.
    pub fn mesh_on(&self, service: &ServiceName) -> bool {
        {
            let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
            if !c.any_off {
                return true;
            }
            if let Some(on) = c.by_service.get(service) {
                return *on;
            }
        }
        let rules = self.rules.borrow().clone();
        let (mesh, rule) = rules.mesh(&self.host, service);
        let on = mesh == Mesh::On;
        if !on {
            tracing::info!(%service, rule = rule.map(|r| r.id.as_str()), "mesh off for this service");
        }
        metrics::gauge!("detour_gray_mesh_off", "service" => detour_registry::labels::service(service)).set(if on {
            0.0
        } else {
            1.0
        });
        let mut c = self.cache.write().unwrap_or_else(|p| p.into_inner());
        if c.by_service.len() < MAX_DECIDED && self.keep_if.get().is_none_or(|keep| keep(service)) {
            c.by_service.insert(service.clone(), on);
        }
        on
    }

    /// Follows the rules (control sessions re-decide their services on every change).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.rules.subscribe()
    }

    /// What `/state` shows.
    pub fn state(&self) -> GrayState {
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        GrayState {
            rules: (**self.rules.borrow()).clone(),
            mesh: c
                .by_service
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            document: *self.doc.read().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_rules_change_nothing_until_known() {
        use detour_registry::docs::DocSource;
        let g = Gray::new(HostId::new("web-1").unwrap());
        let orders = ServiceName::new("orders").unwrap();
        let off = br#"{"version":1,"rules":[{"id":"r","mesh":"off","service":"orders"}]}"#;
        assert!(!g.known());
        g.apply_followed(&Followed {
            source: DocSource::Disk,
            revision: 3,
            bytes: Some(Arc::from(&off[..])),
        });
        assert!(
            g.known() && !g.mesh_on(&orders),
            "the saved rules apply at once"
        );
        assert_eq!(g.state().document.source, DocSource::Disk);
        // An unknown document (a follower never goes back to it) changes nothing.
        g.apply_followed(&Followed::unknown());
        assert!(!g.mesh_on(&orders));
        g.apply_followed(&Followed {
            source: DocSource::Registry,
            revision: 4,
            bytes: None,
        });
        assert!(g.mesh_on(&orders), "the registry's word wins");
        assert_eq!(g.state().document.revision, 4);
    }

    #[test]
    fn decisions_kept_are_bounded_whatever_names_are_asked() {
        let g = Gray::new(HostId::new("web-1").unwrap());
        g.apply(Some(
            br#"{"version":1,"rules":[{"id":"r","mesh":"off","service":"orders"}]}"#,
        ));
        for i in 0..MAX_DECIDED + 500 {
            assert!(g.mesh_on(&ServiceName::new(format!("name-{i}")).unwrap()));
        }
        assert_eq!(g.state().mesh.len(), MAX_DECIDED);
        assert!(
            !g.mesh_on(&ServiceName::new("orders").unwrap()),
            "still decided"
        );
    }

    #[test]
    fn only_services_the_catalog_has_are_kept() {
        let g = Gray::new(HostId::new("web-1").unwrap());
        g.keep_only_if(|s| s.as_str().starts_with("known-"));
        g.apply(Some(
            br#"{"version":1,"rules":[{"id":"r","mesh":"off","service":"*-off"}]}"#,
        ));
        for i in 0..1000 {
            g.mesh_on(&ServiceName::new(format!("random-{i}")).unwrap());
        }
        let known_off = ServiceName::new("known-off").unwrap();
        assert!(!g.mesh_on(&known_off));
        assert!(
            !g.mesh_on(&ServiceName::new("random-off").unwrap()),
            "decided all the same"
        );
        let kept: Vec<String> = g.state().mesh.into_keys().collect();
        assert_eq!(kept, ["known-off"]);
    }

    #[test]
    fn rules_apply_and_a_broken_document_keeps_the_last_good_ones() {
        let g = Gray::new(HostId::new("web-1").unwrap());
        let orders = ServiceName::new("orders").unwrap();
        assert!(g.mesh_on(&orders));
        g.apply(Some(
            br#"{"version":1,"rules":[{"id":"r","mesh":"off","service":"orders","hosts":"web-*"},{"id":"bad","mesh":"maybe"}]}"#,
        ));
        assert!(!g.mesh_on(&orders));
        assert!(g.mesh_on(&ServiceName::new("search").unwrap()));
        g.apply(Some(b"{ not json"));
        assert!(!g.mesh_on(&orders), "the last good rules stay");
        g.apply(None);
        assert!(g.mesh_on(&orders), "no document, no rules");
        assert_eq!(g.state().rules.rules.len(), 0);
    }
}
