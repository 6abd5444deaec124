//! `detourctl`'s operator commands: gray rules, rollback and its undo, policy, status, history
//! ([`ops`] the logic, [`ops_view`] tables and JSON, [`cli_ops`], [`cli_policy`], [`cli_roles`]
//! arguments and exit statuses), per-service numbers from the sidecars' metrics ([`stat`],
//! [`cli_stat`]) and the audit trail they write ([`audit`]). The binary adds the
//! demo, load and provider commands from the test kit.
//!
//! It imports the libraries, the watchdog's API and the test kit, never the sidecar library:
//! it talks to sidecars and watchdogs over their sockets and admin ports.

pub mod audit;
pub mod cli_ops;
pub mod cli_policy;
pub mod cli_roles;
pub mod cli_route;
pub mod cli_stat;
pub mod ops;
pub mod ops_view;
pub mod stat;
