//! The mirror's target: etcd, where one replica at a time is elected (a lease-guarded key) and
//! every write is fenced by that election, so a replica that lost it can no longer write.
//!
//! Keys: `{prefix}/sync/{name}/leader` (the elected replica's id, on its election lease) and the
//! service entries `{prefix}/services/{service}/{instance}` (on the leader's data lease). Every
//! write is a transaction that holds only while the leader key is the one this replica created,
//! and while the entry is still as this replica last saw it.

use std::time::Duration;

use async_trait::async_trait;
use detour_proto::{Endpoint, InstanceId, ServiceName, Source};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::plan::{Current, Held, Key, Op};
use detour_registry::RegistryError;
use detour_registry::etcd::EndpointValue;
use detour_registry::members::Members;

/// A target operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target could not be reached.
    #[error(transparent)]
    Unavailable(#[from] RegistryError),
    /// This replica is no longer the elected one; it must stop writing.
    #[error("no longer the elected replica")]
    NotLeader,
}

/// The outcome of a campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// Elected; writes are fenced with this revision.
    Won {
        /// The leader key's creation revision.
        fence: i64,
    },
    /// Another replica leads.
    Lost {
        /// Its id.
        leader: String,
    },
}

/// What became of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Written (created or updated) at this revision.
    Written(i64),
    /// Deleted.
    Deleted,
    /// The entry was not as expected (changed by someone else meanwhile): left alone.
    Stale,
}

/// The seam between the mirror and its target store.
#[async_trait]
pub trait Target: Send + Sync + 'static {
    /// Grants a lease of `ttl`.
    async fn grant(&self, ttl: Duration) -> Result<i64, TargetError>;
    /// Keeps a lease alive once; `false` when it has expired.
    async fn keep_alive(&self, lease: i64) -> Result<bool, TargetError>;
    /// Revokes a lease (what is attached to it goes).
    async fn revoke(&self, lease: i64) -> Result<(), TargetError>;
    /// Tries to become the elected replica, holding the election on `lease`.
    async fn campaign(&self, replica: &str, lease: i64) -> Result<Campaign, TargetError>;
    /// Lists the service entries: ours (`source = sync:<name>`) and everybody else's keys.
    async fn list(&self) -> Result<Current, TargetError>;
    /// Applies `ops` under the election `fence`, attaching entries to `lease`.
    async fn apply(
        &self,
        fence: i64,
        lease: i64,
        ops: &[Op],
    ) -> Result<Vec<(Key, Outcome)>, TargetError>;
}

/// Writes per transaction (etcd allows 128 operations by default; each write carries a compare).
const BATCH: usize = 48;
/// Entries per listing page.
const PAGE: i64 = 1000;

/// The etcd target.
pub struct EtcdTarget {
    members: Members,
    prefix: String,
    legacy: String,
}

impl std::fmt::Debug for EtcdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTarget")
            .field("prefix", &self.prefix)
            .field("legacy", &self.legacy)
            .finish()
    }
}

impl EtcdTarget {
    /// A target on these members, under `prefix`, for the legacy registry `legacy`.
    pub fn new(
        endpoints: Vec<String>,
        prefix: &str,
        legacy: &str,
        request_timeout: Duration,
        security: detour_registry::etcd_security::EtcdSecurity,
    ) -> Self {
        Self {
            members: Members::new(endpoints, request_timeout, security),
            prefix: prefix.trim_end_matches('/').to_owned(),
            legacy: legacy.to_owned(),
        }
    }

    /// The election key.
    pub fn leader_key(&self) -> String {
        format!("{}/sync/{}/leader", self.prefix, self.legacy)
    }

    fn entry_key(&self, (service, instance): &Key) -> String {
        format!("{}/services/{service}/{instance}", self.prefix)
    }

    fn fence(&self, fence: i64) -> Compare {
        Compare::create_revision(self.leader_key(), CompareOp::Equal, fence)
    }

