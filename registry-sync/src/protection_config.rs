//! `[protection]` and `[protection.service.NAME]`: registry self-protection as written in the
//! config file, validated into a [`ProtectionPolicy`] (global defaults, per-service overrides).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::health::CheckSpec;
use crate::protection::{ProtectionConfig, ProtectionPolicy, ServicePolicy};
use detour_proto::ServiceName;
use serde::Deserialize;

/// `[protection]`: the defaults, and per-service tables overriding any of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProtectionRaw {
    /// Whether protection can engage.
    pub enabled: bool,
    /// Window in which vanished instances are counted.
    pub window_ms: u64,
    /// Share of a service's instances that may vanish in the window before protection engages.
    pub threshold: f64,
    /// Longest protection; then the registry is trusted again.
    pub max_ms: u64,
    /// Time a health check of a kept instance may take.
    pub check_timeout_ms: u64,
    /// Path an HTTP/1.1 kept instance must answer 2xx to (`""`: TCP connect only).
    pub check_path: String,
    /// `[protection.service.NAME]`: overrides for one service.
    pub service: BTreeMap<String, ProtectionOverrideRaw>,
}

impl Default for ProtectionRaw {
    fn default() -> Self {
        Self {
            enabled: true,
            window_ms: 10_000,
            threshold: 0.5,
            max_ms: 300_000,
            check_timeout_ms: 500,
            check_path: String::new(),
            service: BTreeMap::new(),
        }
    }
}

/// `[protection.service.NAME]`: any key of `[protection]` but `service`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ProtectionOverrideRaw {
    /// Overrides `protection.enabled`.
    pub enabled: Option<bool>,
    /// Overrides `protection.window_ms`.
    pub window_ms: Option<u64>,
    /// Overrides `protection.threshold`.
    pub threshold: Option<f64>,
    /// Overrides `protection.max_ms`.
    pub max_ms: Option<u64>,
    /// Overrides `protection.check_timeout_ms`.
    pub check_timeout_ms: Option<u64>,
    /// Overrides `protection.check_path`.
    pub check_path: Option<String>,
}

impl ProtectionRaw {
    /// Validates the defaults and every override, pushing each problem onto `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> ProtectionPolicy {
        let default = policy(
            p,
            "protection",
            &ProtectionOverrideRaw {
                enabled: Some(self.enabled),
                window_ms: Some(self.window_ms),
                threshold: Some(self.threshold),
                max_ms: Some(self.max_ms),
                check_timeout_ms: Some(self.check_timeout_ms),
                check_path: Some(self.check_path.clone()),
            },
            None,
        );
        let mut services = HashMap::new();
        for (name, o) in &self.service {
            let key = format!("protection.service.{name}");
            match ServiceName::new(name.clone()) {
                Ok(s) => {
                    services.insert(s, policy(p, &key, o, Some(&default)));
                }
                Err(e) => p.push(format!("{key}: {e}")),
            }
        }
        ProtectionPolicy { default, services }
    }
}

/// One service's settings: `o` over `base` (the defaults), or `o` alone for the defaults.
fn policy(
    p: &mut Vec<String>,
    key: &str,
    o: &ProtectionOverrideRaw,
    base: Option<&ServicePolicy>,
) -> ServicePolicy {
    let fallback = ServicePolicy::default();
    let base = base.unwrap_or(&fallback);
    let ms = |p: &mut Vec<String>, name: &str, v: Option<u64>, d: Duration| match v {
        Some(0) => {
            p.push(format!("{key}.{name}: must be greater than 0"));
            d
        }
        Some(v) => Duration::from_millis(v),
        None => d,
    };
    let threshold = o.threshold.unwrap_or(base.protection.threshold);
    if !(0.0..=1.0).contains(&threshold) {
        p.push(format!("{key}.threshold: must be between 0 and 1"));
    }
    let http_path = match &o.check_path {
        None => base.check.http_path.clone(),
        Some(s) if s.is_empty() => None,
        Some(s)
            if s.starts_with('/') && !s.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Some(s.clone())
        }
        Some(s) => {
            p.push(format!(
                "{key}.check_path: {s:?} must start with '/' and contain no spaces"
            ));
            None
        }
    };
    ServicePolicy {
        protection: ProtectionConfig {
            enabled: o.enabled.unwrap_or(base.protection.enabled),
            window: ms(p, "window_ms", o.window_ms, base.protection.window),
            threshold,
            max: ms(p, "max_ms", o.max_ms, base.protection.max),
        },
        check: CheckSpec {
            timeout: ms(
                p,
                "check_timeout_ms",
                o.check_timeout_ms,
                base.check.timeout,
            ),
            http_path,
        },
    }
}
