//! The PA's local providers: registering them with this host's inbound address, and checking
//! each every `inbound.check_interval_ms` — at once, too, when real traffic finds it refusing
//! connections. Providers with the same address, protocol and check (an application serving
//! several services on one port) are checked once for all of them. A provider that fails its check is marked unhealthy in the registry (callers
//! pass it over while any healthy endpoint is left) and marked healthy again once it answers.
//! `/state` and `detour_provider_healthy{service}` show the verdicts.
//!
//! **The address other hosts are told.** A provider listening on this host's loopback cannot be
//! reached from another host: dialling its address there reaches *that* host's loopback. Such a
//! provider is registered `no_direct` (callers reach it through this PA only), unless its
//! loopback address is the very one this PA listens on (one loopback address per host, as in a
//! single-machine mesh). A provider listening on every address (`0.0.0.0`) is published with
//! the PA's address. A provider whose `direct` is `deny` (by default, one with an `allow` list)
//! is registered `no_direct` too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use detour_proto::{Endpoint, ServiceName, Source};
use detour_registry::health::{CheckSpec, HealthCheck};
use detour_registry::{Registry, RegistryError};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::Config;

/// The address other hosts may dial to reach a provider listening on `provider`, given this
/// host's inbound (PA) address; `None` when no other host can reach it.
pub fn reachable_address(provider: SocketAddr, inbound: SocketAddr) -> Option<SocketAddr> {
    let (ip, own) = (provider.ip(), inbound.ip());
    if ip.is_unspecified() {
        // On every address: reachable on the host's own, when that is a real one.
        return (!own.is_unspecified() && !own.is_loopback())
            .then(|| SocketAddr::new(own, provider.port()));
    }
    if ip.is_loopback() {
        return (ip == own).then_some(provider);
    }
    Some(provider)
}

/// One local provider and its last verdict.
struct Local {
    /// The endpoint as registered (its `healthy` field follows the checks).
    endpoint: Endpoint,
    /// The provider as this host checks it (its own address).
    local: Endpoint,
    /// How it is checked.
    check: CheckSpec,
    /// The last verdict.
    healthy: AtomicBool,
    /// Wakes its check early (traffic found it refusing); shared by the providers checked
    /// together.
    wake: Arc<Notify>,
}

/// What makes two providers' checks the same check.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CheckKey {
    address: SocketAddr,
    protocol: detour_proto::AppProtocol,
    path: Option<String>,
    timeout: Duration,
}

impl Local {
    fn key(&self) -> CheckKey {
        CheckKey {
            address: self.local.app_address,
            protocol: self.local.protocol,
            path: self.check.http_path.clone(),
            timeout: self.check.timeout,
        }
    }
}

/// The local providers of one sidecar.
pub struct LocalProviders {
    registry: Arc<dyn Registry>,
    checker: Arc<dyn HealthCheck>,
    interval: Duration,
    by_service: HashMap<ServiceName, Arc<Local>>,
}

/// What `/state` shows of one local provider.
#[derive(Debug, Serialize)]
pub struct ProviderState {
    service: ServiceName,
    instance: String,
    address: SocketAddr,
    protocol: &'static str,
    healthy: bool,
}

impl LocalProviders {
    /// The providers of `cfg`, registered with `inbound` (this host's bound inbound address)
    /// as their PA.
    pub fn new(
        cfg: &Config,
        inbound: SocketAddr,
        registry: Arc<dyn Registry>,
        checker: Arc<dyn HealthCheck>,
    ) -> Self {
        let mut wakes: HashMap<CheckKey, Arc<Notify>> = HashMap::new();
        let by_service = cfg
            .provide
            .iter()
            .map(|p| {
                let reachable = reachable_address(p.address, inbound);
                if reachable.is_none() {
                    tracing::info!(service = %p.service, address = %p.address, "the provider listens where other hosts cannot reach it: callers reach it through this PA only");
                }
                let local = Endpoint {
                    service: p.service.clone(),
                    instance: p.instance.clone(),
                    host: cfg.host.clone(),
                    app_address: p.address,
                    pa_address: Some(inbound),
                    protocol: p.protocol,
                    weight: p.weight,
                    zone: match (&*p.zone, &cfg.zone) {
                        ("", Some(z)) => z.zone.clone(),
                        _ => p.zone.clone(),
                    },
                    version: p.version.clone(),
                    source: Source::Native,
                    labels: p.labels.clone(),
                    healthy: true,
                    no_direct: false,
                };
                let endpoint = Endpoint {
                    app_address: reachable.unwrap_or(p.address),
                    no_direct: reachable.is_none() || !p.direct,
                    ..local.clone()
                };
                let check = CheckSpec {
                    timeout: cfg.provider_check_timeout,
                    http_path: p.check_path.clone(),
                };
                let mut local = Local {
                    endpoint,
                    local,
                    check,
                    healthy: AtomicBool::new(true),
                    wake: Arc::default(),
                };
                local.wake = wakes.entry(local.key()).or_default().clone();
                (p.service.clone(), Arc::new(local))
            })
            .collect();
        Self {
            registry,
            checker,
            interval: cfg.provider_check_interval,
            by_service,
        }
    }

