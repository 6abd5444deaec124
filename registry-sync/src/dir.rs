//! The directory registry: the embedded default back-end for one machine.
//!
//! Every host owns one file, `{dir}/{host}.json`, which only that host writes (write to a
//! temporary file, then rename, so readers never see half a record). The file carries a
//! heartbeat timestamp that plays the part of an etcd lease: the owner rewrites it every third
//! of the time-to-live, and readers treat a record whose heartbeat is older than its TTL as gone.
//! Every client rescans the directory every `poll_interval` and tells its watchers what changed.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use detour_proto::{Endpoint, EndpointSet, HostId, HostStatus, InstanceId, ServiceName};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::registry::{
    DocName, DocSenders, DocState, HostStatuses, Registry, RegistryError, Watchers, now_unix_ms,
    subscribe_or_insert,
};

/// The record format this version writes and reads.
const FORMAT: u32 = 1;

/// Tuning of the directory back-end.
#[derive(Debug, Clone, Copy)]
pub struct DirOptions {
    /// How long a record lives without a heartbeat.
    pub ttl: Duration,
    /// How often the directory is rescanned.
    pub poll_interval: Duration,
}

impl Default for DirOptions {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// One host's file, as written.
#[derive(Debug, Serialize)]
struct HostRecordOut<'a> {
    format: u32,
    host: &'a HostId,
    heartbeat_unix_ms: u64,
    ttl_ms: u64,
    status: Option<&'a HostStatus>,
    endpoints: Vec<&'a Endpoint>,
}

/// One host's file, as read: endpoints are parsed one by one so a bad one poisons nothing else.
#[derive(Debug, Deserialize)]
struct HostRecordIn {
    format: u32,
    host: HostId,
    heartbeat_unix_ms: u64,
    ttl_ms: u64,
    #[serde(default)]
    status: Option<HostStatus>,
    #[serde(default)]
    endpoints: Vec<serde_json::Value>,
}

/// What one scan of the directory saw.
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Live endpoints by service (a service whose hosts expired is known and empty).
    pub services: HashMap<ServiceName, EndpointSet>,
    /// Live hosts' statuses.
    pub hosts: HashMap<HostId, HostStatus>,
}

/// What this client owns and keeps alive.
#[derive(Debug, Default)]
struct Own {
    endpoints: Vec<Endpoint>,
    status: Option<HostStatus>,
    /// Set after `withdraw`: the file is gone and is not written again.
    withdrawn: bool,
}

struct Inner {
    dir: PathBuf,
    host: HostId,
    opts: DirOptions,
    own: Mutex<Own>,
    view: RwLock<View>,
    watchers: Mutex<Watchers>,
    hosts: watch::Sender<Arc<HostStatuses>>,
    /// The documents (`{dir}/gray/rules.json`, `{dir}/policy/services.json`).
    docs: DocSenders,
    rescan: Notify,
    /// Files that failed to parse, with the content length seen, so each is logged once.
    bad_files: Mutex<HashMap<PathBuf, u64>>,
}

/// A client of the directory registry for one host.
pub struct DirRegistry {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for DirRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirRegistry")
            .field("dir", &self.inner.dir)
            .field("host", &self.inner.host)
            .finish()
    }
}

impl DirRegistry {
    /// Opens (creating if needed) the registry directory for `host`, scans it once, and starts
    /// the heartbeat and rescan tasks on the current tokio runtime.
    pub async fn open(dir: &Path, host: HostId, opts: DirOptions) -> Result<Self, RegistryError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(dir, e))?;
        let inner = Arc::new(Inner {
            dir: dir.to_owned(),
            host,
            opts,
            own: Mutex::new(Own::default()),
            view: RwLock::new(View::default()),
            watchers: Mutex::new(Watchers::default()),
            hosts: watch::channel(Arc::new(HostStatuses::new())).0,
            docs: DocSenders::default(),
            rescan: Notify::new(),
            bad_files: Mutex::new(HashMap::new()),
        });
        inner.clone().scan().await;
        let scanner = tokio::spawn(scan_loop(inner.clone()));
        let heart = tokio::spawn(heartbeat_loop(inner.clone()));
        Ok(Self {
            inner,
            tasks: vec![scanner, heart],
        })
    }

    /// The file this client writes.
    pub fn own_file(&self) -> PathBuf {
        self.inner.own_path()
    }
}

