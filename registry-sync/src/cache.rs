//! The catalog's second level: every service's last endpoint set on local disk (redb), so a
//! sidecar that starts while the registry is unreachable can route at once. Writes are batched
//! by a [`CacheWriter`] off the request path. A cache that cannot be opened, or a value that
//! does not parse, is reported and ignored — never fatal.

use detour_proto::sync::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use detour_proto::{AppProtocol, Endpoint, EndpointSet, HostId, InstanceId, ServiceName, Source};
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// One cached service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// When they were written (ms since the epoch).
    pub written_unix_ms: u64,
}

/// The stored form, version 2: `{"version":2,"written_unix_ms":…,"endpoints":[ROW,…]}`, one row
/// per endpoint, `[instance, host, app_address, pa_address, protocol, weight, zone, version,
/// source, labels, healthy, no_direct]` (the service is the key; rows written before `healthy`
/// existed have ten fields and read as healthy, rows before `no_direct` eleven and read as
/// reachable directly). Rows parse in about half the time of full objects, which is
/// what a start with a large catalog waits for.
#[derive(Serialize)]
struct Value<'a> {
    version: u32,
    written_unix_ms: u64,
    endpoints: Vec<RowRef<'a>>,
}

#[derive(Serialize)]
struct RowRef<'a>(
    &'a InstanceId,
    &'a HostId,
    &'a SocketAddr,
    &'a Option<SocketAddr>,
    AppProtocol,
    u32,
    &'a str,
    &'a str,
    &'a Source,
    &'a BTreeMap<String, String>,
    bool,
    bool,
);

#[derive(Deserialize)]
struct ValueV2 {
    version: u32,
    written_unix_ms: u64,
    endpoints: Vec<Row>,
}

#[derive(Deserialize)]
struct Row(
    InstanceId,
    HostId,
    SocketAddr,
    Option<SocketAddr>,
    AppProtocol,
    u32,
    String,
    String,
    Source,
    BTreeMap<String, String>,
    #[serde(default = "yes")] bool,
    #[serde(default)] bool,
);

fn yes() -> bool {
    true
}

/// Version 1, still read: endpoints as full objects.
#[derive(Deserialize)]
struct ValueV1 {
    version: u32,
    endpoints: Vec<Endpoint>,
    written_unix_ms: u64,
}

/// The one table of the cache: service name → stored value.
const TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("catalog");

/// The on-disk cache of one sidecar: one redb file, locked by the process that has it open (a
/// successor opens it once its predecessor has gone).
#[derive(Clone)]
pub struct DiskCache {
    db: Arc<redb::Database>,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskCache")
    }
}

/// Runs `f`, turning a panic inside the store (redb may panic on a file altered outside it)
/// into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(format!("{what}: the store panicked (a damaged file)")))
}

