//! Detour's host-side tooling: the watchdog agent (`detour-watchdog`: keeps the host's sidecar
//! alive, holds its registrations, runs upgrades), the operator CLI `detourctl` (a demo mesh,
//! upgrades, and the load generator every failover test uses), child-process supervision, and a
//! small demo provider.

pub mod agent;
pub mod agent_config;
pub mod api;
pub mod audit;
pub mod binaries;
pub mod certs;
pub mod cli_ops;
pub mod cli_policy;
pub mod cli_roles;
pub mod demo;
pub mod held;
pub mod kept;
pub mod load;
pub mod load_stats;
pub mod ops;
pub mod ops_view;
pub mod proc;
pub mod process;
pub mod provider;
pub mod sidecar;
pub mod supervise;
pub mod watched;

/// This build's version (as `--version` prints it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
