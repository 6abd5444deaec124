//! Header handling shared by both directions: the target authority, the request-head size,
//! and removal of hop-by-hop headers.

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross a proxy.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The request's target authority without a port: `:authority` for HTTP/2, `Host` for
/// HTTP/1.1.
pub fn authority(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(a) => a.host(),
        None => parts.headers.get(header::HOST)?.to_str().ok()?,
    };
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => raw,
    };
    (!host.is_empty()).then_some(host)
}

/// The service a request names, for routing: like [`authority`], but a request with two `Host`
/// headers, or whose `Host` disagrees with its `:authority`, names none (proxies that picked
/// different ones would route one request two ways).
pub fn target(parts: &Parts) -> Result<&str, &'static str> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let name = authority(parts).ok_or("no Host or :authority names a service")?;
    if parts.uri.authority().is_some()
        && let Some(h) = first
    {
        let h = h.to_str().map_err(|_| "Host is not text")?;
        let h = match h.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => h,
        };
        if !h.eq_ignore_ascii_case(name) {
            return Err("Host and :authority name different services");
        }
    }
    Ok(name)
}

/// Approximate size of the request head in bytes (as HTTP/1.1 would encode it).
pub fn head_size(parts: &Parts) -> usize {
    let uri = &parts.uri;
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = parts.method.as_str().len() + target + 12;
    parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// The service a request names, after its head passed the size limit (`max_header_bytes`):
/// `header-too-large`, or `malformed-request` when it names none that is valid. Records the
/// name in the current span's `service` field.
pub fn service_of(
    parts: &Parts,
    max_header_bytes: usize,
) -> Result<detour_proto::ServiceName, crate::http::respond::MeshError> {
    use crate::http::respond::MeshError;
    use detour_core::MeshErrorKind;
    let size = head_size(parts);
    if size > max_header_bytes {
        return Err(MeshError::new(
            MeshErrorKind::HeaderTooLarge,
            format!("{size} bytes, limit {max_header_bytes}"),
        ));
    }
    let malformed = |detail: String| MeshError::new(MeshErrorKind::MalformedRequest, detail);
    let name = target(parts).map_err(|e| malformed(e.into()))?;
    let service = detour_proto::ServiceName::new(name).map_err(|e| malformed(e.to_string()))?;
    tracing::Span::current().record("service", service.as_str());
    Ok(service)
}

/// Removes hop-by-hop headers, including those named by `Connection`, and any `TE` other than
/// `trailers` (which gRPC needs).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests carry none: one pass over the names instead of a lookup per name.
    if !headers
        .keys()
        .any(|k| k == header::TE || HOP_BY_HOP.contains(k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn authority_from_uri_or_host() {
        let p = parts(http::Request::get("http://echo:80/x").body(()).unwrap());
        assert_eq!(authority(&p), Some("echo"));
        let p = parts(
            http::Request::get("/x")
                .header("host", "echo:4140")
                .body(())
                .unwrap(),
        );
        assert_eq!(authority(&p), Some("echo"));
        let p = parts(http::Request::get("/x").body(()).unwrap());
        assert_eq!(authority(&p), None);
    }

    #[test]
    fn a_duplicate_or_conflicting_host_names_no_service() {
        let two = parts(
            http::Request::get("/x")
                .header("host", "echo")
                .header("host", "other")
                .body(())
                .unwrap(),
        );
        assert_eq!(target(&two), Err("more than one Host header"));
        let conflict = parts(
            http::Request::get("http://echo/x")
                .header("host", "other:80")
                .body(())
                .unwrap(),
        );
        assert!(target(&conflict).is_err());
        let same = parts(
            http::Request::get("http://echo/x")
                .header("host", "ECHO:80")
                .body(())
                .unwrap(),
        );
        assert_eq!(target(&same), Ok("echo"));
        let one = parts(
            http::Request::get("/x")
                .header("host", "echo")
                .body(())
                .unwrap(),
        );
        assert_eq!(target(&one), Ok("echo"));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut p = parts(
            http::Request::get("/")
                .header("connection", "close, x-secret")
                .header("x-secret", "1")
                .header("keep-alive", "5")
                .header("te", "gzip, trailers")
                .header("x-keep", "1")
                .body(())
                .unwrap(),
        );
        strip_hop_by_hop(&mut p.headers);
        assert!(p.headers.get("x-secret").is_none());
        assert!(p.headers.get("connection").is_none());
        assert!(p.headers.get("keep-alive").is_none());
        assert_eq!(p.headers["te"], "trailers");
        assert_eq!(p.headers["x-keep"], "1");
        assert!(head_size(&p) > 10);
    }
}
