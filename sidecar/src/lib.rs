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

pub mod admin;
pub mod admin_guard;
pub mod app;
pub mod balance;
pub mod budget;
pub mod config;
pub mod config_limits;
pub mod config_tls;
pub mod control;
pub mod delegate;
pub mod detect;
pub mod forward;
pub mod gray;
pub mod handover;
pub mod headers;
pub mod heap;
pub mod inbound;
pub mod lifecycle;
pub mod links;
pub mod listeners;
pub mod outbound;
pub mod policy;
pub mod providers;
pub mod ratelimit;
pub mod respond;
pub mod server;
pub mod stop;
pub mod telemetry;
pub mod tls;

/// This sidecar's version, reported in `/state`, host status and control events.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
