//! The catalog over an in-memory registry: following, protection with health checks, the disk
//! cache before the registry answers.

use std::collections::HashSet;

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::health::CheckSpec;
use crate::memory::MemoryRegistry;
use detour_proto::{Endpoint, HostId, InstanceId};

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
    fn check(&self, ep: &Endpoint, _: &CheckSpec) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let bad = self.0.lock().contains(ep.instance.as_str());
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
    fake.0.lock().insert("i2".into());
    until(&mut rx, |s| s.endpoints.len() == 4).await;
    assert!(catalog.end_protection(&echo));
    assert_eq!(rx.borrow().endpoints.len(), 1);
}

#[tokio::test]
async fn serves_the_disk_cache_until_the_registry_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(&dir.path().join("c")).unwrap();
    let echo = ServiceName::new("echo").unwrap();
    cache.put(&echo, &EndpointSet::known(vec![ep(1), ep(2)]), 7);
    let reg = MemoryRegistry::unsynced();
    let opts = CatalogOptions {
        cache: Some(cache.clone()),
        ..CatalogOptions::default()
    };
    let catalog = Catalog::with_options(Arc::new(reg.clone()), opts);
    let mut rx = catalog.subscribe(&echo).await.unwrap();
    assert_eq!(
        rx.borrow().endpoints.len(),
        2,
        "ready from the disk cache alone"
    );
    assert_eq!(catalog.snapshot()[&echo].source, DataSource::DiskCache);
    // The registry answers with a different set: it wins, and the cache follows.
    reg.set_synced(true);
    reg.register(ep(3)).await.unwrap();
    reg.register(ep(1)).await.unwrap();
    reg.register(ep(2)).await.unwrap();
    until(&mut rx, |s| s.endpoints.len() == 3).await;
    assert_eq!(catalog.snapshot()[&echo].source, DataSource::Registry);
    catalog.flush_cache();
    assert_eq!(cache.get(&echo).unwrap().endpoints.len(), 3);
}

#[tokio::test]
async fn preload_makes_every_cached_service_routable_before_the_registry_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(&dir.path().join("c")).unwrap();
    let names: Vec<ServiceName> = (0..3)
        .map(|i| ServiceName::new(format!("svc{i}")).unwrap())
        .collect();
    for (i, name) in names.iter().enumerate() {
        let eps = (0..=i)
            .map(|k| {
                let mut e = ep(k);
                e.service = name.clone();
                e
            })
            .collect();
        cache.put(name, &EndpointSet::known(eps), 7);
    }
    cache.put_raw("svc-garbage", b"{not json");
    // A registry that never answers: everything comes from the cache.
    let reg = MemoryRegistry::unsynced();
    let catalog = Catalog::with_options(
        Arc::new(reg),
        CatalogOptions {
            cache: Some(cache),
            ..CatalogOptions::default()
        },
    );
    assert_eq!(catalog.preload().await.unwrap(), 3, "garbage is skipped");
    let snap = catalog.snapshot();
    for (i, name) in names.iter().enumerate() {
        assert_eq!(snap[name].source, DataSource::DiskCache);
        assert_eq!(snap[name].set.endpoints.len(), i + 1);
        assert_eq!(snap[name].updated_unix_ms, 7);
    }
    assert_eq!(
        catalog.endpoints(&names[2]).await.unwrap().endpoints.len(),
        3
    );
}

