//! Detour's registry library: the [`Registry`] trait every back-end implements, the embedded
//! directory back-end ([`dir::DirRegistry`]), the etcd back-end ([`etcd::EtcdRegistry`]), the
//! in-memory endpoint [`catalog::Catalog`] that sidecars route from with its disk cache and
//! self-protection, and the registry documents (gray rules, policy). Every Detour process links
//! it; the mirror of a legacy registry (ZooKeeper) is the `detour-registry-sync` agent's crate,
//! which links this one, never the reverse.
//!
//! Everything above the trait is identical whichever back-end is configured.

pub mod backoff;
pub mod cache;
pub mod catalog;
pub mod client_config;
pub mod dir;
pub mod docs;
pub mod etcd;
pub mod etcd_roles;
pub mod etcd_security;
pub mod gray;
pub mod health;
pub use detour_proto::labels;
pub mod members;
pub mod memory;
pub mod policy;
pub mod protection;
pub mod protection_config;
mod registry;
pub mod store;
pub mod telemetry;

pub use catalog::Catalog;
pub use registry::{
    Applied, DocName, DocRead, DocState, HostStatuses, MAX_DOC_BYTES, POLICY_DOC, ROUTES_DOC,
    RULES_DOC, Registered, Registry, RegistryError, RegistrySpec, now_unix_ms, sync_endpoints,
};
