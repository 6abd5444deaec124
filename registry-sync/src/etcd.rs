//! The etcd back-end of [`Registry`], for a real etcd cluster (3.4+).
//!
//! Layout under the prefix (default `/detour/v1`), values as versioned JSON so that
//! `etcdctl get` stays readable:
//! - `{prefix}/services/{service}/{instance}` → `{"version":1,"endpoint":{…}}`
//! - `{prefix}/hosts/{host}` → `{"version":1,"status":{…}}`
//!
//! Everything this client writes is attached to one lease, kept alive every third of its TTL on
//! one keep-alive stream; a lost lease is granted again and everything re-registered. One
//! prefix watch feeds every service watcher and the host statuses; after a disconnect it
//! resumes from the last revision seen, and only when that revision was compacted does it
//! re-list (in pages). Each operation tries the cluster's members in turn, so one dead member
//! fails nothing; every retry waits an exponential backoff with full jitter
//! ([`crate::backoff`]), so a fleet does not come back in step after an outage.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use detour_proto::{Endpoint, EndpointSet, HostId, HostStatus, InstanceId, ServiceName};
use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::members::Members;
use crate::registry::{
    Applied, DocName, DocSenders, DocState, HostStatuses, Registry, RegistryError, Watchers,
    subscribe_or_insert,
};

#[path = "etcd_view.rs"]
mod view;
use view::{View, apply_put, service_set, watch_loop};

#[path = "etcd_lease.rs"]
mod lease;
use lease::lease_loop;

/// Tuning of the etcd back-end.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Member URLs (`http://127.0.0.1:2379`, …).
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash.
    pub prefix: String,
    /// Lease time-to-live.
    pub ttl: Duration,
    /// Time allowed for one request to one member.
    pub request_timeout: Duration,
    /// How long the prefix watch may be silent before it is asked for its progress (plus up
    /// to a quarter at random); at rest, each client sends etcd about one request this often.
    pub watch_check: Duration,
    /// TLS and credentials.
    pub security: crate::etcd_security::EtcdSecurity,
}

/// What a client lists and watches of the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Follows {
    /// Everything: services, hosts, documents (a sidecar's catalog).
    #[default]
    Everything,
    /// Only the gray rules (a watchdog: it writes its host's keys and reads nothing else). Its
    /// watch gets no event for the fleet's endpoints and host statuses; its services and hosts
    /// stay empty and the other documents unknown.
    GrayRules,
}

impl Follows {
    /// The part of the prefix followed, after `{prefix}/`.
    fn under(self) -> &'static str {
        match self {
            Follows::Everything => "",
            Follows::GrayRules => crate::registry::RULES_DOC,
        }
    }

    /// Whether `doc` is followed.
    fn doc(self, doc: DocName) -> bool {
        self == Follows::Everything || doc == DocName::GrayRules
    }

    /// How long this client's watch may be silent before it is asked for its progress, from
    /// the configured `check`: a client following only the gray rules asks five times less
    /// often, so a watchdog sends etcd a fifth of the progress requests at rest (a frozen
    /// member holding its watch then delays a rules change by seconds more, never a route).
    pub fn watch_check(self, check: Duration) -> Duration {
        match self {
            Follows::Everything => check,
            Follows::GrayRules => check * 5,
        }
    }
}

/// A service key's value (also written by the registry-sync agent's mirror).
#[derive(Serialize, Deserialize)]
pub struct EndpointValue {
    /// The value's format version.
    pub version: u32,
    /// The endpoint.
    pub endpoint: Endpoint,
}

/// A host key's value.
#[derive(Serialize, Deserialize)]
pub(crate) struct HostValue {
    pub(crate) version: u32,
    pub(crate) status: HostStatus,
}

#[derive(Default)]
struct Own {
    endpoints: HashMap<String, Endpoint>,
    status: Option<HostStatus>,
}

