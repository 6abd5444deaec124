//! The thin SDK: a small client that applications link to call other services through the
//! Detour sidecar on their own host.
//!
//! A [`Client`] sends `http::Request`s to a named service via the local sidecar (Unix socket or
//! loopback TCP), over HTTP/1.1 or HTTP/2, with streaming bodies. It also holds a control
//! session with the sidecar ([`control`]) that reports the sidecar's state and streams endpoint
//! snapshots of the services the app calls, kept for the direct path.
//!
//! The [`transport`] module (dialing, connection pools, body types) is shared with the sidecar,
//! which uses it for its own upstream connections.

pub mod body;
mod client;
pub mod control;
mod dial;
mod direct;
mod error;
mod grpc;
pub mod link;
pub mod link_handle;
mod outcome;
pub mod probe;
pub mod replay;
pub mod transport;

pub use body::BoxBody;
pub use client::{Client, ClientBuilder};
pub use error::Error;
pub use grpc::GrpcChannel;
pub use outcome::{PathTaken, mesh_error, path_taken};
pub use replay::Idempotent;
pub use transport::{Dial, Failed, Pool, PoolOptions, Stream, TransportError};
