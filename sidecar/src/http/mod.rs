//! The HTTP plumbing both directions share: accepting and serving connections (protocol
//! detection, HTTP/1.1 or HTTP/2, limits, a lingering close), one forwarding attempt, header handling, and the
//! errors the mesh itself answers with.
//!
//! It may import `config`, `tls`, `process::lifecycle` and `ratelimit`; never `inbound`,
//! `outbound` or `admin`, which build on it.

pub mod detect;
pub mod forward;
pub mod headers;
pub mod linger;
pub mod respond;
pub mod server;
