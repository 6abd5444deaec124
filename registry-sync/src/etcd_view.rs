//! The etcd back-end's view of the prefix: the parsed keys, and the watch that keeps them
//! current (resuming after a disconnect, re-listing after a compaction).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use detour_proto::{Endpoint, EndpointSet, HostId, ServiceName};
use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};

use super::{EndpointValue, HostValue, Inner};
use crate::backoff::Backoff;
use crate::registry::{DocName, HostStatuses};

/// What the prefix watch has seen, indexed by service so that one change costs one service.
#[derive(Default)]
pub(super) struct View {
    /// Parsed endpoints by service, then by key.
    pub(super) services: HashMap<ServiceName, BTreeMap<String, Endpoint>>,
    /// Host statuses, each from the key of its own host.
    pub(super) hosts: HostStatuses,
    /// Services that ever had a key (a service once seen stays known).
    pub(super) known: HashSet<ServiceName>,
    /// The last revision applied.
    pub(super) revision: i64,
    /// Services changed since the last publish.
    pub(super) dirty: HashSet<ServiceName>,
    /// Hosts whose status changed since the last publish: only those are published again, so a
    /// storm of N hosts costs each sidecar O(N) updates, not N copies of N statuses.
    pub(super) hosts_dirty: HashSet<HostId>,
    /// Whether everything must be published (after a re-list).
    pub(super) all_dirty: bool,
    /// The documents (by `DocName as usize`), while there is one.
    pub(super) docs: [Option<Arc<[u8]>>; DocName::ALL.len()],
    /// The revision each document was last written or deleted at (0: absent since the list).
    pub(super) doc_revisions: [u64; DocName::ALL.len()],
    /// Whether each changed since the last publish.
    pub(super) docs_dirty: [bool; DocName::ALL.len()],
}

impl View {
    /// Endpoints and host records held.
    pub(super) fn len(&self) -> usize {
        self.services.values().map(BTreeMap::len).sum::<usize>() + self.hosts.len()
    }
}

/// What a key is about.
enum KeyKind {
    Service(ServiceName),
    /// A host status: the host its key names (`None`: not a host name).
    Host(Option<HostId>),
    Doc(DocName),
}

fn classify<'k>(prefix: &str, key: &'k [u8]) -> Option<(&'k str, KeyKind)> {
    let key = std::str::from_utf8(key).ok()?;
    let rest = key.strip_prefix(prefix)?.strip_prefix('/')?;
    if let Some(svc) = rest.strip_prefix("services/") {
        let name = ServiceName::new(svc.split('/').next()?).ok()?;
        Some((key, KeyKind::Service(name)))
    } else if let Some(host) = rest.strip_prefix("hosts/") {
        Some((key, KeyKind::Host(HostId::new(host).ok())))
    } else if let Some(doc) = DocName::from_key(rest) {
        Some((key, KeyKind::Doc(doc)))
    } else {
        None
    }
}

pub(super) fn service_set(view: &View, service: &ServiceName) -> EndpointSet {
    let endpoints: Vec<Endpoint> = view
        .services
        .get(service)
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let mut set = EndpointSet::known(endpoints);
    set.known = view.known.contains(service);
    set
}

/// Applies one key's value (written at `revision`) to the view; a value that does not parse is
/// logged, counted and dropped (the key then counts as absent), never fatal.
pub(super) fn apply_put(prefix: &str, view: &mut View, key: &[u8], value: &[u8], revision: i64) {
    let Some((key, kind)) = classify(prefix, key) else {
        return;
    };
    match kind {
        KeyKind::Service(name) => {
            view.known.insert(name.clone());
            view.dirty.insert(name.clone());
            let slot = view.services.entry(name).or_default();
            match serde_json::from_slice::<EndpointValue>(value) {
                Ok(v) if v.version == 1 => {
                    slot.insert(key.to_owned(), v.endpoint);
                }
                Ok(v) => {
                    slot.remove(key);
                    bad(key, &format!("unknown version {}", v.version));
                }
                Err(e) => {
                    slot.remove(key);
                    bad(key, &e.to_string());
                }
            }
        }
        KeyKind::Doc(doc) => {
            view.docs_dirty[doc as usize] = true;
            if value.len() as u64 > crate::registry::MAX_DOC_BYTES {
                bad(key, "larger than 1 MiB");
            } else {
                view.docs[doc as usize] = Some(Arc::from(value));
                view.doc_revisions[doc as usize] = u64::try_from(revision).unwrap_or(0);
            }
        }
        KeyKind::Host(None) => bad(key, "not a host name"),
        KeyKind::Host(Some(host)) => {
            let status = match serde_json::from_slice::<HostValue>(value) {
                // A status speaks for the host its key names only: a host allowed to write its
                // own key cannot mark another one draining.
                Ok(v) if v.version == 1 && v.status.host == host => Some(v.status),
                Ok(v) if v.version == 1 => {
                    bad(
                        key,
                        &format!("the status of host {} under this key", v.status.host),
                    );
                    None
                }
                Ok(v) => {
                    bad(key, &format!("unknown version {}", v.version));
                    None
                }
                Err(e) => {
                    bad(key, &e.to_string());
                    None
                }
            };
            match status {
                Some(s) => view.hosts.insert(host.clone(), s),
                None => view.hosts.remove(&host),
            };
            view.hosts_dirty.insert(host);
        }
    }
}

