//! The catalog over an in-memory registry: following, protection with health checks, the disk
//! cache before the registry answers.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::memory::MemoryRegistry;
use detour_proto::{HostId, InstanceId};

fn ep(i: usize) -> Endpoint {
    Endpoint::new(
        ServiceName::new("echo").unwrap(),
        InstanceId::new(format!("i{i}")).unwrap(),
        HostId::new("h1").unwrap(),
        format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
    )
}

/// Healthy unless listed.
struct Fake(Mutex<HashSet<String>>);

impl HealthCheck for Fake {
    fn check(&self, ep: &Endpoint) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let bad = self.0.lock().unwrap().contains(ep.instance.as_str());
        Box::pin(async move { !bad })
    }
}

async fn until(rx: &mut watch::Receiver<Arc<EndpointSet>>, pred: impl Fn(&EndpointSet) -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if pred(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("condition within 10 s");
}

#[tokio::test]
async fn follows_the_registry_and_protects_against_mass_removal() {
    let reg = MemoryRegistry::new();
    let fake = Arc::new(Fake(Mutex::new(HashSet::new())));
    let opts = CatalogOptions {
        health: fake.clone(),
        ..CatalogOptions::default()
    };
    let catalog = Catalog::with_options(Arc::new(reg.clone()), opts);
    let echo = ServiceName::new("echo").unwrap();
    let mut rx = catalog.subscribe(&echo).await.unwrap();
    for i in 0..5 {
        reg.register(ep(i)).await.unwrap();
    }
    until(&mut rx, |s| s.endpoints.len() == 5).await;
    // One deliberate de-registration: applied at once.
    reg.deregister(&echo, &InstanceId::new("i4").unwrap())
        .await
        .unwrap();
    until(&mut rx, |s| s.endpoints.len() == 4).await;
    // Three of the four vanish at once: protection keeps everything that vanished inside the
    // window (the first removal looked ordinary, the burst says the registry is not to be
    // trusted right now).
    for i in 1..4 {
        reg.deregister(&echo, &InstanceId::new(format!("i{i}")).unwrap())
            .await
            .unwrap();
    }
    tokio::task::yield_now().await;
    assert!(catalog.snapshot()[&echo].protected);
    assert_eq!(rx.borrow().endpoints.len(), 5);
    // i2 fails its health check: dropped within a check round.
    fake.0.lock().unwrap().insert("i2".into());
    until(&mut rx, |s| s.endpoints.len() == 4).await;
    assert!(catalog.end_protection(&echo));
    assert_eq!(rx.borrow().endpoints.len(), 1);
}

#[tokio::test]
async fn serves_the_disk_cache_until_the_registry_answers() {
    struct Unsynced(MemoryRegistry, AtomicBool);
    #[async_trait::async_trait]
    impl Registry for Unsynced {
        async fn register(&self, e: Endpoint) -> Result<(), RegistryError> {
            self.0.register(e).await
        }
        async fn deregister(&self, s: &ServiceName, i: &InstanceId) -> Result<(), RegistryError> {
            self.0.deregister(s, i).await
        }
        async fn watch(
            &self,
            s: &ServiceName,
        ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
            self.0.watch(s).await
        }
        async fn set_host_status(&self, st: detour_proto::HostStatus) -> Result<(), RegistryError> {
            self.0.set_host_status(st).await
        }
        fn watch_hosts(&self) -> watch::Receiver<Arc<crate::HostStatuses>> {
            self.0.watch_hosts()
        }
        async fn host_status(
            &self,
            h: &HostId,
        ) -> Result<Option<detour_proto::HostStatus>, RegistryError> {
            self.0.host_status(h).await
        }
        async fn withdraw(&self) -> Result<(), RegistryError> {
            Ok(())
        }
        fn synced(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(&dir.path().join("c")).unwrap();
    let echo = ServiceName::new("echo").unwrap();
    cache.put(&echo, &EndpointSet::known(vec![ep(1), ep(2)]), 7);
    let reg = Arc::new(Unsynced(MemoryRegistry::new(), AtomicBool::new(false)));
    let opts = CatalogOptions {
        cache: Some(cache.clone()),
        ..CatalogOptions::default()
    };
    let catalog = Catalog::with_options(reg.clone(), opts);
    let mut rx = catalog.subscribe(&echo).await.unwrap();
    assert_eq!(
        rx.borrow().endpoints.len(),
        2,
        "ready from the disk cache alone"
    );
    assert_eq!(catalog.snapshot()[&echo].source, DataSource::DiskCache);
    // The registry answers with a different set: it wins, and the cache follows.
    reg.1.store(true, Ordering::SeqCst);
    reg.register(ep(3)).await.unwrap();
    reg.register(ep(1)).await.unwrap();
    reg.register(ep(2)).await.unwrap();
    until(&mut rx, |s| s.endpoints.len() == 3).await;
    assert_eq!(catalog.snapshot()[&echo].source, DataSource::Registry);
    assert_eq!(cache.get(&echo).unwrap().endpoints.len(), 3);
}
