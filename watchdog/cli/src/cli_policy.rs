//! `detourctl policy list | set | clear`: the registry's traffic policy document
//! (`policy/services`: timeouts, retry budget, outlier ejection, in-flight limit per endpoint,
//! the PAs' rate limits), per service, written with compare-and-swap so that two operators do not
//! lose each other's change. Every sidecar applies a change to its next request of the service.
//! Exit statuses as the other registry commands: 2 bad input, 3 registry unreachable, 4 a
//! concurrent change.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use detour_proto::ServiceName;
use detour_registry::POLICY_DOC;
use detour_registry::policy::{PolicyDoc, PolicyOverride};
use detour_registry::store::{Doc, Store};

use crate::audit::Actor;

use crate::cli_ops::{RegistryArgs, fail, open};
use crate::ops::OpsError;

/// `detourctl policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Prints the overrides in force.
    List,
    /// Sets keys of one service's overrides (the keys not given keep their value).
    Set {
        /// The service.
        #[arg(long)]
        service: String,
        #[command(flatten)]
        keys: PolicyKeys,
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Removes one service's overrides, or every one.
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
}

/// The keys of one service's overrides (see the sidecar's `[policy.service.NAME]`).
#[derive(Debug, Args)]
pub struct PolicyKeys {
    /// Time for the response head over every attempt (ms).
    #[arg(long)]
    request_timeout_ms: Option<u64>,
    /// Time for one attempt's response head (ms; 0: only the request timeout).
    #[arg(long)]
    try_timeout_ms: Option<u64>,
    /// Time to open a connection (ms).
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    /// Resends allowed per request (0–1).
    #[arg(long)]
    retry_budget_ratio: Option<f64>,
    /// Resends allowed per second whatever the traffic.
    #[arg(long)]
    retry_min_per_second: Option<u32>,
    /// Server errors in a row that eject an endpoint (0: off).
    #[arg(long)]
    outlier_consecutive_5xx: Option<u32>,
    /// The first outlier ejection's length (ms).
    #[arg(long)]
    outlier_base_ejection_ms: Option<u64>,
    /// Most endpoints ejected as outliers at once (percent).
    #[arg(long)]
    outlier_max_ejected_percent: Option<u8>,
    /// Below this share of endpoints not ejected (percent), every endpoint is used.
    #[arg(long)]
    outlier_panic_threshold_percent: Option<u8>,
    /// Most requests in flight from one sidecar to one endpoint (0: no limit).
    #[arg(long)]
    max_concurrent_per_endpoint: Option<u32>,
    /// Most requests a second each PA hands its provider (0: no limit).
    #[arg(long)]
    rate_limit_rps: Option<u32>,
    /// Requests allowed at once above that rate.
    #[arg(long)]
    rate_limit_burst: Option<u32>,
    /// `deny`: nothing reaches the service except through a PA (no path that skips it, even
    /// when the PA is unreachable); `allow`: what each provider registered.
    #[arg(long, value_parser = ["allow", "deny"])]
    direct: Option<String>,
}

impl PolicyKeys {
    fn into_override(self) -> PolicyOverride {
        PolicyOverride {
            request_timeout_ms: self.request_timeout_ms,
            try_timeout_ms: self.try_timeout_ms,
            connect_timeout_ms: self.connect_timeout_ms,
            retry_budget_ratio: self.retry_budget_ratio,
            retry_min_per_second: self.retry_min_per_second,
            outlier_consecutive_5xx: self.outlier_consecutive_5xx,
            outlier_base_ejection_ms: self.outlier_base_ejection_ms,
            outlier_max_ejected_percent: self.outlier_max_ejected_percent,
            outlier_panic_threshold_percent: self.outlier_panic_threshold_percent,
            max_concurrent_per_endpoint: self.max_concurrent_per_endpoint,
            rate_limit_rps: self.rate_limit_rps,
            rate_limit_burst: self.rate_limit_burst,
            direct: self.direct.as_deref().map(|d| {
                if d == "deny" {
                    detour_registry::policy::Direct::Deny
                } else {
                    detour_registry::policy::Direct::Allow
                }
            }),
        }
    }
}

