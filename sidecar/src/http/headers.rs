//! Header handling shared by both directions: the target authority, the request-head size,
//! and removal of hop-by-hop headers.

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross a proxy.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The lengths of the names in [`HOP_BY_HOP`] and of `te`.
const HOP_BY_HOP_LENGTHS: [usize; 6] = [2, 7, 10, 16, 17, 19];

/// The request's target authority without a port: `:authority` for HTTP/2, `Host` for
/// HTTP/1.1.
pub fn authority(parts: &Parts) -> Option<&str> {
    let raw = match parts.uri.authority() {
        Some(a) => uri_host(a.as_str()),
        None => parts.headers.get(header::HOST)?.to_str().ok()?,
    };
    let host = without_port(raw);
    (!host.is_empty()).then_some(host)
}

/// The host of a URI's authority (`user@host:port`, `[v6]:port`), as `Authority::host` gives
/// it, with byte searches instead of its pattern searches (this runs twice per request).
fn uri_host(a: &str) -> &str {
    let a = match a.bytes().rposition(|b| b == b'@') {
        Some(i) => &a[i + 1..],
        None => a,
    };
    let end = match a.as_bytes().first() {
        Some(b'[') => a.bytes().position(|b| b == b']').map(|i| i + 1),
        _ => a.bytes().position(|b| b == b':'),
    };
    end.map_or(a, |i| &a[..i])
}

/// `host` without a trailing `:port` (digits only, maybe none).
fn without_port(host: &str) -> &str {
    let b = host.as_bytes();
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    match b.len().checked_sub(digits + 1) {
        Some(colon) if b[colon] == b':' => &host[..colon],
        _ => host,
    }
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
        let h = without_port(h.to_str().map_err(|_| "Host is not text")?);
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

/// The name of the service a request names, after its head passed the size limit
/// (`max_header_bytes`): `header-too-large`, or `malformed-request` when it names none or is a
/// `CONNECT` (a tunnel, which the mesh does not carry). Not validated as a service name yet:
/// the caller looks it up among the services it knows (whose names are valid) and validates
/// only a name it does not know ([`valid_service`]), so that a request to a known service
/// allocates no name. Records the name in the current span's `service` field.
pub fn service_name(
    parts: &Parts,
    max_header_bytes: usize,
) -> Result<&str, crate::http::respond::MeshError> {
    use crate::http::respond::MeshError;
    use detour_core::MeshErrorKind;
    let size = head_size(parts);
    if size > max_header_bytes {
        return Err(MeshError::new(
            MeshErrorKind::HeaderTooLarge,
            format!("{size} bytes, limit {max_header_bytes}"),
        ));
    }
    let malformed = |detail: &str| MeshError::new(MeshErrorKind::MalformedRequest, detail);
    if parts.method == http::Method::CONNECT {
        // A tunnel is no request to route: no service answers it, and the upstream would only
        // see a broken exchange (taken for a sick link or provider).
        return Err(malformed(
            "CONNECT is not supported: the mesh carries requests, not tunnels",
        ));
    }
    let name = target(parts).map_err(malformed)?;
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("service", name);
    }
    Ok(name)
}

/// `name` as a service name: `malformed-request` when it is not a valid one.
pub fn valid_service(
    name: &str,
) -> Result<detour_proto::ServiceName, crate::http::respond::MeshError> {
    use detour_core::MeshErrorKind;
    detour_proto::ServiceName::new(name).map_err(|e| {
        crate::http::respond::MeshError::new(MeshErrorKind::MalformedRequest, e.to_string())
    })
}

