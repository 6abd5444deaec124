//! The thin SDK: a small client that applications link to call other services through the
//! Detour sidecar on their own host.
//!
//! It imports `detour-proto` and `detour-core` only: never the sidecar, the registry or the
//! watchdog, so an application links none of them.
//!
//! A [`Client`] sends `http::Request`s to a named service via the local sidecar (Unix socket or
//! loopback TCP), over HTTP/1.1 or HTTP/2, with streaming bodies. It holds a control session
//! with the sidecar that reports the sidecar's state and streams endpoint snapshots of the
//! services the app calls, probes the sidecar, and calls providers directly while the sidecar is
//! restarting, hung or sick.
//!
//! The public surface is the client: [`Client`] and its builder, [`GrpcChannel`] for tonic
//! clients, [`Error`], the markers a response carries ([`PathTaken`], [`mesh_error`]) and the
//! [`Idempotent`] mark for requests, trace export ([`TraceConfig`]), plus the types these name;
//! and for providers, [`dedupe`]: carrying out each request with an `Idempotency-Key` once,
//! however often the mesh sends it. Everything the client is built from lives in the
//! workspace-internal `detour-core` crate, shared with the sidecar.

pub mod body;
mod call;
mod client;
mod control;
pub mod dedupe;
mod dedupe_store;
mod direct;
mod error;
mod grpc;
mod outcome;

pub use client::{Client, ClientBuilder};
pub use control::Snapshot;
pub use detour_core::link::{LinkConfig, LinkState};
pub use detour_core::replay::Idempotent;
pub use detour_core::trace::{OtlpEndpoint, TraceConfig};
pub use detour_core::{BoxBody, Dial, MeshErrorKind, PathTaken, PoolOptions};
pub use detour_proto::{AppProtocol, ServiceName, SidecarState};
pub use error::Error;
pub use grpc::GrpcChannel;
pub use outcome::{mesh_error, path_taken};
