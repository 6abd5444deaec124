//! Detour's view of the service registry: the [`Registry`] trait every back-end implements, the
//! embedded directory back-end ([`dir::DirRegistry`]), the etcd back-end
//! ([`etcd::EtcdRegistry`]) and the in-memory endpoint
//! [`catalog::Catalog`] that sidecars route from; and the mirror of a legacy registry into etcd
//! ([`legacy`] sources, the [`mirror`], the `detour-registry-sync` [`agent`]).
//!
//! Everything above the trait is identical whichever back-end is configured.

pub mod agent;
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
pub mod labels;
pub mod legacy;
pub(crate) mod members;
pub mod memory;
pub mod mirror;
pub mod policy;
pub mod protection;
pub mod protection_config;
mod registry;
pub mod store;
pub mod telemetry;

pub use catalog::Catalog;
pub use registry::{
    DocName, DocRead, DocState, HostStatuses, MAX_DOC_BYTES, POLICY_DOC, RULES_DOC, Registered,
    Registry, RegistryError, RegistrySpec, now_unix_ms, sync_endpoints,
};
