//! Dubbo's provider URLs, pure: `dubbo://ip:port/interface?application=…&weight=…` (URL-encoded,
//! as ZooKeeper children of `/dubbo/{interface}/providers/`) to Detour endpoints.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use detour_proto::{AppProtocol, Endpoint, HostId, InstanceId, ServiceName, Source};

use super::Skip;

/// Longest provider URL read (a longer child is skipped).
pub const MAX_URL: usize = 8 * 1024;
/// Most parameters kept as labels per endpoint.
pub const MAX_LABELS: usize = 32;
/// Longest label value kept.
pub const MAX_LABEL_VALUE: usize = 256;

/// How provider URLs map to endpoints.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// The legacy registry's name (`source = sync:<name>`).
    pub legacy: String,
    /// URL scheme → the protocol Detour speaks to such a provider; other schemes are skipped.
    pub protocols: HashMap<String, AppProtocol>,
    /// Interface → service name; an interface not listed keeps its own name.
    pub services: HashMap<String, ServiceName>,
    /// Parameters dropped instead of kept as labels (they change on every registration or are
    /// too long to be useful).
    pub ignored_params: Vec<String>,
}

impl Mapping {
    /// The default protocol table: `http`, `rest` → HTTP/1.1; `h2c`, `grpc`, `tri` → HTTP/2.
    pub fn default_protocols() -> HashMap<String, AppProtocol> {
        [
            ("http", AppProtocol::Http1),
            ("rest", AppProtocol::Http1),
            ("h2c", AppProtocol::Http2),
            ("grpc", AppProtocol::Http2),
            ("tri", AppProtocol::Http2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// The default ignored parameters.
    pub fn default_ignored() -> Vec<String> {
        [
            "timestamp",
            "pid",
            "methods",
            "interface",
            "anyhost",
            "side",
            "dubbo",
            "release",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect()
    }
}

/// A provider URL that could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Why, as a metric label.
    pub why: Skip,
    /// What exactly.
    pub detail: String,
}

fn reject(why: Skip, detail: impl Into<String>) -> Rejected {
    Rejected {
        why,
        detail: detail.into(),
    }
}

/// Decodes `%XX` escapes (and nothing else: `+` stays, as in Dubbo's encoding of children).
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Encodes every byte but letters, digits, `.`, `-` and `_` as `%XX` (how Dubbo writes a URL
/// into a child name).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A name made of what Detour names allow: other characters become `-`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_matches('.')
        .to_owned()
}

/// Maps one child of `/dubbo/{interface}/providers/` (still URL-encoded) to an endpoint.
pub fn parse_provider(child: &str, interface: &str, map: &Mapping) -> Result<Endpoint, Rejected> {
    if child.len() > MAX_URL {
        return Err(reject(
            Skip::Malformed,
            format!("longer than {MAX_URL} bytes"),
        ));
    }
    let url = percent_decode(child).ok_or_else(|| reject(Skip::Malformed, "bad %-escape"))?;
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| reject(Skip::Malformed, "no scheme"))?;
    let scheme = scheme.to_ascii_lowercase();
    let Some(&protocol) = map.protocols.get(&scheme) else {
        return Err(reject(
            Skip::Protocol,
            format!("protocol {scheme:?} is not carried"),
        ));
    };
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = before_query.split_once('/').unwrap_or((before_query, ""));
    let app_address: SocketAddr = authority.parse().map_err(|_| {
        reject(
            Skip::Malformed,
            format!("address {authority:?} is not ip:port"),
        )
    })?;
    if app_address.port() == 0 || app_address.ip().is_unspecified() {
        return Err(reject(
            Skip::Name,
            format!("address {app_address} cannot be dialled"),
        ));
    }
    let mut params = query_params(query)?;
    let named = if path.is_empty() { interface } else { path };
    if named != interface {
        return Err(reject(
            Skip::Malformed,
            format!("URL names interface {named:?} under {interface:?}"),
        ));
    }
    let service = match map.services.get(interface) {
        Some(s) => s.clone(),
        None => ServiceName::new(interface)
            .map_err(|e| reject(Skip::Name, format!("interface is no service name: {e}")))?,
    };
    let host_text = sanitize(&ip_text(app_address.ip()));
    let host = HostId::new(host_text.clone()).map_err(|e| reject(Skip::Name, e.to_string()))?;
    let instance = InstanceId::new(format!("{host_text}-{}", app_address.port()))
        .map_err(|e| reject(Skip::Name, e.to_string()))?;
    let mut ep = Endpoint::new(service, instance, host, app_address);
    ep.protocol = protocol;
    ep.source = Source::Sync(map.legacy.clone());
    ep.weight = match params.remove("weight") {
        None => 100, // Dubbo's default weight
        Some(w) => w
            .parse::<u32>()
            .map_err(|_| reject(Skip::Malformed, format!("weight {w:?} is not a number")))?
            .max(1),
    };
    ep.version = params.remove("version").unwrap_or_default();
    ep.zone = params.remove("zone").unwrap_or_default();
    if ep.version.len() > MAX_LABEL_VALUE || ep.zone.len() > MAX_LABEL_VALUE {
        return Err(reject(Skip::Malformed, "version or zone too long"));
    }
    for k in &map.ignored_params {
        params.remove(k);
    }
    ep.labels = params
        .into_iter()
        .filter(|(k, v)| !k.is_empty() && k.len() <= 64 && v.len() <= MAX_LABEL_VALUE)
        .take(MAX_LABELS)
        .collect();
    Ok(ep)
}

/// The parameters of a provider URL's query, %-decoded (the last of a repeated name wins).
fn query_params(query: &str) -> Result<BTreeMap<String, String>, Rejected> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k =
            percent_decode(k).ok_or_else(|| reject(Skip::Malformed, "bad %-escape in query"))?;
        let v =
            percent_decode(v).ok_or_else(|| reject(Skip::Malformed, "bad %-escape in query"))?;
        params.insert(k, v);
    }
    Ok(params)
}

fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Mapping {
        Mapping {
            legacy: "zk".into(),
            protocols: Mapping::default_protocols(),
            services: [(
                "com.acme.Hello".to_owned(),
                ServiceName::new("hello").unwrap(),
            )]
            .into_iter()
            .collect(),
            ignored_params: Mapping::default_ignored(),
        }
    }

    fn enc(s: &str) -> String {
        percent_encode(s)
    }

    #[test]
    fn a_dubbo_url_maps_to_an_endpoint() {
        let url = "rest://10.1.2.3:8080/com.acme.Hello?application=hello-app&weight=40&version=1.2.0&group=blue&zone=z1&timestamp=1700000000000&side=provider";
        let ep = parse_provider(&enc(url), "com.acme.Hello", &map()).unwrap();
        assert_eq!(ep.service.as_str(), "hello");
        assert_eq!(ep.instance.as_str(), "10.1.2.3-8080");
        assert_eq!(ep.host.as_str(), "10.1.2.3");
        assert_eq!(ep.app_address, "10.1.2.3:8080".parse().unwrap());
        assert_eq!(ep.pa_address, None);
        assert_eq!(ep.protocol, AppProtocol::Http1);
        assert_eq!(ep.weight, 40);
        assert_eq!(ep.version, "1.2.0");
        assert_eq!(ep.zone, "z1");
        assert_eq!(ep.source, Source::Sync("zk".into()));
        let labels: Vec<_> = ep.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(labels, ["application=hello-app", "group=blue"]);
    }

    #[test]
    fn an_unmapped_interface_keeps_its_name_and_dubbo_weight_defaults() {
        let ep = parse_provider(&enc("tri://[::1]:50051/org.x.Y?a=b"), "org.x.Y", &map()).unwrap();
        assert_eq!(ep.service.as_str(), "org.x.Y");
        assert_eq!(ep.instance.as_str(), "--1-50051");
        assert_eq!(ep.protocol, AppProtocol::Http2);
        assert_eq!(ep.weight, 100);
    }

    #[test]
    fn bad_urls_are_rejected_with_a_reason() {
        let m = map();
        let why = |child: &str| parse_provider(child, "com.acme.Hello", &m).unwrap_err().why;
        assert_eq!(
            why(&enc("dubbo://10.0.0.1:20880/com.acme.Hello")),
            Skip::Protocol
        );
        assert_eq!(why("not a url"), Skip::Malformed);
        assert_eq!(why("rest%3A%2F%2F10.0.0.1"), Skip::Malformed);
        assert_eq!(why("%ZZ"), Skip::Malformed);
        assert_eq!(
            why(&enc("rest://10.0.0.1:99999/com.acme.Hello")),
            Skip::Malformed
        );
        assert_eq!(why(&enc("rest://0.0.0.0:80/com.acme.Hello")), Skip::Name);
        assert_eq!(
            why(&enc("rest://10.0.0.1:80/com.acme.Other")),
            Skip::Malformed
        );
        assert_eq!(
            why(&enc("rest://10.0.0.1:80/com.acme.Hello?weight=-3")),
            Skip::Malformed
        );
        assert_eq!(why(&"x".repeat(MAX_URL + 1)), Skip::Malformed);
        let bad_iface = parse_provider(&enc("rest://10.0.0.1:80/a b"), "a b", &m).unwrap_err();
        assert_eq!(bad_iface.why, Skip::Name);
    }

    #[test]
    fn encoding_round_trips() {
        let url = "rest://10.0.0.1:80/a.B?x=1&y=a b%";
        assert_eq!(percent_decode(&percent_encode(url)).as_deref(), Some(url));
    }

    #[test]
    fn labels_are_bounded() {
        let mut url = String::from("rest://10.0.0.1:80/com.acme.Hello?");
        for i in 0..100 {
            url.push_str(&format!("k{i:03}=v&"));
        }
        url.push_str(&format!("long={}", "v".repeat(MAX_LABEL_VALUE + 1)));
        let ep = parse_provider(&enc(&url), "com.acme.Hello", &map()).unwrap();
        assert_eq!(ep.labels.len(), MAX_LABELS);
        assert!(!ep.labels.contains_key("long"));
    }
}
