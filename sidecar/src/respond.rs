//! Errors the mesh itself produces, and the one place they become HTTP (or gRPC) responses.
//!
//! Every such response carries `x-detour-error: <reason>` so callers (and the SDK) can tell a
//! sick mesh from a sick provider. gRPC callers get HTTP 200 with the matching `grpc-status`.

use detour_proto::ERROR_HEADER;
use detour_thin_sdk::BoxBody;
use detour_thin_sdk::body::{empty, full};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

/// An error produced by a sidecar rather than by a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// The request named no service, or one that is not a valid name.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request head is larger than allowed.
    #[error("request header too large: {size} bytes, limit {limit}")]
    HeaderTooLarge {
        /// Bytes seen.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The registry does not know the service.
    #[error("unknown service {0}")]
    UnknownService(String),
    /// The service is known but has no endpoint to route to.
    #[error("no healthy endpoint for service {0}")]
    NoEndpoint(String),
    /// The registry could not be read.
    #[error("registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The upstream (PA or provider) refused or did not accept the connection.
    #[error("upstream connect failed: {0}")]
    UpstreamConnect(String),
    /// The upstream connection failed after the request was sent.
    #[error("upstream connection lost: {0}")]
    UpstreamReset(String),
    /// No response head within the request timeout.
    #[error("upstream timed out after {0} ms")]
    Timeout(u64),
    /// The sidecar is stopping and takes no new requests.
    #[error("sidecar is draining")]
    Draining,
}

impl MeshError {
    /// The value of `x-detour-error`, stable for dashboards and the SDK.
    pub fn reason(&self) -> &'static str {
        match self {
            MeshError::Malformed(_) => "malformed-request",
            MeshError::HeaderTooLarge { .. } => "header-too-large",
            MeshError::UnknownService(_) => "unknown-service",
            MeshError::NoEndpoint(_) => "no-endpoint",
            MeshError::RegistryUnavailable(_) => "registry-unavailable",
            MeshError::UpstreamConnect(_) => "upstream-connect",
            MeshError::UpstreamReset(_) => "upstream-reset",
            MeshError::Timeout(_) => "timeout",
            MeshError::Draining => "draining",
        }
    }

    /// The HTTP status for plain HTTP callers.
    pub fn status(&self) -> StatusCode {
        match self {
            MeshError::Malformed(_) => StatusCode::BAD_REQUEST,
            MeshError::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            MeshError::UnknownService(_)
            | MeshError::NoEndpoint(_)
            | MeshError::RegistryUnavailable(_)
            | MeshError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::UpstreamConnect(_) | MeshError::UpstreamReset(_) => StatusCode::BAD_GATEWAY,
            MeshError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The gRPC status code for gRPC callers.
    pub fn grpc_status(&self) -> u8 {
        match self {
            MeshError::Malformed(_) => 3,          // INVALID_ARGUMENT
            MeshError::HeaderTooLarge { .. } => 8, // RESOURCE_EXHAUSTED
            MeshError::UnknownService(_) => 12,    // UNIMPLEMENTED
            MeshError::Timeout(_) => 4,            // DEADLINE_EXCEEDED
            MeshError::NoEndpoint(_)
            | MeshError::RegistryUnavailable(_)
            | MeshError::UpstreamConnect(_)
            | MeshError::UpstreamReset(_)
            | MeshError::Draining => 14, // UNAVAILABLE
        }
    }

    /// The response for a caller (`grpc`: whether the request was a gRPC call, see
    /// [`is_grpc`]); `proxy` names this sidecar.
    pub fn respond(&self, grpc: bool, proxy: &str) -> Response<BoxBody> {
        metrics::counter!("detour_mesh_errors_total", "reason" => self.reason()).increment(1);
        let mut resp = if grpc {
            let mut r = Response::new(empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(
                "grpc-status",
                HeaderValue::from(u16::from(self.grpc_status())),
            );
            if let Ok(msg) = HeaderValue::from_str(&percent_encode(&self.to_string())) {
                h.insert("grpc-message", msg);
            }
            r
        } else {
            let mut r = Response::new(full(format!("{self}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        let h = resp.headers_mut();
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.reason()));
        if let Ok(v) = HeaderValue::from_str(proxy) {
            h.insert(detour_proto::PROXY_HEADER, v);
        }
        resp
    }
}

/// Whether a request with these headers is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// gRPC's percent-encoding of `grpc-message` (RFC 3986 unreserved bytes and space kept).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_callers_get_status_and_header() {
        let r = MeshError::UnknownService("x".into()).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_HEADER], "unknown-service");
        assert_eq!(r.headers()[detour_proto::PROXY_HEADER], "h1");
        let r = MeshError::HeaderTooLarge { size: 9, limit: 1 }.respond(false, "h1");
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let r = MeshError::Timeout(5).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = MeshError::UpstreamConnect("x".into()).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn grpc_callers_get_grpc_status() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let r = MeshError::NoEndpoint("échо".into()).respond(is_grpc(&h), "h1");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[ERROR_HEADER], "no-endpoint");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("%C3%A9")
        );
    }
}