impl DiskCache {
    /// Opens (creating, with its directory) the cache at `path`, retrying briefly while the previous owner still
    /// holds its lock; `None` (logged, counted) when it cannot be used. A file that is not a
    /// cache (damaged, or of another program) is moved aside to `{path}.corrupt` and a new
    /// cache is started in its place.
    pub fn open(path: &Path) -> Option<DiskCache> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let open = || {
            guarded("open", || {
                redb::Builder::new()
                    .set_cache_size(16 << 20)
                    .set_check_integrity_on_open(true)
                    .create(path)
                    .map_err(|e| match e {
                        redb::DatabaseError::DatabaseAlreadyOpen => "locked".to_owned(),
                        e => e.to_string(),
                    })
            })
        };
        let mut moved_aside = false;
        for attempt in 0..40 {
            match open() {
                Ok(db) => {
                    return Some(DiskCache { db: Arc::new(db) });
                }
                Err(e) if e == "locked" && attempt < 39 => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e != "locked" && !moved_aside && path.is_file() => {
                    tracing::warn!(path = %path.display(), error = %e, "catalog disk cache damaged: moved aside, starting a new one");
                    metrics::counter!("detour_catalog_cache_errors_total", "op" => "open")
                        .increment(1);
                    let aside = path.with_extension("corrupt");
                    if std::fs::rename(path, &aside).is_err() {
                        let _ = std::fs::remove_file(path);
                    }
                    moved_aside = true;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "catalog disk cache unusable; running without it");
                    metrics::counter!("detour_catalog_cache_errors_total", "op" => "open")
                        .increment(1);
                    return None;
                }
            }
        }
        None
    }

    /// The cached set of `service`, if any and readable.
    pub fn get(&self, service: &ServiceName) -> Option<Cached> {
        let read = guarded("read", || {
            let txn = self.db.begin_read().map_err(|e| e.to_string())?;
            let table = match txn.open_table(TABLE) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.to_string()),
            };
            let v = table.get(service.as_str()).map_err(|e| e.to_string())?;
            Ok(v.map(|g| g.value().to_vec()))
        });
        match read {
            Ok(raw) => parse(service, &raw?),
            Err(e) => {
                tracing::warn!(%service, error = %e, "catalog disk cache read failed");
                metrics::counter!("detour_catalog_cache_errors_total", "op" => "read").increment(1);
                None
            }
        }
    }

    /// Every readable cached service, in one pass; unreadable entries are reported and
    /// skipped. Blocking.
    pub fn load_all(&self) -> Vec<(ServiceName, Cached)> {
        let out = Mutex::new(Vec::new());
        self.stream(512, |part| {
            out.lock().extend(part);
        });
        out.into_inner()
    }

    /// Hands every readable cached service to `sink`, `chunk` at a time, as they are parsed:
    /// this thread scans while one worker per core parses, so a caller can use the first
    /// services while the rest are read (a sidecar's start). Blocking: call it off the async
    /// runtime. Unreadable entries are reported and skipped.
    pub fn stream(&self, chunk: usize, sink: impl Fn(Vec<(ServiceName, Cached)>) + Sync) {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(String, Vec<u8>)>>(workers * 2);
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    loop {
                        let next = rx.lock().recv();
                        let Ok(raw) = next else { return };
                        sink(raw.iter().filter_map(parse_entry).collect());
                    }
                });
            }
            let scanned = guarded("scan", || {
                let txn = self.db.begin_read().map_err(|e| e.to_string())?;
                let table = match txn.open_table(TABLE) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                };
                let mut raw = Vec::with_capacity(chunk);
                for item in table.iter().map_err(|e| e.to_string())? {
                    let (k, v) = item.map_err(|e| e.to_string())?;
                    raw.push((k.value().to_owned(), v.value().to_vec()));
                    if raw.len() == chunk {
                        let full = std::mem::replace(&mut raw, Vec::with_capacity(chunk));
                        if tx.send(full).is_err() {
                            return Ok(());
                        }
                    }
                }
                if !raw.is_empty() {
                    let _ = tx.send(raw);
                }
                Ok(())
            });
            if let Err(e) = scanned {
                tracing::warn!(error = %e, "catalog disk cache scan stopped");
                metrics::counter!("detour_catalog_cache_errors_total", "op" => "read").increment(1);
            }
            drop(tx);
        });
    }

    /// Writes `service`'s set now (durably: the commit is on disk when this returns).
    pub fn put(&self, service: &ServiceName, set: &EndpointSet, now_ms: u64) {
        if let Some(bytes) = encode(set, now_ms) {
            self.write(vec![(service.clone(), bytes)]);
        }
    }

    fn write(&self, entries: Vec<(ServiceName, Vec<u8>)>) {
        let n = entries.len();
        let written = guarded("write", || {
            let txn = self.db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
                for (service, bytes) in &entries {
                    table
                        .insert(service.as_str(), bytes.as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
            txn.commit().map_err(|e| e.to_string())
        });
        match written {
            Ok(()) => {
                metrics::counter!("detour_catalog_cache_writes_total").increment(n as u64);
            }
            Err(e) => {
                tracing::warn!(services = n, error = %e, "catalog disk cache write failed");
                metrics::counter!("detour_catalog_cache_errors_total", "op" => "write")
                    .increment(1);
            }
        }
    }

    /// Writes raw bytes (tests use it to plant garbage).
    pub fn put_raw(&self, key: &str, bytes: &[u8]) {
        let _ = guarded("write", || {
            let txn = self.db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut table = txn.open_table(TABLE).map_err(|e| e.to_string())?;
                table.insert(key, bytes).map_err(|e| e.to_string())?;
            }
            txn.commit().map_err(|e| e.to_string())
        });
    }

    /// Every write is durable when it returns; kept for callers that flush before a stop.
    pub fn flush(&self) {}
}

