//! Errors the mesh itself produces, and the one place they become HTTP (or gRPC) responses.
//!
//! A [`MeshError`] is a kind from the shared vocabulary (`detour_core::failure`) plus the detail
//! for people. Every such response carries `x-detour-error: <reason>` and `x-detour-proxy:
//! <host>` so callers (and the SDK) can tell the mesh's errors from a provider's; gRPC callers
//! get HTTP 200 with the matching `grpc-status`.

use detour_core::BoxBody;
use detour_core::body::{empty, full};
use detour_core::decide::Failure;
use detour_core::failure::{ERROR_NAME, MeshErrorKind, PROXY_NAME};
use http::{HeaderMap, HeaderValue, Response, header};

/// An error produced by a sidecar rather than by a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", describe(*kind))]
pub struct MeshError {
    /// What went wrong, in the shared vocabulary.
    pub kind: MeshErrorKind,
    /// The specifics, for people.
    pub detail: String,
}

/// The words of a kind in a message.
fn describe(kind: MeshErrorKind) -> &'static str {
    match kind {
        MeshErrorKind::MalformedRequest => "malformed request",
        MeshErrorKind::HeaderTooLarge => "request header too large",
        MeshErrorKind::BodyTimeout => "request body timed out",
        MeshErrorKind::UnknownService => "unknown service",
        MeshErrorKind::NoEndpoint => "no healthy endpoint",
        MeshErrorKind::RegistryUnavailable => "registry unavailable",
        MeshErrorKind::UpstreamConnect => "no provider could be reached",
        MeshErrorKind::UpstreamReset => "upstream connection lost",
        MeshErrorKind::Timeout => "upstream timed out",
        MeshErrorKind::RateLimited => "over the rate limit",
        MeshErrorKind::Denied => "the caller is not allowed",
        MeshErrorKind::Overloaded => "every endpoint is at its concurrency limit",
        MeshErrorKind::UntrustedPeer => "the provider host's sidecar is not trusted",
    }
}

impl MeshError {
    /// An error of `kind` with `detail`.
    pub fn new(kind: MeshErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }

    /// The error a request given up for `failure` is answered with.
    pub fn gave_up(failure: Failure, detail: impl Into<String>) -> Self {
        let kind = match failure {
            Failure::NeverReached => MeshErrorKind::UpstreamConnect,
            Failure::OutcomeUnknown => MeshErrorKind::UpstreamReset,
            Failure::TimedOut => MeshErrorKind::Timeout,
        };
        Self::new(kind, detail)
    }

    /// The value of `x-detour-error`.
    pub fn reason(&self) -> &'static str {
        self.kind.reason()
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
                HeaderValue::from(u16::from(self.kind.grpc_status())),
            );
            if let Ok(msg) = HeaderValue::from_str(&percent_encode(&self.to_string())) {
                h.insert("grpc-message", msg);
            }
            r
        } else {
            let mut r = Response::new(full(format!("{self}\n")));
            *r.status_mut() = self.kind.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        let h = resp.headers_mut();
        h.insert(ERROR_NAME, self.kind.header_value());
        if let Ok(v) = HeaderValue::from_str(proxy) {
            h.insert(PROXY_NAME, v);
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
    use http::StatusCode;

    fn err(kind: MeshErrorKind) -> MeshError {
        MeshError::new(kind, "x")
    }

    #[test]
    fn http_callers_get_status_and_header() {
        let r = err(MeshErrorKind::UnknownService).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_NAME], "unknown-service");
        assert_eq!(r.headers()[PROXY_NAME], "h1");
        let r = err(MeshErrorKind::HeaderTooLarge).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let r = err(MeshErrorKind::Timeout).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let r = err(MeshErrorKind::UpstreamConnect).respond(false, "h1");
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        for &k in MeshErrorKind::all() {
            let r = err(k).respond(false, "h1");
            assert_eq!(MeshErrorKind::from_headers(r.headers()), Some(k));
        }
    }

    #[test]
    fn grpc_callers_get_grpc_status() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let r = MeshError::new(MeshErrorKind::NoEndpoint, "échо").respond(is_grpc(&h), "h1");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[ERROR_NAME], "no-endpoint");
        assert!(
            r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("%C3%A9")
        );
    }
}
