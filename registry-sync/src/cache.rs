//! The catalog's second level: every service's last endpoint set on local disk (sled), so a
//! sidecar that starts while the registry is unreachable can route at once. A cache that cannot
//! be opened, or a value that does not parse, is reported and ignored — never fatal.

use std::path::Path;
use std::time::Duration;

use detour_proto::{Endpoint, EndpointSet, ServiceName};
use serde::{Deserialize, Serialize};

/// One cached service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    /// The endpoints.
    pub endpoints: Vec<Endpoint>,
    /// When they were written (ms since the epoch).
    pub written_unix_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Value {
    version: u32,
    #[serde(flatten)]
    cached: Cached,
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
            match sled::Config::new()
                .path(path)
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
        match serde_json::from_slice::<Value>(&raw) {
            Ok(v) if v.version == 1 => Some(v.cached),
            Ok(_) | Err(_) => {
                tracing::warn!(%service, "ignoring a corrupt catalog cache entry");
                metrics::counter!("detour_catalog_cache_errors_total", "op" => "parse")
                    .increment(1);
                None
            }
        }
    }

    /// Writes `service`'s set (sled flushes to disk in the background).
    pub fn put(&self, service: &ServiceName, set: &EndpointSet, now_ms: u64) {
        let v = Value {
            version: 1,
            cached: Cached {
                endpoints: set.endpoints.clone(),
                written_unix_ms: now_ms,
            },
        };
        let Ok(bytes) = serde_json::to_vec(&v) else {
            return;
        };
        if let Err(e) = self.db.insert(service.as_str(), bytes) {
            tracing::warn!(%service, error = %e, "catalog disk cache write failed");
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
        assert_eq!(c.get(&svc).unwrap().endpoints, vec![ep]);
        assert!(c.get(&ServiceName::new("bad").unwrap()).is_none());
        // A path that is not a database is reported, not fatal.
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a db").unwrap();
        assert!(DiskCache::open(&file.join("x")).is_none());
    }
}
