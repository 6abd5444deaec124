//! Carrying out each keyed request once, for providers: the first request with an idempotency
//! key runs and its record is stored; a later one with the same key gets the stored record, and
//! one that arrives while the first still runs in this process waits for it.
//!
//! The mesh sends a request with an `Idempotency-Key` again after an attempt whose outcome is
//! unknown (its sidecar or provider died with it in flight), so a provider that takes keys must
//! answer a repeated key with what the first request did. The record is the provider's own:
//! the bytes it needs to answer again (a status and a body, an order number). Its effect must be
//! made with the record, in one step: the [`RecordStore`] is where it lands.
//!
//! ```no_run
//! # async fn handle(req: http::Request<()>) -> Result<(), detour_thin_sdk::dedupe::DedupeError> {
//! use detour_thin_sdk::dedupe::{Dedupe, IdempotencyKey, MemoryStore};
//! let dedupe = Dedupe::new(MemoryStore::default());
//! if let Some(key) = IdempotencyKey::of(req.headers())? {
//!     let once = dedupe
//!         .once(&key, || async { Ok::<_, std::io::Error>(bytes::Bytes::from("order 7")) })
//!         .await?;
//!     println!("{:?} (replayed: {})", once.record, once.replayed);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use detour_proto::sync::Mutex;
use http::HeaderMap;
use tokio::sync::OnceCell;

pub use crate::dedupe_store::{DirStore, MEMORY_STORE_BYTES, MemoryStore, RecordStore};
pub use detour_core::replay::{IDEMPOTENCY_KEY, MAX_IDEMPOTENCY_KEY};

/// The largest record kept for a key.
pub const MAX_RECORD: usize = 1 << 20;

/// An idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key `s`, when valid.
    pub fn new(s: &str) -> Result<Self, DedupeError> {
        if detour_core::replay::valid_idempotency_key(s.as_bytes()) {
            Ok(IdempotencyKey(s.to_owned()))
        } else {
            Err(DedupeError::BadKey(format!(
                "{:?}: an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters",
                s.chars().take(64).collect::<String>()
            )))
        }
    }

    /// A fresh key (128 random bits in hex), for a caller naming a new operation.
    pub fn random() -> Self {
        IdempotencyKey(format!(
            "{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        ))
    }

    /// The key of a request's headers: `None` without an `Idempotency-Key`; an error when it
    /// is there but not a valid key (given twice, empty, too long, other bytes), which a
    /// provider answers with 400 rather than carry the request out unprotected.
    pub fn of(headers: &HeaderMap) -> Result<Option<Self>, DedupeError> {
        if !headers.contains_key(IDEMPOTENCY_KEY) {
            return Ok(None);
        }
        match detour_core::replay::idempotency_key(headers) {
            Some(k) => Ok(Some(IdempotencyKey(k.to_owned()))),
            None => Err(DedupeError::BadKey(
                "the Idempotency-Key header must be given once, with 1 to 255 visible ASCII \
                 characters"
                    .into(),
            )),
        }
    }

    /// The key as text (a valid header value).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Dedupe::once`] gives: the record of the key, and whether it was stored before this
/// request (the request was not carried out again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Once {
    /// The record the first request with the key stored.
    pub record: Bytes,
    /// True when this request did not run: the key's record was there, or was made by a
    /// request with the same key that ran at the same time.
    pub replayed: bool,
}

/// Why a keyed request could not be carried out or answered.
#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    /// The key is not valid.
    #[error("bad idempotency key: {0}")]
    BadKey(String),
    /// The store failed.
    #[error("idempotency store: {0}")]
    Store(#[from] std::io::Error),
    /// The record is larger than [`MAX_RECORD`].
    #[error("a record of {0} bytes is larger than the {MAX_RECORD} an idempotency key keeps")]
    TooLarge(usize),
    /// The request's own work failed: nothing was stored, the key may run again.
    #[error("{0}")]
    Run(String),
}

/// A key running in this process: its record once made, and whether it was stored before.
type Running = Arc<OnceCell<(Bytes, bool)>>;

/// Carries out each key once over a [`RecordStore`]; cheap to clone.
#[derive(Clone)]
pub struct Dedupe {
    store: Arc<dyn RecordStore>,
    /// Keys running in this process, so a repeat that arrives meanwhile waits for the first.
    running: Arc<Mutex<HashMap<IdempotencyKey, Running>>>,
}

impl std::fmt::Debug for Dedupe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedupe").finish_non_exhaustive()
    }
}

impl Default for Dedupe {
    /// Over a [`MemoryStore`] of its defaults.
    fn default() -> Self {
        Dedupe::new(MemoryStore::default())
    }
}

impl Dedupe {
    /// Over `store`.
    pub fn new(store: impl RecordStore) -> Self {
        Dedupe {
            store: Arc::new(store),
            running: Arc::default(),
        }
    }

    /// The record of `key`: stored already, or made by `run` and stored. `run` is called at
    /// most once per key in this process at a time; when another process sharing the store
    /// stored a record for the key first, that record is the answer and `run`'s is dropped.
    /// When `run` fails nothing is stored, and the key may run again.
    pub async fn once<F, Fut, E>(&self, key: &IdempotencyKey, run: F) -> Result<Once, DedupeError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
        E: std::fmt::Display,
    {
        if let Some(record) = self.store.get(key)? {
            return Ok(Once {
                record,
                replayed: true,
            });
        }
        let held = Held {
            running: &self.running,
            key,
            cell: Some(self.running.lock().entry(key.clone()).or_default().clone()),
        };
        let cell = held.cell.as_ref().expect("held until dropped");
        let ran = AtomicBool::new(false);
        cell.get_or_try_init(|| async {
            ran.store(true, Ordering::Relaxed);
            // Looked up again: the key may have been stored since the first look.
            if let Some(record) = self.store.get(key)? {
                return Ok((record, true));
            }
            let record = run().await.map_err(|e| DedupeError::Run(e.to_string()))?;
            if record.len() > MAX_RECORD {
                return Err(DedupeError::TooLarge(record.len()));
            }
            let (stored, first) = self.store.put_first(key, record)?;
            Ok((stored, !first))
        })
        .await
        .map(|(record, before)| Once {
            record: record.clone(),
            replayed: *before || !ran.load(Ordering::Relaxed),
        })
    }
}

/// One request's hold on its key's running entry. The last request to let go (answered,
/// failed, or dropped with its caller gone) removes the entry: by then the record is in the
/// store, or nobody waits for it.
struct Held<'a> {
    running: &'a Mutex<HashMap<IdempotencyKey, Running>>,
    key: &'a IdempotencyKey,
    cell: Option<Running>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let Some(cell) = self.cell.take() else {
            return;
        };
        let ours = Arc::as_ptr(&cell);
        drop(cell);
        let mut running = self.running.lock();
        if running
            .get(self.key)
            .is_some_and(|c| Arc::as_ptr(c) == ours && Arc::strong_count(c) == 1)
        {
            running.remove(self.key);
        }
    }
}

#[cfg(test)]
#[path = "dedupe_tests.rs"]
mod tests;
