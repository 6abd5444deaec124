//! The registry documents a process follows (gray rules, traffic policy), kept on local disk so
//! that what an operator decided survives a restart during a registry outage.
//!
//! [`follow`] merges two sources into one [`Followed`] value:
//! - at start, the copy saved in the host's state directory (`{state_dir}/docs/*.json`), used
//!   until the registry answers (`source = disk`);
//! - then the registry's document, which always wins once read (`source = registry`); every
//!   revision the follower accepts (see `accept`) is saved again — written to a temporary file,
//!   fsynced, renamed over the old copy — so the next start has it.
//!
//! With neither (a first start while the registry is unreachable) the document is *unknown*
//! (`source = default`): the process uses its documented defaults and says so in its log, in
//! `detour_document_source` and in `/state`; a follower that must not move on a guess (the
//! watchdog's version rules, the SDK's mesh switches) waits for a known document. A saved copy
//! that cannot be read or does not parse is logged, counted in
//! `detour_state_file_errors_total{file}` and ignored — never fatal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::registry::{DocName, DocRead, DocState, MAX_DOC_BYTES};

/// Where a followed document's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocSource {
    /// Read from the registry.
    Registry,
    /// The copy saved on disk by an earlier run (the registry has not answered yet).
    Disk,
    /// Nothing known: neither the registry nor a saved copy (defaults apply).
    Default,
}

impl DocSource {
    /// Its name in `/state` and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DocSource::Registry => "registry",
            DocSource::Disk => "disk",
            DocSource::Default => "default",
        }
    }

    const ALL: [DocSource; 3] = [DocSource::Registry, DocSource::Disk, DocSource::Default];
}

/// A document as a follower sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    /// Where it came from.
    pub source: DocSource,
    /// The registry revision it came from (0 when unknown or absent).
    pub revision: u64,
    /// Its bytes; `None` when there is no document (or it is unknown).
    pub bytes: Option<Arc<[u8]>>,
}

impl Followed {
    /// Nothing known yet.
    pub fn unknown() -> Followed {
        Followed {
            source: DocSource::Default,
            revision: 0,
            bytes: None,
        }
    }

    /// Whether the content is known (from the registry or a saved copy).
    pub fn known(&self) -> bool {
        self.source != DocSource::Default
    }

    /// What `/state` shows of it.
    pub fn status(&self) -> DocStatus {
        DocStatus {
            source: self.source,
            revision: self.revision,
            present: self.bytes.is_some(),
        }
    }
}

/// A document's provenance, as `/state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocStatus {
    /// `registry`, `disk` or `default`.
    pub source: DocSource,
    /// The registry revision of the content in force.
    pub revision: u64,
    /// Whether there is a document at all (false: none, the defaults apply).
    pub present: bool,
}

/// The saved form of one document.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// Format of this file (1).
    format: u32,
    /// The document's name (its registry key).
    doc: String,
    /// The registry revision it came from.
    revision: u64,
    /// When it was saved (ms since the epoch).
    saved_unix_ms: u64,
    /// The document's text; `None`: the registry had no such document.
    content: Option<String>,
}

/// The documents saved in one state directory.
#[derive(Debug, Clone)]
pub struct DocStore {
    dir: PathBuf,
}

impl DocStore {
    /// The store under `state_dir` (its `docs/` subdirectory, created on the first save).
    pub fn new(state_dir: &Path) -> DocStore {
        DocStore {
            dir: state_dir.join("docs"),
        }
    }

    /// The file `doc` is saved in.
    pub fn path(&self, doc: DocName) -> PathBuf {
        self.dir
            .join(format!("{}.json", doc.key().replace('/', "-")))
    }

    /// The saved copy of `doc`: `None` when there is none or it is unusable (then logged and
    /// counted). `accept` decides whether its content is still a usable document.
    pub fn load(&self, doc: DocName, accept: &dyn Fn(&[u8]) -> bool) -> Option<Followed> {
        let path = self.path(doc);
        let bytes = match crate::dir::read_regular(&path, 2 * MAX_DOC_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return state_file_error(&path, &e.to_string()),
        };
        let saved = match serde_json::from_slice::<Saved>(&bytes) {
            Ok(s) if s.format == 1 && s.doc == doc.key() => s,
            Ok(s) => {
                return state_file_error(
                    &path,
                    &format!("format {} of document {:?}", s.format, s.doc),
                );
            }
            Err(e) => return state_file_error(&path, &e.to_string()),
        };
        let content: Option<Arc<[u8]>> = saved.content.map(|c| Arc::from(c.into_bytes()));
        if let Some(c) = &content
            && !accept(c)
        {
            return state_file_error(&path, "the saved document does not parse");
        }
        Some(Followed {
            source: DocSource::Disk,
            revision: saved.revision,
            bytes: content,
        })
    }

