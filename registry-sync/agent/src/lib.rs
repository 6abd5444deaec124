//! The `detour-registry-sync` agent: mirrors a legacy registry into Detour's etcd so that old
//! release systems keep working — the [`legacy`] sources (ZooKeeper in Dubbo's layout, or a
//! directory), the [`mirror`] (plan, fenced writes, self-protection) and the [`agent`] that runs
//! it as one of several leader-elected replicas with an admin endpoint.
//!
//! It links the registry library (`detour-registry`); nothing else in Detour links this crate
//! except the operator CLI's demo provider (ZooKeeper registration) and the tests: the sidecar
//! carries no ZooKeeper client.

pub mod agent;
pub mod legacy;
pub mod mirror;