    /// The compare and the write of one op.
    fn txn_parts(&self, op: &Op, lease: i64) -> (Compare, TxnOp) {
        let key = self.entry_key(&op.key());
        match op {
            Op::Create(ep) => (
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                TxnOp::put(key, encode(ep), Some(PutOptions::new().with_lease(lease))),
            ),
            Op::Update { endpoint, revision } => (
                Compare::mod_revision(key.clone(), CompareOp::Equal, *revision),
                TxnOp::put(
                    key,
                    encode(endpoint),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            ),
            Op::Delete { revision, .. } => (
                Compare::mod_revision(key.clone(), CompareOp::Equal, *revision),
                TxnOp::delete(key, None),
            ),
        }
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<(bool, i64), TargetError> {
        let r = self
            .members
            .call(what, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        Ok((r.succeeded(), r.header().map_or(0, |h| h.revision())))
    }

    async fn is_leader(&self, fence: i64) -> Result<bool, TargetError> {
        let key = self.leader_key();
        let r = self
            .members
            .call("get", |mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(r.kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == fence))
    }
}

fn encode(ep: &Endpoint) -> Vec<u8> {
    serde_json::to_vec(&EndpointValue {
        version: 1,
        endpoint: ep.clone(),
    })
    .unwrap_or_default()
}

fn outcome(op: &Op, revision: i64) -> Outcome {
    match op {
        Op::Delete { .. } => Outcome::Deleted,
        _ => Outcome::Written(revision),
    }
}

#[async_trait]
impl Target for EtcdTarget {
    async fn grant(&self, ttl: Duration) -> Result<i64, TargetError> {
        let secs = ttl.as_secs().max(1) as i64;
        let r = self
            .members
            .call("lease_grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<bool, TargetError> {
        let ttl = self
            .members
            .call("lease_keep_alive", |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(stream.message().await?.map_or(0, |r| r.ttl()))
            })
            .await?;
        Ok(ttl > 0)
    }

    async fn revoke(&self, lease: i64) -> Result<(), TargetError> {
        self.members
            .call("lease_revoke", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await?;
        Ok(())
    }

    async fn campaign(&self, replica: &str, lease: i64) -> Result<Campaign, TargetError> {
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                replica,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = self
            .members
            .call("campaign", |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        if r.succeeded() {
            return Ok(Campaign::Won {
                fence: r.header().map_or(0, |h| h.revision()),
            });
        }
        let leader = r
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Campaign::Lost { leader })
    }

    async fn list(&self) -> Result<Current, TargetError> {
        let base = format!("{}/services/", self.prefix);
        let end = format!("{}/services0", self.prefix); // '0' follows '/'
        let mut from = base.clone();
        let mut cur = Current::default();
        let mine = Source::Sync(self.legacy.clone());
        loop {
            let r = self
                .members
                .call("list", |mut c| {
                    let (from, end) = (from.clone(), end.clone());
                    async move {
                        c.get(
                            from,
                            Some(GetOptions::new().with_range(end).with_limit(PAGE)),
                        )
                        .await
                    }
                })
                .await?;
            for kv in r.kvs() {
                let Ok(key) = kv.key_str() else { continue };
                let Some((svc, inst)) = key.strip_prefix(&base).and_then(|r| r.split_once('/'))
                else {
                    continue;
                };
                let (Ok(svc), Ok(inst)) = (ServiceName::new(svc), InstanceId::new(inst)) else {
                    continue;
                };
                let k = (svc, inst);
                match serde_json::from_slice::<EndpointValue>(kv.value()) {
                    Ok(v)
                        if v.endpoint.source == mine
                            && v.endpoint.service == k.0
                            && v.endpoint.instance == k.1 =>
                    {
                        cur.ours.insert(
                            k,
                            Held {
                                endpoint: v.endpoint,
                                revision: kv.mod_revision(),
                                lease: kv.lease(),
                            },
                        );
                    }
                    _ => {
                        cur.foreign.insert(k);
                    }
                }
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    let mut next = last.key().to_vec();
                    next.push(0);
                    from = String::from_utf8_lossy(&next).into_owned();
                }
                _ => return Ok(cur),
            }
        }
    }

    async fn apply(
        &self,
        fence: i64,
        lease: i64,
        ops: &[Op],
    ) -> Result<Vec<(Key, Outcome)>, TargetError> {
        let mut out = Vec::with_capacity(ops.len());
        for batch in ops.chunks(BATCH) {
            let (mut compares, mut writes) = (vec![self.fence(fence)], Vec::new());
            for op in batch {
                let (c, w) = self.txn_parts(op, lease);
                compares.push(c);
                writes.push(w);
            }
            let (ok, rev) = self
                .txn("sync_write", Txn::new().when(compares).and_then(writes))
                .await?;
            if ok {
                out.extend(batch.iter().map(|op| (op.key(), outcome(op, rev))));
                continue;
            }
            if !self.is_leader(fence).await? {
                return Err(TargetError::NotLeader);
            }
            // One entry changed under us: write the others one by one.
            for op in batch {
                let (c, w) = self.txn_parts(op, lease);
                let (ok, rev) = self
                    .txn(
                        "sync_write",
                        Txn::new().when([self.fence(fence), c]).and_then([w]),
                    )
                    .await?;
                out.push((op.key(), if ok { outcome(op, rev) } else { Outcome::Stale }));
            }
        }
        Ok(out)
    }
}
