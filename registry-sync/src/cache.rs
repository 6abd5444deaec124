//! The catalog's second level: every service's last endpoint set on local disk (sled), so a
//! sidecar that starts while the registry is unreachable can route at once. Writes are batched
//! by a [`CacheWriter`] off the request path. A cache that cannot be opened, or a value that
//! does not parse, is reported and ignored — never fatal.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;

use detour_proto::{AppProtocol, Endpoint, EndpointSet, HostId, InstanceId, ServiceName, Source};
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
/// source, labels, healthy]` (the service is the key; rows written before `healthy` existed
/// have ten fields and read as healthy). Rows parse in about half the time of full objects, which is
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

/// The on-disk cache of one sidecar (sled allows one process per database).
#[derive(Debug, Clone)]
pub struct DiskCache {
    db: sled::Db,
}

impl DiskCache {
    /// Opens (creating) the cache at `path`, retrying briefly when the previous owner's lock
    /// is still being released; `None` (logged, counted) when it cannot be used.
    pub fn open(path: &Path) -> Option<DiskCache> {
        for attempt in 0..20 {
            // Large enough to hold a big catalog while it is read at start (a smaller one thrashes
            // during that scan); sled only fills it with what is there.
            match sled::Config::new()
                .path(path)
                .cache_capacity(64 << 20)
                .flush_every_ms(Some(200))
                .open()
            {
                Ok(db) => return Some(DiskCache { db }),
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && attempt < 19 =>
                {
                    std::thread::sleep(Duration::from_millis(50));
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
        let raw = match self.db.get(service.as_str()) {
            Ok(v) => v?,
            Err(e) => {
                tracing::warn!(%service, error = %e, "catalog disk cache read failed");
                metrics::counter!("detour_catalog_cache_errors_total", "op" => "read").increment(1);
                return None;
            }
        };
        parse(service, &raw)
    }

    /// Every readable cached service, in one pass; unreadable entries are reported and
    /// skipped. Blocking.
    pub fn load_all(&self) -> Vec<(ServiceName, Cached)> {
        let out = Mutex::new(Vec::new());
        self.stream(512, |part| {
            out.lock().unwrap_or_else(|p| p.into_inner()).extend(part);
        });
        out.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands every readable cached service to `sink`, `chunk` at a time, as they are parsed:
    /// this thread scans while one worker per core parses, so a caller can use the first
    /// services while the rest are read (a sidecar's start). Blocking: call it off the async
    /// runtime. Unreadable entries are reported and skipped.
    pub fn stream(&self, chunk: usize, sink: impl Fn(Vec<(ServiceName, Cached)>) + Sync) {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(sled::IVec, sled::IVec)>>(workers * 2);
        let rx = Mutex::new(rx);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    loop {
                        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(raw) = next else { return };
                        sink(raw.iter().filter_map(parse_entry).collect());
                    }
                });
            }
            let mut raw = Vec::with_capacity(chunk);
            for item in self.db.iter() {
                match item {
                    Ok(kv) => raw.push(kv),
                    Err(e) => {
                        tracing::warn!(error = %e, "catalog disk cache scan stopped");
                        metrics::counter!("detour_catalog_cache_errors_total", "op" => "read")
                            .increment(1);
                        break;
                    }
                }
                if raw.len() == chunk {
                    let full = std::mem::replace(&mut raw, Vec::with_capacity(chunk));
                    if tx.send(full).is_err() {
                        return;
                    }
                }
            }
            if !raw.is_empty() {
                let _ = tx.send(raw);
            }
            drop(tx);
        });
    }

    /// Writes `service`'s set now (sled flushes to disk in the background).
    pub fn put(&self, service: &ServiceName, set: &EndpointSet, now_ms: u64) {
        if let Some(bytes) = encode(set, now_ms) {
            self.write(vec![(service.clone(), bytes)]);
        }
    }

    fn write(&self, entries: Vec<(ServiceName, Vec<u8>)>) {
        let mut batch = sled::Batch::default();
        let n = entries.len();
        for (service, bytes) in entries {
            batch.insert(service.as_str(), bytes);
        }
        if let Err(e) = self.db.apply_batch(batch) {
            tracing::warn!(services = n, error = %e, "catalog disk cache write failed");
            metrics::counter!("detour_catalog_cache_errors_total", "op" => "write").increment(1);
        }
    }

    /// Writes raw bytes (tests use it to plant garbage).
    pub fn put_raw(&self, key: &str, bytes: &[u8]) {
        let _ = self.db.insert(key, bytes);
    }

    /// Flushes to disk now.
    pub fn flush(&self) {
        let _ = self.db.flush();
    }
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

fn parse_entry((key, raw): &(sled::IVec, sled::IVec)) -> Option<(ServiceName, Cached)> {
    let key = String::from_utf8_lossy(key);
    let Ok(service) = ServiceName::new(key.to_string()) else {
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
/// `every` is written once, in one sled batch, by a background task.
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
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.clone(), bytes);
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
    let batch: Vec<_> = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()))
        .into_iter()
        .collect();
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
        // A path that is not a database is reported, not fatal.
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a db").unwrap();
        assert!(DiskCache::open(&file.join("x")).is_none());
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