fn bad(key: &str, why: &str) {
    tracing::warn!(key, error = why, "ignoring a malformed registry value");
    metrics::counter!("detour_registry_invalid_records_total").increment(1);
}

fn apply_delete(prefix: &str, view: &mut View, key: &[u8], revision: i64) {
    match classify(prefix, key) {
        Some((key, KeyKind::Service(name))) => {
            if let Some(m) = view.services.get_mut(&name) {
                m.remove(key);
            }
            view.dirty.insert(name);
        }
        Some((_, KeyKind::Host(Some(host)))) => {
            view.hosts.remove(&host);
            view.hosts_dirty.insert(host);
        }
        Some((_, KeyKind::Host(None))) => {}
        Some((_, KeyKind::Doc(doc))) => {
            view.docs[doc as usize] = None;
            view.doc_revisions[doc as usize] = u64::try_from(revision).unwrap_or(0);
            view.docs_dirty[doc as usize] = true;
        }
        None => {}
    }
}

/// How long a watch may be silent before it is asked for its progress: `check` plus up to a
/// quarter more at random, so that a fleet told of one change together does not ask together.
fn quiet(check: Duration) -> Duration {
    check.mul_f64(1.0 + fastrand::f64() / 4.0)
}

/// Follows what the client follows of the prefix (all of it but for a watchdog): resumes after the last revision seen (never listing again for a
/// disconnect); re-lists when that revision was compacted away; reopens it on another member
/// when it stalls. Every retry waits with [`Backoff`], reset by the first message of a watch.
pub(super) async fn watch_loop(inner: Arc<Inner>) {
    let prefix = inner.followed();
    let mut backoff = Backoff::REGISTRY;
    loop {
        if !inner.synced.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(e) = inner.relist().await
        {
            tracing::debug!(error = %e, "etcd not listed yet; retrying");
            backoff.wait().await;
            continue;
        }
        let stream = match open_watch(&inner, &prefix).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "etcd watch not open; retrying");
                backoff.wait().await;
                continue;
            }
        };
        // A stream that ends before its first message counts as a failure: the next one waits.
        if !follow(&inner, stream, &mut backoff).await {
            backoff.wait().await;
        }
    }
}

/// A watch of `prefix` from the revision after the last one applied.
async fn open_watch(inner: &Inner, prefix: &str) -> Result<WatchStream, crate::RegistryError> {
    let from = inner.view.lock().revision + 1;
    let options = WatchOptions::new().with_prefix().with_start_revision(from);
    inner
        .call("watch", |mut c| {
            let (prefix, options) = (prefix.to_owned(), options.clone());
            async move { c.watch(prefix, Some(options)).await }
        })
        .await
}

/// Applies what one open watch says until it ends, stalls, or its revision is compacted away
/// (then re-lists); whether it said anything.
async fn follow(inner: &Inner, mut stream: WatchStream, backoff: &mut Backoff) -> bool {
    let mut answered = false;
    // A watch with nothing to say for `watch_check` is asked for its progress; one that does
    // not answer within the request timeout is on a member that stopped answering (frozen,
    // partitioned: its connection may look open for much longer), and is reopened on another
    // member.
    let mut asked: Option<tokio::time::Instant> = None;
    loop {
        let msg = match tokio::time::timeout(quiet(inner.opts.watch_check), stream.message()).await
        {
            Ok(Ok(Some(m))) => {
                asked = None;
                if !answered {
                    answered = true;
                    backoff.reset();
                }
                m
            }
            Ok(Ok(None) | Err(_)) => return answered,
            Err(_) => match stalled(inner, &mut stream, &mut asked).await {
                true => return answered,
                false => continue,
            },
        };
        if msg.compact_revision() > 0
            || (msg.canceled() && msg.cancel_reason().contains("compacted"))
        {
            tracing::info!(
                compacted = msg.compact_revision(),
                "watch revision compacted; re-listing"
            );
            metrics::counter!("detour_registry_relists_total").increment(1);
            if inner.relist().await.is_err() {
                backoff.wait().await;
            }
            return answered;
        }
        if msg.canceled() {
            return answered;
        }
        apply_events(inner, &msg);
        inner.publish();
    }
}

