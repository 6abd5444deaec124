//! Routing by version and label: which of a service's endpoints one request may go to, the one
//! pure decision the CA (mesh and CA-direct paths) and the SDK (direct path) both apply.
//!
//! A service's routes (one entry of the registry's `routes/services` document, [`RouteDoc`])
//! name **subsets** of its endpoints by label (`version` and `zone` match the endpoint's fields
//! of those names, any other key its labels), **ordered rules** matching a request's method,
//! path, headers and cookies to a subset or a weighted split of subsets, a **default** for the
//! requests no rule matches (absent: every endpoint), and optionally a header or cookie whose
//! value pins a caller ([`HashOn`]): the split is then decided by the value instead of at
//! random, and the endpoint within the subset by rendezvous hashing ([`rendezvous_order`]), so
//! that when one of N endpoints leaves only the keys it held move.
//!
//! A chosen subset with no healthy endpoint falls back to the default target, and then to every
//! endpoint ([`Selection::fell_back`]): routing never turns into an error while any endpoint is
//! healthy.

mod hash;
mod parse;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use detour_proto::Endpoint;
use http::HeaderMap;

pub use hash::{key_hash, rendezvous_best, rendezvous_order, roll_of};
pub use parse::{
    MAX_ROUTE_SERVICES, MAX_RULES, MAX_SUBSETS, ROUTES_VERSION, RouteDoc, RouteDocError,
};

/// A caller's preference for providers of its own zone (the sidecar's `zone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZonePreference {
    /// The zone.
    pub zone: String,
    /// Callers stay in the zone while at least this share of its endpoints (percent) is usable
    /// (healthy, not ejected), and spill over to every zone otherwise.
    pub min_healthy_percent: u8,
}

impl ZonePreference {
    /// Whether a caller stays in its zone, which has `local` candidates of which `usable` are
    /// usable, among `total` candidates in all: when some are elsewhere, and at least one and
    /// the minimum share of the zone's are usable.
    pub fn stays(&self, local: usize, usable: usize, total: usize) -> bool {
        local > 0
            && local < total
            && usable > 0
            && usable * 100 >= local * usize::from(self.min_healthy_percent)
    }
}

/// What a subset selects on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelKey {
    /// The endpoint's `version` field (or, when empty, its `version` label).
    Version,
    /// The endpoint's `zone` field (or, when empty, its `zone` label).
    Zone,
    /// Any other label.
    Label(String),
}

/// A named set of a service's endpoints: those whose labels have every listed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subset {
    /// Its name in the rules (`v2`, `canary`).
    pub name: String,
    selector: Vec<(LabelKey, String)>,
}

impl Subset {
    /// Whether `e` belongs to it.
    pub fn contains(&self, e: &Endpoint) -> bool {
        self.selector.iter().all(|(k, v)| {
            let have = match k {
                LabelKey::Version if !e.version.is_empty() => e.version.as_str(),
                LabelKey::Zone if !e.zone.is_empty() => e.zone.as_str(),
                LabelKey::Version => label(e, "version"),
                LabelKey::Zone => label(e, "zone"),
                LabelKey::Label(l) => label(e, l),
            };
            have == v
        })
    }
}

fn label<'a>(e: &'a Endpoint, key: &str) -> &'a str {
    e.labels.get(key).map_or("", String::as_str)
}

/// Where matching requests go: one subset, or several by weight (indexes into the subsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split(Vec<(usize, u32)>);

impl Split {
    /// The subset `roll` lands on (weights in proportion).
    fn pick(&self, roll: u64) -> usize {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut at = roll % total.max(1);
        for (subset, w) in &self.0 {
            let w = u64::from(*w);
            if at < w {
                return *subset;
            }
            at -= w;
        }
        self.0[0].0
    }
}

/// A header or cookie whose value pins a caller to a subset and an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header (lower-case name).
    Header(http::HeaderName),
    /// A cookie of the `cookie` header.
    Cookie(String),
}

/// What a rule matches; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Matcher {
    method: Option<http::Method>,
    path_exact: Option<String>,
    path_prefix: Option<String>,
    headers: Vec<(http::HeaderName, String)>,
    cookies: Vec<(String, String)>,
}

