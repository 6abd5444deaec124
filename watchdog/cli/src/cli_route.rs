//! `detourctl route list | set | clear | undo`: the registry's route document
//! (`routes/services`: per service, subsets of its endpoints by version and label, ordered
//! match rules, a weighted default, pinning by header or cookie — docs/routing.md), written
//! with compare-and-swap and an audit record like `gray` and `policy`. `undo` puts back the
//! document as it was before the last route change, when nobody changed it since. Every
//! sidecar applies a change to its next request of the service, and sends it to its SDKs for
//! their direct path. Exit statuses as the other registry commands: 2 bad input, 3 registry
//! unreachable, 4 a concurrent change or nothing to do.

use std::io::Read;
use std::process::ExitCode;

use clap::Subcommand;
use detour_core::route::{RouteDoc, ServiceRoutes};
use detour_proto::ServiceName;
use detour_registry::ROUTES_DOC;
use detour_registry::store::{Doc, Store};

use crate::audit::Actor;
use crate::cli_ops::{RegistryArgs, fail, open};
use crate::ops::OpsError;

/// `detourctl route …`
#[derive(Debug, Subcommand)]
pub enum RouteCmd {
    /// Prints the routes in force.
    List,
    /// Sets one service's routes (replacing its earlier ones).
    Set {
        /// The service.
        #[arg(long)]
        service: String,
        /// Its routes: a JSON object (docs/routing.md), `@FILE` to read it from a file, or `-`
        /// from standard input.
        #[arg(long)]
        routes: String,
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Removes one service's routes, or every one.
    Clear {
        /// The service.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        service: Option<String>,
        /// Every service.
        #[arg(long)]
        all: bool,
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Puts back the routes as they were before the last route change (refused when the
    /// document changed since).
    Undo {
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// What a command does to the document.
#[derive(Debug)]
pub enum Change {
    /// Replaces `service`'s routes.
    Set(ServiceName, ServiceRoutes),
    /// Removes `service`'s entry (every entry when `None`).
    Clear(Option<ServiceName>),
}

/// Reads the document: `None` when absent; an unreadable one is refused, not overwritten
/// blindly, unless the change clears everything.
async fn read(store: &dyn Store) -> Result<(Option<Doc>, Option<RouteDoc>), OpsError> {
    let names = ("route", "detourctl route clear --all");
    crate::audit::read_doc(store, ROUTES_DOC, names, RouteDoc::parse).await
}

/// Applies `change` with compare-and-swap on the document's revision, with its audit record by
/// `actor` in the same write; returns the new document.
pub async fn apply(store: &dyn Store, change: Change, actor: &Actor) -> Result<RouteDoc, OpsError> {
    let (doc, parsed) = match (&change, read(store).await) {
        (Change::Clear(None), Err(_)) => (store.get(ROUTES_DOC).await?, None),
        (_, r) => r?,
    };
    let mut next = parsed.unwrap_or_default();
    next.malformed.clear();
    let command = match change {
        Change::Set(..) => "route set",
        Change::Clear(_) => "route clear",
    };
    match change {
        Change::Set(service, routes) => {
            next.services.insert(service, routes.into());
        }
        Change::Clear(Some(service)) => {
            if next.services.remove(&service).is_none() {
                return Err(OpsError::Refused(format!(
                    "no routes for {service}: nothing to do"
                )));
            }
        }
        Change::Clear(None) => next.services.clear(),
    }
    crate::audit::write_doc(
        store,
        actor,
        command,
        ROUTES_DOC,
        doc.as_ref(),
        next.to_bytes(),
    )
    .await?;
    Ok(next)
}

/// Puts back the document the last route change replaced, if the document is still what that
/// change wrote.
pub async fn undo(store: &dyn Store, actor: &Actor) -> Result<RouteDoc, OpsError> {
    let records = crate::audit::list(store).await?;
    let Some(last) = records.iter().rev().find(|r| r.document == ROUTES_DOC) else {
        return Err(OpsError::Refused("no route change to undo".into()));
    };
    let doc = store.get(ROUTES_DOC).await?;
    let now = doc.as_ref().map(|d| String::from_utf8_lossy(&d.bytes));
    if now.as_deref() != last.after.as_deref() {
        return Err(OpsError::Refused(format!(
            "the routes changed since {} ({}); nothing was undone",
            last.id, last.command
        )));
    }
    let before = last
        .before
        .as_deref()
        .unwrap_or(r#"{"version":1,"services":{}}"#);
    let restored = RouteDoc::parse(before.as_bytes())
        .map_err(|e| OpsError::Refused(format!("the routes before {}: {e}", last.id)))?;
    crate::audit::write_doc(
        store,
        actor,
        "route undo",
        ROUTES_DOC,
        doc.as_ref(),
        before.as_bytes().to_vec(),
    )
    .await?;
    Ok(restored)
}

/// One line per service: its routes as written.
pub fn table(doc: &RouteDoc) -> String {
    if doc.services.is_empty() {
        return "no routes\n".into();
    }
    let mut out = String::new();
    for (service, r) in &doc.services {
        out.push_str(&format!("{service}\t{}\n", r.json));
    }
    for m in &doc.malformed {
        let m = crate::ops_view::printable(&m.to_string()).into_owned();
        out.push_str(&format!("malformed (left out): {m}\n"));
    }
    out
}

/// The routes `arg` gives: JSON, `@FILE` or `-` (standard input).
fn routes_arg(arg: &str) -> Result<ServiceRoutes, OpsError> {
    let text = match arg {
        "-" => {
            let mut s = String::new();
            std::io::stdin()
                .take(1 << 20)
                .read_to_string(&mut s)
                .map_err(|e| OpsError::Malformed(format!("standard input: {e}")))?;
            s
        }
        a if a.starts_with('@') => std::fs::read_to_string(&a[1..])
            .map_err(|e| OpsError::Malformed(format!("{}: {e}", &a[1..])))?,
        a => a.to_owned(),
    };
    ServiceRoutes::parse(&text).map_err(|e| OpsError::Malformed(format!("routes: {e}")))
}

/// Runs `detourctl route CMD`.
pub async fn route(cmd: RouteCmd, reg: RegistryArgs) -> ExitCode {
    let ops = match open(&reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let name = |s: String| ServiceName::new(s).map_err(|e| OpsError::Malformed(e.to_string()));
    let store = ops.store();
    let result = match cmd {
        RouteCmd::List => read(store).await.map(|(_, d)| d.unwrap_or_default()),
        RouteCmd::Set {
            service,
            routes,
            reason,
        } => match name(service).and_then(|s| Ok((s, routes_arg(&routes)?))) {
            Ok((s, r)) => apply(store, Change::Set(s, r), &Actor::current(reason)).await,
            Err(e) => Err(e),
        },
        RouteCmd::Clear {
            service, reason, ..
        } => match service.map(name).transpose() {
            Ok(s) => apply(store, Change::Clear(s), &Actor::current(reason)).await,
            Err(e) => Err(e),
        },
        RouteCmd::Undo { reason } => undo(store, &Actor::current(reason)).await,
    };
    crate::audit::print_doc(result, reg.json, RouteDoc::to_bytes, table)
}
