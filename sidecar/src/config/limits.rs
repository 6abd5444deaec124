//! `[limits]`: what one client may hold on the data listeners (outbound and inbound): open
//! connections, idle time, concurrent HTTP/2 streams, keep-alive pings. `[outlier]`: when the
//! CA passes over an endpoint that answers server errors in a row. `[retry]`: the CA's retry
//! budget.

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
    /// Most HTTP/1.1 connections to one provider endpoint (the PA's and the direct path's);
    /// requests beyond wait for one to come free.
    pub max_connections_per_endpoint: usize,
    /// Most requests waiting for such a connection; beyond, `upstream-connect`.
    pub max_pending_per_endpoint: usize,
    /// Most requests one caller connection may have in flight to this PA's providers at once
    /// (its share of their connections); more wait, within their time (0: no share).
    pub max_in_flight_per_connection: usize,
}

impl Default for LimitsRaw {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            idle_timeout_ms: 600_000,
            head_timeout_ms: 30_000,
            max_concurrent_streams: 1024,
            h2_keepalive_ms: 30_000,
            max_connections_per_endpoint: 512,
            max_pending_per_endpoint: 2048,
            max_in_flight_per_connection: 256,
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
    /// HTTP/1.1 connections per provider endpoint.
    pub max_connections_per_endpoint: usize,
    /// Requests waiting for one.
    pub max_pending_per_endpoint: usize,
    /// Requests one caller connection may have in flight to the PA's providers (0: any).
    pub max_in_flight_per_connection: usize,
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
        let per_endpoint = positive(
            "max_connections_per_endpoint",
            self.max_connections_per_endpoint as u64,
        ) as usize;
        Limits {
            max_connections_per_endpoint: per_endpoint,
            max_pending_per_endpoint: self.max_pending_per_endpoint,
            max_in_flight_per_connection: self.max_in_flight_per_connection,
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
    /// Below this share of endpoints not ejected (percent), every endpoint is used.
    pub panic_threshold_percent: u8,
}

impl Default for OutlierRaw {
    fn default() -> Self {
        let d = Outlier::default();
        Self {
            consecutive_5xx: d.consecutive_5xx,
            base_ejection_ms: d.base_ejection.as_millis() as u64,
            max_ejected_percent: d.max_ejected_percent,
            panic_threshold_percent: d.panic_threshold_percent,
        }
    }
}

impl OutlierRaw {
    /// Checks every value, pushing each problem onto `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> Outlier {
        if self.max_ejected_percent > 100 {
            p.push("outlier.max_ejected_percent: at most 100".into());
        }
        if self.panic_threshold_percent > 100 {
            p.push("outlier.panic_threshold_percent: at most 100".into());
        }
        if self.base_ejection_ms == 0 {
            p.push("outlier.base_ejection_ms: must be greater than 0".into());
        }
        Outlier {
            consecutive_5xx: self.consecutive_5xx,
            base_ejection: Duration::from_millis(self.base_ejection_ms.max(1)),
            max_ejected_percent: self.max_ejected_percent.min(100),
            panic_threshold_percent: self.panic_threshold_percent.min(100),
        }
    }
}

/// `[retry]` as written: the CA's retry budget per service.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RetryRaw {
    /// Resends allowed per request (0–1).
    pub budget_ratio: f64,
    /// Resends allowed per second whatever the traffic.
    pub min_per_second: u32,
    /// Window over which requests and resends count, milliseconds.
    pub window_ms: u64,
}

impl Default for RetryRaw {
    fn default() -> Self {
        let d = BudgetConfig::default();
        Self {
            budget_ratio: d.ratio,
            min_per_second: d.min_per_second,
            window_ms: d.window.as_millis() as u64,
        }
    }
}

impl RetryRaw {
    /// Checks every value, pushing each problem onto `p`.
    pub fn validate(&self, p: &mut Vec<String>) -> BudgetConfig {
        if !(0.0..=1.0).contains(&self.budget_ratio) {
            p.push("retry.budget_ratio: must be between 0 and 1".into());
        }
        if self.window_ms < 10 {
            p.push("retry.window_ms: must be at least 10".into());
        }
        BudgetConfig {
            ratio: self.budget_ratio.clamp(0.0, 1.0),
            min_per_second: self.min_per_second,
            window: Duration::from_millis(self.window_ms.max(10)),
        }
    }
}

/// Outlier ejection (Envoy's `consecutive_5xx`): an endpoint that answers `consecutive_5xx`
/// server errors in a row is passed over for `base_ejection` times the number of its
/// ejections (at most 10×; the count starts again after five quiet minutes), unless more than
/// `max_ejected_percent` of the service's endpoints would then be ejected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    /// Server errors in a row that eject (0: off).
    pub consecutive_5xx: u32,
    /// The first ejection's length.
    pub base_ejection: Duration,
    /// Most endpoints of a service ejected as outliers at once, in percent.
    pub max_ejected_percent: u8,
    /// The healthy-panic threshold: when fewer than this share of the candidates (percent) are
    /// not ejected, every candidate is used, so that the few left are not overwhelmed (0: only
    /// when every one is ejected).
    pub panic_threshold_percent: u8,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            base_ejection: Duration::from_secs(30),
            max_ejected_percent: 50,
            panic_threshold_percent: 50,
        }
    }
}

/// A budget's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BudgetConfig {
    /// Resends allowed per request sent (0.2: one in five).
    pub ratio: f64,
    /// Resends allowed per second whatever the traffic.
    pub min_per_second: u32,
    /// How far back requests and resends count.
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
            window: Duration::from_secs(10),
        }
    }
}