#[tokio::test]
async fn per_service_policies_and_http_checks_decide_what_is_kept() {
    use crate::health::{CheckSpec, answering};
    use crate::protection::{ProtectionConfig, ProtectionPolicy, ServicePolicy};

    let svc = |name: &str| ServiceName::new(name).unwrap();
    let at = |service: &ServiceName, i: usize, addr: std::net::SocketAddr| {
        let mut e = ep(i);
        e.service = service.clone();
        e.app_address = addr;
        e
    };
    // "checked": default policy with an HTTP check; "trusting": protection off.
    let mut policy = ProtectionPolicy {
        default: ServicePolicy {
            check: CheckSpec {
                timeout: Duration::from_secs(2),
                http_path: Some("/healthz".into()),
            },
            ..ServicePolicy::default()
        },
        ..ProtectionPolicy::default()
    };
    let trusting = svc("trusting");
    policy.services.insert(
        trusting.clone(),
        ServicePolicy {
            protection: ProtectionConfig {
                enabled: false,
                ..ProtectionConfig::default()
            },
            ..ServicePolicy::default()
        },
    );
    let reg = MemoryRegistry::new();
    let catalog = Catalog::with_options(
        Arc::new(reg.clone()),
        CatalogOptions {
            policy: Arc::new(policy),
            ..CatalogOptions::default()
        },
    );
    let checked = svc("checked");
    let ok = answering("200 OK").await;
    let sick = answering("503 Service Unavailable").await;
    let mut rx_checked = catalog.subscribe(&checked).await.unwrap();
    let mut rx_trusting = catalog.subscribe(&trusting).await.unwrap();
    for i in 0..4 {
        // i0 and i1 answer 200; i2 and i3 accept connections but answer 503.
        let addr = if i < 2 { ok } else { sick };
        reg.register(at(&checked, i, addr)).await.unwrap();
        reg.register(at(&trusting, i, ok)).await.unwrap();
    }
    until(&mut rx_checked, |s| s.endpoints.len() == 4).await;
    until(&mut rx_trusting, |s| s.endpoints.len() == 4).await;
    for i in 1..4 {
        let id = InstanceId::new(format!("i{i}")).unwrap();
        reg.deregister(&checked, &id).await.unwrap();
        reg.deregister(&trusting, &id).await.unwrap();
    }
    // Protection off: the registry is followed at once.
    until(&mut rx_trusting, |s| s.endpoints.len() == 1).await;
    assert!(!catalog.snapshot()[&trusting].protected);
    // Protected: i1 passes its HTTP check and stays; the 503 ones leave although they accept
    // connections.
    until(&mut rx_checked, |s| {
        let ids: Vec<&str> = s.endpoints.iter().map(|e| e.instance.as_str()).collect();
        ids == ["i0", "i1"]
    })
    .await;
    assert!(catalog.snapshot()[&checked].protected);
}

#[tokio::test]
async fn a_registry_back_with_most_instances_gone_is_judged_against_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(&dir.path().join("c")).unwrap();
    let echo = ServiceName::new("echo").unwrap();
    cache.put(&echo, &EndpointSet::known((0..5).map(ep).collect()), 7);
    let reg = MemoryRegistry::unsynced();
    let fake = Arc::new(Fake(Mutex::new(HashSet::from(["i4".to_owned()]))));
    let catalog = Catalog::with_options(
        Arc::new(reg.clone()),
        CatalogOptions {
            cache: Some(cache),
            health: fake,
            ..CatalogOptions::default()
        },
    );
    assert_eq!(catalog.preload().await.unwrap(), 1);
    let mut rx = catalog.subscribe(&echo).await.unwrap();
    assert_eq!(rx.borrow().endpoints.len(), 5);
    // The registry answers with one instance of the five.
    reg.register(ep(0)).await.unwrap();
    reg.set_synced(true);
    reg.register(ep(0)).await.unwrap(); // a change, now that the registry counts
    tokio::time::timeout(Duration::from_secs(10), async {
        while catalog.snapshot()[&echo].source != DataSource::Registry {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the registry's answer is applied");
    let view = &catalog.snapshot()[&echo];
    assert!(view.protected, "four of five vanished at once");
    assert_eq!(view.source, DataSource::Registry);
    // The kept instances stay while healthy; i4 fails its check and leaves.
    until(&mut rx, |s| {
        let ids: Vec<&str> = s.endpoints.iter().map(|e| e.instance.as_str()).collect();
        ids == ["i0", "i1", "i2", "i3"]
    })
    .await;
}
