//! Legacy registries mirrored into Detour's: one [`LegacySource`] trait (a full snapshot, kept
//! current by the source's own watches), with adapters for ZooKeeper in Dubbo's layout
//! ([`zk::ZkSource`]) and for a directory registry ([`dirsrc::DirSource`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio::time::Instant;

use async_trait::async_trait;
use detour_proto::{Endpoint, InstanceId, ServiceName};
use tokio::sync::watch;

pub mod dirsrc;
pub mod dubbo;
pub mod zk;
pub mod zk_publish;

/// Every provider a source lists, by service and instance.
pub type Providers = BTreeMap<ServiceName, BTreeMap<InstanceId, Endpoint>>;

/// What a source shows now: the latest full snapshot and whether it can be trusted to be current.
#[derive(Debug, Clone)]
pub struct SourceView {
    /// Whether the source is reachable now (a ZooKeeper session is connected, the directory
    /// reads). While it is not, the snapshot is the last one seen and no deletion follows from it.
    pub connected: bool,
    /// Whether the snapshot is a complete listing (false until the first one finished).
    pub listed: bool,
    /// The providers, already mapped to Detour endpoints (`source = sync:<name>`).
    pub providers: Arc<Providers>,
    /// When the source's change behind each service's current set was observed (the start of
    /// the mirror lag).
    pub observed: Arc<HashMap<ServiceName, Instant>>,
    /// Why the source is not connected, if it is not.
    pub problem: Option<String>,
}

impl Default for SourceView {
    fn default() -> Self {
        Self {
            connected: false,
            listed: false,
            providers: Arc::default(),
            observed: Arc::default(),
            problem: Some("not connected yet".into()),
        }
    }
}

/// A legacy registry: it publishes its full, current snapshot on `out` until the task ends.
#[async_trait]
pub trait LegacySource: Send + Sync + 'static {
    /// Where it reads from, for logs and `/state`.
    fn describe(&self) -> String;

    /// Follows the source for ever, publishing every change on `out`.
    async fn run(self: Box<Self>, out: watch::Sender<SourceView>);
}

/// Why an entry of a legacy registry was skipped (a label of `detour_sync_skipped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The entry does not parse.
    Malformed,
    /// Its protocol is not one Detour can carry.
    Protocol,
    /// It names a service or address Detour cannot use.
    Name,
    /// Its interface lists more providers than the configured limit.
    Limit,
}

impl Skip {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Malformed => "malformed",
            Skip::Protocol => "protocol",
            Skip::Name => "name",
            Skip::Limit => "limit",
        }
    }
}

/// Counts and logs a skipped entry once per distinct entry (up to a bound), so a bad entry
/// re-listed on every change neither floods the log nor inflates the count.
pub(crate) fn report_skip(
    seen: &mut std::collections::HashSet<String>,
    entry: &str,
    why: Skip,
    detail: &str,
) {
    let first = seen.len() >= 10_000 || seen.insert(entry.to_owned());
    if first {
        metrics::counter!("detour_sync_skipped_total", "reason" => why.as_str()).increment(1);
        let shown: String = entry.chars().take(200).collect();
        tracing::warn!(entry = %shown, reason = why.as_str(), %detail, "legacy registry entry skipped");
    }
}
