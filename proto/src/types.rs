//! Shared value types: validated names, endpoints as stored in the registry, host status.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A name that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// What kind of name it was meant to be.
    pub kind: &'static str,
    /// The rejected text.
    pub value: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

fn validate(kind: &'static str, value: &str) -> Result<(), NameError> {
    let err = |reason| NameError {
        kind,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(err("empty"));
    }
    if value.len() > 253 {
        return Err(err("longer than 253 bytes"));
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(err(
            "only ASCII letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    if value.starts_with('.') || value.ends_with('.') {
        return Err(err("must not start or end with '.'"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        /// Looked up by its text (the derived `Hash` and `Eq` are the text's).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_type!(
    /// A logical service name, as callers put it in `Host` / `:authority`.
    ServiceName,
    "service name"
);
name_type!(
    /// One host of the mesh (one sidecar, one watchdog).
    HostId,
    "host id"
);
name_type!(
    /// One provider instance of a service.
    InstanceId,
    "instance id"
);

/// The protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), also used for gRPC.
    Http2,
}

impl AppProtocol {
    /// The name used in config files and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::Http2 => "http2",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "http1" => Some(AppProtocol::Http1),
            "http2" | "grpc" => Some(AppProtocol::Http2),
            _ => None,
        }
    }
}

/// Who put an endpoint into the registry; written as `"native"` or `"sync:{legacy}"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Source {
    /// Registered by a Detour sidecar for a local provider.
    #[default]
    Native,
    /// Mirrored from the named legacy registry by the sync agent.
    Sync(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Native => f.write_str("native"),
            Source::Sync(legacy) => write!(f, "sync:{legacy}"),
        }
    }
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "native" => Ok(Source::Native),
            Some(("sync", legacy)) if !legacy.is_empty() => Ok(Source::Sync(legacy.to_owned())),
            _ => Err(format!(
                "source {s:?} is neither \"native\" nor \"sync:NAME\""
            )),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Source {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Source {
    /// Whether a Detour sidecar registered it.
    pub fn is_native(&self) -> bool {
        *self == Source::Native
    }
}

/// One provider instance as stored in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The service it provides.
    pub service: ServiceName,
    /// Unique within the service.
    pub instance: InstanceId,
    /// The host it runs on.
    pub host: HostId,
    /// Where the provider itself listens (the direct path dials this).
    pub app_address: SocketAddr,
    /// That host's inbound sidecar (PA); `None` when the host has no sidecar.
    pub pa_address: Option<SocketAddr>,
    /// The provider's protocol.
    #[serde(default)]
    pub protocol: AppProtocol,
    /// Relative share of traffic (1 when absent).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Failure domain, for zone-aware routing later (left out of JSON when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Provider version, free text (left out of JSON when empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Who registered it (left out of JSON when native).
    #[serde(default, skip_serializing_if = "Source::is_native")]
    pub source: Source,
    /// Free labels (for rules that select endpoints); left out of JSON when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Whether the provider answers its sidecar's health checks; callers pass over unhealthy
    /// endpoints while any healthy one is left. Written only when false.
    #[serde(default = "healthy", skip_serializing_if = "is_healthy")]
    pub healthy: bool,
    /// Callers reach it through its PA only — never on a path that skips the PA (C→P, C→CA→P):
    /// the provider listens where other hosts cannot reach it (loopback), or its service
    /// forbids such paths (`direct = "deny"`, or an allow-list at the PA). Written only when
    /// true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_direct: bool,
}

fn default_weight() -> u32 {
    1
}

fn healthy() -> bool {
    true
}

fn is_healthy(h: &bool) -> bool {
    *h
}

impl Endpoint {
    /// A native HTTP/1.1 endpoint of weight 1 without a sidecar; set the other fields as needed.
    pub fn new(
        service: ServiceName,
        instance: InstanceId,
        host: HostId,
        app_address: SocketAddr,
    ) -> Self {
        Self {
            service,
            instance,
            host,
            app_address,
            pa_address: None,
            protocol: AppProtocol::Http1,
            weight: 1,
            zone: String::new(),
            version: String::new(),
            source: Source::Native,
            labels: BTreeMap::new(),
            healthy: true,
            no_direct: false,
        }
    }

    /// Whether a path that skips the PA (C→P, C→CA→P) may be taken to it.
    pub fn direct_allowed(&self) -> bool {
        !self.no_direct
    }
}

/// All known endpoints of one service, sorted by instance id.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EndpointSet {
    /// Whether the registry knows the service at all (it may know it with no live instance).
    pub known: bool,
    /// The live endpoints.
    pub endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    /// A set the registry knows, sorted by instance id.
    pub fn known(mut endpoints: Vec<Endpoint>) -> Self {
        if !endpoints.is_sorted_by(|a, b| a.instance <= b.instance) {
            endpoints.sort_by(|a, b| a.instance.cmp(&b.instance));
        }
        Self {
            known: true,
            endpoints,
        }
    }
}