impl Drop for DirRegistry {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn unavailable(dir: &Path, source: std::io::Error) -> RegistryError {
    RegistryError::Unavailable {
        backend: format!("dir:{}", dir.display()),
        source,
    }
}

impl Inner {
    fn own_path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.host))
    }

    /// Writes this host's record (or removes it after a withdraw), then asks for a rescan.
    async fn write_own(self: &Arc<Self>) -> Result<(), RegistryError> {
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || me.write_own_blocking())
            .await
            .map_err(|e| unavailable(&self.dir, std::io::Error::other(e)))?;
        self.rescan.notify_one();
        res
    }

    fn write_own_blocking(&self) -> Result<(), RegistryError> {
        let path = self.own_path();
        let bytes = {
            let own = self.own.lock();
            if own.withdrawn {
                return match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(unavailable(&self.dir, e)),
                };
            }
            let rec = HostRecordOut {
                format: FORMAT,
                host: &self.host,
                heartbeat_unix_ms: now_unix_ms(),
                ttl_ms: self.opts.ttl.as_millis() as u64,
                status: own.status.as_ref(),
                endpoints: own.endpoints.iter().collect(),
            };
            serde_json::to_vec_pretty(&rec).map_err(|e| unavailable(&self.dir, e.into()))?
        };
        detour_proto::files::write_atomic(&path, &bytes, 0o644)
            .map_err(|e| unavailable(&self.dir, e))
    }

    /// Reads every record, rebuilds the view and updates the watchers.
    async fn scan(self: Arc<Self>) {
        let me = self.clone();
        let read = tokio::task::spawn_blocking(move || {
            let docs = DocName::ALL.map(|d| (d, me.read_doc_blocking(d)));
            (me.read_view_blocking(), docs)
        })
        .await;
        let Ok((view, docs)) = read else { return };
        for (name, doc) in docs {
            if let Some(doc) = doc {
                let revision = doc.as_deref().map_or(0, crate::store::revision_of);
                self.docs.publish(name, doc.map(Arc::from), revision);
            }
        }
        {
            let watchers = self.watchers.lock();
            for (service, tx) in watchers.iter() {
                let mut next = view.services.get(service).cloned().unwrap_or_default();
                tx.send_if_modified(|cur| {
                    // A service once seen stays known: its last instance leaving makes it
                    // empty, not unknown.
                    next.known |= cur.known;
                    if **cur == next {
                        false
                    } else {
                        *cur = Arc::new(next);
                        true
                    }
                });
            }
        }
        self.hosts.send_if_modified(|cur| {
            if **cur == view.hosts {
                false
            } else {
                *cur = Arc::new(view.hosts.clone());
                true
            }
        });
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
    }

    fn read_view_blocking(&self) -> View {
        match read_records(&self.dir, |path, len, why| self.report_bad(path, len, why)) {
            Ok(view) => view,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read registry directory");
                metrics::counter!("detour_registry_errors_total", "op" => "scan").increment(1);
                // Keep the last view rather than dropping every endpoint.
                self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
            }
        }
    }

    /// A document: `Some(None)` when there is none, `None` when it cannot be read now (the
    /// last one read stays in force).
    fn read_doc_blocking(&self, name: DocName) -> Option<Option<Vec<u8>>> {
        let path = self.dir.join(format!("{}.json", name.key()));
        match read_regular(&path, crate::registry::MAX_DOC_BYTES) {
            Ok(bytes) => Some(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
            Err(e) => {
                self.report_bad(&path, 0, &e.to_string());
                None
            }
        }
    }

    fn report_bad(&self, path: &Path, len: usize, why: &str) {
        let mut bad = self.bad_files.lock();
        if bad.insert(path.to_owned(), len as u64) != Some(len as u64) {
            tracing::warn!(file = %path.display(), error = why, "ignoring unreadable registry record");
            metrics::counter!("detour_registry_invalid_records_total").increment(1);
        }
    }
}

/// The largest host record read (a bigger one is reported and skipped).
pub const MAX_RECORD_BYTES: u64 = 4 << 20;

/// Reads `path` if it is a regular file (not a FIFO, device, directory or symbolic link) of at
/// most `limit` bytes. Opened without following links and without blocking, so a FIFO dropped
/// into the directory cannot freeze the reader.
pub(crate) fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// Reads every host record in `dir` into a view; `bad` hears each file that does not parse, is
/// not a regular file, is too large, or holds another host's record.
pub fn read_records(dir: &Path, mut bad: impl FnMut(&Path, usize, &str)) -> std::io::Result<View> {
    let mut records = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let bytes = match read_regular(&path, MAX_RECORD_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // renamed away
            Err(e) => {
                bad(&path, 0, &e.to_string());
                continue;
            }
        };
        let stem = &name[..name.len() - ".json".len()];
        match serde_json::from_slice::<HostRecordIn>(&bytes) {
            Ok(rec) if rec.format == FORMAT && rec.host.as_str() == stem => records.push(rec),
            Ok(rec) if rec.format == FORMAT => bad(
                &path,
                bytes.len(),
                &format!("record of host {} in another host's file", rec.host),
            ),
            Ok(rec) => bad(&path, bytes.len(), &format!("format {}", rec.format)),
            Err(e) => bad(&path, bytes.len(), &e.to_string()),
        }
    }
    Ok(build_view(records, now_unix_ms()))
}

