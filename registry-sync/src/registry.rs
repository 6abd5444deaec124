//! The `Registry` seam: register, keep alive, de-register, watch, host status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use detour_proto::{Endpoint, EndpointSet, HostId, HostStatus, InstanceId, ServiceName};
use serde::Serialize;
use tokio::sync::watch;

/// A registry operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The back-end could not be reached or written; a retry may succeed.
    #[error("registry {backend} unavailable: {source}")]
    Unavailable {
        /// Which back-end.
        backend: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The caller asked for something the back-end refuses; a retry will not help.
    #[error("registry refused: {0}")]
    Refused(String),
    /// The registry specification in the config did not parse.
    #[error("invalid registry {spec:?}: {reason}")]
    InvalidSpec {
        /// The text from the config.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Every live host's status.
pub type HostStatuses = std::collections::HashMap<HostId, HostStatus>;

/// What one client has registered, by (service, instance).
pub type Registered = std::collections::BTreeMap<(ServiceName, InstanceId), Endpoint>;

/// Makes what `registry` holds for this client (`registered`) `wanted`: de-registers what is
/// gone, registers what is new or changed, and records each step in `registered`. Stops at the
/// first error (the next call carries on from there).
pub async fn sync_endpoints(
    registry: &dyn Registry,
    registered: &mut Registered,
    wanted: &[Endpoint],
) -> Result<(), RegistryError> {
    let wanted: Registered = wanted
        .iter()
        .map(|e| ((e.service.clone(), e.instance.clone()), e.clone()))
        .collect();
    let gone: Vec<_> = registered
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    for (service, instance) in gone {
        registry.deregister(&service, &instance).await?;
        registered.remove(&(service, instance));
    }
    for (key, e) in wanted {
        if registered.get(&key) != Some(&e) {
            registry.register(e.clone()).await?;
            registered.insert(key, e);
        }
    }
    Ok(())
}

/// One registry client. A client belongs to one host: what it registers is kept alive by the
/// client until it is de-registered, withdrawn, or the client's process dies (then it expires
/// after its time-to-live).
/// The last registry revision a client told its watchers, and when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// The revision (0: none yet, or a back-end without revisions).
    pub revision: u64,
    /// When its changes were told, in Unix milliseconds.
    pub at_unix_ms: u64,
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Registers (or replaces) an endpoint of this client's host.
    async fn register(&self, endpoint: Endpoint) -> Result<(), RegistryError>;

    /// Removes one endpoint this client registered.
    async fn deregister(
        &self,
        service: &ServiceName,
        instance: &InstanceId,
    ) -> Result<(), RegistryError>;

    /// Watches one service. The receiver holds the current set at once and is updated on every
    /// change (within the back-end's propagation delay).
    async fn watch(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError>;

    /// Publishes this client's host status.
    async fn set_host_status(&self, status: HostStatus) -> Result<(), RegistryError>;

    /// Follows every live host's status (a host whose record expired is absent).
    fn watch_hosts(&self) -> watch::Receiver<Arc<HostStatuses>>;

    /// Reads any host's status; `None` when the host is unknown or its record expired.
    async fn host_status(&self, host: &HostId) -> Result<Option<HostStatus>, RegistryError>;

    /// Withdraws everything this client registered (a planned stop) and stops keeping it alive.
    async fn withdraw(&self) -> Result<(), RegistryError>;

    /// Stops keeping alive what this client registered, without removing it: another client of
    /// the same host (its watchdog) has written it again and keeps it from now on.
    async fn release(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    /// Whether the view has been read from the registry at least once (before that, a catalog
    /// trusts its disk cache over an empty view).
    fn synced(&self) -> bool {
        true
    }

    /// The registry's revision whose changes every watcher has been told (etcd's store
    /// revision) and when; zeros for a back-end without revisions. Comparing it across
    /// sidecars shows which have not applied a change yet, and how long each took.
    fn applied(&self) -> Applied {
        Applied::default()
    }

    /// Follows one of the registry's documents: [`DocState::Unknown`] until the registry has
    /// been read, then its bytes (or that there is none) and the revision they came from.
    fn watch_doc(&self, doc: DocName) -> watch::Receiver<DocState>;
}

/// A registry document as a back-end knows it. *Not read yet* is not *none*: a follower that
/// has not heard from the registry keeps what it had, it does not fall back to "no rules".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DocState {
    /// The registry has not answered yet.
    #[default]
    Unknown,
    /// Read from the registry.
    Known(DocRead),
}

/// A document read from the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocRead {
    /// Its bytes; `None` when the registry has no such document.
    pub bytes: Option<Arc<[u8]>>,
    /// The registry revision it came from (etcd: the key's modification revision; the
    /// directory registry: a hash of the contents; 0 when there is no document).
    pub revision: u64,
}

/// The name of the gray rules document (etcd key `{prefix}/gray/rules`, directory file
/// `{dir}/gray/rules.json`).
pub const RULES_DOC: &str = "gray/rules";

/// The name of the traffic policy document (etcd key `{prefix}/policy/services`, directory
/// file `{dir}/policy/services.json`).
pub const POLICY_DOC: &str = "policy/services";

/// The name of the route document (etcd key `{prefix}/routes/services`, directory file
/// `{dir}/routes/services.json`).
pub const ROUTES_DOC: &str = "routes/services";

/// A document the registry holds beside endpoints and host records, followed by every sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DocName {
    /// The gray rules ([`RULES_DOC`]).
    GrayRules,
    /// The per-service traffic policy ([`POLICY_DOC`]).
    Policy,
    /// The per-service routes by version and label ([`ROUTES_DOC`]).
    Routes,
}

