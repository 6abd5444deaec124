//! `[tracing]`: where this sidecar exports its spans (OTLP/HTTP), how many of the traces it
//! starts are recorded, and how many finished spans may wait. Off (no endpoint) by default:
//! the sidecar then touches no trace header.

use detour_core::trace::{OtlpEndpoint, TraceConfig};
use detour_proto::HostId;
use serde::Deserialize;

/// `[tracing]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TracingRaw {
    /// OTLP/HTTP endpoint, `http://host:port[/path]` (path `/v1/traces` when none); `""`: no
    /// export.
    pub otlp_endpoint: String,
    /// Share of the traces this sidecar starts that are recorded, 0 to 1 (a request that comes
    /// with a `traceparent` follows its sampled flag).
    pub sample: f64,
    /// Most finished spans waiting for export; more are dropped and counted.
    pub queue: usize,
    /// The `service.name` of this sidecar's spans.
    pub service_name: String,
}

impl Default for TracingRaw {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sample: 1.0,
            queue: 2048,
            service_name: "detour-sidecar".into(),
        }
    }
}

impl TracingRaw {
    /// Checks every value, pushing each problem onto `p`; `None`: no export.
    pub fn validate(&self, host: &str, p: &mut Vec<String>) -> Option<TraceConfig> {
        if !(0.0..=1.0).contains(&self.sample) {
            p.push(format!(
                "tracing.sample: {} is not between 0 and 1",
                self.sample
            ));
        }
        if self.queue == 0 || self.queue > 1_000_000 {
            p.push(format!(
                "tracing.queue: {} is not between 1 and 1000000",
                self.queue
            ));
        }
        if self.service_name.is_empty() {
            p.push("tracing.service_name: must not be empty".into());
        }
        if self.otlp_endpoint.is_empty() {
            return None;
        }
        let endpoint = OtlpEndpoint::parse(&self.otlp_endpoint)
            .map_err(|e| p.push(format!("tracing.otlp_endpoint: {e}")))
            .ok()?;
        let mut cfg = TraceConfig::new(endpoint, self.service_name.clone());
        cfg.sample = self.sample.clamp(0.0, 1.0);
        cfg.queue = self.queue.max(1);
        if HostId::new(host.to_owned()).is_ok() {
            cfg.resource.push(("host.name".into(), host.to_owned()));
        }
        Some(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_every_bad_value_named() {
        let mut p = Vec::new();
        assert!(TracingRaw::default().validate("h1", &mut p).is_none());
        assert!(p.is_empty());
        let raw = TracingRaw {
            otlp_endpoint: "https://collector:4318".into(),
            sample: 1.5,
            queue: 0,
            service_name: String::new(),
        };
        assert!(raw.validate("h1", &mut p).is_none());
        assert_eq!(p.len(), 4, "{p:?}");
        let raw = TracingRaw {
            otlp_endpoint: "http://127.0.0.1:4318".into(),
            ..TracingRaw::default()
        };
        let mut p = Vec::new();
        let cfg = raw.validate("h1", &mut p).expect("on");
        assert_eq!(cfg.endpoint.path, "/v1/traces");
        assert_eq!(
            cfg.resource,
            vec![("host.name".to_owned(), "h1".to_owned())]
        );
    }
}
