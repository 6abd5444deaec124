//! The audit trail of operator changes. Every command that writes a steering document — `gray
//! set | clear`, `rollback` and its `--undo`, `policy set | clear`, `route set | clear | undo` — adds one record under
//! `audit/{id}` in the same compare-and-swap write as the change (both or neither), and the
//! record is created only if its key is absent: no command ever rewrites one. A record says who
//! (the OS user), when, why (`--reason`), which command, and the document before and after.
//! `detourctl history` lists them, oldest first.

use detour_registry::now_unix_ms;
use detour_registry::store::{Doc, Expect, Store, Write};
use serde::{Deserialize, Serialize};

use crate::ops::OpsError;

/// Where the records live, under the registry's prefix.
pub const AUDIT_PREFIX: &str = "audit/";

/// Who makes a change, and why.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    /// The OS user running the command.
    pub user: String,
    /// Why, in the operator's words (may be empty).
    pub reason: String,
}

impl Actor {
    /// The user running this process, with `reason`.
    pub fn current(reason: impl Into<String>) -> Actor {
        Actor {
            user: crate::ops::os_user(),
            reason: reason.into(),
        }
    }
}

/// One change, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Format (1).
    pub version: u32,
    /// Sortable id: `au-{unix ms}-{hex}`.
    pub id: String,
    /// When.
    pub at_unix_ms: u64,
    /// Who.
    pub user: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// The command: `gray set`, `gray clear`, `rollback`, `rollback undo`, `policy set`,
    /// `policy clear`, `route set`, `route clear`, `route undo`.
    pub command: String,
    /// The document it wrote (`gray/rules`, `policy/services`, `routes/services`).
    pub document: String,
    /// The document before (`None`: there was none).
    pub before: Option<String>,
    /// The document after.
    pub after: Option<String>,
}

/// The write that records `command` on `document` (from `before` to `after`) by `actor`; it
/// goes in the same transaction as the change.
pub fn record(
    actor: &Actor,
    command: &str,
    document: &str,
    before: Option<&[u8]>,
    after: Option<&[u8]>,
) -> Result<(AuditRecord, Write), OpsError> {
    let at = record_time();
    let id = format!("au-{at:013}-{:04x}", fastrand::u16(..));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let rec = AuditRecord {
        version: 1,
        id: id.clone(),
        at_unix_ms: at,
        user: actor.user.clone(),
        reason: actor.reason.clone(),
        command: command.to_owned(),
        document: document.to_owned(),
        before: before.map(text),
        after: after.map(text),
    };
    let bytes = serde_json::to_vec(&rec).map_err(|e| OpsError::Malformed(e.to_string()))?;
    Ok((
        rec,
        Write {
            key: format!("{AUDIT_PREFIX}{id}"),
            bytes,
            expect: Expect::Absent,
        },
    ))
}

/// Reads document `key` and parses it with `parse`: `None` when absent; an unreadable one is
/// refused (`what` names it, `clear` the command that replaces it), not overwritten blindly.
pub async fn read_doc<T, E: std::fmt::Display>(
    store: &dyn Store,
    key: &str,
    (what, clear): (&str, &str),
    parse: impl Fn(&[u8]) -> Result<T, E>,
) -> Result<(Option<Doc>, Option<T>), OpsError> {
    let doc = store.get(key).await?;
    let parsed = match &doc {
        None => None,
        Some(d) => Some(parse(&d.bytes).map_err(|e| {
            OpsError::Refused(format!(
                "the {what} document in the registry is unreadable ({e}); every sidecar keeps its last good {what} — replace it with `{clear}`"
            ))
        })?),
    };
    Ok((doc, parsed))
}

/// What a document command prints: the document (`json`) or its table, or the error.
pub fn print_doc<T>(
    result: Result<T, OpsError>,
    json: bool,
    bytes: impl Fn(&T) -> Vec<u8>,
    table: impl Fn(&T) -> String,
) -> std::process::ExitCode {
    match result {
        Ok(doc) if json => {
            let text = String::from_utf8_lossy(&bytes(&doc)).into_owned();
            println!("{}", crate::ops_view::terminal_safe(&text));
            std::process::ExitCode::SUCCESS
        }
        Ok(doc) => {
            print!("{}", crate::ops_view::terminal_safe(&table(&doc)));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => crate::cli_ops::fail(&e),
    }
}

/// Writes `bytes` as document `key` with compare-and-swap on `was` (its revision as read;
/// `None`: it must still be absent), with `actor`'s audit record of `command` in the same write.
pub async fn write_doc(
    store: &dyn Store,
    actor: &Actor,
    command: &str,
    key: &str,
    was: Option<&Doc>,
    bytes: Vec<u8>,
) -> Result<(), OpsError> {
    let expect = was.map_or(Expect::Absent, |d| Expect::Revision(d.revision));
    let (_, trail) = record(
        actor,
        command,
        key,
        was.map(|d| d.bytes.as_slice()),
        Some(&bytes),
    )?;
    let change = Write {
        key: key.into(),
        bytes,
        expect,
    };
    store.put_all(vec![change, trail]).await?;
    Ok(())
}

/// The time of a new record, in ms: the clock, but later than the last record this process
/// made, so that two changes within one millisecond are listed in the order they were made.
fn record_time() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_unix_ms();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let at = now.max(last + 1);
        match LAST.compare_exchange_weak(last, at, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return at,
            Err(seen) => last = seen,
        }
    }
}

/// Every record, oldest first (one that does not parse is left out and counted).
pub async fn list(store: &dyn Store) -> Result<Vec<AuditRecord>, OpsError> {
    let mut out: Vec<AuditRecord> = store
        .list(AUDIT_PREFIX)
        .await?
        .values()
        .filter_map(|b| match serde_json::from_slice::<AuditRecord>(b) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "leaving out an unreadable audit record");
                None
            }
        })
        .collect();
    out.sort_by(|a, b| (a.at_unix_ms, &a.id).cmp(&(b.at_unix_ms, &b.id)));
    Ok(out)
}

/// One line of `detourctl history`.
pub fn line(r: &AuditRecord) -> String {
    let reason = if r.reason.is_empty() {
        String::new()
    } else {
        format!(" reason={:?}", r.reason)
    };
    use crate::ops_view::printable;
    format!(
        "{}\t{}\t{}\t{}\t{}{}",
        printable(&r.id),
        crate::ops_view::utc(r.at_unix_ms),
        printable(&r.user),
        printable(&r.command),
        printable(&r.document),
        printable(&reason)
    )
}
