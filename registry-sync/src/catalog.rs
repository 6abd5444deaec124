//! The endpoint catalog a sidecar routes from: per service, the set to route to, kept in memory
//! (L1, swapped atomically) and on disk (L2, [`DiskCache`]), fed by registry watches through
//! [`Protection`].
//!
//! A read is a map lookup plus an `Arc` clone. The first read of a service starts its feeder
//! task: until the registry has been reached (`Registry::synced`), the disk cache answers; after
//! that every registry change goes through self-protection, then to L1 and L2. While a service is
//! protected, its kept instances are health-checked every second.

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use detour_proto::{EndpointSet, ServiceName};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::{CacheWriter, Cached, DiskCache};
use crate::health::{HealthCheck, NetCheck};
use crate::protection::{Change, Protection, ProtectionPolicy, ServicePolicy};
use crate::registry::{Registry, RegistryError, now_unix_ms};

/// How a catalog is fed.
#[derive(Clone)]
pub struct CatalogOptions {
    /// Self-protection settings, global and per service.
    pub policy: Arc<ProtectionPolicy>,
    /// The on-disk level, if any.
    pub cache: Option<DiskCache>,
    /// Changes within this interval reach the disk cache in one batch.
    pub cache_batch: Duration,
    /// How kept instances are checked while protected.
    pub health: Arc<dyn HealthCheck>,
}

impl Default for CatalogOptions {
    fn default() -> Self {
        Self {
            policy: Arc::new(ProtectionPolicy::default()),
            cache: None,
            cache_batch: Duration::from_millis(100),
            health: Arc::new(NetCheck),
        }
    }
}

/// Where a service's current set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    /// The registry (through self-protection).
    Registry,
    /// The disk cache, while the registry has not been reached.
    DiskCache,
}

/// What `/state` shows of one service.
#[derive(Debug, Clone)]
pub struct ServiceView {
    /// The set routed to.
    pub set: Arc<EndpointSet>,
    /// Where it came from.
    pub source: DataSource,
    /// When it last changed (ms since the epoch).
    pub updated_unix_ms: u64,
    /// Whether self-protection holds it.
    pub protected: bool,
}

struct Slot {
    tx: watch::Sender<Arc<EndpointSet>>,
    meta: Arc<Mutex<Meta>>,
    task: JoinHandle<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Meta {
    source: DataSource,
    updated_unix_ms: u64,
    protection: Protection,
}

/// What a service's feeder needs besides its channels.
#[derive(Clone)]
struct Feed {
    registry: Arc<dyn Registry>,
    policy: ServicePolicy,
    health: Arc<dyn HealthCheck>,
    writer: Writer,
}

/// The disk cache's writer, once there is one (it can be attached after the start).
type Writer = Arc<OnceLock<Arc<CacheWriter>>>;

/// What [`Catalog::follow`] found.
#[derive(Debug)]
pub enum Follow {
    /// The routed set of a known service.
    Routed(watch::Receiver<Arc<EndpointSet>>),
    /// The registry's view of a name no service has (yet).
    Unknown(watch::Receiver<Arc<EndpointSet>>),
}

/// Endpoint sets per service.
pub struct Catalog {
    registry: Arc<dyn Registry>,
    opts: CatalogOptions,
    writer: Writer,
    services: RwLock<FastMap<ServiceName, Slot>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").finish_non_exhaustive()
    }
}

