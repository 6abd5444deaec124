//! What Detour's tests, chaos scenarios, benchmarks and demo share: the load generator behind
//! `detourctl load` ([`load`], [`load_stats`]), the demo provider ([`provider`]), a throw-away CA
//! ([`certs`]), finding and starting sidecars ([`sidecar`], [`process`]), the one writer of their configs
//! ([`sidecar_config`]), watched hosts
//! ([`watched`]) and the demo mesh ([`demo`]). The watchdog agent never links it.
//!
//! It imports the libraries it starts or drives (`detour-core`, `detour-proto`,
//! `detour-registry`, `detour-thin-sdk`, the watchdog's API), never the sidecar library: the
//! sidecar is a process it starts.

pub mod certs;
pub mod demo;
pub mod load;
pub mod load_stats;
pub mod process;
pub mod provider;
pub mod sidecar;
pub mod sidecar_config;
mod started;
pub mod watched;