/// Removes hop-by-hop headers, including those named by `Connection`, and any `TE` other than
/// `trailers` (which gRPC needs).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names: which of them are here (most requests carry none; most HTTP/1.1
    // answers carry `Connection` only). Only those present are looked up again.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut te = false;
    for k in headers.keys() {
        let name = k.as_str();
        // Only a name of a hop-by-hop header's length is compared (most names are not).
        if !HOP_BY_HOP_LENGTHS.contains(&name.len()) {
            continue;
        }
        if k == header::TE {
            te = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h.as_str() == name) {
            present[i] = true;
        }
    }
    if !te && !present.contains(&true) {
        return;
    }
    if present[0] {
        // The names `Connection` lists go too; its values are taken out first.
        // On the stack: an answer's `Connection` is one value (`keep-alive`) nearly always.
        let listed: smallvec::SmallVec<[http::HeaderValue; 2]> =
            match headers.entry(header::CONNECTION) {
                header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
                header::Entry::Vacant(_) => smallvec::SmallVec::new(),
            };
        for v in &listed {
            for name in v.to_str().unwrap_or("").split(',') {
                let name = name.trim();
                // `keep-alive`, what nearly every answer lists, is hop by hop itself: removed
                // below when present, without parsing the name to look it up here.
                if !name.is_empty() && !name.eq_ignore_ascii_case("keep-alive") {
                    // Not a header name: nothing to remove.
                    headers.remove(name);
                }
            }
        }
    }
    // `Connection` (the first) is gone already when it was present.
    let others = HOP_BY_HOP.iter().zip(present).skip(1);
    for (h, _) in others.filter(|(_, p)| *p) {
        headers.remove(h);
    }
    if te {
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
    fn the_host_is_what_the_authority_and_the_old_port_rule_give() {
        let old_port_rule = |raw: &'static str| match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        };
        for a in [
            "echo",
            "echo:80",
            "echo:",
            "u@echo:80",
            "u:p@echo",
            "a@b@echo:1",
            "[::1]",
            "[::1]:8080",
            "127.0.0.1:9",
            "x:y",
        ] {
            let parsed: http::uri::Authority = a.parse().unwrap();
            assert_eq!(uri_host(a), parsed.host(), "{a}");
        }
        for raw in [
            "echo", "echo:80", "echo:", "echo:8x", ":80", "", "[::1]", "[::1]:1", "a:b:1",
        ] {
            assert_eq!(without_port(raw), old_port_rule(raw), "{raw:?}");
        }
    }

    #[test]
    fn a_connect_names_no_service() {
        let p = parts(
            http::Request::connect("hello:80")
                .header("host", "hello:80")
                .body(())
                .unwrap(),
        );
        let e = service_name(&p, 64 * 1024).unwrap_err();
        assert_eq!(e.kind, detour_core::MeshErrorKind::MalformedRequest);
        assert!(e.to_string().contains("CONNECT is not supported"), "{e}");
    }

    #[test]
    fn a_name_that_is_no_service_name_is_a_malformed_request() {
        let p = parts(
            http::Request::get("/x")
                .header("host", "a b")
                .body(())
                .unwrap(),
        );
        let name = service_name(&p, 64 * 1024).unwrap();
        assert_eq!(name, "a b");
        let e = valid_service(name).unwrap_err();
        assert_eq!(e.kind, detour_core::MeshErrorKind::MalformedRequest);
        assert_eq!(valid_service("echo").unwrap().as_str(), "echo");
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
        assert_eq!(p.headers.len(), 2, "{:?}", p.headers);
        assert!(p.headers.get("connection").is_none());
        assert!(p.headers.get("keep-alive").is_none());
        assert_eq!(p.headers["te"], "trailers");
        assert_eq!(p.headers["x-keep"], "1");
        assert!(head_size(&p) > 10);
    }

    #[test]
    fn the_lengths_are_those_of_the_hop_by_hop_names() {
        let mut lengths: Vec<usize> = HOP_BY_HOP.iter().map(|h| h.as_str().len()).collect();
        lengths.push(header::TE.as_str().len());
        lengths.sort_unstable();
        lengths.dedup();
        assert_eq!(lengths, HOP_BY_HOP_LENGTHS);
    }

    #[test]
    fn every_connection_header_and_every_name_it_lists_go() {
        let mut h = HeaderMap::new();
        h.append("connection", "keep-alive".parse().unwrap());
        h.append("connection", "X-A , x-b,,not a name".parse().unwrap());
        h.append("x-a", "1".parse().unwrap());
        h.append("x-b", "1".parse().unwrap());
        h.append("keep-alive", "timeout=5".parse().unwrap());
        h.append("upgrade", "h2c".parse().unwrap());
        h.append("proxy-authorization", "secret".parse().unwrap());
        h.append("te", "gzip".parse().unwrap());
        h.append("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
        // An answer's usual `Connection`, in any case, with and without the header it names.
        for with_header in [false, true] {
            let mut a = HeaderMap::new();
            a.append("connection", "Keep-Alive".parse().unwrap());
            if with_header {
                a.append("keep-alive", "timeout=5".parse().unwrap());
            }
            a.append("content-length", "5".parse().unwrap());
            strip_hop_by_hop(&mut a);
            let keys: Vec<_> = a.keys().map(|k| k.as_str()).collect();
            assert_eq!(keys, ["content-length"]);
        }
        // Nothing to remove: nothing changes.
        let mut plain = HeaderMap::new();
        plain.append("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 1);
    }
}
