//! The failure vocabulary of the data path, defined once for the SDK and the sidecar: every
//! reason the mesh can fail a request ([`MeshErrorKind`]), who caused it ([`Blame`]), what it
//! says about where the request got to ([`Delivery`]), its HTTP and gRPC statuses, and its
//! header encoding; and the path a response came over ([`PathTaken`]) with its header encoding.
//!
//! Headers:
//! - `x-detour-error: <reason>` marks a response the mesh produced (not a provider). A sidecar
//!   removes every `x-detour-*` header a provider or a remote sidecar set before it adds its own,
//!   so on the response an application gets from its own sidecar these headers are that
//!   sidecar's word.
//! - `x-detour-proxy: <host>` names the sidecar that produced the error (for people and logs).
//! - `x-detour-path: mesh | ca-direct` says which path a caller's sidecar took.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

pub use detour_proto::{CALLER_HEADER, ERROR_HEADER, PATH_HEADER, PROXY_HEADER};

/// [`ERROR_HEADER`] as a header name: a map looks it up without parsing the text.
pub const ERROR_NAME: HeaderName = HeaderName::from_static(ERROR_HEADER);
/// [`PATH_HEADER`] as a header name.
pub const PATH_NAME: HeaderName = HeaderName::from_static(PATH_HEADER);
/// [`PROXY_HEADER`] as a header name.
pub const PROXY_NAME: HeaderName = HeaderName::from_static(PROXY_HEADER);
/// [`CALLER_HEADER`] as a header name.
pub const CALLER_NAME: HeaderName = HeaderName::from_static(CALLER_HEADER);
/// How many sidecars a request has passed: each sets it one higher on the request it sends on
/// (to a PA or a provider). A provider address that leads back into the mesh (another host's
/// CA or PA) makes a forwarding loop, which the count ends ([`MAX_HOPS`]).
pub const HOPS_NAME: HeaderName = HeaderName::from_static("x-detour-hops");
/// A sidecar refuses a request that has passed this many sidecars already: a forwarding loop
/// (a call chain through the mesh passes two a service).
pub const MAX_HOPS: u32 = 16;

/// Takes the hop count ([`HOPS_NAME`]) out of `headers`: 0 when absent or unreadable.
pub fn take_hops(headers: &mut HeaderMap) -> u32 {
    headers
        .remove(HOPS_NAME)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// The hop count `headers` carry ([`HOPS_NAME`]), left in place for the sidecar to set one
/// higher where it is: 0 when absent or unreadable.
pub fn hops_of(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS_NAME)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// Removes every mesh header ([`strip_mesh_headers`]) and returns the hop count among them
/// ([`take_hops`]): one pass over the names, and no lookup, for a request that carries none (an
/// app's usual request).
pub fn take_mesh_headers(headers: &mut HeaderMap) -> u32 {
    if !headers.keys().any(is_mesh_header) {
        return 0;
    }
    let hops = take_hops(headers);
    strip_mesh_headers(headers);
    hops
}

/// Every reason the mesh itself can fail a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MeshErrorKind {
    /// The request named no service, or not a valid name, or its head did not parse.
    MalformedRequest,
    /// The request head is larger than allowed.
    HeaderTooLarge,
    /// A small request body (kept so the request can be sent again) did not arrive in time.
    BodyTimeout,
    /// The sidecar's registry view does not know the service (or, at a PA, the service is not
    /// provided on this host).
    UnknownService,
    /// The service is known but has no endpoint to route to.
    NoEndpoint,
    /// The registry could not be read.
    RegistryUnavailable,
    /// The sidecar could not hand the request to any provider (connect refused or timed out, or
    /// every sidecar and provider it tried said so): no provider received it.
    UpstreamConnect,
    /// The connection broke after the request was sent on: it may have been processed.
    UpstreamReset,
    /// No response head within the time allowed: it may have been processed.
    Timeout,
    /// A limit of the mesh refused the request (the provider host's rate limit): no provider
    /// received it, and it is not sent elsewhere (that would defeat the limit).
    RateLimited,
    /// The provider host's authorization refused the caller's identity: no provider received
    /// it, and it is not sent elsewhere.
    Denied,
    /// Every endpoint of the service has its limit of requests in flight from the caller's
    /// sidecar (the service's `max_concurrent_per_endpoint`): no provider received it.
    Overloaded,
    /// The provider host's sidecar answered and was not trusted (its TLS handshake failed, or
    /// it proved another host's identity): no provider received the request, and it is not
    /// sent elsewhere — least of all in the clear, around the PA.
    UntrustedPeer,
}

