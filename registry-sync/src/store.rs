//! The registry as the operator's CLI sees it: every host and service, and the shared documents
//! (the gray rules, the rollback records) read and written with compare-and-swap, so that an
//! operator never overwrites a change they have not seen. Not bound to a host or a lease: what
//! it writes stays until it is written again.
//!
//! Documents live at `{prefix}/{key}` in etcd and at `{dir}/{key}.json` in the directory
//! registry (written with write + rename, under a lock file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use detour_proto::{Endpoint, HostStatus, ServiceName};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::etcd::{EndpointValue, HostValue};
use crate::members::Members;
use crate::registry::{MAX_DOC_BYTES, RegistryError, RegistrySpec};

/// A document and its revision (what a compare-and-swap compares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its revision.
    pub revision: u64,
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Anything.
    Any,
    /// No document.
    Absent,
    /// The document at this revision.
    Revision(u64),
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The registry could not be reached or written.
    #[error("{0}")]
    Unavailable(#[from] RegistryError),
    /// The document changed since it was read.
    #[error("{key} changed since it was read (someone else wrote it); nothing was written")]
    Conflict {
        /// The document.
        key: String,
    },
    /// The document is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// One write of [`Store::put_all`].
#[derive(Debug, Clone)]
pub struct Write {
    /// The document.
    pub key: String,
    /// Its new bytes.
    pub bytes: Vec<u8>,
    /// What it must be now.
    pub expect: Expect,
}

/// The registry for the operator.
#[async_trait]
pub trait Store: Send + Sync {
    /// One document, if it exists.
    async fn get(&self, key: &str) -> Result<Option<Doc>, StoreError>;
    /// Writes every document if each is as its `expect` says, or none (a conflict).
    async fn put_all(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Writes one document if it is as `expect` says.
    async fn put(&self, key: &str, bytes: Vec<u8>, expect: Expect) -> Result<(), StoreError> {
        self.put_all(vec![Write {
            key: key.to_owned(),
            bytes,
            expect,
        }])
        .await
    }
    /// Every document under `prefix` (`rollback/`), by key.
    async fn list(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError>;
    /// Every live host's status.
    async fn hosts(&self) -> Result<Vec<HostStatus>, StoreError>;
    /// Every service's live endpoints.
    async fn services(&self) -> Result<BTreeMap<ServiceName, Vec<Endpoint>>, StoreError>;
}

/// Opens the store of `spec` (etcd keys under `etcd_prefix`, reached with `security`).
pub fn open(
    spec: &RegistrySpec,
    etcd_prefix: &str,
    timeout: Duration,
    security: crate::etcd_security::EtcdSecurity,
) -> Box<dyn Store> {
    match spec {
        RegistrySpec::Dir(dir) => Box::new(DirStore { dir: dir.clone() }),
        RegistrySpec::Etcd(urls) => Box::new(EtcdStore {
            members: Members::new(urls.clone(), timeout, security),
            prefix: etcd_prefix.trim_end_matches('/').to_owned(),
        }),
    }
}

/// A stable revision of bytes (FNV-1a), for the directory store.
pub(crate) fn revision_of(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h.max(1)
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.split('/').all(|part| {
            !part.is_empty()
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{key:?} is not a document key"
        )))
    }
}

/// The directory registry's documents.
struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The registry directory must exist: a missing one is an unreachable registry, not an
    /// empty one (a typo in `--registry` must not pass for "no rules").
    fn reachable(&self) -> Result<(), StoreError> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(self.io(std::io::Error::other("not a directory"))),
            Err(e) => Err(self.io(e)),
        }
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::Unavailable(RegistryError::Unavailable {
            backend: format!("dir:{}", self.dir.display()),
            source: e,
        })
    }
}

/// Reads a document file: regular, at most [`MAX_DOC_BYTES`].
fn read_doc(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_file() || meta.len() > MAX_DOC_BYTES {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file of at most {MAX_DOC_BYTES} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map(Some)
}

#[async_trait]
impl Store for DirStore {
    async fn get(&self, key: &str) -> Result<Option<Doc>, StoreError> {
        check_key(key)?;
        self.reachable()?;
        let bytes = read_doc(&self.path(key)).map_err(|e| self.io(e))?;
        Ok(bytes.map(|bytes| Doc {
            revision: revision_of(&bytes),
            bytes,
        }))
    }

    async fn put_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        for w in &writes {
            check_key(&w.key)?;
        }
        self.reachable()?;
        // One writer at a time: the lock is held while the documents are compared and replaced.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".docs.lock"))
            .map_err(|e| self.io(e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io(e.into()))?;
        for w in &writes {
            let current = read_doc(&self.path(&w.key)).map_err(|e| self.io(e))?;
            let matches = match (w.expect, &current) {
                (Expect::Any, _) | (Expect::Absent, None) => true,
                (Expect::Revision(r), Some(b)) => revision_of(b) == r,
                _ => false,
            };
            if !matches {
                return Err(StoreError::Conflict { key: w.key.clone() });
            }
        }
        for w in &writes {
            let path = self.path(&w.key);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| self.io(e))?;
            }
            let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
            std::fs::write(&tmp, &w.bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| self.io(e))?;
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        self.reachable()?;
        let dir = self.dir.join(prefix.trim_end_matches('/'));
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io(e)),
        };
        let mut out = BTreeMap::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if let Ok(Some(bytes)) = read_doc(&entry.path()) {
                out.insert(format!("{}/{stem}", prefix.trim_end_matches('/')), bytes);
            }
        }
        Ok(out)
    }

    async fn hosts(&self) -> Result<Vec<HostStatus>, StoreError> {
        let view = crate::dir::read_records(&self.dir, |_, _, _| {}).map_err(|e| self.io(e))?;
        let mut hosts: Vec<HostStatus> = view.hosts.into_values().collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(hosts)
    }

    async fn services(&self) -> Result<BTreeMap<ServiceName, Vec<Endpoint>>, StoreError> {
        let view = crate::dir::read_records(&self.dir, |_, _, _| {}).map_err(|e| self.io(e))?;
        Ok(view
            .services
            .into_iter()
            .map(|(k, v)| (k, v.endpoints))
            .collect())
    }
}

