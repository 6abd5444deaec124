//! `[tls]`: mutual TLS between sidecars — on unless `mode = "plaintext"` — with the files of
//! this host's certificate, its key and the trust bundle, and how often they are re-read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::tls::identity::valid_trust_domain;

/// `[tls]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TlsRaw {
    /// `"mutual"` (default): the CA→PA hop is mutual TLS. `"plaintext"`: h2c/HTTP/1.1 in the
    /// clear, logged at start.
    pub mode: String,
    /// The SPIFFE trust domain; peers' certificates must name a `spiffe://<it>/…` URI.
    pub trust_domain: String,
    /// This host's certificate chain (PEM, leaf first), relative to `run_dir` unless absolute.
    pub cert: String,
    /// Its private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: String,
    /// The trust bundle (PEM CA certificates).
    pub bundle: String,
    /// How often the three files are checked for changes, milliseconds.
    pub reload_ms: u64,
    /// Most TLS handshakes the PA runs at once (0: no limit); more connections are closed
    /// unread.
    pub handshake_concurrency: u32,
    /// Most handshakes a second the PA starts, for all sources but known peers (0: no limit).
    pub handshake_rate: u32,
    /// Most handshakes a second the PA starts for one source address (0: no limit).
    pub handshake_rate_per_source: u32,
}

impl Default for TlsRaw {
    fn default() -> Self {
        Self {
            mode: "mutual".into(),
            trust_domain: "detour.local".into(),
            cert: "tls/cert.pem".into(),
            key: "tls/key.pem".into(),
            bundle: "tls/bundle.pem".into(),
            reload_ms: 1000,
            handshake_concurrency: 64,
            handshake_rate: 250,
            handshake_rate_per_source: 20,
        }
    }
}

impl TlsRaw {
    /// The PA's handshake admission limits.
    pub fn handshake_limits(&self) -> HandshakeLimits {
        HandshakeLimits {
            concurrency: self.handshake_concurrency,
            rate: self.handshake_rate,
            per_source: self.handshake_rate_per_source,
        }
    }
}

/// Where a sidecar's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The trust domain.
    pub trust_domain: String,
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
    /// Change-check interval.
    pub reload: Duration,
}

/// Validated `[tls]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Mutual TLS with these files.
    Mutual(TlsFiles),
    /// No TLS (set explicitly); the trust domain still names the allow-lists' identities.
    Plaintext,
}

impl TlsMode {
    /// The files, when TLS is on.
    pub fn files(&self) -> Option<&TlsFiles> {
        match self {
            TlsMode::Mutual(f) => Some(f),
            TlsMode::Plaintext => None,
        }
    }
}

impl TlsRaw {
    /// Checks every value, pushing each problem onto `p`; paths are taken relative to
    /// `run_dir`.
    pub fn validate(&self, run_dir: &Path, p: &mut Vec<String>) -> TlsMode {
        if !valid_trust_domain(&self.trust_domain) {
            p.push(format!(
                "tls.trust_domain: {:?} must be lower-case letters, digits, '.', '-' or '_'",
                self.trust_domain
            ));
        }
        if self.reload_ms == 0 {
            p.push("tls.reload_ms: must be greater than 0".into());
        }
        let path = |key: &str, v: &str, p: &mut Vec<String>| {
            if v.is_empty() {
                p.push(format!("tls.{key}: must name a file"));
            }
            let v = PathBuf::from(v);
            if v.is_absolute() { v } else { run_dir.join(v) }
        };
        match self.mode.as_str() {
            "mutual" => TlsMode::Mutual(TlsFiles {
                trust_domain: self.trust_domain.clone(),
                cert: path("cert", &self.cert, p),
                key: path("key", &self.key, p),
                bundle: path("bundle", &self.bundle, p),
                reload: Duration::from_millis(self.reload_ms.max(1)),
            }),
            "plaintext" => TlsMode::Plaintext,
            other => {
                p.push(format!(
                    "tls.mode: {other:?} is not one of \"mutual\", \"plaintext\""
                ));
                TlsMode::Plaintext
            }
        }
    }
}

/// The limits (`[tls]` `handshake_*`; 0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Handshakes in progress at once.
    pub concurrency: u32,
    /// Handshakes a second, for the whole PA (known peers excepted).
    pub rate: u32,
    /// Handshakes a second from one source address.
    pub per_source: u32,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self {
            concurrency: 64,
            rate: 250,
            per_source: 20,
        }
    }
}
