//! The mirror's plan, pure: what to write to the target so that it holds the desired entries,
//! touching only entries this mirror wrote.

use std::collections::{BTreeMap, BTreeSet};

use detour_proto::{Endpoint, InstanceId, ServiceName};

/// One entry's key in the target: service and instance.
pub type Key = (ServiceName, InstanceId);

/// An entry this mirror wrote, as the target holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The endpoint written.
    pub endpoint: Endpoint,
    /// The target's revision of it (writes are made conditional on it).
    pub revision: i64,
    /// The lease it is attached to.
    pub lease: i64,
}

/// What the target holds now.
#[derive(Debug, Clone, Default)]
pub struct Current {
    /// Entries this mirror wrote (`source = sync:<name>`).
    pub ours: BTreeMap<Key, Held>,
    /// Keys someone else wrote: never touched.
    pub foreign: BTreeSet<Key>,
}

/// One write.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Create the entry; only if the key is absent.
    Create(Endpoint),
    /// Rewrite our entry (new value or new lease); only if it is still at `revision`.
    Update {
        /// The new value.
        endpoint: Endpoint,
        /// The revision it must still be at.
        revision: i64,
    },
    /// Remove our entry; only if it is still at `revision`.
    Delete {
        /// Its key.
        key: Key,
        /// The revision it must still be at.
        revision: i64,
    },
}

impl Op {
    /// The key written.
    pub fn key(&self) -> Key {
        match self {
            Op::Create(e) | Op::Update { endpoint: e, .. } => {
                (e.service.clone(), e.instance.clone())
            }
            Op::Delete { key, .. } => key.clone(),
        }
    }
}

/// The plan: the writes, and the desired keys skipped because someone else holds them.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Writes, in key order.
    pub ops: Vec<Op>,
    /// Desired keys held by another writer.
    pub conflicts: Vec<Key>,
}

/// Plans the writes that turn `current` into `desired`, attaching every entry to `lease`.
pub fn plan(desired: &BTreeMap<Key, Endpoint>, current: &Current, lease: i64) -> Plan {
    let mut out = Plan::default();
    for (key, ep) in desired {
        if current.foreign.contains(key) {
            out.conflicts.push(key.clone());
            continue;
        }
        match current.ours.get(key) {
            None => out.ops.push(Op::Create(ep.clone())),
            Some(h) if h.endpoint != *ep || h.lease != lease => out.ops.push(Op::Update {
                endpoint: ep.clone(),
                revision: h.revision,
            }),
            Some(_) => {}
        }
    }
    for (key, h) in &current.ours {
        if !desired.contains_key(key) {
            out.ops.push(Op::Delete {
                key: key.clone(),
                revision: h.revision,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::HostId;

    fn ep(svc: &str, inst: &str, weight: u32) -> Endpoint {
        let mut e = Endpoint::new(
            ServiceName::new(svc).unwrap(),
            InstanceId::new(inst).unwrap(),
            HostId::new("h").unwrap(),
            "127.0.0.1:80".parse().unwrap(),
        );
        e.weight = weight;
        e
    }

    fn key(e: &Endpoint) -> Key {
        (e.service.clone(), e.instance.clone())
    }

    #[test]
    fn adds_updates_and_removes_only_what_differs() {
        let (a, b, c) = (ep("s", "a", 1), ep("s", "b", 1), ep("s", "c", 1));
        let b2 = ep("s", "b", 5);
        let mut cur = Current::default();
        for (e, rev) in [(&a, 10), (&b, 11), (&c, 12)] {
            cur.ours.insert(
                key(e),
                Held {
                    endpoint: e.clone(),
                    revision: rev,
                    lease: 7,
                },
            );
        }
        let d = ep("s", "d", 1);
        let desired: BTreeMap<_, _> = [&a, &b2, &d]
            .into_iter()
            .map(|e| (key(e), e.clone()))
            .collect();
        let p = plan(&desired, &cur, 7);
        assert_eq!(
            p.ops,
            vec![
                Op::Update {
                    endpoint: b2.clone(),
                    revision: 11
                },
                Op::Create(d.clone()),
                Op::Delete {
                    key: key(&c),
                    revision: 12
                },
            ]
        );
        // Applied, nothing is left to do: idempotent.
        let mut after = Current::default();
        for (i, e) in [&a, &b2, &d].into_iter().enumerate() {
            after.ours.insert(
                key(e),
                Held {
                    endpoint: e.clone(),
                    revision: 20 + i as i64,
                    lease: 7,
                },
            );
        }
        assert_eq!(plan(&desired, &after, 7), Plan::default());
    }

    #[test]
    fn a_new_lease_rewrites_everything_and_foreign_keys_are_never_touched() {
        let (a, f) = (ep("s", "a", 1), ep("s", "f", 1));
        let mut cur = Current::default();
        cur.ours.insert(
            key(&a),
            Held {
                endpoint: a.clone(),
                revision: 3,
                lease: 1,
            },
        );
        cur.foreign.insert(key(&f));
        let desired: BTreeMap<_, _> = [&a, &f].into_iter().map(|e| (key(e), e.clone())).collect();
        let p = plan(&desired, &cur, 2);
        assert_eq!(
            p.ops,
            vec![Op::Update {
                endpoint: a.clone(),
                revision: 3
            }]
        );
        assert_eq!(p.conflicts, vec![key(&f)]);
        // A foreign key that is not desired is not deleted either.
        let p = plan(&BTreeMap::new(), &cur, 1);
        assert_eq!(
            p.ops,
            vec![Op::Delete {
                key: key(&a),
                revision: 3
            }]
        );
    }
}
