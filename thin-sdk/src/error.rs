//! Errors a call through the SDK can end with, each saying whether a retry is safe.

use std::time::Duration;

use detour_core::Dial;
use detour_proto::ServiceName;

/// Why a call failed before the application got a response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be built into something the mesh can carry, or its body (the
    /// app's own stream) failed as it was sent: nothing was sent again, and neither the sidecar
    /// nor any provider was taken for sick.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The local sidecar could not be reached; the request never left, so a retry is safe.
    #[error("sidecar {sidecar} unavailable: {source}")]
    SidecarUnavailable {
        /// The sidecar address.
        sidecar: Dial,
        /// The transport failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request was sent and then a connection on its way failed (between the app and its
    /// sidecar, or further along, reported by the mesh as `upstream-reset`): it may or may not
    /// have been processed. Retry only if it is idempotent.
    #[error("outcome unknown for a request to {service}: {detail}")]
    OutcomeUnknown {
        /// The service called.
        service: ServiceName,
        /// What failed.
        detail: String,
    },
    /// Neither the sidecar nor any provider could be reached; the request never left.
    #[error("no route to {service}: {cause}")]
    NoRoute {
        /// The service called.
        service: ServiceName,
        /// Why neither path could take it.
        cause: String,
    },
    /// No response arrived within the client's deadline ([`crate::ClientBuilder::timeout`]);
    /// the outcome is unknown.
    #[error("request to {service} timed out after {after:?}")]
    Timeout {
        /// The service called.
        service: ServiceName,
        /// The configured timeout.
        after: Duration,
    },
}

impl Error {
    /// A short, stable name for metrics and load reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::SidecarUnavailable { .. } => "sidecar_unavailable",
            Error::OutcomeUnknown { .. } => "outcome_unknown",
            Error::Timeout { .. } => "timeout",
            Error::NoRoute { .. } => "no_route",
        }
    }

    /// Whether the request certainly did not reach any provider.
    pub fn never_left(&self) -> bool {
        matches!(
            self,
            Error::InvalidRequest(_) | Error::SidecarUnavailable { .. } | Error::NoRoute { .. }
        )
    }
}