    /// The providers grouped by check, each group in service order.
    fn groups(&self) -> Vec<Vec<Arc<Local>>> {
        let mut groups: HashMap<CheckKey, Vec<Arc<Local>>> = HashMap::new();
        for local in self.by_service.values() {
            groups.entry(local.key()).or_default().push(local.clone());
        }
        let mut groups: Vec<_> = groups.into_values().collect();
        for g in &mut groups {
            g.sort_by(|a, b| a.endpoint.service.cmp(&b.endpoint.service));
        }
        groups
    }

    /// Checks every provider once and registers it with that verdict.
    pub async fn register_all(&self) -> Result<(), RegistryError> {
        for group in self.groups() {
            let healthy = self.checker.check(&group[0].local, &group[0].check).await;
            for local in &group {
                local.healthy.store(healthy, Ordering::Relaxed);
                self.publish(local, healthy).await?;
            }
        }
        Ok(())
    }

    /// Starts one check loop per group of providers checked together.
    pub fn spawn_checks(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        self.groups()
            .into_iter()
            .map(|group| tokio::spawn(self.clone().check_loop(group)))
            .collect()
    }

    /// Traffic found `service`'s provider refusing: check it now.
    pub fn suspect(&self, service: &ServiceName) {
        if let Some(local) = self.by_service.get(service) {
            local.wake.notify_one();
        }
    }

    /// Every provider with its last verdict, for `/state`.
    pub fn states(&self) -> Vec<ProviderState> {
        let mut v: Vec<ProviderState> = self
            .by_service
            .values()
            .map(|l| ProviderState {
                service: l.endpoint.service.clone(),
                instance: l.endpoint.instance.to_string(),
                address: l.local.app_address,
                protocol: l.endpoint.protocol.as_str(),
                healthy: l.healthy.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.service.cmp(&b.service));
        v
    }

    async fn check_loop(self: Arc<Self>, group: Vec<Arc<Local>>) {
        let Some(first) = group.first().cloned() else {
            return;
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                () = first.wake.notified() => {}
            }
            let healthy = self.checker.check(&first.local, &first.check).await;
            for local in &group {
                self.apply(local, healthy).await;
            }
        }
    }

    /// Records `local`'s verdict; a change is logged, counted and published.
    async fn apply(&self, local: &Local, healthy: bool) {
        if local.healthy.swap(healthy, Ordering::Relaxed) == healthy {
            return;
        }
        let service = &local.endpoint.service;
        if healthy {
            tracing::info!(%service, address = %local.local.app_address, "local provider answers again: marked healthy");
        } else {
            tracing::warn!(%service, address = %local.local.app_address, "local provider failed its health check: marked unhealthy");
        }
        metrics::counter!("detour_provider_health_changes_total",
            "service" => detour_registry::labels::service(service), "healthy" => if healthy { "true" } else { "false" })
        .increment(1);
        if let Err(e) = self.publish(local, healthy).await {
            // The registry back-end keeps the write and retries it when it is reachable.
            tracing::warn!(%service, error = %e, "could not publish the provider's health");
        }
    }

