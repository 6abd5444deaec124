//! The traffic policy document (`policy/services` in the registry): per-service overrides of the
//! sidecars' timeouts, retry budget, outlier ejection, per-endpoint concurrency and the PAs' rate
//! limits, so that an
//! operator changes them on every host without a restart. Parsing and validation only (shared by
//! the sidecars that apply it and `detourctl policy` that writes it). Each service's entry stands
//! alone: a malformed one is left out and reported, the others apply.

use std::collections::BTreeMap;

use detour_proto::ServiceName;
use detour_proto::service_doc;
use serde::{Deserialize, Serialize};

/// The document's format version.
pub const POLICY_VERSION: u32 = 1;

/// Most services one document may name (a larger document is refused as a whole).
pub const MAX_POLICY_SERVICES: usize = 10_000;

/// One service's overrides; a key left out keeps the sidecar's own setting. The same keys make
/// the sidecar config's `[policy.service.NAME]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyOverride {
    /// Time for the response head over every attempt of a request (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Time for the response head of one attempt (ms); 0: only the request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub try_timeout_ms: Option<u64>,
    /// Time to open a connection to one of the service's endpoints (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Resends allowed per request (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget_ratio: Option<f64>,
    /// Resends allowed per second whatever the traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_min_per_second: Option<u32>,
    /// Server errors in a row that eject an endpoint (0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_consecutive_5xx: Option<u32>,
    /// The first outlier ejection's length (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_base_ejection_ms: Option<u64>,
    /// Most endpoints ejected as outliers at once (percent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_max_ejected_percent: Option<u8>,
    /// Below this share of endpoints not ejected (percent), every endpoint is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_panic_threshold_percent: Option<u8>,
    /// Most requests in flight from one sidecar to one endpoint (0: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_per_endpoint: Option<u32>,
    /// Most requests a second each PA hands its provider of the service (0: no limit; absent:
    /// the PA's `[[provide]] rate_limit_rps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_rps: Option<u32>,
    /// Requests allowed at once above that rate (absent: the rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_burst: Option<u32>,
    /// Whether callers may reach the service on paths that skip its PAs (C→P, C→CA→P) when a
    /// PA cannot be reached: `allow` (absent: what each provider registered) or `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct: Option<Direct>,
}

/// Paths that skip a provider's PA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direct {
    /// Allowed (when the provider allows them too).
    Allow,
    /// Forbidden: nothing reaches the service except through a PA.
    Deny,
}

/// Longest timeout accepted (one hour).
const MAX_TIMEOUT_MS: u64 = 3_600_000;

impl PolicyOverride {
    /// Every out-of-range value, each prefixed with `key.` (e.g. `policy.service.orders.`).
    pub fn problems(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        let mut range = |name: &str, v: Option<u64>, lo: u64, hi: u64| {
            if let Some(v) = v
                && !(lo..=hi).contains(&v)
            {
                p.push(format!("{key}.{name}: {v} is not between {lo} and {hi}"));
            }
        };
        range(
            "request_timeout_ms",
            self.request_timeout_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        range("try_timeout_ms", self.try_timeout_ms, 0, MAX_TIMEOUT_MS);
        range("connect_timeout_ms", self.connect_timeout_ms, 1, 60_000);
        let u = |v: Option<u32>| v.map(u64::from);
        range(
            "retry_min_per_second",
            u(self.retry_min_per_second),
            0,
            100_000,
        );
        range(
            "outlier_consecutive_5xx",
            u(self.outlier_consecutive_5xx),
            0,
            10_000,
        );
        range(
            "outlier_base_ejection_ms",
            self.outlier_base_ejection_ms,
            1,
            MAX_TIMEOUT_MS,
        );
        range(
            "outlier_max_ejected_percent",
            self.outlier_max_ejected_percent.map(u64::from),
            0,
            100,
        );
        range(
            "outlier_panic_threshold_percent",
            self.outlier_panic_threshold_percent.map(u64::from),
            0,
            100,
        );
        range(
            "max_concurrent_per_endpoint",
            u(self.max_concurrent_per_endpoint),
            0,
            1_000_000,
        );
        range("rate_limit_rps", u(self.rate_limit_rps), 0, 10_000_000);
        range("rate_limit_burst", u(self.rate_limit_burst), 1, 10_000_000);
        if let Some(r) = self.retry_budget_ratio
            && !(0.0..=1.0).contains(&r)
        {
            p.push(format!(
                "{key}.retry_budget_ratio: {r} is not between 0 and 1"
            ));
        }
        p
    }

    /// The PA's rate limit (rate, burst) for a provider configured with `provided`.
    pub fn rate_limit(&self, provided: Option<(u32, u32)>) -> Option<(u32, u32)> {
        match (self.rate_limit_rps, provided) {
            (Some(0), _) | (None, None) => None,
            (Some(rate), _) => Some((rate, self.rate_limit_burst.unwrap_or(rate))),
            (None, Some((rate, burst))) => Some((rate, self.rate_limit_burst.unwrap_or(burst))),
        }
    }

    /// `over`'s keys over these.
    pub fn then(&self, over: &PolicyOverride) -> PolicyOverride {
        PolicyOverride {
            request_timeout_ms: over.request_timeout_ms.or(self.request_timeout_ms),
            try_timeout_ms: over.try_timeout_ms.or(self.try_timeout_ms),
            connect_timeout_ms: over.connect_timeout_ms.or(self.connect_timeout_ms),
            retry_budget_ratio: over.retry_budget_ratio.or(self.retry_budget_ratio),
            retry_min_per_second: over.retry_min_per_second.or(self.retry_min_per_second),
            outlier_consecutive_5xx: over
                .outlier_consecutive_5xx
                .or(self.outlier_consecutive_5xx),
            outlier_base_ejection_ms: over
                .outlier_base_ejection_ms
                .or(self.outlier_base_ejection_ms),
            outlier_max_ejected_percent: over
                .outlier_max_ejected_percent
                .or(self.outlier_max_ejected_percent),
            outlier_panic_threshold_percent: over
                .outlier_panic_threshold_percent
                .or(self.outlier_panic_threshold_percent),
            max_concurrent_per_endpoint: over
                .max_concurrent_per_endpoint
                .or(self.max_concurrent_per_endpoint),
            rate_limit_rps: over.rate_limit_rps.or(self.rate_limit_rps),
            rate_limit_burst: over.rate_limit_burst.or(self.rate_limit_burst),
            direct: over.direct.or(self.direct),
        }
    }
}

/// A parsed document: the well-formed entries, and why the others were left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyDoc {
    /// Each service's overrides.
    pub services: BTreeMap<ServiceName, PolicyOverride>,
    /// The entries left out, with why.
    pub malformed: Vec<String>,
}

