//! Detour's host-side tooling: the operator CLI `detourctl` (a demo mesh and the load
//! generator every failover test uses), child-process supervision, and a small demo provider.

pub mod demo;
pub mod load;
pub mod process;
pub mod provider;
pub mod sidecar;