impl Matcher {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.method.as_ref().is_none_or(|m| m == req.method)
            && self.path_exact.as_deref().is_none_or(|p| p == req.path)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| req.path.starts_with(p))
            && self.headers.iter().all(|(name, want)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.as_bytes() == want.as_bytes())
            })
            && self
                .cookies
                .iter()
                .all(|(name, want)| cookie(req.headers, name) == Some(want.as_str()))
    }
}

/// The value of cookie `name` in the request's `cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim())
        })
}

/// One ordered rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    when: Matcher,
    to: Split,
}

/// What routing looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Its method.
    pub method: &'a http::Method,
    /// Its path (without the query).
    pub path: &'a str,
    /// Its headers.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// The view of `parts`.
    pub fn of(parts: &'a http::request::Parts) -> Self {
        RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            headers: &parts.headers,
        }
    }
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// Rule number N (from 0) matched.
    Rule(usize),
    /// No rule matched: the default target.
    Default,
}

/// One request's routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection {
    /// The subset to draw endpoints from (index into [`ServiceRoutes::subsets`]); `None`: every
    /// endpoint of the service.
    pub subset: Option<usize>,
    /// What decided.
    pub decided: Decided,
    /// The subset first chosen had no healthy endpoint, so a fallback was taken.
    pub fell_back: bool,
    /// The pinning key's hash, when the service hashes and the request carries the key: choose
    /// the endpoint with [`rendezvous_order`].
    pub key: Option<u64>,
}

/// One service's routes, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRoutes {
    /// The subsets, in the order of their names.
    pub subsets: Vec<Subset>,
    rules: Vec<Rule>,
    default: Option<Split>,
    hash: Option<HashOn>,
    /// The entry as written in the document (what the sidecar sends the SDK).
    pub json: Arc<str>,
}

impl ServiceRoutes {
    /// The number of rules.
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// Whether the service pins callers by a header or cookie.
    pub fn hashes(&self) -> bool {
        self.hash.is_some()
    }

    /// The pinning key's hash in `req`, if the service pins and the request carries one.
    pub fn key_of(&self, req: &RequestView<'_>) -> Option<u64> {
        match self.hash.as_ref()? {
            HashOn::Header(name) => req.headers.get(name).map(|v| key_hash(v.as_bytes())),
            HashOn::Cookie(name) => cookie(req.headers, name).map(|v| key_hash(v.as_bytes())),
        }
    }

    /// Routes `req`. `roll` is a random number (ignored when the request carries the pinning
    /// key, whose hash decides the split instead); `usable(i)` tells whether subset `i` has a
    /// healthy endpoint now.
    pub fn select(
        &self,
        req: &RequestView<'_>,
        roll: u64,
        usable: impl Fn(usize) -> bool,
    ) -> Selection {
        let key = self.key_of(req);
        let roll = key.map_or(roll, roll_of);
        let (decided, first) = match self.rules.iter().position(|r| r.when.matches(req)) {
            Some(i) => (Decided::Rule(i), Some(&self.rules[i].to)),
            None => (Decided::Default, self.default.as_ref()),
        };
        let mut sel = Selection {
            subset: None,
            decided,
            fell_back: false,
            key,
        };
        let Some(first) = first else {
            return sel;
        };
        let chosen = first.pick(roll);
        if usable(chosen) {
            sel.subset = Some(chosen);
            return sel;
        }
        sel.fell_back = true;
        if decided != Decided::Default
            && let Some(d) = &self.default
        {
            let other = d.pick(roll);
            if usable(other) {
                sel.subset = Some(other);
            }
        }
        sel
    }

    /// [`Self::select`] over `endpoints` themselves: a subset is usable when one of its
    /// endpoints is healthy.
    pub fn select_among(
        &self,
        req: &RequestView<'_>,
        roll: u64,
        endpoints: &[Endpoint],
    ) -> Selection {
        self.select(req, roll, |i| {
            endpoints
                .iter()
                .any(|e| e.healthy && self.subsets[i].contains(e))
        })
    }

    /// The name of subset `i` (`"all"` for `None`).
    pub fn subset_name(&self, i: Option<usize>) -> &str {
        i.and_then(|i| self.subsets.get(i))
            .map_or("all", |s| s.name.as_str())
    }
}
