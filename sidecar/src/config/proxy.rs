//! `[proxy]`, `[lifecycle]` and `[link]`: how the CA forwards, how a stop drains, and how the
//! CA watches the PAs it uses, each section validated on its own.

use std::time::Duration;

use detour_core::link::LinkConfig;
use detour_core::probe::ProbePace;
use detour_proto::AppProtocol;
use serde::Deserialize;

use super::positive;

/// `[proxy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxyRaw {
    /// `peak-ewma` (the default: of two random picks, the lower latency estimate times requests
    /// in flight), `p2c` (least loaded of two random picks) or `round-robin`.
    pub balance: String,
    /// Upstream connect timeout.
    pub connect_timeout_ms: u64,
    /// Time allowed for a response head to arrive, over every attempt.
    pub request_timeout_ms: u64,
    /// Time allowed for one attempt's response head (0: only the request timeout).
    pub try_timeout_ms: u64,
    /// Most requests in flight from this CA to one endpoint (0: no limit).
    pub max_concurrent_per_endpoint: u32,
    /// Largest request head accepted (bytes); larger gets 431.
    pub max_header_bytes: usize,
    /// How long an endpoint that refused a connection is passed over.
    pub eject_ms: u64,
    /// Request bodies up to this size are kept so a failed attempt can be retried.
    pub max_replay_bytes: u64,
    /// The protocol from this CA to remote PAs: `http2` (one multiplexed connection per PA) or
    /// `http1` (a keep-alive pool per PA).
    pub pa_protocol: String,
    /// With a `zone`: callers stay in their zone while at least this share (percent) of its
    /// endpoints of a service is usable.
    pub zone_min_healthy_percent: u8,
}

impl Default for ProxyRaw {
    fn default() -> Self {
        Self {
            balance: "peak-ewma".into(),
            connect_timeout_ms: 1000,
            request_timeout_ms: 30_000,
            try_timeout_ms: 0,
            max_concurrent_per_endpoint: 0,
            max_header_bytes: 16 * 1024,
            eject_ms: 2000,
            max_replay_bytes: 64 * 1024,
            pa_protocol: "http2".into(),
            zone_min_healthy_percent: 50,
        }
    }
}

/// Load-balancing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Power of two choices, least in-flight requests.
    P2c,
    /// Each endpoint in turn.
    RoundRobin,
    /// Power of two choices, lower peak-EWMA latency times in-flight requests.
    PeakEwma,
}

/// `[proxy]` validated.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Load balancing (`None` when invalid; the problem is pushed).
    pub balance: Option<Balance>,
    /// The protocol to remote PAs.
    pub pa_protocol: AppProtocol,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Response-head timeout over every attempt.
    pub request_timeout: Duration,
    /// Response-head timeout of one attempt.
    pub try_timeout: Option<Duration>,
    /// Most requests in flight to one endpoint (0: no limit).
    pub max_concurrent_per_endpoint: usize,
    /// Request-head size limit.
    pub max_header_bytes: usize,
    /// Ejection after a refused connection.
    pub eject: Duration,
    /// Request bodies kept for retries up to this size.
    pub max_replay_bytes: u64,
    /// See [`ProxyRaw::zone_min_healthy_percent`].
    pub zone_min_healthy_percent: u8,
}