struct Inner {
    opts: EtcdOptions,
    /// What of the prefix is listed and watched.
    follows: Follows,
    host: HostId,
    /// The cluster's members.
    members: Members,
    own: Mutex<Own>,
    /// Serialises writes of owned keys, so a re-write of everything (after a lost lease or an
    /// outage) cannot resurrect a key de-registered meanwhile.
    writes: tokio::sync::Mutex<()>,
    lease: Mutex<Option<i64>>,
    /// Woken when what this client owns changed or its lease was lost.
    own_changed: Notify,
    view: Mutex<View>,
    watchers: Mutex<Watchers>,
    hosts: watch::Sender<Arc<HostStatuses>>,
    /// The documents (gray rules, traffic policy).
    docs: DocSenders,
    /// Set once the prefix has been listed.
    synced: std::sync::atomic::AtomicBool,
    /// Full listings of the prefix done (the first, then one per compaction missed).
    lists: std::sync::atomic::AtomicU64,
    /// The view's revision as of the last publish that moved it, and when.
    published: Mutex<Applied>,
}

/// A client of the etcd registry for one host.
pub struct EtcdRegistry {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.inner.opts.endpoints)
            .field("prefix", &self.inner.opts.prefix)
            .finish()
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl EtcdRegistry {
    /// Starts the client: gives the first listing of the prefix up to 100 ms (so watchers
    /// usually start from a full view), then keeps the lease and the watch in the background.
    pub async fn open(host: HostId, opts: EtcdOptions) -> Result<Self, RegistryError> {
        Self::open_following(host, opts, Follows::Everything).await
    }

    /// [`Self::open`], listing and watching only what `follows` says (and checking the watch
    /// as often as [`Follows::watch_check`] says).
    pub async fn open_following(
        host: HostId,
        opts: EtcdOptions,
        follows: Follows,
    ) -> Result<Self, RegistryError> {
        let opts = EtcdOptions {
            watch_check: follows.watch_check(opts.watch_check),
            ..opts
        };
        if opts.endpoints.is_empty() {
            return Err(RegistryError::InvalidSpec {
                spec: "etcd:".into(),
                reason: "no endpoint".into(),
            });
        }
        let members = Members::new(
            opts.endpoints.clone(),
            opts.request_timeout,
            opts.security.clone(),
        );
        let inner = Arc::new(Inner {
            opts,
            follows,
            host,
            members,
            own: Mutex::new(Own::default()),
            writes: tokio::sync::Mutex::new(()),
            lease: Mutex::new(None),
            own_changed: Notify::new(),
            view: Mutex::new(View::default()),
            watchers: Mutex::new(Watchers::default()),
            hosts: watch::channel(Arc::new(HostStatuses::new())).0,
            docs: DocSenders::default(),
            synced: std::sync::atomic::AtomicBool::new(false),
            lists: std::sync::atomic::AtomicU64::new(0),
            published: Mutex::new(Applied::default()),
        });
        // Wait briefly for a first full view; a catalog routes from its disk cache meanwhile,
        // and the watch task keeps trying, so a slow or absent etcd never delays a start.
        match tokio::time::timeout(Duration::from_millis(100), inner.relist()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "etcd not reachable at start; serving what is known and retrying")
            }
            Err(_) => {
                tracing::info!("etcd still listing after 100 ms; continuing from the disk cache")
            }
        }
        let tasks = vec![
            tokio::spawn(lease_loop(inner.clone())),
            tokio::spawn(watch_loop(inner.clone())),
        ];
        Ok(Self { inner, tasks })
    }

    /// How many times this client listed the whole prefix: once at start, and once more per
    /// compaction it missed; a disconnect alone resumes the watch without listing.
    pub fn lists(&self) -> u64 {
        self.inner.lists.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Inner {
    fn service_key(&self, service: &ServiceName, instance: &InstanceId) -> String {
        format!("{}/services/{service}/{instance}", self.opts.prefix)
    }

    fn host_key(&self, host: &HostId) -> String {
        format!("{}/hosts/{host}", self.opts.prefix)
    }

    /// Runs `op` against the members in turn, starting with the one that answered last.
    async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.members.call(what, op).await
    }

    /// Writes one owned key under the current lease. It never fails: without a lease, or when
    /// etcd cannot be reached, the lease loop writes everything owned as soon as it can (a
    /// sidecar must start and serve while etcd is down).
    async fn put_owned(&self, key: String, value: Vec<u8>) -> Result<(), RegistryError> {
        let Some(lease) = *self.lease.lock() else {
            self.own_changed.notify_one();
            return Ok(());
        };
        let _writing = self.writes.lock().await;
        let written = self
            .call("put", |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(%key, error = %e, "etcd write deferred until etcd answers");
            self.own_changed.notify_one();
        }
        Ok(())
    }

    /// Whether this client owns no key.
    fn owns_nothing(&self) -> bool {
        let own = self.own.lock();
        own.endpoints.is_empty() && own.status.is_none()
    }

    /// Everything this client owns, as key/value pairs.
    fn owned_pairs(&self) -> Vec<(String, Vec<u8>)> {
        let own = self.own.lock();
        let mut pairs: Vec<(String, Vec<u8>)> = own
            .endpoints
            .iter()
            .filter_map(|(k, ep)| {
                let v = EndpointValue {
                    version: 1,
                    endpoint: ep.clone(),
                };
                serde_json::to_vec(&v).ok().map(|v| (k.clone(), v))
            })
            .collect();
        if let Some(st) = &own.status {
            let v = HostValue {
                version: 1,
                status: st.clone(),
            };
            if let Ok(v) = serde_json::to_vec(&v) {
                pairs.push((self.host_key(&self.host), v));
            }
        }
        pairs
    }

    /// The keys followed: the whole prefix, or the part of it [`Follows`] names.
    fn followed(&self) -> String {
        format!("{}/{}", self.opts.prefix, self.follows.under())
    }

    /// Reads what is followed of the prefix and replaces the view.
    async fn relist(&self) -> Result<(), RegistryError> {
        // In pages at one revision: a whole large prefix does not fit one gRPC message.
        const PAGE: i64 = 2000;
        let prefix = self.followed();
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut start = prefix.into_bytes();
        let mut revision = 0;
        let mut pairs: Vec<(Vec<u8>, Vec<u8>, i64)> = Vec::new();
        loop {
            let resp = self
                .call("list", |mut c| {
                    let (start, end) = (start.clone(), end.clone());
                    let mut opts = GetOptions::new().with_range(end).with_limit(PAGE);
                    if revision > 0 {
                        opts = opts.with_revision(revision);
                    }
                    async move { c.get(start, Some(opts)).await }
                })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            pairs.extend(
                resp.kvs()
                    .iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision())),
            );
            match pairs.last() {
                Some((last, _, _)) if resp.more() => {
                    start = last.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        self.lists
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut view = self.view.lock();
        let known = std::mem::take(&mut view.known);
        *view = View {
            known,
            revision,
            docs_dirty: DocName::ALL.map(|d| self.follows.doc(d)),
            ..View::default()
        };
        for (k, v, rev) in &pairs {
            apply_put(&self.opts.prefix, &mut view, k, v, *rev);
        }
        view.all_dirty = true;
        let keys = view.len();
        drop(view);
        if !self.synced.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(keys, revision, "registry listed from etcd");
        }
        self.publish();
        Ok(())
    }

    /// Tells every watcher its service's current set, and publishes host statuses.
    fn publish(&self) {
        let mut view = self.view.lock();
        let all = std::mem::take(&mut view.all_dirty);
        let dirty = std::mem::take(&mut view.dirty);
        let hosts_dirty = std::mem::take(&mut view.hosts_dirty);
        let watchers = self.watchers.lock();
        let send = |service: &ServiceName, tx: &watch::Sender<Arc<EndpointSet>>| {
            let next = service_set(&view, service);
            tx.send_if_modified(|cur| {
                if **cur == next {
                    false
                } else {
                    *cur = Arc::new(next);
                    true
                }
            });
        };
        if all {
            for (service, tx) in watchers.iter() {
                send(service, tx);
            }
        } else {
            for service in &dirty {
                if let Some(tx) = watchers.get(service) {
                    send(service, tx);
                }
            }
        }
        for name in DocName::ALL {
            if std::mem::take(&mut view.docs_dirty[name as usize]) {
                self.docs.publish(
                    name,
                    view.docs[name as usize].clone(),
                    view.doc_revisions[name as usize],
                );
            }
        }
        let revision = u64::try_from(view.revision).unwrap_or(0);
        if all {
            self.hosts.send_if_modified(|cur| {
                if **cur == view.hosts {
                    false
                } else {
                    *cur = Arc::new(view.hosts.clone());
                    true
                }
            });
        } else if !hosts_dirty.is_empty() {
            // Copied only when a subscriber still holds the last publication.
            self.hosts.send_if_modified(|cur| {
                let mut modified = false;
                for host in &hosts_dirty {
                    let next = view.hosts.get(host);
                    if cur.get(host) != next {
                        let map = Arc::make_mut(cur);
                        match next {
                            Some(s) => map.insert(host.clone(), s.clone()),
                            None => map.remove(host),
                        };
                        modified = true;
                    }
                }
                modified
            });
        }
        let mut published = self.published.lock();
        if published.revision != revision {
            *published = Applied {
                revision,
                at_unix_ms: crate::registry::now_unix_ms(),
            };
        }
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, endpoint: Endpoint) -> Result<(), RegistryError> {
        if endpoint.host != self.inner.host {
            return Err(RegistryError::Refused(format!(
                "host {} cannot register an endpoint of host {}",
                self.inner.host, endpoint.host
            )));
        }
        let key = self
            .inner
            .service_key(&endpoint.service, &endpoint.instance);
        let value = serde_json::to_vec(&EndpointValue {
            version: 1,
            endpoint: endpoint.clone(),
        })
        .map_err(|e| RegistryError::Refused(e.to_string()))?;
        self.inner
            .own
            .lock()
            .endpoints
            .insert(key.clone(), endpoint);
        self.inner.put_owned(key, value).await
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        instance: &InstanceId,
    ) -> Result<(), RegistryError> {
        let key = self.inner.service_key(service, instance);
        let _writing = self.inner.writes.lock().await;
        self.inner.own.lock().endpoints.remove(&key);
        self.inner
            .call("delete", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await
            .map(|_| ())
    }

    async fn watch(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        let mut watchers = self.inner.watchers.lock();
        Ok(subscribe_or_insert(&mut watchers, service, || {
            service_set(&self.inner.view.lock(), service)
        }))
    }

    async fn set_host_status(&self, status: HostStatus) -> Result<(), RegistryError> {
        let key = self.inner.host_key(&status.host);
        let value = serde_json::to_vec(&HostValue {
            version: 1,
            status: status.clone(),
        })
        .map_err(|e| RegistryError::Refused(e.to_string()))?;
        self.inner.own.lock().status = Some(status);
        self.inner.put_owned(key, value).await
    }

    fn watch_doc(&self, doc: DocName) -> watch::Receiver<DocState> {
        self.inner.docs.subscribe(doc)
    }

    fn watch_hosts(&self) -> watch::Receiver<Arc<HostStatuses>> {
        self.inner.hosts.subscribe()
    }

    async fn host_status(&self, host: &HostId) -> Result<Option<HostStatus>, RegistryError> {
        Ok(self.inner.hosts.borrow().get(host).cloned())
    }

    fn synced(&self) -> bool {
        self.inner.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn applied(&self) -> Applied {
        *self.inner.published.lock()
    }

    async fn release(&self) -> Result<(), RegistryError> {
        // The lease stays: a key the other client has not re-written yet stays attached to it,
        // alive, until that write moves it.
        let _writing = self.inner.writes.lock().await;
        *self.inner.own.lock() = Own::default();
        Ok(())
    }

    async fn withdraw(&self) -> Result<(), RegistryError> {
        let lease = self.inner.lease.lock().take();
        *self.inner.own.lock() = Own::default();
        if let Some(id) = lease {
            self.inner
                .call("revoke", |mut c| async move { c.lease_revoke(id).await })
                .await?;
        }
        Ok(())
    }
}
