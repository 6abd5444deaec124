//! Registry self-protection, pure: given what the registry says now, what the catalog should
//! route to.
//!
//! A de-registration of a few instances is trusted at once (routing to an instance that was
//! deliberately taken out is dangerous). When, inside a window, more than a threshold share of a
//! service's instances vanish — or the set becomes empty while it was not — the registry is
//! distrusted (a partition, a registry bug): the service enters protection, the vanished
//! instances are kept and health-checked, and only those that fail are dropped. Protection ends
//! when the registry shows the set back, after a maximum time (the registry is then trusted
//! again, so protection never leaks connections to providers that are really gone), or by
//! operator command. References: Eureka self-preservation, Nacos' protect threshold, Envoy's
//! healthy panic threshold.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_proto::{Endpoint, EndpointSet, InstanceId, ServiceName};

use crate::health::CheckSpec;

/// Self-protection thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProtectionConfig {
    /// Whether protection can engage at all.
    pub enabled: bool,
    /// The window in which vanished instances are counted.
    pub window: Duration,
    /// Share of the service's instances that may vanish inside the window before protection
    /// engages (0.5: more than half).
    pub threshold: f64,
    /// Longest protection; then the registry is trusted again.
    pub max: Duration,
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(10),
            threshold: 0.5,
            max: Duration::from_secs(300),
        }
    }
}

/// What one service is protected with: thresholds and the health check of kept instances.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServicePolicy {
    /// Thresholds.
    pub protection: ProtectionConfig,
    /// How kept instances are checked.
    pub check: CheckSpec,
}

/// Protection settings: global defaults and per-service overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProtectionPolicy {
    /// For services without their own entry.
    pub default: ServicePolicy,
    /// Per-service settings (complete: overrides are merged over the defaults when configured).
    pub services: HashMap<ServiceName, ServicePolicy>,
}

impl ProtectionPolicy {
    /// The settings of `service`.
    pub fn for_service(&self, service: &ServiceName) -> &ServicePolicy {
        self.services.get(service).unwrap_or(&self.default)
    }
}

/// Why protection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The registry shows the kept instances again.
    RegistryRecovered,
    /// The maximum time passed.
    Expired,
    /// An operator ended it.
    Operator,
}

/// A change worth logging and counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Protection engaged, keeping this many vanished instances.
    Entered {
        /// Instances kept against the registry's word.
        kept: usize,
    },
    /// Protection ended.
    Left(Ended),
}

/// The protection state of one service.
#[derive(Debug, Clone)]
pub struct Protection {
    cfg: ProtectionConfig,
    /// The last set the registry reported (shared with the registry's watch: routing from it
    /// costs no copy while nothing is kept).
    last_registry: Arc<EndpointSet>,
    /// Instances that vanished recently, with when.
    vanished: VecDeque<(Instant, Endpoint)>,
    /// While protected: since when, and the instances kept against the registry.
    protected: Option<(Instant, BTreeMap<InstanceId, Endpoint>)>,
    /// Kept instances whose health check failed (dropped from routing).
    failing: HashSet<InstanceId>,
}

impl Protection {
    /// A service with no history.
    pub fn new(cfg: ProtectionConfig) -> Self {
        Self {
            cfg,
            last_registry: Arc::new(EndpointSet::default()),
            vanished: VecDeque::new(),
            protected: None,
            failing: HashSet::new(),
        }
    }

    /// Whether the service is protected now.
    pub fn is_protected(&self) -> bool {
        self.protected.is_some()
    }

    /// The instances kept against the registry (to health-check).
    pub fn kept(&self) -> Vec<Endpoint> {
        self.protected
            .as_ref()
            .map(|(_, k)| k.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies a new registry set at `now`; returns what to route to and any change.
    pub fn on_registry(
        &mut self,
        set: &Arc<EndpointSet>,
        now: Instant,
    ) -> (Arc<EndpointSet>, Option<Change>) {
        let next: HashSet<&InstanceId> = set.endpoints.iter().map(|e| &e.instance).collect();
        let gone: Vec<Endpoint> = self
            .last_registry
            .endpoints
            .iter()
            .filter(|e| !next.contains(&e.instance))
            .cloned()
            .collect();
        let base = self.last_registry.endpoints.len();
        let mut change = None;
        for e in &gone {
            self.vanished.push_back((now, e.clone()));
        }
        while self
            .vanished
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.cfg.window)
        {
            self.vanished.pop_front();
        }
        let recent = self.vanished.len();
        match &mut self.protected {
            None if self.cfg.enabled && !gone.is_empty() => {
                let emptied = next.is_empty() && base > 0;
                let share = recent as f64 / (base + recent - gone.len()).max(1) as f64;
                if emptied || share > self.cfg.threshold {
                    // Everything that vanished inside the window is distrusted, not only this
                    // batch: the first few of a mass removal looked like ordinary ones.
                    let kept: BTreeMap<_, _> = self
                        .vanished
                        .iter()
                        .filter(|(_, e)| !next.contains(&e.instance))
                        .map(|(_, e)| (e.instance.clone(), e.clone()))
                        .collect();
                    change = Some(Change::Entered { kept: kept.len() });
                    self.failing.clear();
                    self.protected = Some((now, kept));
                }
            }
            Some((_, kept)) => {
                // Newly vanished instances join the kept ones; re-appearing ones leave them.
                for e in gone {
                    kept.insert(e.instance.clone(), e);
                }
                kept.retain(|id, _| !next.contains(id));
                if kept.is_empty() {
                    change = Some(self.leave(Ended::RegistryRecovered));
                }
            }
            None => {}
        }
        self.last_registry = set.clone();
        if change.is_none() {
            change = self.expire(now);
        }
        (self.output(), change)
    }

    /// Records a health check of a kept instance; returns the new routing set if it changed.
    pub fn on_health(&mut self, id: &InstanceId, healthy: bool) -> Option<Arc<EndpointSet>> {
        let kept = self
            .protected
            .as_ref()
            .is_some_and(|(_, k)| k.contains_key(id));
        if !kept {
            return None;
        }
        let changed = if healthy {
            self.failing.remove(id)
        } else {
            self.failing.insert(id.clone())
        };
        changed.then(|| self.output())
    }

    /// Ends protection at `now` if it lasted too long.
    pub fn expire(&mut self, now: Instant) -> Option<Change> {
        let since = self.protected.as_ref()?.0;
        (now.saturating_duration_since(since) >= self.cfg.max).then(|| self.leave(Ended::Expired))
    }

    /// Ends protection on an operator's word.
    pub fn end_by_operator(&mut self) -> Option<Change> {
        self.protected.as_ref()?;
        Some(self.leave(Ended::Operator))
    }

    fn leave(&mut self, why: Ended) -> Change {
        self.protected = None;
        self.failing.clear();
        self.vanished.clear();
        Change::Left(why)
    }

    /// What to route to: the registry's set, plus the kept instances that pass their checks.
    pub fn output(&self) -> Arc<EndpointSet> {
        let Some((_, kept)) = &self.protected else {
            return self.last_registry.clone();
        };
        let mut eps = self.last_registry.endpoints.clone();
        eps.extend(
            kept.values()
                .filter(|e| !self.failing.contains(&e.instance))
                .cloned(),
        );
        let mut set = EndpointSet::known(eps);
        set.known = self.last_registry.known;
        Arc::new(set)
    }
}

#[cfg(test)]
#[path = "protection_tests.rs"]
mod tests;