/// Who caused a mesh error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The request itself (sending it again anywhere fails the same way).
    Caller,
    /// The sidecar that produced the error: its registry view could not route the request.
    Sidecar,
    /// What lies beyond the sidecar that produced the error: a remote sidecar or a provider.
    Upstream,
    /// Nobody: a configured limit said no (the answer is final, and no sign of sickness).
    Policy,
}

/// What an attempt's end says about where the request got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The answer is final: the request is the problem.
    Rejected,
    /// No provider received the request: sending it elsewhere is safe whatever its method.
    NeverReached,
    /// A provider may have processed it: only an idempotent request may be sent again.
    Unknown,
}

const ALL: [MeshErrorKind; 13] = [
    MeshErrorKind::MalformedRequest,
    MeshErrorKind::HeaderTooLarge,
    MeshErrorKind::BodyTimeout,
    MeshErrorKind::UnknownService,
    MeshErrorKind::NoEndpoint,
    MeshErrorKind::RegistryUnavailable,
    MeshErrorKind::UpstreamConnect,
    MeshErrorKind::UpstreamReset,
    MeshErrorKind::Timeout,
    MeshErrorKind::RateLimited,
    MeshErrorKind::Denied,
    MeshErrorKind::Overloaded,
    MeshErrorKind::UntrustedPeer,
];

