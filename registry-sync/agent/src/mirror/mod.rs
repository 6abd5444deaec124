//! The mirror's state, pure: the source's providers through self-protection to the entries the
//! target must hold, and the writes that get it there ([`plan`]); the target seam ([`target`]);
//! the loop that elects a replica and keeps the target converged ([`run`]).
//!
//! Self-protection is the sidecar catalog's ([`detour_registry::protection`]), per service: a single
//! de-registration flows through at once; a mass one (or an emptied service) is held, the held
//! instances are health-checked and only failing ones are removed; it ends when the source
//! shows them again, after the maximum time, or never starts while the source is disconnected —
//! then nothing is fed to it and nothing is deleted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::time::Instant;

use detour_proto::{Endpoint, EndpointSet, InstanceId, ServiceName};

use crate::legacy::SourceView;
use detour_registry::protection::{Change, Protection, ProtectionPolicy};

pub mod plan;
pub mod run;
pub mod target;

use plan::{Current, Key};

/// The mirror's view of every service it mirrors.
#[derive(Debug)]
pub struct Mirror {
    policy: ProtectionPolicy,
    services: BTreeMap<ServiceName, Protection>,
}

/// One protected service, for `/state`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Held {
    /// The service.
    pub service: String,
    /// Instances kept against the source.
    pub kept: Vec<String>,
    /// Of those, the ones kept and passing their checks (still mirrored).
    pub mirrored: usize,
}

impl Mirror {
    /// A mirror with no history.
    pub fn new(policy: ProtectionPolicy) -> Self {
        Self {
            policy,
            services: BTreeMap::new(),
        }
    }

    fn protection(&mut self, service: &ServiceName) -> &mut Protection {
        let cfg = self.policy.for_service(service).protection;
        self.services
            .entry(service.clone())
            .or_insert_with(|| Protection::new(cfg))
    }

    /// Starts from what the target holds (so a source that comes back shrunk after a takeover
    /// is judged against what was mirrored, not against nothing).
    pub fn seed(&mut self, current: &Current, now: Instant) {
        let mut by_service: BTreeMap<ServiceName, Vec<Endpoint>> = BTreeMap::new();
        for ((svc, _), h) in &current.ours {
            by_service
                .entry(svc.clone())
                .or_default()
                .push(h.endpoint.clone());
        }
        for (svc, eps) in by_service {
            let set = Arc::new(EndpointSet::known(eps));
            self.protection(&svc).on_registry(&set, now);
        }
    }

    /// Applies the source's view; returns the protection changes to log and count. A view that
    /// is not connected or not yet fully listed changes nothing: deletions wait for a source
    /// that can be trusted.
    pub fn on_source(&mut self, view: &SourceView, now: Instant) -> Vec<(ServiceName, Change)> {
        if !view.connected || !view.listed {
            return Vec::new();
        }
        let mut names: Vec<ServiceName> = view.providers.keys().cloned().collect();
        names.extend(
            self.services
                .keys()
                .filter(|s| !view.providers.contains_key(*s))
                .cloned(),
        );
        let mut changes = Vec::new();
        for svc in names {
            let eps: Vec<Endpoint> = view
                .providers
                .get(&svc)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let set = Arc::new(EndpointSet::known(eps));
            let p = self.protection(&svc);
            let (_, change) = p.on_registry(&set, now);
            if let Some(c) = change {
                changes.push((svc.clone(), c));
            }
        }
        // Forget services that are gone for good (nothing listed, nothing held).
        self.services
            .retain(|_, p| p.is_protected() || !p.output().endpoints.is_empty());
        changes
    }

    /// The instances held against the source, to health-check.
    pub fn kept(&self) -> Vec<Endpoint> {
        self.services.values().flat_map(|p| p.kept()).collect()
    }

    /// Records a health check of a held instance; whether the desired entries changed.
    pub fn on_health(&mut self, service: &ServiceName, id: &InstanceId, healthy: bool) -> bool {
        self.services
            .get_mut(service)
            .and_then(|p| p.on_health(id, healthy))
            .is_some()
    }

    /// Ends protections that lasted their maximum.
    pub fn expire(&mut self, now: Instant) -> Vec<(ServiceName, Change)> {
        self.services
            .iter_mut()
            .filter_map(|(s, p)| p.expire(now).map(|c| (s.clone(), c)))
            .collect()
    }

    /// The entries the target must hold.
    pub fn desired(&self) -> BTreeMap<Key, Endpoint> {
        self.services
            .values()
            .flat_map(|p| p.output().endpoints.clone())
            .map(|e| ((e.service.clone(), e.instance.clone()), e))
            .collect()
    }

    /// The services under protection.
    pub fn held(&self) -> Vec<Held> {
        self.services
            .iter()
            .filter(|(_, p)| p.is_protected())
            .map(|(s, p)| {
                let out = p.output();
                let kept = p.kept();
                Held {
                    service: s.to_string(),
                    mirrored: kept
                        .iter()
                        .filter(|k| out.endpoints.iter().any(|e| e.instance == k.instance))
                        .count(),
                    kept: kept.iter().map(|k| k.instance.to_string()).collect(),
                }
            })
            .collect()
    }

    /// Per service, how many entries it has: for `/state`.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.services
            .iter()
            .map(|(s, p)| (s.to_string(), p.output().endpoints.len()))
            .collect()
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