    async fn publish(&self, local: &Local, healthy: bool) -> Result<(), RegistryError> {
        metrics::gauge!("detour_provider_healthy", "service" => detour_registry::labels::service(&local.endpoint.service))
            .set(if healthy { 1.0 } else { 0.0 });
        let mut ep = local.endpoint.clone();
        ep.healthy = healthy;
        self.registry.register(ep).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::sync::Mutex;
    use detour_registry::memory::MemoryRegistry;
    use std::future::Future;
    use std::pin::Pin;

    /// Verdicts set by the test.
    #[derive(Default, Clone)]
    struct Verdicts(Arc<Mutex<bool>>);

    impl HealthCheck for Verdicts {
        fn check(&self, _: &Endpoint, _: &CheckSpec) -> Pin<Box<dyn Future<Output = bool> + Send>> {
            let ok = *self.0.lock();
            Box::pin(async move { ok })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_provider_is_marked_unhealthy_and_restored() {
        let cfg = crate::config::Config::parse(
            "t",
            "host = \"h1\"\n[[provide]]\nservice = \"hello\"\naddress = \"127.0.0.1:9\"\n",
            Vec::new(),
        )
        .unwrap();
        let registry = Arc::new(MemoryRegistry::default());
        let verdicts = Verdicts::default();
        *verdicts.0.lock() = true;
        let inbound = "127.0.0.1:4143".parse().unwrap();
        let p = Arc::new(LocalProviders::new(
            &cfg,
            inbound,
            registry.clone(),
            Arc::new(verdicts.clone()),
        ));
        p.register_all().await.unwrap();
        let svc = ServiceName::new("hello").unwrap();
        let rx = registry.watch(&svc).await.unwrap();
        assert!(rx.borrow().endpoints[0].healthy);
        let _tasks = p.spawn_checks();
        *verdicts.0.lock() = false;
        p.suspect(&svc);
        let mut rx2 = rx.clone();
        rx2.wait_for(|s| !s.endpoints[0].healthy).await.unwrap();
        assert!(!p.states()[0].healthy);
        *verdicts.0.lock() = true;
        rx2.wait_for(|s| s.endpoints[0].healthy).await.unwrap();
    }

    /// Verdicts per address, and the checks made of each.
    #[derive(Default, Clone)]
    struct PerAddress {
        down: Arc<Mutex<Vec<SocketAddr>>>,
        checks: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    }

    impl HealthCheck for PerAddress {
        fn check(
            &self,
            ep: &Endpoint,
            _: &CheckSpec,
        ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
            *self.checks.lock().entry(ep.app_address).or_default() += 1;
            let ok = !self.down.lock().contains(&ep.app_address);
            Box::pin(async move { ok })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn providers_on_one_address_are_checked_once_for_all_and_share_the_verdict() {
        let provide =
            |svc: &str, at: &str| format!("[[provide]]\nservice = \"{svc}\"\naddress = \"{at}\"\n");
        let text = format!(
            "host = \"h1\"\n{}{}{}",
            provide("a", "127.0.0.1:9"),
            provide("b", "127.0.0.1:9"),
            provide("c", "127.0.0.1:10")
        );
        let cfg = crate::config::Config::parse("t", &text, Vec::new()).unwrap();
        let registry = Arc::new(MemoryRegistry::default());
        let checker = PerAddress::default();
        let inbound = "127.0.0.1:4143".parse().unwrap();
        let p = Arc::new(LocalProviders::new(
            &cfg,
            inbound,
            registry.clone(),
            Arc::new(checker.clone()),
        ));
        p.register_all().await.unwrap();
        let (nine, ten): (SocketAddr, SocketAddr) = (
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:10".parse().unwrap(),
        );
        let checks = |at| checker.checks.lock().get(&at).copied().unwrap_or(0);
        assert_eq!((checks(nine), checks(ten)), (1, 1));
        let _tasks = p.spawn_checks();
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        // One check a second per address, however many services it serves.
        assert_eq!((checks(nine), checks(ten)), (11, 11));
        // Traffic finds `b` refusing: the check runs at once and marks `a` too, not `c`.
        checker.down.lock().push(nine);
        let b = ServiceName::new("b").unwrap();
        let mut rx_a = registry
            .watch(&ServiceName::new("a").unwrap())
            .await
            .unwrap();
        p.suspect(&b);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(checks(nine), 12);
        rx_a.wait_for(|s| !s.endpoints[0].healthy).await.unwrap();
        let healthy: Vec<(String, bool)> = p
            .states()
            .into_iter()
            .map(|s| (s.service.to_string(), s.healthy))
            .collect();
        let want = [("a", false), ("b", false), ("c", true)].map(|(s, h)| (s.to_string(), h));
        assert_eq!(healthy, want);
    }
}
