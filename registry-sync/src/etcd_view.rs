//! The etcd back-end's view of the prefix: the parsed keys, and the watch that keeps them
//! current (resuming after a disconnect, re-listing after a compaction).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use detour_proto::{Endpoint, EndpointSet, HostStatus, ServiceName};
use etcd_client::{EventType, WatchOptions};

use super::{EndpointValue, HostValue, Inner};

/// What the prefix watch has seen.
#[derive(Default)]
pub(super) struct View {
    /// Parsed endpoints by key.
    pub(super) endpoints: BTreeMap<String, Endpoint>,
    /// Host statuses by key.
    pub(super) hosts: BTreeMap<String, HostStatus>,
    /// Services that ever had a key (a service once seen stays known).
    pub(super) known: HashSet<ServiceName>,
    /// The last revision applied.
    pub(super) revision: i64,
}

pub(super) fn service_set(view: &View, service: &ServiceName) -> EndpointSet {
    let endpoints: Vec<Endpoint> = view
        .endpoints
        .values()
        .filter(|e| &e.service == service)
        .cloned()
        .collect();
    let mut set = EndpointSet::known(endpoints);
    set.known = view.known.contains(service);
    set
}

/// Applies one key's value to the view; a value that does not parse is logged, counted and
/// dropped (the key then counts as absent), never fatal.
pub(super) fn apply_put(prefix: &str, view: &mut View, key: &[u8], value: &[u8]) {
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return;
    };
    if let Some(svc) = rest.strip_prefix("services/") {
        if let Some(name) = svc.split('/').next().and_then(|n| ServiceName::new(n).ok()) {
            view.known.insert(name);
        }
        match serde_json::from_slice::<EndpointValue>(value) {
            Ok(v) if v.version == 1 => {
                view.endpoints.insert(key.to_owned(), v.endpoint);
            }
            Ok(v) => bad(key, &format!("unknown version {}", v.version), view),
            Err(e) => bad(key, &e.to_string(), view),
        }
    } else if rest.starts_with("hosts/") {
        match serde_json::from_slice::<HostValue>(value) {
            Ok(v) if v.version == 1 => {
                view.hosts.insert(key.to_owned(), v.status);
            }
            Ok(v) => bad(key, &format!("unknown version {}", v.version), view),
            Err(e) => bad(key, &e.to_string(), view),
        }
    }
}

fn bad(key: &str, why: &str, view: &mut View) {
    tracing::warn!(key, error = why, "ignoring a malformed registry value");
    metrics::counter!("detour_registry_invalid_records_total").increment(1);
    view.endpoints.remove(key);
    view.hosts.remove(key);
}

fn apply_delete(view: &mut View, key: &[u8]) {
    if let Ok(key) = std::str::from_utf8(key) {
        view.endpoints.remove(key);
        view.hosts.remove(key);
    }
}

/// Follows the whole prefix: resumes after the last revision seen; re-lists when that
/// revision was compacted away.
pub(super) async fn watch_loop(inner: Arc<Inner>) {
    let prefix = format!("{}/", inner.opts.prefix);
    loop {
        if !inner.synced.load(std::sync::atomic::Ordering::SeqCst)
            && let Err(e) = inner.relist().await
        {
            tracing::debug!(error = %e, "etcd not listed yet; retrying");
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        let from = inner
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .revision
            + 1;
        let opened = inner
            .call("watch", |mut c| {
                let prefix = prefix.clone();
                async move {
                    c.watch(
                        prefix,
                        Some(WatchOptions::new().with_prefix().with_start_revision(from)),
                    )
                    .await
                }
            })
            .await;
        let mut stream = match opened {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "etcd watch not open; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
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
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                break;
            }
            if msg.canceled() {
                break;
            }
            {
                let mut view = inner.view.lock().unwrap_or_else(|p| p.into_inner());
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if kv.mod_revision() <= view.revision && ev.event_type() == EventType::Put {
                        continue; // already applied (a resumed watch may repeat it)
                    }
                    match ev.event_type() {
                        EventType::Put => {
                            apply_put(&inner.opts.prefix, &mut view, kv.key(), kv.value())
                        }
                        EventType::Delete => apply_delete(&mut view, kv.key()),
                    }
                    view.revision = view.revision.max(kv.mod_revision());
                }
                // Not the header's revision: the watch's first ("created") message carries the
                // store's current revision, and events between the list and that revision are
                // still to come in later messages.
            }
            inner.publish();
        }
    }
}
