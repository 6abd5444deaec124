//! The watchdog agent (`detour-watchdog`): one per host, it keeps the host's sidecar alive,
//! holds its registrations while the sidecar is away, runs upgrades (socket hand-over) and
//! rollbacks, and applies version rules. Its API types ([`api`]) and the version rules'
//! binaries ([`binaries`]) are shared with `detourctl`; nothing here links the sidecar, the
//! operator CLI or the test kit.

pub mod agent;
pub mod agent_config;
pub mod api;
pub mod binaries;
pub mod held;
pub mod kept;
pub mod proc;
pub mod supervise;

/// This build's version (as `--version` prints it).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
