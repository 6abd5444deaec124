//! Per-service traffic policy: at the CA, the sidecar's own settings (`proxy.*`, `[retry]`,
//! `[outlier]`); at the PA, its providers' rate limits (`[[provide]] rate_limit_rps`); overridden per service by the config's `[policy.service.NAME]` tables and then
//! by the registry's policy document (`policy/services`), which is followed live: a change
//! applies to the next request of that service, with no restart. A document that does not parse
//! leaves the last good one in force; a malformed service entry is left out. Both are logged
//! and counted (`detour_policy_invalid_total`). The registry's document is followed with the
//! copy saved in the state directory before the registry answers; while it is unknown the
//! config's policy applies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use detour_proto::ServiceName;
use detour_proto::service_doc::Parsed;
use detour_registry::docs::{DocStatus, Followed};
use detour_registry::policy::{PolicyDoc, PolicyOverride};
use tokio::sync::watch;

use crate::config::Config;
use crate::config::limits::{BudgetConfig, Outlier};

/// What the CA applies to one service's requests.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// Time for the response head, over every attempt.
    pub request_timeout: Duration,
    /// Time for one attempt's response head (`None`: only the request timeout).
    pub try_timeout: Option<Duration>,
    /// Time to open a connection for one of the service's requests.
    pub connect_timeout: Duration,
    /// The retry budget.
    pub budget: BudgetConfig,
    /// Outlier ejection.
    pub outlier: Outlier,
    /// Most requests in flight to one endpoint from this sidecar (0: no limit).
    pub max_concurrent_per_endpoint: usize,
    /// Whether paths that skip the PA may be taken (an endpoint may forbid them too).
    pub direct: bool,
}

impl ServicePolicy {
    /// The sidecar's own settings.
    pub fn base(cfg: &Config) -> ServicePolicy {
        ServicePolicy {
            request_timeout: cfg.request_timeout,
            try_timeout: cfg.try_timeout,
            connect_timeout: cfg.connect_timeout,
            budget: cfg.retry_budget,
            outlier: cfg.outlier,
            max_concurrent_per_endpoint: cfg.max_concurrent_per_endpoint,
            direct: true,
        }
    }

    /// These settings with `o`'s keys over them.
    pub fn with(&self, o: &PolicyOverride) -> ServicePolicy {
        let ms = Duration::from_millis;
        ServicePolicy {
            request_timeout: o.request_timeout_ms.map_or(self.request_timeout, ms),
            try_timeout: match o.try_timeout_ms {
                None => self.try_timeout,
                Some(0) => None,
                Some(t) => Some(ms(t)),
            },
            connect_timeout: o.connect_timeout_ms.map_or(self.connect_timeout, ms),
            budget: BudgetConfig {
                ratio: o.retry_budget_ratio.unwrap_or(self.budget.ratio),
                min_per_second: o.retry_min_per_second.unwrap_or(self.budget.min_per_second),
                window: self.budget.window,
            },
            outlier: Outlier {
                consecutive_5xx: o
                    .outlier_consecutive_5xx
                    .unwrap_or(self.outlier.consecutive_5xx),
                base_ejection: o
                    .outlier_base_ejection_ms
                    .map_or(self.outlier.base_ejection, ms),
                max_ejected_percent: o
                    .outlier_max_ejected_percent
                    .unwrap_or(self.outlier.max_ejected_percent),
                panic_threshold_percent: o
                    .outlier_panic_threshold_percent
                    .unwrap_or(self.outlier.panic_threshold_percent),
            },
            max_concurrent_per_endpoint: o
                .max_concurrent_per_endpoint
                .map_or(self.max_concurrent_per_endpoint, |n| n as usize),
            direct: o
                .direct
                .map_or(self.direct, |d| d == detour_registry::policy::Direct::Allow),
        }
    }
}

/// The policies in force: base, config overrides, registry overrides.
pub struct Policies {
    base: ServicePolicy,
    configured: HashMap<ServiceName, PolicyOverride>,
    registry: RwLock<Arc<BTreeMap<ServiceName, PolicyOverride>>>,
    /// Bumped on every change of the registry's overrides.
    generation: AtomicU64,
    /// Told every new generation (control sessions re-send their snapshots).
    changed: watch::Sender<u64>,
    /// Where the registry's overrides in force came from.
    doc: RwLock<DocStatus>,
}

impl Policies {
    /// The config's policies, no registry overrides yet.
    pub fn new(cfg: &Config) -> Arc<Policies> {
        Arc::new(Policies {
            base: ServicePolicy::base(cfg),
            configured: cfg.policies.clone(),
            registry: RwLock::new(Arc::new(BTreeMap::new())),
            generation: AtomicU64::new(0),
            changed: watch::channel(0).0,
            doc: RwLock::new(Followed::unknown().status()),
        })
    }