/// What a command does to the document.
#[derive(Debug)]
pub enum Change {
    /// `service`'s keys over its current ones.
    Set(ServiceName, PolicyOverride),
    /// Removes `service`'s entry (every entry when `None`).
    Clear(Option<ServiceName>),
}

/// Reads the document: `None` when absent; an unreadable one is refused, not overwritten
/// blindly, unless the change clears everything.
async fn read(store: &dyn Store) -> Result<(Option<Doc>, Option<PolicyDoc>), OpsError> {
    let names = ("policy", "detourctl policy clear --all");
    crate::audit::read_doc(store, POLICY_DOC, names, PolicyDoc::parse).await
}

/// Applies `change` with compare-and-swap on the document's revision, with its audit record by
/// `actor` in the same write; returns the new document.
pub async fn apply(
    store: &dyn Store,
    change: Change,
    actor: &Actor,
) -> Result<PolicyDoc, OpsError> {
    let (doc, parsed) = match (&change, read(store).await) {
        (Change::Clear(None), Err(_)) => (store.get(POLICY_DOC).await?, None),
        (_, r) => r?,
    };
    let mut next = parsed.unwrap_or_default();
    next.malformed.clear();
    let command = match change {
        Change::Set(..) => "policy set",
        Change::Clear(_) => "policy clear",
    };
    match change {
        Change::Set(service, o) => {
            let merged = next
                .services
                .get(&service)
                .cloned()
                .unwrap_or_default()
                .then(&o);
            let problems = merged.problems(service.as_str());
            if !problems.is_empty() {
                return Err(OpsError::Malformed(problems.join("; ")));
            }
            next.services.insert(service, merged);
        }
        Change::Clear(Some(service)) => {
            if next.services.remove(&service).is_none() {
                return Err(OpsError::Refused(format!(
                    "no policy override for {service}: nothing to do"
                )));
            }
        }
        Change::Clear(None) => next.services.clear(),
    }
    crate::audit::write_doc(
        store,
        actor,
        command,
        POLICY_DOC,
        doc.as_ref(),
        next.to_bytes(),
    )
    .await?;
    Ok(next)
}

/// One line per service: its overrides as `key=value`.
pub fn table(doc: &PolicyDoc) -> String {
    if doc.services.is_empty() {
        return "no policy overrides\n".into();
    }
    let mut out = String::new();
    for (service, o) in &doc.services {
        let value = serde_json::to_value(o).unwrap_or_default();
        let keys: Vec<String> = value
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
            .unwrap_or_default();
        out.push_str(&format!("{service}\t{}\n", keys.join(" ")));
    }
    for m in &doc.malformed {
        let m = crate::ops_view::printable(&m.to_string()).into_owned();
        out.push_str(&format!("malformed (left out): {m}\n"));
    }
    out
}

/// Runs `detourctl policy CMD`.
pub async fn policy(cmd: PolicyCmd, reg: RegistryArgs) -> ExitCode {
    let ops = match open(&reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let name = |s: String| ServiceName::new(s).map_err(|e| OpsError::Malformed(e.to_string()));
    let result = match cmd {
        PolicyCmd::List => read(ops.store()).await.map(|(_, d)| d.unwrap_or_default()),
        PolicyCmd::Set {
            service,
            keys,
            reason,
        } => match name(service) {
            Ok(s) => {
                let actor = Actor::current(reason);
                apply(ops.store(), Change::Set(s, keys.into_override()), &actor).await
            }
            Err(e) => Err(e),
        },
        PolicyCmd::Clear {
            service, reason, ..
        } => match service.map(name).transpose() {
            Ok(s) => apply(ops.store(), Change::Clear(s), &Actor::current(reason)).await,
            Err(e) => Err(e),
        },
    };
    crate::audit::print_doc(result, reg.json, PolicyDoc::to_bytes, table)
}