    /// Saves `doc` (write, fsync, rename). A document that is not UTF-8 text is not saved.
    pub fn save(&self, doc: DocName, revision: u64, bytes: Option<&[u8]>) -> std::io::Result<()> {
        let content = match bytes {
            None => None,
            Some(b) => Some(
                std::str::from_utf8(b)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
                    .to_owned(),
            ),
        };
        let saved = Saved {
            format: 1,
            doc: doc.key().to_owned(),
            revision,
            saved_unix_ms: crate::now_unix_ms(),
            content,
        };
        std::fs::create_dir_all(&self.dir)?;
        let out = serde_json::to_vec_pretty(&saved).map_err(std::io::Error::other)?;
        detour_proto::files::write_atomic(&self.path(doc), &out, 0o600)
    }
}

/// Reports a state file that cannot be used; always `None`.
pub fn state_file_error<T>(path: &Path, why: &str) -> Option<T> {
    tracing::warn!(file = %path.display(), error = why, "ignoring an unusable state file");
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    metrics::counter!("detour_state_file_errors_total", "file" => file).increment(1);
    None
}

fn set_source_gauge(doc: DocName, source: DocSource) {
    for s in DocSource::ALL {
        metrics::gauge!("detour_document_source", "document" => doc.key(), "source" => s.as_str())
            .set(if s == source { 1.0 } else { 0.0 });
    }
}