impl MeshErrorKind {
    /// Every kind (for tables and tests).
    pub fn all() -> &'static [MeshErrorKind] {
        &ALL
    }

    /// The value of `x-detour-error`, stable for dashboards and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            MeshErrorKind::MalformedRequest => "malformed-request",
            MeshErrorKind::HeaderTooLarge => "header-too-large",
            MeshErrorKind::BodyTimeout => "request-body-timeout",
            MeshErrorKind::UnknownService => "unknown-service",
            MeshErrorKind::NoEndpoint => "no-endpoint",
            MeshErrorKind::RegistryUnavailable => "registry-unavailable",
            MeshErrorKind::UpstreamConnect => "upstream-connect",
            MeshErrorKind::UpstreamReset => "upstream-reset",
            MeshErrorKind::Timeout => "timeout",
            MeshErrorKind::RateLimited => "rate-limited",
            MeshErrorKind::Denied => "denied",
            MeshErrorKind::Overloaded => "overloaded",
            MeshErrorKind::UntrustedPeer => "untrusted-peer",
        }
    }

    /// Parses a reason; `None` for anything else.
    pub fn from_reason(reason: &[u8]) -> Option<MeshErrorKind> {
        ALL.iter()
            .copied()
            .find(|k| k.reason().as_bytes() == reason)
    }

    /// Who caused it.
    pub fn blame(self) -> Blame {
        match self {
            MeshErrorKind::MalformedRequest
            | MeshErrorKind::HeaderTooLarge
            | MeshErrorKind::BodyTimeout => Blame::Caller,
            MeshErrorKind::UnknownService
            | MeshErrorKind::NoEndpoint
            | MeshErrorKind::RegistryUnavailable => Blame::Sidecar,
            MeshErrorKind::UpstreamConnect
            | MeshErrorKind::UpstreamReset
            | MeshErrorKind::Timeout => Blame::Upstream,
            MeshErrorKind::RateLimited
            | MeshErrorKind::Denied
            | MeshErrorKind::Overloaded
            | MeshErrorKind::UntrustedPeer => Blame::Policy,
        }
    }

    /// Where the request got to, and so whether sending it again is safe.
    pub fn delivery(self) -> Delivery {
        match self.blame() {
            Blame::Caller | Blame::Policy => Delivery::Rejected,
            Blame::Sidecar => Delivery::NeverReached,
            Blame::Upstream if self == MeshErrorKind::UpstreamConnect => Delivery::NeverReached,
            Blame::Upstream => Delivery::Unknown,
        }
    }

    /// The HTTP status plain HTTP callers get.
    pub fn status(self) -> StatusCode {
        match self {
            MeshErrorKind::MalformedRequest => StatusCode::BAD_REQUEST,
            MeshErrorKind::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            MeshErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            MeshErrorKind::UnknownService
            | MeshErrorKind::NoEndpoint
            | MeshErrorKind::RegistryUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            MeshErrorKind::UpstreamConnect
            | MeshErrorKind::UpstreamReset
            | MeshErrorKind::UntrustedPeer => StatusCode::BAD_GATEWAY,
            MeshErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            MeshErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            MeshErrorKind::Denied => StatusCode::FORBIDDEN,
            MeshErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code gRPC callers get (with HTTP 200).
    pub fn grpc_status(self) -> u8 {
        match self {
            MeshErrorKind::MalformedRequest => 3, // INVALID_ARGUMENT
            MeshErrorKind::HeaderTooLarge
            | MeshErrorKind::RateLimited
            | MeshErrorKind::Overloaded => 8, // RESOURCE_EXHAUSTED
            MeshErrorKind::UnknownService => 12,  // UNIMPLEMENTED
            MeshErrorKind::Denied | MeshErrorKind::UntrustedPeer => 7, // PERMISSION_DENIED
            MeshErrorKind::Timeout | MeshErrorKind::BodyTimeout => 4, // DEADLINE_EXCEEDED
            MeshErrorKind::NoEndpoint
            | MeshErrorKind::RegistryUnavailable
            | MeshErrorKind::UpstreamConnect
            | MeshErrorKind::UpstreamReset => 14, // UNAVAILABLE
        }
    }

    /// The `x-detour-error` header value.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.reason())
    }

    /// The mesh error `headers` carry; `None` when they carry none, or a value this version
    /// does not know. Only call it on headers from a sidecar (see the module docs).
    pub fn from_headers(headers: &HeaderMap) -> Option<MeshErrorKind> {
        headers
            .get(ERROR_NAME)
            .and_then(|v| MeshErrorKind::from_reason(v.as_bytes()))
    }
}

impl std::fmt::Display for MeshErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Which path a response came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PathTaken {
    /// C→CA→PA→P.
    Mesh,
    /// C→CA→P (the provider host's sidecar was bypassed).
    CaDirect,
    /// C→P (the local sidecar was bypassed).
    Direct,
}

impl PathTaken {
    /// The label used in metrics and reports (`mesh`, `ca_direct`, `direct`).
    pub fn as_str(self) -> &'static str {
        match self {
            PathTaken::Mesh => "mesh",
            PathTaken::CaDirect => "ca_direct",
            PathTaken::Direct => "direct",
        }
    }

    /// The `x-detour-path` value a caller's sidecar sets (`mesh`, `ca-direct`; `direct` is
    /// never on the wire: no sidecar took that path).
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            PathTaken::Mesh => "mesh",
            PathTaken::CaDirect => "ca-direct",
            PathTaken::Direct => "direct",
        })
    }

    /// The path named by `x-detour-path` in a response from the caller's own sidecar; a
    /// response without one came over the mesh.
    pub fn from_headers(headers: &HeaderMap) -> PathTaken {
        match headers.get(PATH_NAME).map(HeaderValue::as_bytes) {
            Some(b"ca-direct") => PathTaken::CaDirect,
            _ => PathTaken::Mesh,
        }
    }
}