/// Why a whole document was refused.
pub type PolicyDocError = detour_proto::service_doc::ServiceDocError;

impl PolicyDoc {
    /// Parses `bytes`: the whole document must have the right shape and version; then each
    /// service's entry is kept or left out on its own.
    pub fn parse(bytes: &[u8]) -> Result<PolicyDoc, PolicyDocError> {
        let shape = ("policy", POLICY_VERSION, MAX_POLICY_SERVICES);
        let (services, malformed) = service_doc::parse(bytes, shape, |name, value| {
            let o = serde_json::from_value::<PolicyOverride>(value)
                .map_err(|e| format!("{name}: {e}"))?;
            let problems = o.problems(name);
            match problems.is_empty() {
                true => Ok(o),
                false => Err(problems.join("; ")),
            }
        })?;
        Ok(PolicyDoc {
            services,
            malformed,
        })
    }

    /// The document's bytes (well-formed entries only).
    pub fn to_bytes(&self) -> Vec<u8> {
        service_doc::to_bytes(
            POLICY_VERSION,
            self.services.iter().map(|(k, v)| {
                let value = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
                (k.to_string(), value)
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_stand_alone_and_round_trip() {
        let doc = PolicyDoc::parse(
            br#"{"version":1,"services":{
                "orders":{"request_timeout_ms":300,"max_concurrent_per_endpoint":8},
                "bad-range":{"retry_budget_ratio":1.5},
                "bad-key":{"timeout":5},
                "no spaces":{}
            }}"#,
        )
        .unwrap();
        assert_eq!(doc.services.len(), 1);
        let orders = &doc.services[&ServiceName::new("orders").unwrap()];
        assert_eq!(orders.request_timeout_ms, Some(300));
        assert_eq!(orders.max_concurrent_per_endpoint, Some(8));
        assert_eq!(doc.malformed.len(), 3, "{:?}", doc.malformed);
        let again = PolicyDoc::parse(&doc.to_bytes()).unwrap();
        assert_eq!(again.services, doc.services);
    }

    #[test]
    fn whole_document_refusals() {
        assert!(matches!(
            PolicyDoc::parse(br#"{"version":2,"services":{}}"#),
            Err(PolicyDocError::Version { found: 2, .. })
        ));
        assert!(PolicyDoc::parse(b"\xff garbage").is_err());
        assert!(PolicyDoc::parse(br#"{"version":1,"extra":1}"#).is_err());
    }

    #[test]
    fn rate_limits_override_the_provider_config() {
        let none = PolicyOverride::default();
        assert_eq!(none.rate_limit(Some((10, 20))), Some((10, 20)));
        assert_eq!(none.rate_limit(None), None);
        let set = PolicyOverride {
            rate_limit_rps: Some(5),
            ..PolicyOverride::default()
        };
        assert_eq!(set.rate_limit(None), Some((5, 5)));
        assert_eq!(set.rate_limit(Some((10, 20))), Some((5, 5)));
        let off = PolicyOverride {
            rate_limit_rps: Some(0),
            ..PolicyOverride::default()
        };
        assert_eq!(off.rate_limit(Some((10, 20))), None);
    }

    #[test]
    fn later_keys_win() {
        let base = PolicyOverride {
            request_timeout_ms: Some(1000),
            try_timeout_ms: Some(100),
            ..PolicyOverride::default()
        };
        let over = PolicyOverride {
            request_timeout_ms: Some(50),
            ..PolicyOverride::default()
        };
        let merged = base.then(&over);
        assert_eq!(merged.request_timeout_ms, Some(50));
        assert_eq!(merged.try_timeout_ms, Some(100));
    }
}