fn encode(set: &EndpointSet, now_ms: u64) -> Option<Vec<u8>> {
    let rows = set
        .endpoints
        .iter()
        .map(|e| {
            RowRef(
                &e.instance,
                &e.host,
                &e.app_address,
                &e.pa_address,
                e.protocol,
                e.weight,
                &e.zone,
                &e.version,
                &e.source,
                &e.labels,
                e.healthy,
                e.no_direct,
            )
        })
        .collect();
    let v = Value {
        version: 2,
        written_unix_ms: now_ms,
        endpoints: rows,
    };
    serde_json::to_vec(&v).ok()
}

fn parse_entry((key, raw): &(String, Vec<u8>)) -> Option<(ServiceName, Cached)> {
    let Ok(service) = ServiceName::new(key.clone()) else {
        tracing::warn!(key = %key, "ignoring a catalog cache entry with an invalid name");
        metrics::counter!("detour_catalog_cache_errors_total", "op" => "parse").increment(1);
        return None;
    };
    parse(&service, raw).map(|c| (service, c))
}

fn parse(service: &ServiceName, raw: &[u8]) -> Option<Cached> {
    let v2 = serde_json::from_slice::<ValueV2>(raw).ok();
    let v1 = || serde_json::from_slice::<ValueV1>(raw).ok();
    match v2 {
        Some(v) if v.version == 2 => Some(Cached {
            endpoints: v
                .endpoints
                .into_iter()
                .map(|r| Endpoint {
                    service: service.clone(),
                    instance: r.0,
                    host: r.1,
                    app_address: r.2,
                    pa_address: r.3,
                    protocol: r.4,
                    weight: r.5,
                    zone: r.6,
                    version: r.7,
                    source: r.8,
                    labels: r.9,
                    healthy: r.10,
                    no_direct: r.11,
                })
                .collect(),
            written_unix_ms: v.written_unix_ms,
        }),
        None => match v1() {
            Some(v) if v.version == 1 => Some(Cached {
                endpoints: v.endpoints,
                written_unix_ms: v.written_unix_ms,
            }),
            _ => corrupt(service),
        },
        Some(_) => corrupt(service),
    }
}

fn corrupt(service: &ServiceName) -> Option<Cached> {
    tracing::warn!(%service, "ignoring a corrupt catalog cache entry");
    metrics::counter!("detour_catalog_cache_errors_total", "op" => "parse").increment(1);
    None
}

