//! The local control API (generated from `proto/detour/control/v1/control.proto`), the value
//! types every Detour crate shares (names, endpoints, host status) and the config-file loader
//! every Detour binary shares.
//!
//! It imports no other Detour crate.

pub mod config_file;
pub mod fastmap;
pub mod files;
pub mod labels;
pub mod service_doc;
pub mod sync;
pub mod types;
pub mod utc;

pub use types::{
    ADDRESS_FILE, AppProtocol, Endpoint, EndpointSet, HostId, HostPublication, HostStatus,
    InstanceId, NameError, PUBLICATION_PROTOCOL, PUBLICATION_PROTOCOL_HEADER, ServiceName,
    SidecarAddresses, SidecarState, Source, WatchdogReport,
};

/// Generated code of the `detour.control.v1` package.
pub mod control {
    #![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("detour.control.v1");
}

/// The `:authority` under which a sidecar's outbound listener serves the control API.
pub const CONTROL_AUTHORITY: &str = "detour.control";

/// The path, under authority [`CONTROL_AUTHORITY`], that answers 200 while a sidecar is
/// ready and 503 otherwise: the active probe of SDKs and of remote sidecars.
pub const PING_PATH: &str = "/detour/ping";

/// The response header in which a CA says which path a request took (`mesh`, `ca-direct`).
pub const PATH_HEADER: &str = "x-detour-path";

/// The response header that marks an error produced by the mesh itself (not by a provider).
pub const ERROR_HEADER: &str = "x-detour-error";

/// The response header that names the sidecar instance that produced a mesh error.
pub const PROXY_HEADER: &str = "x-detour-proxy";

/// The request header in which a PA tells its provider the verified identity of the calling
/// sidecar (`spiffe://…`). The PA sets it and removes any value a caller sent.
pub const CALLER_HEADER: &str = "x-detour-caller";

mod convert;
