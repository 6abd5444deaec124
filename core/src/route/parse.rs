//! The route document (`routes/services` in the registry) and one service's entry: parsing and
//! validation, shared by the sidecars and SDKs that apply it and `detourctl route` that writes
//! it. Each service's entry stands alone: a malformed one is left out and reported, the others
//! apply.

use std::collections::BTreeMap;
use std::sync::Arc;

use detour_proto::ServiceName;
use detour_proto::service_doc;
use serde::{Deserialize, Serialize};

use super::{HashOn, LabelKey, Matcher, Rule, ServiceRoutes, Split, Subset};

/// The document's format version.
pub const ROUTES_VERSION: u32 = 1;

/// Most services one document may name (a larger document is refused as a whole).
pub const MAX_ROUTE_SERVICES: usize = 10_000;

/// Most subsets per service.
pub const MAX_SUBSETS: usize = 32;

/// Most rules per service.
pub const MAX_RULES: usize = 64;

/// Longest header, cookie, label or path value a rule may name.
const MAX_VALUE: usize = 256;

/// One service's entry as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceRaw {
    #[serde(default)]
    subsets: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    rules: Vec<RuleRaw>,
    #[serde(default)]
    default: Option<TargetRaw>,
    #[serde(default)]
    hash: Option<HashRaw>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRaw {
    #[serde(rename = "match", default)]
    when: MatchRaw,
    to: TargetRaw,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatchRaw {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path_exact: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    cookies: BTreeMap<String, String>,
}

/// A subset's name, or subsets' names with weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetRaw {
    One(String),
    Split(BTreeMap<String, u32>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HashRaw {
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    cookie: Option<String>,
}

/// A parsed document: the well-formed entries, and why the others were left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteDoc {
    /// Each service's routes.
    pub services: BTreeMap<ServiceName, Arc<ServiceRoutes>>,
    /// The entries left out, with why.
    pub malformed: Vec<String>,
}

/// Why a whole document was refused.
pub type RouteDocError = detour_proto::service_doc::ServiceDocError;

impl RouteDoc {
    /// Parses `bytes`: the whole document must have the right shape and version; then each
    /// service's entry is kept or left out on its own.
    pub fn parse(bytes: &[u8]) -> Result<RouteDoc, RouteDocError> {
        let shape = ("route", ROUTES_VERSION, MAX_ROUTE_SERVICES);
        let (services, malformed) = service_doc::parse(bytes, shape, |name, value| {
            ServiceRoutes::from_value(value)
                .map(Arc::new)
                .map_err(|e| format!("{name}: {e}"))
        })?;
        Ok(RouteDoc {
            services,
            malformed,
        })
    }

    /// The document's bytes (well-formed entries only, as written).
    pub fn to_bytes(&self) -> Vec<u8> {
        service_doc::to_bytes(
            ROUTES_VERSION,
            self.services.iter().map(|(k, v)| {
                let value = serde_json::from_str(&v.json).unwrap_or(serde_json::Value::Null);
                (k.to_string(), value)
            }),
        )
    }
}

impl ServiceRoutes {
    /// One service's entry from its JSON text (what the sidecar sends the SDK).
    pub fn parse(json: &str) -> Result<ServiceRoutes, String> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Self::from_value(value)
    }

    /// One service's entry, validated.
    pub fn from_value(value: serde_json::Value) -> Result<ServiceRoutes, String> {
        let json: Arc<str> = value.to_string().into();
        let raw: ServiceRaw = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if raw.subsets.len() > MAX_SUBSETS {
            return Err(format!(
                "{} subsets, at most {MAX_SUBSETS}",
                raw.subsets.len()
            ));
        }
        if raw.rules.len() > MAX_RULES {
            return Err(format!("{} rules, at most {MAX_RULES}", raw.rules.len()));
        }
        let subsets = raw
            .subsets
            .into_iter()
            .map(|(name, sel)| subset(name, sel))
            .collect::<Result<Vec<_>, _>>()?;
        let target = |t: TargetRaw, at: &str| split(&subsets, t).map_err(|e| format!("{at}: {e}"));
        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let when = matcher(r.when).map_err(|e| format!("rules[{i}]: {e}"))?;
            rules.push(Rule {
                when,
                to: target(r.to, &format!("rules[{i}].to"))?,
            });
        }
        let default = raw.default.map(|t| target(t, "default")).transpose()?;
        let hash = raw.hash.map(hash_on).transpose()?;
        Ok(ServiceRoutes {
            subsets,
            rules,
            default,
            hash,
            json,
        })
    }
}

