//! An in-memory [`Registry`] for unit tests of the layers above the trait. Records never
//! expire; every client made from one store sees the same data at once.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use detour_proto::{Endpoint, EndpointSet, HostId, HostStatus, InstanceId, ServiceName};
use tokio::sync::watch;

use crate::registry::{
    DocName, DocSenders, DocState, HostStatuses, Registry, RegistryError, Watchers,
    subscribe_or_insert,
};

struct Store {
    endpoints: HashMap<ServiceName, Vec<Endpoint>>,
    hosts: watch::Sender<Arc<HostStatuses>>,
    watchers: Watchers,
    docs: DocSenders,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            endpoints: HashMap::new(),
            hosts: watch::channel(Arc::new(HostStatuses::new())).0,
            watchers: Watchers::default(),
            docs: DocSenders::default(),
        }
    }
}

impl Store {
    fn set_of(&self, service: &ServiceName) -> EndpointSet {
        match self.endpoints.get(service) {
            Some(eps) => EndpointSet::known(eps.clone()),
            None => EndpointSet::default(),
        }
    }

    fn publish(&self, service: &ServiceName) {
        if let Some(tx) = self.watchers.get(service) {
            tx.send_replace(Arc::new(self.set_of(service)));
        }
    }
}

/// A shared in-memory registry.
#[derive(Clone)]
pub struct MemoryRegistry {
    store: Arc<Mutex<Store>>,
    /// What `synced` answers (a registry not reached yet, for cache tests).
    synced: Arc<AtomicBool>,
    /// The last document revision.
    revision: Arc<AtomicU64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self {
            store: Arc::default(),
            synced: Arc::new(AtomicBool::new(true)),
            revision: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryRegistry")
    }
}

impl MemoryRegistry {
    /// An empty registry whose documents are known to be absent (a registry that answered).
    pub fn new() -> Self {
        let r = Self::default();
        for d in DocName::ALL {
            r.set_doc(d, None);
        }
        r
    }

    /// An empty registry that reports not being reached until [`Self::set_synced`]; its
    /// documents stay [`DocState::Unknown`] until set.
    pub fn unsynced() -> Self {
        let r = Self::default();
        r.set_synced(false);
        r
    }

    /// Sets the gray rules document (`None`: none).
    pub fn set_rules(&self, doc: Option<&[u8]>) {
        self.set_doc(DocName::GrayRules, doc);
    }

    /// Sets one document (`None`: none), at a new revision.
    pub fn set_doc(&self, name: DocName, doc: Option<&[u8]>) {
        let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
        self.lock().docs.publish(name, doc.map(Arc::from), revision);
    }

    /// Sets what `synced` answers.
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock()
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, endpoint: Endpoint) -> Result<(), RegistryError> {
        let mut store = self.lock();
        let service = endpoint.service.clone();
        let list = store.endpoints.entry(service.clone()).or_default();
        list.retain(|e| e.instance != endpoint.instance);
        list.push(endpoint);
        store.publish(&service);
        Ok(())
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        instance: &InstanceId,
    ) -> Result<(), RegistryError> {
        let mut store = self.lock();
        if let Some(list) = store.endpoints.get_mut(service) {
            list.retain(|e| &e.instance != instance);
        }
        store.publish(service);
        Ok(())
    }

    async fn watch(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        let mut store = self.lock();
        let current = store.set_of(service);
        Ok(subscribe_or_insert(&mut store.watchers, service, || {
            current
        }))
    }

    async fn set_host_status(&self, status: HostStatus) -> Result<(), RegistryError> {
        self.lock().hosts.send_modify(|h| {
            Arc::make_mut(h).insert(status.host.clone(), status);
        });
        Ok(())
    }

    fn watch_hosts(&self) -> watch::Receiver<Arc<HostStatuses>> {
        self.lock().hosts.subscribe()
    }

    async fn host_status(&self, host: &HostId) -> Result<Option<HostStatus>, RegistryError> {
        Ok(self.lock().hosts.borrow().get(host).cloned())
    }

    async fn withdraw(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    fn watch_doc(&self, doc: DocName) -> watch::Receiver<DocState> {
        self.lock().docs.subscribe(doc)
    }
}