/// Writes sets to a [`DiskCache`] in batches: the latest set of each service changed within
/// `every` is written once, in one transaction, by a background task.
#[derive(Debug)]
pub struct CacheWriter {
    cache: DiskCache,
    pending: Arc<Mutex<HashMap<ServiceName, Vec<u8>>>>,
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl CacheWriter {
    /// Starts the writer (inside a Tokio runtime).
    pub fn spawn(cache: DiskCache, every: Duration) -> Self {
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let wake = Arc::new(Notify::new());
        let task = tokio::spawn({
            let (cache, pending, wake) = (cache.clone(), pending.clone(), wake.clone());
            async move {
                loop {
                    wake.notified().await;
                    tokio::time::sleep(every).await;
                    // Off the runtime's threads: a batch after a re-list can hold every service.
                    let (cache, pending) = (cache.clone(), pending.clone());
                    let _ = tokio::task::spawn_blocking(move || drain(&cache, &pending)).await;
                }
            }
        });
        Self {
            cache,
            pending,
            wake,
            task,
        }
    }

    /// The cache written to.
    pub fn cache(&self) -> &DiskCache {
        &self.cache
    }

    /// Queues `service`'s set (replacing any queued one).
    pub fn put(&self, service: &ServiceName, set: &EndpointSet, now_ms: u64) {
        let Some(bytes) = encode(set, now_ms) else {
            return;
        };
        self.pending.lock().insert(service.clone(), bytes);
        self.wake.notify_one();
    }

    /// Writes everything queued and flushes it to disk (shutdown, tests).
    pub fn flush(&self) {
        drain(&self.cache, &self.pending);
        self.cache.flush();
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        self.task.abort();
        drain(&self.cache, &self.pending);
    }
}

fn drain(cache: &DiskCache, pending: &Mutex<HashMap<ServiceName, Vec<u8>>>) {
    let batch: Vec<_> = std::mem::take(&mut *pending.lock()).into_iter().collect();
    if !batch.is_empty() {
        cache.write(batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_garbage_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let svc = ServiceName::new("echo").unwrap();
        let ep: Endpoint = serde_json::from_str(
            r#"{"service":"echo","instance":"i1","host":"h1","app_address":"127.0.0.1:9","pa_address":null}"#,
        )
        .unwrap();
        {
            let c = DiskCache::open(&path).unwrap();
            assert!(c.get(&svc).is_none());
            c.put(&svc, &EndpointSet::known(vec![ep.clone()]), 42);
            c.put_raw("bad", b"\xff{garbage");
            c.flush();
        }
        let c = DiskCache::open(&path).expect("reopens after close");
        assert_eq!(c.get(&svc).unwrap().endpoints, vec![ep.clone()]);
        assert!(c.get(&ServiceName::new("bad").unwrap()).is_none());
        // One pass over everything skips the garbage and keeps the rest.
        let all = c.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, svc);
        // Entries written by an older sidecar (version 1: full objects) are still read.
        let v1 = serde_json::json!({"version": 1, "endpoints": [ep.clone()], "written_unix_ms": 5});
        c.put_raw("old", v1.to_string().as_bytes());
        let mut old = ep.clone();
        old.service = ServiceName::new("old").unwrap();
        let got = c.get(&ServiceName::new("old").unwrap()).unwrap();
        assert_eq!(
            (got.endpoints[0].instance.clone(), got.written_unix_ms),
            (old.instance, 5)
        );
        // Rows keep the health mark; rows written before it existed read as healthy.
        let mut sick = ep.clone();
        sick.healthy = false;
        c.put(&svc, &EndpointSet::known(vec![sick.clone()]), 43);
        assert_eq!(c.get(&svc).unwrap().endpoints, vec![sick]);
        let ten = br#"{"version":2,"written_unix_ms":7,"endpoints":[["i1","h1","127.0.0.1:9",null,"http1",1,"","","native",{}]]}"#;
        c.put_raw("ten", ten);
        let got = c.get(&ServiceName::new("ten").unwrap()).unwrap();
        assert!(got.endpoints[0].healthy);
        // An unknown version is refused.
        c.put_raw(
            "future",
            br#"{"version":9,"written_unix_ms":1,"endpoints":[]}"#,
        );
        assert!(c.get(&ServiceName::new("future").unwrap()).is_none());
        // A path that cannot hold a database is reported, not fatal.
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a db").unwrap();
        assert!(DiskCache::open(&file.join("x")).is_none());
        // A file that is not a cache is moved aside and a new cache starts in its place.
        drop(c);
        let damaged = dir.path().join("damaged");
        std::fs::write(&damaged, vec![0x5a; 64 << 10]).unwrap();
        let fresh = DiskCache::open(&damaged).expect("a new cache in its place");
        assert!(fresh.load_all().is_empty());
        assert!(dir.path().join("damaged.corrupt").exists());
        // While one process (here: one handle) holds the cache, another open waits, then gives
        // up without harm.
        let held = DiskCache::open(&path).unwrap();
        assert!(DiskCache::open(&path).is_none(), "locked by its owner");
        drop(held);
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    #[tokio::test]
    async fn the_writer_batches_the_latest_set_of_each_service() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(&dir.path().join("cache")).unwrap();
        let w = CacheWriter::spawn(cache.clone(), Duration::from_millis(20));
        let svc = ServiceName::new("echo").unwrap();
        let ep = |i: u16| {
            Endpoint::new(
                svc.clone(),
                detour_proto::InstanceId::new(format!("i{i}")).unwrap(),
                detour_proto::HostId::new("h1").unwrap(),
                format!("127.0.0.1:{i}").parse().unwrap(),
            )
        };
        for i in 1..=3 {
            w.put(&svc, &EndpointSet::known(vec![ep(i)]), u64::from(i));
        }
        // Nothing is written until the batch interval passes, then only the last set.
        assert!(cache.get(&svc).is_none());
        tokio::time::timeout(Duration::from_secs(5), async {
            while cache.get(&svc).is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let got = cache.get(&svc).unwrap();
        assert_eq!(got.endpoints, vec![ep(3)]);
        assert_eq!(got.written_unix_ms, 3);
        // Dropping the writer writes what is still queued.
        w.put(&svc, &EndpointSet::known(vec![ep(4)]), 4);
        drop(w);
        assert_eq!(cache.get(&svc).unwrap().endpoints, vec![ep(4)]);
    }
}