/// A watch that was quiet for a while: asked for its progress the first time; stalled (true)
/// when it has not answered that within the request timeout (the member it is on is then
/// distrusted), or when it cannot even be asked.
async fn stalled(
    inner: &Inner,
    stream: &mut WatchStream,
    asked: &mut Option<tokio::time::Instant>,
) -> bool {
    match asked {
        None => {
            if stream.request_progress().await.is_err() {
                return true;
            }
            *asked = Some(tokio::time::Instant::now());
            false
        }
        Some(t) if t.elapsed() >= inner.opts.request_timeout => {
            tracing::warn!(
                "etcd watch stalled (no answer to a progress request); reopening it on another member"
            );
            metrics::counter!("detour_registry_watch_stalls_total").increment(1);
            inner.members.distrust_preferred().await;
            true
        }
        Some(_) => false,
    }
}

/// Applies a watch message's events to the view.
fn apply_events(inner: &Inner, msg: &WatchResponse) {
    let mut view = inner.view.lock();
    // The revision applied before this message: every key of one transaction carries the same
    // revision, so it is compared with this, not with the last event's.
    let before = view.revision;
    let prefix = &inner.opts.prefix;
    for ev in msg.events() {
        let Some(kv) = ev.kv() else { continue };
        if kv.mod_revision() <= before && ev.event_type() == EventType::Put {
            continue; // already applied (a resumed watch may repeat it)
        }
        match ev.event_type() {
            EventType::Put => apply_put(prefix, &mut view, kv.key(), kv.value(), kv.mod_revision()),
            EventType::Delete => apply_delete(prefix, &mut view, kv.key(), kv.mod_revision()),
        }
        view.revision = view.revision.max(kv.mod_revision());
    }
    // Not the header's revision: the watch's first ("created") message carries the store's
    // current revision, and events between the list and that revision are still to come in
    // later messages.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_told_apart_by_key() {
        let mut view = View::default();
        let prefix = "/detour/v1";
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/policy/services",
            b"{\"version\":1}",
            7,
        );
        apply_put(prefix, &mut view, b"/detour/v1/gray/rules", b"rules", 8);
        apply_put(prefix, &mut view, b"/detour/v1/policy/other", b"ignored", 9);
        let policy = DocName::Policy as usize;
        let gray = DocName::GrayRules as usize;
        assert_eq!(view.docs[policy].as_deref(), Some(&b"{\"version\":1}"[..]));
        assert_eq!(view.docs[gray].as_deref(), Some(&b"rules"[..]));
        assert!(view.docs_dirty[policy] && view.docs_dirty[gray]);
        apply_delete(prefix, &mut view, b"/detour/v1/policy/services", 10);
        assert_eq!(view.doc_revisions[policy], 10);
        assert!(view.docs[policy].is_none());
        assert!(view.docs[gray].is_some(), "the other document stays");
        // An oversized document is refused: the last one read stays.
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/policy/services",
            b"good",
            11,
        );
        let big = vec![b' '; crate::registry::MAX_DOC_BYTES as usize + 1];
        apply_put(prefix, &mut view, b"/detour/v1/policy/services", &big, 12);
        assert_eq!(view.docs[policy].as_deref(), Some(&b"good"[..]));
        assert_eq!(view.doc_revisions[policy], 11);
    }

    fn status(host: &str, state: &str) -> Vec<u8> {
        format!(
            "{{\"version\":1,\"status\":{{\"host\":\"{host}\",\"sidecar\":\"{state}\",\"version\":\"1\",\"updated_unix_ms\":1}}}}"
        )
        .into_bytes()
    }

    #[test]
    fn a_host_status_counts_under_its_own_hosts_key_only_and_marks_that_host_changed() {
        let (prefix, mut view) = ("/detour/v1", View::default());
        let (h1, h2) = (HostId::new("h1").unwrap(), HostId::new("h2").unwrap());
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/hosts/h1",
            &status("h1", "ready"),
            2,
        );
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/hosts/h2",
            &status("h2", "ready"),
            3,
        );
        assert_eq!(view.hosts.len(), 2);
        assert_eq!(view.hosts_dirty, HashSet::from([h1.clone(), h2.clone()]));
        view.hosts_dirty.clear();
        // h2 writes, under its own key, a status that speaks for h1: refused, and h2's own
        // status is gone with it; h1 stays ready.
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/hosts/h2",
            &status("h1", "draining"),
            4,
        );
        assert_eq!(view.hosts_dirty, HashSet::from([h2.clone()]));
        assert!(!view.hosts.contains_key(&h2));
        let ready = detour_proto::SidecarState::Ready;
        assert_eq!(view.hosts[&h1].sidecar, ready);
        // A key that names no valid host is refused; a delete marks its host changed.
        apply_put(
            prefix,
            &mut view,
            b"/detour/v1/hosts/bad host",
            &status("h1", "ready"),
            5,
        );
        assert_eq!(view.hosts.len(), 1);
        view.hosts_dirty.clear();
        apply_delete(prefix, &mut view, b"/detour/v1/hosts/h1", 6);
        assert!(view.hosts.is_empty());
        assert_eq!(view.hosts_dirty, HashSet::from([h1]));
    }
}