impl DocName {
    /// Every document.
    pub const ALL: [DocName; 3] = [DocName::GrayRules, DocName::Policy, DocName::Routes];

    /// Its key under the registry's prefix (or its path, without `.json`, in the directory).
    pub fn key(self) -> &'static str {
        match self {
            DocName::GrayRules => RULES_DOC,
            DocName::Policy => POLICY_DOC,
            DocName::Routes => ROUTES_DOC,
        }
    }

    /// The document `key` names, if any.
    pub fn from_key(key: &str) -> Option<DocName> {
        Self::ALL.into_iter().find(|d| d.key() == key)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One watch per document, for the back-ends; every one [`DocState::Unknown`] until published.
#[derive(Debug)]
pub(crate) struct DocSenders([watch::Sender<DocState>; DocName::ALL.len()]);

impl Default for DocSenders {
    fn default() -> Self {
        Self(DocName::ALL.map(|_| watch::channel(DocState::Unknown).0))
    }
}

impl DocSenders {
    /// A receiver of `doc`.
    pub(crate) fn subscribe(&self, doc: DocName) -> watch::Receiver<DocState> {
        self.0[doc.index()].subscribe()
    }

    /// Publishes `bytes` (at `revision`) as `doc`'s content, waking receivers only when it
    /// changed.
    pub(crate) fn publish(&self, doc: DocName, bytes: Option<Arc<[u8]>>, revision: u64) {
        let next = DocState::Known(DocRead { bytes, revision });
        self.0[doc.index()].send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

/// The largest rules document read (a bigger one is reported and ignored).
pub const MAX_DOC_BYTES: u64 = 1 << 20;

/// Which back-end a config names: `dir:PATH` (the embedded default) or
/// `etcd:http://HOST:PORT[,http://HOST:PORT…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrySpec {
    /// The directory registry rooted at this path.
    Dir(PathBuf),
    /// An etcd cluster with these member URLs.
    Etcd(Vec<String>),
}

impl std::str::FromStr for RegistrySpec {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let invalid = |reason: &str| RegistryError::InvalidSpec {
            spec: s.to_owned(),
            reason: reason.to_owned(),
        };
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(RegistrySpec::Dir(PathBuf::from(path))),
            Some(("dir", _)) => Err(invalid("dir: needs a path")),
            Some(("etcd", list)) => {
                let urls: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect();
                if urls.is_empty() {
                    return Err(invalid("etcd: needs at least one member URL"));
                }
                if let Some(bad) = urls
                    .iter()
                    .find(|u| !u.starts_with("http://") && !u.starts_with("https://"))
                {
                    return Err(invalid(&format!(
                        "{bad:?} is not an http:// or https:// URL"
                    )));
                }
                Ok(RegistrySpec::Etcd(urls))
            }
            _ => Err(invalid("expected dir:PATH or etcd:http://HOST:PORT[,…]")),
        }
    }
}

/// The per-service watches of one back-end.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    map: std::collections::HashMap<ServiceName, watch::Sender<Arc<EndpointSet>>>,
    /// The size at which watches nobody follows are dropped next.
    prune_at: usize,
}

impl std::ops::Deref for Watchers {
    type Target = std::collections::HashMap<ServiceName, watch::Sender<Arc<EndpointSet>>>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// The watchers of one back-end: a subscription to an existing watch, or a new one starting
/// from `current()`. Watches nobody follows any more (a lookup of a name that turned out
/// unknown) are dropped whenever the map has doubled since the last time, so names from the
/// network cannot grow it, and a start that watches 10,000 services at once does not scan it
/// 10,000 times.
pub(crate) fn subscribe_or_insert(
    watchers: &mut Watchers,
    service: &ServiceName,
    current: impl FnOnce() -> EndpointSet,
) -> watch::Receiver<Arc<EndpointSet>> {
    if let Some(tx) = watchers.map.get(service) {
        return tx.subscribe();
    }
    if watchers.map.len() >= watchers.prune_at {
        watchers.map.retain(|_, tx| tx.receiver_count() > 0);
        watchers.prune_at = (watchers.map.len() * 2).max(64);
    }
    let (tx, rx) = watch::channel(Arc::new(current()));
    watchers.map.insert(service.clone(), tx);
    rx
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "dir:/tmp/r".parse::<RegistrySpec>().unwrap(),
            RegistrySpec::Dir("/tmp/r".into())
        );
        assert!("dir:".parse::<RegistrySpec>().is_err());
        assert!("zk:foo".parse::<RegistrySpec>().is_err());
        assert_eq!(
            "etcd:http://127.0.0.1:2379, http://127.0.0.1:2479"
                .parse::<RegistrySpec>()
                .unwrap(),
            RegistrySpec::Etcd(vec![
                "http://127.0.0.1:2379".into(),
                "http://127.0.0.1:2479".into()
            ])
        );
        assert!("etcd:".parse::<RegistrySpec>().is_err());
        assert!("etcd:127.0.0.1:2379".parse::<RegistrySpec>().is_err());
        assert!("/tmp/r".parse::<RegistrySpec>().is_err());
    }
}
