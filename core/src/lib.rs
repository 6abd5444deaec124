//! What the Detour SDK and the sidecar share, internal to the workspace: dialing and pooled
//! connections ([`transport`], behind the [`connect::Connect`] seam), the body type, keeping
//! small requests for a second attempt ([`replay`]), the pure link state machine ([`link`]) and
//! its live handle, active probes, the failure vocabulary ([`failure`]), the one retry
//! decision ([`decide`]), the routing decision by version and label ([`route`]) and trace
//! context and export ([`trace`]).
//!
//! Applications do not use this crate: they link `detour-thin-sdk`, whose public surface is
//! the client alone.
//! It imports `detour-proto` only: never the registry, the sidecar or the SDK.

pub mod body;
pub mod connect;
pub mod decide;
mod dial;
pub mod failure;
pub mod link;
pub mod link_handle;
pub mod probe;
pub mod replay;
pub mod route;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod trace;
pub mod transport;

pub use body::BoxBody;
pub use dial::{Dial, Io, LISTEN_BACKLOG, Stream, listen_tcp};
pub use failure::{MeshErrorKind, PathTaken};
pub use transport::{Failed, Pool, PoolOptions, TransportError};