/// An etcd cluster's documents.
struct EtcdStore {
    members: Members,
    prefix: String,
}

impl EtcdStore {
    fn key(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }

    async fn range(&self, sub: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = self.key(sub);
        let resp = self
            .members
            .call("list", |mut c| {
                let start = start.clone();
                async move { c.get(start, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Doc>, StoreError> {
        check_key(key)?;
        let k = self.key(key);
        let resp = self
            .members
            .call("get", |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Doc {
            bytes: kv.value().to_vec(),
            revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
        }))
    }

    async fn put_all(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut compare = Vec::new();
        let mut ops = Vec::new();
        for w in &writes {
            check_key(&w.key)?;
            let k = self.key(&w.key);
            match w.expect {
                Expect::Any => {}
                Expect::Absent => {
                    compare.push(Compare::create_revision(k.clone(), CompareOp::Equal, 0));
                }
                Expect::Revision(r) => compare.push(Compare::mod_revision(
                    k.clone(),
                    CompareOp::Equal,
                    i64::try_from(r).unwrap_or(i64::MAX),
                )),
            }
            ops.push(TxnOp::put(k, w.bytes.clone(), None));
        }
        let resp = self
            .members
            .call("put", |mut c| {
                let txn = Txn::new().when(compare.clone()).and_then(ops.clone());
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            let keys: Vec<&str> = writes.iter().map(|w| w.key.as_str()).collect();
            Err(StoreError::Conflict {
                key: keys.join(", "),
            })
        }
    }

    async fn list(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let strip = format!("{}/", self.prefix);
        Ok(self
            .range(prefix)
            .await?
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&strip)?.to_owned(), v)))
            .collect())
    }

    async fn hosts(&self) -> Result<Vec<HostStatus>, StoreError> {
        let mut hosts: Vec<HostStatus> = self
            .range("hosts/")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<HostValue>(&v).ok())
            .filter(|v| v.version == 1)
            .map(|v| v.status)
            .collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(hosts)
    }

    async fn services(&self) -> Result<BTreeMap<ServiceName, Vec<Endpoint>>, StoreError> {
        let mut out: BTreeMap<ServiceName, Vec<Endpoint>> = BTreeMap::new();
        for (_, v) in self.range("services/").await? {
            if let Ok(v) = serde_json::from_slice::<EndpointValue>(&v)
                && v.version == 1
            {
                out.entry(v.endpoint.service.clone())
                    .or_default()
                    .push(v.endpoint);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn documents_are_compared_before_they_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(
            &RegistrySpec::Dir(dir.path().to_owned()),
            "/detour/v1",
            Duration::from_secs(1),
            Default::default(),
        );
        assert!(store.get("gray/rules").await.unwrap().is_none());
        store
            .put("gray/rules", b"one".to_vec(), Expect::Absent)
            .await
            .unwrap();
        let doc = store.get("gray/rules").await.unwrap().unwrap();
        assert_eq!(doc.bytes, b"one");
        let err = store
            .put("gray/rules", b"x".to_vec(), Expect::Absent)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        store
            .put(
                "gray/rules",
                b"two".to_vec(),
                Expect::Revision(doc.revision),
            )
            .await
            .unwrap();
        let err = store
            .put(
                "gray/rules",
                b"three".to_vec(),
                Expect::Revision(doc.revision),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { .. }),
            "a stale revision"
        );
        assert_eq!(
            store.get("gray/rules").await.unwrap().unwrap().bytes,
            b"two"
        );
        for bad in ["", "../x", "a//b", "a b"] {
            assert!(store.get(bad).await.is_err(), "{bad:?}");
        }
        store
            .put("rollback/1", b"r1".to_vec(), Expect::Absent)
            .await
            .unwrap();
        let listed = store.list("rollback/").await.unwrap();
        assert_eq!(listed.keys().collect::<Vec<_>>(), ["rollback/1"]);
    }
}