fn value_ok(what: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_VALUE {
        return Err(format!("{what}: longer than {MAX_VALUE} bytes"));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{what}: control characters"));
    }
    Ok(())
}

fn subset(name: String, sel: BTreeMap<String, String>) -> Result<Subset, String> {
    if name.is_empty() || name == "all" || name.len() > 64 {
        return Err(format!("subset name {name:?}: 1-64 bytes, not \"all\""));
    }
    if sel.is_empty() {
        return Err(format!("subset {name}: selects nothing (no label)"));
    }
    let mut selector = Vec::new();
    for (k, v) in sel {
        value_ok(&format!("subset {name}.{k}"), &k)?;
        value_ok(&format!("subset {name}.{k}"), &v)?;
        let key = match k.as_str() {
            "version" => LabelKey::Version,
            "zone" => LabelKey::Zone,
            _ => LabelKey::Label(k),
        };
        selector.push((key, v));
    }
    Ok(Subset { name, selector })
}

fn split(subsets: &[Subset], t: TargetRaw) -> Result<Split, String> {
    let weights = match t {
        TargetRaw::One(name) => BTreeMap::from([(name, 1)]),
        TargetRaw::Split(w) => w,
    };
    let mut out = Vec::new();
    for (name, w) in weights {
        let Some(i) = subsets.iter().position(|s| s.name == name) else {
            return Err(format!("no subset named {name:?}"));
        };
        if w > 1_000_000 {
            return Err(format!("weight {w} of {name}: at most 1000000"));
        }
        if w > 0 {
            out.push((i, w));
        }
    }
    if out.is_empty() {
        return Err("no subset with a weight above 0".into());
    }
    Ok(Split(out))
}

fn header_name(what: &str, name: &str) -> Result<http::HeaderName, String> {
    http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("{what}: {name:?} is not a header name"))
}

fn matcher(m: MatchRaw) -> Result<Matcher, String> {
    let method = m
        .method
        .map(|s| {
            http::Method::from_bytes(s.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("method {s:?} is not a method"))
        })
        .transpose()?;
    for p in [&m.path_exact, &m.path_prefix].into_iter().flatten() {
        value_ok("path", p)?;
        if !p.starts_with('/') {
            return Err(format!("path {p:?} does not start with /"));
        }
    }
    let mut headers = Vec::new();
    for (name, v) in m.headers {
        value_ok(&format!("header {name}"), &v)?;
        headers.push((header_name("header", &name)?, v));
    }
    let mut cookies = Vec::new();
    for (name, v) in m.cookies {
        value_ok(&format!("cookie {name}"), &name)?;
        value_ok(&format!("cookie {name}"), &v)?;
        cookies.push((name, v));
    }
    Ok(Matcher {
        method,
        path_exact: m.path_exact,
        path_prefix: m.path_prefix,
        headers,
        cookies,
    })
}

fn hash_on(h: HashRaw) -> Result<HashOn, String> {
    match (h.header, h.cookie) {
        (Some(name), None) => Ok(HashOn::Header(header_name("hash.header", &name)?)),
        (None, Some(name)) if !name.is_empty() => {
            value_ok("hash.cookie", &name)?;
            Ok(HashOn::Cookie(name))
        }
        _ => Err("hash: give exactly one of header or cookie".into()),
    }
}
