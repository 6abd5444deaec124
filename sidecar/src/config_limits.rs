//! `[limits]`: what one client may hold on the data listeners (outbound and inbound): open
//! connections, idle time, concurrent HTTP/2 streams, keep-alive pings. `[outlier]`: when the
//! CA passes over an endpoint that answers server errors in a row.

use std::time::Duration;

use serde::Deserialize;

/// `[limits]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LimitsRaw {
    /// Most open connections per listener; more wait in the accept queue.
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed (HTTP/1.1: after the
    /// current response; HTTP/2: GOAWAY), milliseconds.
    pub idle_timeout_ms: u64,
    /// Time allowed for a request head to arrive, milliseconds.
    pub head_timeout_ms: u64,
    /// Most concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval, milliseconds (a peer that does not answer within the
    /// same time is disconnected).
    pub h2_keepalive_ms: u64,
}

impl Default for LimitsRaw {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            idle_timeout_ms: 600_000,
            head_timeout_ms: 30_000,
            max_concurrent_streams: 4096,
            h2_keepalive_ms: 30_000,
        }
    }
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most open connections per listener.
    pub max_connections: usize,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
    /// Request-head timeout.
    pub head_timeout: Duration,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keep-alive ping interval and timeout.
    pub h2_keepalive: Duration,
}

impl LimitsRaw {
    /// Checks every value, pushing each problem onto `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> Limits {
        let mut positive = |key: &str, v: u64| {
            if v == 0 {
                p.push(format!("limits.{key}: must be greater than 0"));
            }
            v.max(1)
        };
        let max_connections = positive("max_connections", self.max_connections as u64) as usize;
        let idle = positive("idle_timeout_ms", self.idle_timeout_ms);
        let head = positive("head_timeout_ms", self.head_timeout_ms);
        let streams = positive(
            "max_concurrent_streams",
            u64::from(self.max_concurrent_streams),
        );
        let ping = positive("h2_keepalive_ms", self.h2_keepalive_ms);
        Limits {
            max_connections,
            idle_timeout: Duration::from_millis(idle),
            head_timeout: Duration::from_millis(head),
            max_concurrent_streams: streams as u32,
            h2_keepalive: Duration::from_millis(ping),
        }
    }
}

/// `[outlier]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutlierRaw {
    /// Server errors (5xx) in a row that eject an endpoint; 0 turns ejection off.
    pub consecutive_5xx: u32,
    /// The first ejection's length, milliseconds (each repeat lasts one more base, at most 10).
    pub base_ejection_ms: u64,
    /// Most endpoints of a service ejected at once, in percent.
    pub max_ejected_percent: u8,
}

impl Default for OutlierRaw {
    fn default() -> Self {
        let d = crate::balance::Outlier::default();
        Self {
            consecutive_5xx: d.consecutive_5xx,
            base_ejection_ms: d.base_ejection.as_millis() as u64,
            max_ejected_percent: d.max_ejected_percent,
        }
    }
}

impl OutlierRaw {
    /// Checks every value, pushing each problem onto `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> crate::balance::Outlier {
        if self.max_ejected_percent > 100 {
            p.push("outlier.max_ejected_percent: at most 100".into());
        }
        if self.base_ejection_ms == 0 {
            p.push("outlier.base_ejection_ms: must be greater than 0".into());
        }
        crate::balance::Outlier {
            consecutive_5xx: self.consecutive_5xx,
            base_ejection: Duration::from_millis(self.base_ejection_ms.max(1)),
            max_ejected_percent: self.max_ejected_percent.min(100),
        }
    }
}