/// Calls `apply` with the followed document now and after every change, for as long as `doc`
/// lives.
pub fn apply_each(
    mut doc: watch::Receiver<Followed>,
    apply: impl Fn(&Followed) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let next = doc.borrow_and_update().clone();
            apply(&next);
            if doc.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Follows `doc`: the registry's watch `registry`, with the saved copy in `store` before the
/// registry answers. `accept` tells whether bytes are a document the follower can use: only
/// those are saved (a malformed document from the registry never replaces a good saved one).
/// The task ends when the registry's sender does.
pub fn follow(
    doc: DocName,
    mut registry: watch::Receiver<DocState>,
    store: Option<DocStore>,
    accept: fn(&[u8]) -> bool,
) -> (watch::Receiver<Followed>, tokio::task::JoinHandle<()>) {
    let saved = store.as_ref().and_then(|s| s.load(doc, &accept));
    let start = first(doc, &registry.borrow_and_update(), saved);
    set_source_gauge(doc, start.source);
    let mut last_saved =
        (start.source == DocSource::Disk).then(|| (start.revision, start.bytes.clone()));
    let (tx, rx) = watch::channel(start);
    let task = tokio::spawn(async move {
        loop {
            let state = registry.borrow_and_update().clone();
            if let DocState::Known(read) = state {
                let next = Followed {
                    source: DocSource::Registry,
                    revision: read.revision,
                    bytes: read.bytes.clone(),
                };
                if tx.borrow().source != DocSource::Registry {
                    tracing::info!(
                        document = doc.key(),
                        revision = read.revision,
                        "document read from the registry"
                    );
                    set_source_gauge(doc, DocSource::Registry);
                }
                tx.send_if_modified(|cur| {
                    let changed = *cur != next;
                    *cur = next;
                    changed
                });
                let usable = read.bytes.as_deref().is_none_or(accept);
                if let Some(store) = &store
                    && usable
                {
                    save(store, doc, read, &mut last_saved).await;
                }
            }
            if registry.changed().await.is_err() {
                return;
            }
        }
    });
    (rx, task)
}

/// The document to start from: the registry's when it has been read, else the saved copy,
/// else none (its defaults apply).
fn first(doc: DocName, registry: &DocState, saved: Option<Followed>) -> Followed {
    match (registry, saved) {
        (DocState::Known(read), _) => Followed {
            source: DocSource::Registry,
            revision: read.revision,
            bytes: read.bytes.clone(),
        },
        (DocState::Unknown, Some(saved)) => {
            tracing::info!(
                document = doc.key(),
                revision = saved.revision,
                "registry not read yet: using the saved copy of the document"
            );
            saved
        }
        (DocState::Unknown, None) => {
            tracing::warn!(
                document = doc.key(),
                "registry not read yet and no saved copy of the document: its defaults apply until the registry answers"
            );
            Followed::unknown()
        }
    }
}

/// Saves `read` to `store` unless it is the copy saved last (a failure is logged and counted).
async fn save(
    store: &DocStore,
    doc: DocName,
    read: DocRead,
    last_saved: &mut Option<(u64, Option<Arc<[u8]>>)>,
) {
    let pair = (read.revision, read.bytes.clone());
    if last_saved.as_ref() == Some(&pair) {
        return;
    }
    let s = store.clone();
    let written =
        tokio::task::spawn_blocking(move || s.save(doc, read.revision, read.bytes.as_deref()))
            .await;
    match written {
        Ok(Ok(())) => *last_saved = Some(pair),
        Ok(Err(e)) => {
            tracing::warn!(document = doc.key(), error = %e, "cannot save the document to the state directory");
            metrics::counter!("detour_state_file_errors_total", "file" => doc.key()).increment(1);
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::DocRead;

    fn any(_: &[u8]) -> bool {
        true
    }

    fn json(b: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    }

    fn known(bytes: Option<&[u8]>, revision: u64) -> DocState {
        DocState::Known(DocRead {
            bytes: bytes.map(Arc::from),
            revision,
        })
    }

    async fn wait_for(rx: &mut watch::Receiver<Followed>, f: impl Fn(&Followed) -> bool) {
        tokio::time::timeout(std::time::Duration::from_secs(5), rx.wait_for(|v| f(v)))
            .await
            .expect("in time")
            .expect("open");
    }

    #[tokio::test]
    async fn saved_copy_until_the_registry_answers_then_the_registry_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = DocStore::new(dir.path());
        let (reg, rx) = watch::channel(DocState::Unknown);
        // Nothing saved, nothing read: unknown.
        let (mut f, task) = follow(DocName::GrayRules, rx, Some(store.clone()), json);
        assert!(!f.borrow().known());
        reg.send_replace(known(Some(b"{\"a\":1}"), 5));
        wait_for(&mut f, |v| {
            v.source == DocSource::Registry && v.revision == 5
        })
        .await;
        // It is saved: wait for the file.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while store.load(DocName::GrayRules, &any).is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        // A malformed document from the registry is followed but never saved.
        reg.send_replace(known(Some(b"{oops"), 6));
        wait_for(&mut f, |v| v.revision == 6).await;
        drop(reg);
        let _ = task.await;
        let back = store.load(DocName::GrayRules, &json).unwrap();
        assert_eq!(back.revision, 5);
        assert_eq!(back.bytes.as_deref(), Some(&b"{\"a\":1}"[..]));
        // A new start with the registry silent uses the saved copy.
        let (_reg, rx) = watch::channel(DocState::Unknown);
        let (f, _task) = follow(DocName::GrayRules, rx, Some(store.clone()), json);
        assert_eq!(f.borrow().source, DocSource::Disk);
        assert_eq!(f.borrow().revision, 5);
        // "No document" is a known state, saved as such.
        let (reg, rx) = watch::channel(known(None, 9));
        let (f, task) = follow(DocName::GrayRules, rx, Some(store.clone()), json);
        assert!(f.borrow().known() && f.borrow().bytes.is_none());
        drop(reg);
        let _ = task.await;
        let none = store.load(DocName::GrayRules, &json).unwrap();
        assert_eq!((none.revision, none.bytes), (9, None));
    }

    #[test]
    fn corrupt_or_foreign_saved_copies_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = DocStore::new(dir.path());
        std::fs::create_dir_all(dir.path().join("docs")).unwrap();
        let path = store.path(DocName::Policy);
        for garbage in [
            &b"{not json"[..],
            br#"{"format":7,"doc":"policy/services","revision":1,"saved_unix_ms":1,"content":null}"#,
            br#"{"format":1,"doc":"gray/rules","revision":1,"saved_unix_ms":1,"content":null}"#,
            br#"{"format":1,"doc":"policy/services","revision":1,"saved_unix_ms":1,"content":"{no"}"#,
        ] {
            std::fs::write(&path, garbage).unwrap();
            assert!(store.load(DocName::Policy, &json).is_none(), "{garbage:?}");
        }
        // A directory where the file should be is not fatal either.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(store.load(DocName::Policy, &json).is_none());
    }
}
