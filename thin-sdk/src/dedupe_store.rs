//! Where the records of idempotency keys are kept: the [`RecordStore`] seam, a bounded store in
//! memory (one provider process) and a store in a directory (the instances of a service that
//! share it).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use detour_proto::sync::Mutex;

use crate::dedupe::{IdempotencyKey, MAX_RECORD};

/// The records of idempotency keys. `put_first` is the one step that decides which request of a
/// key counts: it stores `record` unless the key has one already.
pub trait RecordStore: Send + Sync + 'static {
    /// The key's record, when stored.
    fn get(&self, key: &IdempotencyKey) -> io::Result<Option<Bytes>>;
    /// Stores `record` for `key` unless the key has a record; returns the key's record and
    /// whether it is `record` (this call stored it).
    fn put_first(&self, key: &IdempotencyKey, record: Bytes) -> io::Result<(Bytes, bool)>;
}

/// Records in this process's memory: at most `capacity` keys and [`MEMORY_STORE_BYTES`] of
/// records, each for `ttl` (the oldest goes first). A repeat that comes later than `ttl`, or
/// after that many newer keys, runs again; so does one the mesh sends to another instance
/// (after this one's provider failed), which a store the instances share ([`DirStore`], a
/// database) prevents.
#[derive(Debug)]
pub struct MemoryStore {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<Memory>,
}

/// The most bytes of records a [`MemoryStore`] holds (keys and records).
pub const MEMORY_STORE_BYTES: usize = 64 << 20;

#[derive(Debug, Default)]
struct Memory {
    records: HashMap<IdempotencyKey, (Bytes, Instant)>,
    order: VecDeque<(IdempotencyKey, Instant)>,
    /// Bytes of the keys and records held.
    bytes: usize,
}

impl Default for MemoryStore {
    /// 100,000 keys for 24 hours.
    fn default() -> Self {
        MemoryStore::new(100_000, Duration::from_secs(24 * 3600))
    }
}

impl MemoryStore {
    /// At most `capacity` keys (at least 1), each kept for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        MemoryStore {
            capacity: capacity.max(1),
            ttl,
            inner: Mutex::default(),
        }
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.inner.lock().records.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Memory {
    /// Drops expired keys, and the oldest while more than `capacity` keys or
    /// [`MEMORY_STORE_BYTES`] are held.
    fn trim(&mut self, now: Instant, ttl: Duration, capacity: usize) {
        while let Some((key, at)) = self.order.front() {
            let full = self.records.len() > capacity || self.bytes > MEMORY_STORE_BYTES;
            if now.duration_since(*at) < ttl && !full {
                break;
            }
            if self.records.get(key).is_some_and(|(_, a)| a == at)
                && let Some((record, _)) = self.records.remove(key)
            {
                self.bytes -= key.as_str().len() + record.len();
            }
            self.order.pop_front();
        }
    }
}

impl RecordStore for MemoryStore {
    fn get(&self, key: &IdempotencyKey) -> io::Result<Option<Bytes>> {
        let mut inner = self.inner.lock();
        inner.trim(Instant::now(), self.ttl, self.capacity);
        Ok(inner.records.get(key).map(|(r, _)| r.clone()))
    }

    fn put_first(&self, key: &IdempotencyKey, record: Bytes) -> io::Result<(Bytes, bool)> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        inner.trim(now, self.ttl, self.capacity);
        if let Some((stored, _)) = inner.records.get(key) {
            return Ok((stored.clone(), false));
        }
        inner.bytes += key.as_str().len() + record.len();
        inner.records.insert(key.clone(), (record.clone(), now));
        inner.order.push_back((key.clone(), now));
        inner.trim(now, self.ttl, self.capacity);
        Ok((record, true))
    }
}

/// Records as files in a directory that every instance of a service shares: one file per key,
/// named by a 128-bit hash of it and holding the key itself (a file of another key is an
/// error, never its record). A record is written to a file of its own and then linked to the
/// key's name, which succeeds for one writer only. Files are not synced to disk: a record
/// outlives its process, not its machine. A thread removes the files older than the store's
/// time to live, every quarter of it, while the store is open. `get` and `put_first` are
/// blocking file operations made on the caller's thread: a few system calls each, meant for a
/// local or memory-backed file system.
#[derive(Debug)]
pub struct DirStore {
    dir: PathBuf,
    /// Ends the sweeping thread when the store is dropped.
    _sweeper: std::sync::mpsc::Sender<()>,
}

impl DirStore {
    /// Over `dir` (made when missing), keeping each record for `ttl` (at least one second).
    pub fn open(dir: impl Into<PathBuf>, ttl: Duration) -> io::Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)?;
        let ttl = ttl.max(Duration::from_secs(1));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let swept = dir.clone();
        std::thread::Builder::new()
            .name("dedupe-sweep".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(ttl / 4)
                {
                    sweep(&swept, ttl);
                }
            })?;
        Ok(DirStore {
            dir,
            _sweeper: stop,
        })
    }

    pub(crate) fn path_of(&self, key: &IdempotencyKey) -> PathBuf {
        self.dir
            .join(format!("{:032x}", fnv1a_128(key.as_str().as_bytes())))
    }

    /// The record in the file at `path`, checked to be `key`'s.
    fn read(path: &std::path::Path, key: &IdempotencyKey) -> io::Result<Option<Bytes>> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.take((MAX_RECORD + crate::dedupe::MAX_IDEMPOTENCY_KEY + 2) as u64)
            .read_to_end(&mut bytes)?;
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", path.display()),
            )
        };
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| bad("no key line"))?;
        if &bytes[..newline] != key.as_str().as_bytes() {
            return Err(bad("the record of another key"));
        }
        Ok(Some(Bytes::from(bytes).slice(newline + 1..)))
    }
}

impl RecordStore for DirStore {
    fn get(&self, key: &IdempotencyKey) -> io::Result<Option<Bytes>> {
        DirStore::read(&self.path_of(key), key)
    }

    fn put_first(&self, key: &IdempotencyKey, record: Bytes) -> io::Result<(Bytes, bool)> {
        let path = self.path_of(key);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(key.as_str().as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(&record)?;
            std::fs::hard_link(&tmp, &path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match written {
            Ok(()) => Ok((record, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let stored = DirStore::read(&path, key)?.ok_or_else(|| {
                    io::Error::other(format!("{}: vanished after it was stored", path.display()))
                })?;
                Ok((stored, false))
            }
            Err(e) => Err(e),
        }
    }
}

/// Removes the files in `dir` last changed more than `ttl` ago (records, and the temporary
/// files of writers that died).
fn sweep(dir: &std::path::Path, ttl: Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = std::time::SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|at| now.duration_since(at).is_ok_and(|age| age > ttl));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// FNV-1a, 128 bits: a file name per key, the same in every process and version.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, b| (h ^ u128::from(*b)).wrapping_mul(PRIME))
}