/// Builds the view from the records read: expired hosts keep their services known but empty;
/// an endpoint that does not parse, or that claims another host, is skipped and counted.
fn build_view(records: Vec<HostRecordIn>, now_ms: u64) -> View {
    let mut view = View::default();
    for rec in records {
        let alive = now_ms.saturating_sub(rec.heartbeat_unix_ms) <= rec.ttl_ms;
        if alive && let Some(status) = rec.status {
            view.hosts.insert(rec.host.clone(), status);
        }
        for raw in rec.endpoints {
            let ep = match serde_json::from_value::<Endpoint>(raw) {
                Ok(ep) if ep.host == rec.host => ep,
                Ok(ep) => {
                    tracing::warn!(host = %rec.host, claimed = %ep.host, "skipping endpoint of another host");
                    metrics::counter!("detour_registry_invalid_records_total").increment(1);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(host = %rec.host, error = %e, "skipping malformed endpoint");
                    metrics::counter!("detour_registry_invalid_records_total").increment(1);
                    continue;
                }
            };
            let set = view.services.entry(ep.service.clone()).or_default();
            set.known = true;
            if alive {
                set.endpoints.push(ep);
            }
        }
    }
    for set in view.services.values_mut() {
        set.endpoints.sort_by(|a, b| a.instance.cmp(&b.instance));
    }
    view
}

async fn scan_loop(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(inner.opts.poll_interval) => {}
            _ = inner.rescan.notified() => {}
        }
        inner.clone().scan().await;
    }
}

async fn heartbeat_loop(inner: Arc<Inner>) {
    let period = (inner.opts.ttl / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(period).await;
        let has_content = {
            let own = inner.own.lock();
            !own.withdrawn && (!own.endpoints.is_empty() || own.status.is_some())
        };
        if has_content && let Err(e) = inner.write_own().await {
            tracing::warn!(error = %e, "registry heartbeat failed");
            metrics::counter!("detour_registry_errors_total", "op" => "heartbeat").increment(1);
        }
    }
}

#[async_trait]
impl Registry for DirRegistry {
    async fn register(&self, endpoint: Endpoint) -> Result<(), RegistryError> {
        if endpoint.host != self.inner.host {
            return Err(RegistryError::Refused(format!(
                "host {} cannot register an endpoint of host {}",
                self.inner.host, endpoint.host
            )));
        }
        {
            let mut own = self.inner.own.lock();
            own.withdrawn = false;
            own.endpoints
                .retain(|e| !(e.service == endpoint.service && e.instance == endpoint.instance));
            own.endpoints.push(endpoint);
        }
        self.inner.write_own().await
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        instance: &InstanceId,
    ) -> Result<(), RegistryError> {
        {
            let mut own = self.inner.own.lock();
            own.endpoints
                .retain(|e| !(&e.service == service && &e.instance == instance));
        }
        self.inner.write_own().await
    }

    async fn watch(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        let mut watchers = self.inner.watchers.lock();
        Ok(subscribe_or_insert(&mut watchers, service, || {
            let view = self.inner.view.read().unwrap_or_else(|p| p.into_inner());
            view.services.get(service).cloned().unwrap_or_default()
        }))
    }

    async fn set_host_status(&self, status: HostStatus) -> Result<(), RegistryError> {
        {
            let mut own = self.inner.own.lock();
            own.withdrawn = false;
            own.status = Some(status);
        }
        self.inner.write_own().await
    }

    fn watch_hosts(&self) -> watch::Receiver<Arc<HostStatuses>> {
        self.inner.hosts.subscribe()
    }

    async fn host_status(&self, host: &HostId) -> Result<Option<HostStatus>, RegistryError> {
        let view = self.inner.view.read().unwrap_or_else(|p| p.into_inner());
        Ok(view.hosts.get(host).cloned())
    }

    async fn withdraw(&self) -> Result<(), RegistryError> {
        {
            let mut own = self.inner.own.lock();
            own.endpoints.clear();
            own.status = None;
            own.withdrawn = true;
        }
        self.inner.write_own().await
    }

    fn watch_doc(&self, doc: DocName) -> watch::Receiver<DocState> {
        self.inner.docs.subscribe(doc)
    }

    async fn release(&self) -> Result<(), RegistryError> {
        // The file stays as written; with nothing of its own, the heartbeat stops writing it.
        let mut own = self.inner.own.lock();
        own.endpoints.clear();
        own.status = None;
        Ok(())
    }
}

#[cfg(test)]
#[path = "dir_tests.rs"]
mod tests;