    /// Where the registry's overrides in force came from.
    pub fn document(&self) -> DocStatus {
        *self.doc.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes with every registry change (callers caching a policy compare it).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Follows the generation (woken on every change).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The policy of `service` now.
    pub fn of(&self, service: &ServiceName) -> ServicePolicy {
        self.base.with(&self.overrides(service))
    }

    /// The overrides of `service`: the config's, then the registry's.
    fn overrides(&self, service: &ServiceName) -> PolicyOverride {
        let registry = self
            .registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let configured = self.configured.get(service).cloned().unwrap_or_default();
        match registry.get(service) {
            Some(r) => configured.then(r),
            None => configured,
        }
    }

    /// The PA's rate limit (rate, burst) of its provider of `service`, configured with
    /// `provided` (`[[provide]] rate_limit_rps`, `rate_limit_burst`).
    pub fn rate_limit(
        &self,
        service: &ServiceName,
        provided: Option<(u32, u32)>,
    ) -> Option<(u32, u32)> {
        self.overrides(service).rate_limit(provided)
    }

    /// The registry's overrides in force.
    pub fn registry_overrides(&self) -> Arc<BTreeMap<ServiceName, PolicyOverride>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the policy document for as long as `doc` lives.
    pub fn follow(self: &Arc<Self>, doc: watch::Receiver<Followed>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        detour_registry::docs::apply_each(doc, move |d| me.apply_followed(d))
    }

    /// Takes the document as followed: unknown changes nothing (the config's policy applies).
    pub fn apply_followed(&self, doc: &Followed) {
        if !doc.known() {
            return;
        }
        *self.doc.write().unwrap_or_else(|p| p.into_inner()) = doc.status();
        self.apply(doc.bytes.as_deref());
    }

    /// Takes a new policy document (`None`: there is none).
    pub fn apply(&self, doc: Option<&[u8]>) {
        let parsed = doc.map(|b| PolicyDoc::parse(b).map(|d| (d.services, d.malformed)));
        let Some(services) = services_in(
            parsed,
            "policy",
            metrics::counter!("detour_policy_invalid_total"),
        ) else {
            return;
        };
        let mut current = self.registry.write().unwrap_or_else(|p| p.into_inner());
        if **current == services {
            return;
        }
        tracing::info!(
            services = services.len(),
            "traffic policy from the registry changed"
        );
        metrics::gauge!("detour_policy_registry_services").set(services.len() as f64);
        *current = Arc::new(services);
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(g);
    }
}

/// The services of a per-service document `what` as read (`None`: there is none, so none), or
/// `None` when it does not parse: the last good one stays in force. Both a document that does not
/// parse and each entry left out are logged and counted in `invalid`.
pub fn services_in<T>(
    parsed: Option<Parsed<T>>,
    what: &str,
    invalid: metrics::Counter,
) -> Option<BTreeMap<ServiceName, T>> {
    match parsed {
        None => Some(BTreeMap::new()),
        Some(Ok((services, malformed))) => {
            for m in &malformed {
                tracing::warn!(entry = %m, "leaving out a malformed service entry of the {what} document");
                invalid.increment(1);
            }
            Some(services)
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "ignoring a malformed {what} document; the last good one stays in force");
            invalid.increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            "test",
            &format!("host = \"h\"\n{extra}"),
            Vec::<(String, String)>::new(),
        )
        .unwrap()
    }

    #[test]
    fn registry_over_config_over_base() {
        let cfg = config(
            "[proxy]\nrequest_timeout_ms = 5000\n[policy.service.orders]\nrequest_timeout_ms = 800\ntry_timeout_ms = 200\n",
        );
        let p = Policies::new(&cfg);
        let orders = ServiceName::new("orders").unwrap();
        let other = ServiceName::new("other").unwrap();
        assert_eq!(p.of(&other).request_timeout, Duration::from_millis(5000));
        assert_eq!(p.of(&other).try_timeout, None);
        assert_eq!(p.of(&orders).request_timeout, Duration::from_millis(800));
        assert_eq!(p.of(&orders).try_timeout, Some(Duration::from_millis(200)));
        let g = p.generation();
        p.apply(Some(
            br#"{"version":1,"services":{"orders":{"request_timeout_ms":300,"max_concurrent_per_endpoint":4}}}"#,
        ));
        assert_ne!(p.generation(), g, "a change is announced");
        let o = p.of(&orders);
        assert_eq!(o.request_timeout, Duration::from_millis(300));
        assert_eq!(
            o.try_timeout,
            Some(Duration::from_millis(200)),
            "config keys stay"
        );
        assert_eq!(o.max_concurrent_per_endpoint, 4);
        // A broken document keeps the last good policy; removing it restores the config's.
        p.apply(Some(b"{not json"));
        assert_eq!(p.of(&orders).request_timeout, Duration::from_millis(300));
        p.apply(None);
        assert_eq!(p.of(&orders).request_timeout, Duration::from_millis(800));
    }

    #[test]
    fn config_entries_are_validated() {
        let err = Config::parse(
            "test",
            "host = \"h\"\n[policy.service.orders]\nretry_budget_ratio = 2.0\nbogus = 1\n",
            Vec::<(String, String)>::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("retry_budget_ratio"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }
}