/// The lifecycle state of a host's sidecar, as published in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SidecarState {
    /// Started, not yet ready to serve.
    #[default]
    Starting,
    /// Serving.
    Ready,
    /// Announced its stop: callers should move away.
    Draining,
    /// Exited on purpose.
    Stopped,
    /// Crashed or hung.
    Failed,
}

impl SidecarState {
    /// The lowercase name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SidecarState::Starting => "starting",
            SidecarState::Ready => "ready",
            SidecarState::Draining => "draining",
            SidecarState::Stopped => "stopped",
            SidecarState::Failed => "failed",
        }
    }
}

/// What a host publishes about its sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host.
    pub host: HostId,
    /// Its sidecar's state.
    pub sidecar: SidecarState,
    /// Its sidecar's version.
    pub version: String,
    /// When this status was written, in milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
    /// What the host's watchdog adds (absent without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchdog: Option<WatchdogReport>,
    /// Where its sidecar's metrics listener answers (`[metrics] listen`), when it has one:
    /// what `detourctl stat` scrapes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// What a host's watchdog reports beside its sidecar's state (`detourctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WatchdogReport {
    /// The sidecar binary it runs.
    pub binary: String,
    /// The version label of the gray rule that chose that binary, if one did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rule_version: String,
    /// When the running sidecar started (ms since the epoch; 0 while none runs).
    pub since_unix_ms: u64,
    /// Restarts so far.
    pub restarts: u64,
    /// The sidecar's CA links that are not on their primary path, by remote host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, String>,
    /// How the last upgrade ended, when a version rule's binary was refused (why).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub refused: String,
}

/// The version of the sidecar ↔ watchdog publication protocol this build speaks. Compatibility
/// rule: a watchdog of protocol N takes publications of N-1, N and N+1 (fields are only ever
/// added, and unknown ones are ignored); it answers with its own version in
/// [`PUBLICATION_PROTOCOL_HEADER`]. Version 1 had no `protocol` field; version 2 added
/// `protocol` and `self_held`.
pub const PUBLICATION_PROTOCOL: u32 = 2;

/// The response header a watchdog states its publication protocol in.
pub const PUBLICATION_PROTOCOL_HEADER: &str = "x-detour-publication-protocol";

fn protocol_v1() -> u32 {
    1
}

/// What a sidecar running under a watchdog asks it to keep in the registry for its host: its
/// status and its providers' endpoints (the whole set, each time). The watchdog holds them under
/// its own lease, so they outlive the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPublication {
    /// The publication protocol of the sender ([`PUBLICATION_PROTOCOL`]; 1 when absent).
    #[serde(default = "protocol_v1")]
    pub protocol: u32,
    /// Set while the sidecar keeps these registrations alive itself because its watchdog was
    /// away: the watchdog then writes every one of them again under its own lease before it
    /// answers, so the sidecar can let go of them without a gap.
    #[serde(default)]
    pub self_held: bool,
    /// The publishing sidecar's process id.
    pub pid: u32,
    /// Its status, once it has one.
    #[serde(default)]
    pub status: Option<HostStatus>,
    /// Every endpoint of the host's providers.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Its CA links that are not on their primary path, by remote host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: BTreeMap<String, String>,
}