impl ProxyRaw {
    /// Validates `[proxy]`.
    pub fn validate(&self, p: &mut Vec<String>) -> ProxySettings {
        let balance = match self.balance.as_str() {
            "p2c" => Some(Balance::P2c),
            "round-robin" => Some(Balance::RoundRobin),
            "peak-ewma" => Some(Balance::PeakEwma),
            other => {
                p.push(format!(
                    "proxy.balance: {other:?} is not one of \"p2c\", \"peak-ewma\", \"round-robin\""
                ));
                None
            }
        };
        let pa_protocol = match self.pa_protocol.as_str() {
            "http2" => AppProtocol::Http2,
            "http1" => AppProtocol::Http1,
            other => {
                p.push(format!(
                    "proxy.pa_protocol: {other:?} is not one of \"http2\", \"http1\""
                ));
                AppProtocol::Http2
            }
        };
        let global = detour_registry::policy::PolicyOverride {
            try_timeout_ms: Some(self.try_timeout_ms),
            max_concurrent_per_endpoint: Some(self.max_concurrent_per_endpoint),
            ..Default::default()
        };
        p.extend(global.problems("proxy"));
        let connect_timeout = positive(p, "proxy.connect_timeout_ms", self.connect_timeout_ms);
        let request_timeout = positive(p, "proxy.request_timeout_ms", self.request_timeout_ms);
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            p.push("proxy.max_header_bytes: must be between 1024 and 1048576".into());
        }
        ProxySettings {
            balance,
            pa_protocol,
            connect_timeout,
            request_timeout,
            try_timeout: (self.try_timeout_ms > 0)
                .then(|| Duration::from_millis(self.try_timeout_ms)),
            max_concurrent_per_endpoint: self.max_concurrent_per_endpoint as usize,
            max_header_bytes: self.max_header_bytes,
            eject: Duration::from_millis(self.eject_ms),
            max_replay_bytes: self.max_replay_bytes,
            zone_min_healthy_percent: self.zone_min_healthy_percent,
        }
    }
}

/// `[lifecycle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LifecycleRaw {
    /// Upper bound on a graceful stop.
    pub drain_timeout_ms: u64,
    /// How long a drain is announced (control stream, registry, `/detour/ping`) before the
    /// listeners close, so callers switch paths first.
    pub announce_ms: u64,
}

impl Default for LifecycleRaw {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
            announce_ms: 1000,
        }
    }
}

impl LifecycleRaw {
    /// Validates `[lifecycle]`: the drain bound and the announce time.
    pub fn validate(&self, p: &mut Vec<String>) -> (Duration, Duration) {
        let drain = positive(p, "lifecycle.drain_timeout_ms", self.drain_timeout_ms);
        (drain, Duration::from_millis(self.announce_ms))
    }
}

/// `[link]`: how this sidecar's CA watches the PAs it uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LinkRaw {
    /// Interval of active probes to each PA in use.
    pub probe_interval_ms: u64,
    /// A link no request used for this long is probed at the idle pace.
    pub idle_after_ms: u64,
    /// Interval of active probes to a PA whose link is idle.
    pub idle_probe_interval_ms: u64,
    /// Time a probe may take.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes before going straight to the provider.
    pub fail_after: u32,
    /// Consecutive good probes (with the host ready) before ramping back.
    pub recover_after: u32,
    /// Duration of the ramp back to 100% via the PA.
    pub ramp_ms: u64,
}

impl Default for LinkRaw {
    fn default() -> Self {
        Self {
            probe_interval_ms: 200,
            idle_after_ms: 10_000,
            idle_probe_interval_ms: 30_000,
            probe_timeout_ms: 250,
            fail_after: 2,
            recover_after: 3,
            ramp_ms: 2000,
        }
    }
}

/// `[link]` validated.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    /// The link machine's thresholds.
    pub machine: LinkConfig,
    /// How often PAs are probed.
    pub probe: ProbePace,
    /// Probe timeout.
    pub probe_timeout: Duration,
}

impl LinkRaw {
    /// Validates `[link]`.
    pub fn validate(&self, p: &mut Vec<String>) -> LinkSettings {
        let probe_interval = positive(p, "link.probe_interval_ms", self.probe_interval_ms);
        let idle_after = positive(p, "link.idle_after_ms", self.idle_after_ms);
        let idle_interval = positive(
            p,
            "link.idle_probe_interval_ms",
            self.idle_probe_interval_ms,
        );
        if idle_interval < probe_interval {
            p.push("link.idle_probe_interval_ms: must be at least link.probe_interval_ms".into());
        }
        let probe_timeout = positive(p, "link.probe_timeout_ms", self.probe_timeout_ms);
        if self.fail_after == 0 || self.recover_after == 0 {
            p.push("link.fail_after and link.recover_after: must be at least 1".into());
        }
        LinkSettings {
            machine: LinkConfig {
                fail_after: self.fail_after,
                recover_after: self.recover_after,
                ramp_start: 0.1,
                ramp: Duration::from_millis(self.ramp_ms),
            },
            probe: ProbePace {
                interval: probe_interval,
                idle_interval,
                idle_after,
            },
            probe_timeout,
        }
    }
}
