//! The Detour sidecar: one proxy per host. Its outbound side (CA) takes calls from local apps
//! and routes them by service name to a provider host's inbound side (PA), which hands them to
//! the local provider. One process plays both roles.
//!
//! The binary (`src/main.rs`) only reads the config, calls [`app::Sidecar::start`], waits for
//! a signal and drains; everything else is here.
//!
//! It imports `detour-proto`, `detour-core` and the registry library (`detour-registry`), never
//! the SDK, the watchdog, the operator CLI, the test kit or the registry-sync agent (no
//! ZooKeeper client); only its own binary and the integration tests link it.

// The rooms, each with its own rule of what it may import (docs/architecture.md):
pub mod admin;
pub mod config;
pub mod http;
pub mod inbound;
pub mod outbound;
pub mod process;
pub mod tls;

// What the rooms share, and the assembly.
pub mod access_log;
pub mod app;
pub mod policy;
pub mod ratelimit;
pub mod telemetry;

/// This sidecar's version, reported in `/state`, host status and control events.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod rooms_tests;
