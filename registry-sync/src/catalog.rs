//! The endpoint catalog a sidecar routes from: the current endpoint set of every service it
//! has been asked about, kept in memory and swapped atomically as the registry changes.
//!
//! A read is a map lookup plus an `Arc` clone; the first read of a service starts a registry
//! watch for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use detour_proto::{EndpointSet, ServiceName};
use tokio::sync::watch;

use crate::registry::{Registry, RegistryError};

/// Endpoint sets per service, fed by registry watches.
pub struct Catalog {
    /// Where watches come from.
    registry: Arc<dyn Registry>,
    /// One live watch per service seen so far; the receiver always holds the current set.
    services: RwLock<HashMap<ServiceName, watch::Receiver<Arc<EndpointSet>>>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Catalog {
    /// An empty catalog over `registry`.
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self {
            registry,
            services: RwLock::new(HashMap::new()),
        }
    }

    /// The registry this catalog watches.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// The current endpoint set of `service`, starting a watch on first use.
    pub async fn endpoints(
        &self,
        service: &ServiceName,
    ) -> Result<Arc<EndpointSet>, RegistryError> {
        if let Some(rx) = self.read().get(service) {
            return Ok(rx.borrow().clone());
        }
        Ok(self.subscribe(service).await?.borrow().clone())
    }

    /// A receiver that follows `service`'s endpoint set.
    pub async fn subscribe(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        if let Some(rx) = self.read().get(service) {
            return Ok(rx.clone());
        }
        let rx = self.registry.watch(service).await?;
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        Ok(services.entry(service.clone()).or_insert(rx).clone())
    }

    /// Every service watched so far with its current set, for `/state`.
    pub fn snapshot(&self) -> BTreeMap<ServiceName, Arc<EndpointSet>> {
        self.read()
            .iter()
            .map(|(k, rx)| (k.clone(), rx.borrow().clone()))
            .collect()
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<ServiceName, watch::Receiver<Arc<EndpointSet>>>>
    {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegistry;
    use detour_proto::{AppProtocol, Endpoint, HostId, InstanceId, Source};

    #[tokio::test]
    async fn follows_the_registry() {
        let reg = MemoryRegistry::new();
        let catalog = Catalog::new(Arc::new(reg.clone()));
        let echo = ServiceName::new("echo").unwrap();
        assert!(!catalog.endpoints(&echo).await.unwrap().known);
        reg.register(Endpoint {
            service: echo.clone(),
            instance: InstanceId::new("i1").unwrap(),
            host: HostId::new("h1").unwrap(),
            app_address: "127.0.0.1:1".parse().unwrap(),
            pa_address: None,
            protocol: AppProtocol::Http1,
            weight: 1,
            zone: String::new(),
            version: String::new(),
            source: Source::Native,
        })
        .await
        .unwrap();
        let set = catalog.endpoints(&echo).await.unwrap();
        assert!(set.known);
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(catalog.snapshot().len(), 1);
    }
}