impl Default for HostPublication {
    fn default() -> Self {
        Self {
            protocol: PUBLICATION_PROTOCOL,
            self_held: false,
            pid: 0,
            status: None,
            endpoints: Vec::new(),
            links: BTreeMap::new(),
        }
    }
}

/// Where a running sidecar's listeners are, as it writes them to `{run_dir}/sidecar.json`
/// once it is ready (ports chosen by the OS are resolved here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarAddresses {
    /// The sidecar's process id.
    pub pid: u32,
    /// Outbound TCP listener, if enabled.
    pub outbound_tcp: Option<SocketAddr>,
    /// Outbound Unix socket, if enabled.
    pub outbound_unix: Option<std::path::PathBuf>,
    /// Inbound listener.
    pub inbound: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// This process's own liveness socket (`GET /live`, `GET /ready` only; mode 0600): its
    /// watchdog probes it there, where no other local user can take its connection slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<std::path::PathBuf>,
    /// The scrapeable metrics listener (`GET /metrics` only), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// The file name, inside a sidecar's run directory, of its [`SidecarAddresses`].
pub const ADDRESS_FILE: &str = "sidecar.json";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(ServiceName::new("echo").is_ok());
        assert!(ServiceName::new("orders.v2-eu_1").is_ok());
        assert!(ServiceName::new("").is_err());
        assert!(ServiceName::new("a b").is_err());
        assert!(ServiceName::new("echo:80").is_err());
        assert!(ServiceName::new(".echo").is_err());
        let err = HostId::new("x/y").unwrap_err();
        assert!(err.to_string().contains("host id"), "{err}");
    }

    #[test]
    fn endpoint_json_round_trip_and_defaults() {
        let json = r#"{"service":"echo","instance":"h1-echo","host":"h1",
            "app_address":"127.0.0.1:80","pa_address":null}"#;
        let ep: Endpoint = serde_json::from_str(json).unwrap();
        assert_eq!(ep.weight, 1);
        assert_eq!(ep.protocol, AppProtocol::Http1);
        assert_eq!(ep.source, Source::Native);
        let back: Endpoint = serde_json::from_str(&serde_json::to_string(&ep).unwrap()).unwrap();
        assert_eq!(ep, back);
        let bad = json.replace("\"echo\"", "\"bad name\"");
        assert!(serde_json::from_str::<Endpoint>(&bad).is_err());
        // Defaults are left out; a mirrored endpoint with labels keeps them.
        assert!(!serde_json::to_string(&ep).unwrap().contains("source"));
        assert!(
            ep.healthy,
            "an endpoint is healthy unless it says otherwise"
        );
        assert!(!serde_json::to_string(&ep).unwrap().contains("healthy"));
        let mut sick = ep.clone();
        sick.healthy = false;
        let text = serde_json::to_string(&sick).unwrap();
        assert!(text.contains(r#""healthy":false"#), "{text}");
        assert_eq!(serde_json::from_str::<Endpoint>(&text).unwrap(), sick);
        let mut synced = ep.clone();
        synced.source = Source::Sync("zk".into());
        synced.labels.insert("lane".into(), "canary".into());
        let text = serde_json::to_string(&synced).unwrap();
        assert!(text.contains(r#""source":"sync:zk""#), "{text}");
        assert!(text.contains(r#""labels":{"lane":"canary"}"#), "{text}");
        assert_eq!(serde_json::from_str::<Endpoint>(&text).unwrap(), synced);
        for bad in ["sync:", "legacy", "sync"] {
            let text = text.replace("sync:zk", bad);
            assert!(serde_json::from_str::<Endpoint>(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoint_sets_are_sorted() {
        let ep = |i: &str| {
            Endpoint::new(
                ServiceName::new("s").unwrap(),
                InstanceId::new(i).unwrap(),
                HostId::new("h").unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            )
        };
        let set = EndpointSet::known(vec![ep("b"), ep("a")]);
        assert_eq!(set.endpoints[0].instance.as_str(), "a");
    }
}