/// Removes every `x-detour-*` header (those of a provider, or of a hop whose word has already
/// been read): only the sidecar that hands a response on may set them.
pub fn strip_mesh_headers(headers: &mut HeaderMap) {
    strip_mesh_headers_but(headers, None);
}

/// [`strip_mesh_headers`], but the header `keep` stays (the hop count, which the sidecar sets
/// one higher in place: one lookup instead of a removal and an insertion).
pub fn strip_mesh_headers_but(headers: &mut HeaderMap, keep: Option<&HeaderName>) {
    let goes = |n: &HeaderName| is_mesh_header(n) && Some(n) != keep;
    // Fast path: nothing to do on the usual provider response.
    if !headers.keys().any(goes) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| goes(n)).cloned().collect();
    for n in names {
        headers.remove(n);
    }
}

fn is_mesh_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-detour-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_headers_go_and_the_hop_count_among_them_is_read() {
        let mut h = HeaderMap::new();
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert_eq!(take_mesh_headers(&mut h), 0);
        assert_eq!(h.len(), 1);
        h.insert(HOPS_NAME, HeaderValue::from_static("3"));
        h.insert("x-detour-anything", HeaderValue::from_static("x"));
        assert_eq!(take_mesh_headers(&mut h), 3);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
        h.insert(HOPS_NAME, HeaderValue::from_static("many"));
        assert_eq!(take_mesh_headers(&mut h), 0);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_hop_count_can_stay_while_every_other_mesh_header_goes() {
        let mut h = HeaderMap::new();
        h.insert(HOPS_NAME, HeaderValue::from_static("4"));
        h.insert("x-detour-path", HeaderValue::from_static("mesh"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        assert_eq!(hops_of(&h), 4);
        strip_mesh_headers_but(&mut h, Some(&HOPS_NAME));
        let mut keys: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["x-detour-hops", "x-keep"]);
        strip_mesh_headers(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
        assert_eq!(hops_of(&h), 0);
    }

    #[test]
    fn every_kind_round_trips_through_its_header() {
        for &k in MeshErrorKind::all() {
            let mut h = HeaderMap::new();
            h.insert(ERROR_HEADER, k.header_value());
            assert_eq!(MeshErrorKind::from_headers(&h), Some(k));
        }
        let mut h = HeaderMap::new();
        h.insert(ERROR_HEADER, HeaderValue::from_static("draining"));
        assert_eq!(
            MeshErrorKind::from_headers(&h),
            None,
            "unknown reasons mean nothing"
        );
    }

    #[test]
    fn only_upstream_connect_and_routing_failures_never_reached_a_provider() {
        for &k in MeshErrorKind::all() {
            let expect = match k {
                MeshErrorKind::UnknownService
                | MeshErrorKind::NoEndpoint
                | MeshErrorKind::RegistryUnavailable
                | MeshErrorKind::UpstreamConnect => Delivery::NeverReached,
                MeshErrorKind::UpstreamReset | MeshErrorKind::Timeout => Delivery::Unknown,
                _ => Delivery::Rejected,
            };
            assert_eq!(k.delivery(), expect, "{k}");
        }
    }

    #[test]
    fn paths_round_trip_and_mesh_headers_are_stripped() {
        for p in [PathTaken::Mesh, PathTaken::CaDirect] {
            let mut h = HeaderMap::new();
            h.insert(PATH_HEADER, p.header_value());
            assert_eq!(PathTaken::from_headers(&h), p);
        }
        let mut h = HeaderMap::new();
        h.insert(ERROR_HEADER, HeaderValue::from_static("upstream-connect"));
        h.insert("x-detour-anything", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_mesh_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-other"));
    }
}