impl Catalog {
    /// A catalog over `registry` with default options (protection on, no disk cache).
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self::with_options(registry, CatalogOptions::default())
    }

    /// A catalog over `registry` (inside a Tokio runtime: the disk cache's writer is a task).
    pub fn with_options(registry: Arc<dyn Registry>, opts: CatalogOptions) -> Self {
        let writer = Writer::default();
        if let Some(c) = opts.cache.clone() {
            let _ = writer.set(Arc::new(CacheWriter::spawn(c, opts.cache_batch)));
        }
        Self {
            registry,
            opts,
            writer,
            services: RwLock::new(FastMap::default()),
        }
    }

    /// Loads every service in the disk cache in one pass, so the catalog can route to all of
    /// them before the registry answers (a sidecar's start); returns how many. Services the
    /// registry already answered for are left to it.
    pub async fn preload(&self) -> Result<usize, RegistryError> {
        let Some(cache) = self.writer.get().map(|w| w.cache()) else {
            return Ok(0);
        };
        let started = Instant::now();
        let cache = cache.clone();
        // Services become routable chunk by chunk while the rest is still being read.
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let reader = tokio::task::spawn_blocking(move || {
            cache.stream(256, |part| {
                let _ = tx.blocking_send(part);
            });
        });
        let mut loaded = 0;
        while let Some(part) = rx.recv().await {
            for (service, cached) in part {
                if self.read().contains_key(&service) {
                    continue;
                }
                self.insert(&service, Some(cached)).await?;
                loaded += 1;
            }
        }
        let _ = reader.await;
        if loaded > 0 {
            tracing::info!(
                services = loaded,
                ms = started.elapsed().as_millis() as u64,
                "catalog loaded from the disk cache"
            );
        }
        Ok(loaded)
    }

    /// Writes what the disk cache has queued (a graceful stop).
    pub fn flush_cache(&self) {
        if let Some(w) = self.writer.get() {
            w.flush();
        }
    }

    /// Gives a catalog started without one its disk cache (a sidecar that took the sockets
    /// over from its predecessor, once that one has released the cache): every set routed now
    /// is written to it, and every change from then on.
    pub fn attach_cache(&self, cache: DiskCache) {
        let writer = Arc::new(CacheWriter::spawn(cache, self.opts.cache_batch));
        if self.writer.set(writer.clone()).is_err() {
            return;
        }
        let now = now_unix_ms();
        for (service, slot) in self.read().iter() {
            writer.put(service, &slot.tx.borrow(), now);
        }
    }

    /// Whether the catalog writes its sets to a disk cache (a successor's only once its
    /// predecessor let the cache go).
    pub fn has_disk_cache(&self) -> bool {
        self.writer.get().is_some()
    }

    /// The registry this catalog watches.
    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// The current endpoint set of `service`, starting its feeder on first use (of a service
    /// the registry or the disk cache knows).
    pub async fn endpoints(
        &self,
        service: &ServiceName,
    ) -> Result<Arc<EndpointSet>, RegistryError> {
        if let Some(slot) = self.read().get(service) {
            return Ok(slot.tx.borrow().clone());
        }
        // A name the registry does not know (once it has answered) and the disk cache never
        // held leaves nothing behind: no slot, feeder, metric series or cache entry. Names come
        // from the network; only services that exist get state.
        let cached = self.writer.get().and_then(|w| w.cache().get(service));
        if cached.is_none() && self.registry.synced() {
            let set = self.registry.watch(service).await?.borrow().clone();
            if !set.known {
                metrics::counter!("detour_catalog_unknown_lookups_total").increment(1);
                return Ok(set);
            }
        }
        Ok(self.insert(service, cached).await?.borrow().clone())
    }

    /// Follows `service` if it exists: the routed set of a service the registry or the disk
    /// cache knows, or else the registry's own watch of the name (no catalog state is made for
    /// it; follow it until it is `known`, then ask again).
    pub async fn follow(&self, service: &ServiceName) -> Result<Follow, RegistryError> {
        if let Some(slot) = self.read().get(service) {
            return Ok(Follow::Routed(slot.tx.subscribe()));
        }
        let cached = self.writer.get().and_then(|w| w.cache().get(service));
        if cached.is_none() && self.registry.synced() {
            let rx = self.registry.watch(service).await?;
            if !rx.borrow().known {
                return Ok(Follow::Unknown(rx));
            }
        }
        Ok(Follow::Routed(self.insert(service, cached).await?))
    }

    /// A receiver that follows `service`'s routed set.
    pub async fn subscribe(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        if let Some(slot) = self.read().get(service) {
            return Ok(slot.tx.subscribe());
        }
        let cached = self.writer.get().and_then(|w| w.cache().get(service));
        self.insert(service, cached).await
    }

    /// Makes `service`'s slot (unless a racing call did) and starts its feeder.
    async fn insert(
        &self,
        service: &ServiceName,
        cached: Option<Cached>,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        let rx = self.registry.watch(service).await?;
        let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = services.get(service) {
            return Ok(slot.tx.subscribe());
        }
        let policy = self.opts.policy.for_service(service).clone();
        let mut protection = Protection::new(policy.protection);
        let synced = self.registry.synced();
        let (initial, source, updated) = match cached {
            Some(c) if !synced => {
                tracing::debug!(%service, endpoints = c.endpoints.len(), "routing from the disk cache until the registry answers");
                // The cached set is the history protection judges the registry's first answer
                // against: a registry back from an outage with most instances gone is distrusted
                // like any other mass removal.
                let cached = Arc::new(EndpointSet::known(c.endpoints));
                let (out, _) = protection.on_registry(&cached, Instant::now());
                (out, DataSource::DiskCache, c.written_unix_ms)
            }
            _ => {
                let set = rx.borrow().clone();
                let out = protection.on_registry(&set, Instant::now()).0;
                if let Some(w) = self.writer.get()
                    && synced
                {
                    w.put(service, &out, now_unix_ms());
                }
                (out, DataSource::Registry, now_unix_ms())
            }
        };
        source_metrics(service, source, updated);
        let (tx, out) = watch::channel(initial);
        let meta = Arc::new(Mutex::new(Meta {
            source,
            updated_unix_ms: updated,
            protection,
        }));
        let feed_ctx = Feed {
            registry: self.registry.clone(),
            policy,
            health: self.opts.health.clone(),
            writer: self.writer.clone(),
        };
        let task = tokio::spawn(feed(
            service.clone(),
            rx,
            tx.clone(),
            meta.clone(),
            feed_ctx,
        ));
        services.insert(service.clone(), Slot { tx, meta, task });
        Ok(out)
    }

    /// Whether `service` has a slot: a service the registry has (or had), followed here. Names
    /// no service has never get one.
    pub fn has(&self, service: &ServiceName) -> bool {
        self.read().contains_key(service)
    }

    /// Every service watched so far, for `/state`.
    pub fn snapshot(&self) -> BTreeMap<ServiceName, ServiceView> {
        self.read()
            .iter()
            .map(|(k, slot)| {
                let meta = slot.meta.lock();
                let view = ServiceView {
                    set: slot.tx.borrow().clone(),
                    source: meta.source,
                    updated_unix_ms: meta.updated_unix_ms,
                    protected: meta.protection.is_protected(),
                };
                (k.clone(), view)
            })
            .collect()
    }

    /// Ends `service`'s protection on an operator's word; false when it was not protected.
    pub fn end_protection(&self, service: &ServiceName) -> bool {
        let services = self.read();
        let Some(slot) = services.get(service) else {
            return false;
        };
        let mut meta = slot.meta.lock();
        let Some(change) = meta.protection.end_by_operator() else {
            return false;
        };
        slot.tx.send_replace(meta.protection.output());
        report(service, &change);
        true
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, FastMap<ServiceName, Slot>> {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a service's set came from and when it last changed, as metrics (staleness is now minus
/// the update time).
fn source_metrics(service: &ServiceName, source: DataSource, updated_unix_ms: u64) {
    let from_cache = if source == DataSource::DiskCache {
        1.0
    } else {
        0.0
    };
    metrics::gauge!("detour_catalog_from_disk_cache", "service" => crate::labels::service(service))
        .set(from_cache);
    metrics::gauge!("detour_catalog_updated_unix_seconds", "service" => crate::labels::service(service))
        .set(updated_unix_ms as f64 / 1000.0);
}

fn report(service: &ServiceName, change: &Change) {
    match change {
        Change::Entered { kept } => {
            tracing::warn!(%service, kept, "registry self-protection engaged: keeping vanished instances while they pass health checks");
            metrics::gauge!("detour_registry_protection_active", "service" => crate::labels::service(service))
                .set(1.0);
            metrics::counter!("detour_registry_protection_transitions_total", "service" => crate::labels::service(service), "change" => "entered").increment(1);
        }
        Change::Left(why) => {
            tracing::info!(%service, reason = ?why, "registry self-protection ended");
            metrics::gauge!("detour_registry_protection_active", "service" => crate::labels::service(service))
                .set(0.0);
            metrics::counter!("detour_registry_protection_transitions_total", "service" => crate::labels::service(service), "change" => "left").increment(1);
        }
    }
}

/// Feeds one service: registry changes through protection to L1 and L2; health checks while
/// protected.
async fn feed(
    service: ServiceName,
    mut rx: watch::Receiver<Arc<EndpointSet>>,
    tx: watch::Sender<Arc<EndpointSet>>,
    meta: Arc<Mutex<Meta>>,
    ctx: Feed,
) {
    let registry = &ctx.registry;
    let publish = |set: Arc<EndpointSet>, source: DataSource| {
        {
            let mut m = meta.lock();
            m.source = source;
            m.updated_unix_ms = now_unix_ms();
        }
        source_metrics(&service, source, now_unix_ms());
        if let Some(w) = ctx.writer.get() {
            w.put(&service, &set, now_unix_ms());
        }
        tx.send_replace(set);
    };
    // A registry reached since the slot was made counts as a change.
    let mut pending = registry.synced() && meta.lock().source == DataSource::DiskCache;
    loop {
        let protected = meta.lock().protection.is_protected();
        if !pending {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(1)), if protected => {
                    check_kept(&service, &meta, &tx, &ctx).await;
                    continue;
                }
            }
        }
        pending = false;
        if !registry.synced() {
            continue; // keep what the disk cache said
        }
        let set = rx.borrow_and_update().clone();
        let (out, change) = {
            let mut m = meta.lock();
            m.protection.on_registry(&set, Instant::now())
        };
        if let Some(c) = &change {
            report(&service, c);
        }
        publish(out, DataSource::Registry);
    }
}

/// Health-checks the kept instances of a protected service; expires protection.
async fn check_kept(
    service: &ServiceName,
    meta: &Arc<Mutex<Meta>>,
    tx: &watch::Sender<Arc<EndpointSet>>,
    ctx: &Feed,
) {
    let kept = meta.lock().protection.kept();
    for ep in kept {
        let healthy = ctx.health.check(&ep, &ctx.policy.check).await;
        let next = meta.lock().protection.on_health(&ep.instance, healthy);
        if let Some(set) = next {
            tracing::info!(%service, instance = %ep.instance, healthy, "kept instance health changed");
            tx.send_replace(set);
        }
    }
    let mut m = meta.lock();
    if let Some(change) = m.protection.expire(Instant::now()) {
        report(service, &change);
        tx.send_replace(m.protection.output());
    }
}

#[cfg(test)]
#[path = "catalog_tests.rs"]
mod tests;
