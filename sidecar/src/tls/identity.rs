//! Sidecar identities: the SPIFFE ID (`spiffe://<trust-domain>/host/<host>`) a sidecar's
//! certificate carries as its one URI SAN, parsed from a certificate and compared.

use std::fmt;
use std::sync::Arc;

use detour_proto::HostId;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate carries no usable identity, or a text is no SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The certificate did not parse.
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    /// No `spiffe://` URI SAN.
    #[error("the certificate carries no spiffe:// URI SAN")]
    Missing,
    /// More than one `spiffe://` URI SAN.
    #[error("the certificate carries more than one spiffe:// URI SAN")]
    Several,
    /// A malformed SPIFFE ID.
    #[error("{0:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")]
    Malformed(String),
}

/// A SPIFFE ID: `spiffe://<trust-domain>/<path>`, lower-case trust domain, non-empty path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<str>);

impl SpiffeId {
    /// Parses and checks `text` (trust domain of `[a-z0-9.-_]`, a path of segments of
    /// `[A-Za-z0-9.-_]`, none empty, `.` or `..`).
    pub fn parse(text: &str) -> Result<SpiffeId, IdError> {
        let bad = || IdError::Malformed(text.chars().take(200).collect());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
        if !valid_trust_domain(domain) || text.len() > 2048 {
            return Err(bad());
        }
        let segment_ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        if !path.split('/').all(segment_ok) {
            return Err(bad());
        }
        Ok(SpiffeId(text.into()))
    }

    /// The identity of `host`'s sidecar in `trust_domain`.
    pub fn host(trust_domain: &str, host: &HostId) -> SpiffeId {
        SpiffeId(format!("spiffe://{trust_domain}/host/{host}").into())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map_or(rest, |(d, _)| d)
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The one SPIFFE ID among the URI SANs of the DER certificate `der`.
    pub fn of_certificate(der: &[u8]) -> Result<SpiffeId, IdError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| IdError::Parse(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdError::Parse(e.to_string()))?
            .ok_or(IdError::Missing)?;
        let mut found = None;
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with("spiffe://")
            {
                if found.is_some() {
                    return Err(IdError::Several);
                }
                found = Some(SpiffeId::parse(uri)?);
            }
        }
        found.ok_or(IdError::Missing)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({:?})", &*self.0)
    }
}

/// When the DER certificate `der` expires, seconds since the Unix epoch (`None`: it does not
/// parse).
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Whether `domain` is a valid trust domain name (lower-case letters, digits, `.`, `-`, `_`).
pub fn valid_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let id = SpiffeId::parse("spiffe://detour.local/host/h1").unwrap();
        assert_eq!(id.trust_domain(), "detour.local");
        assert_eq!(
            id,
            SpiffeId::host("detour.local", &HostId::new("h1").unwrap())
        );
        for bad in [
            "http://detour.local/host/h1",
            "spiffe://detour.local",
            "spiffe://detour.local/",
            "spiffe://Detour/host/h1",
            "spiffe://d/host//h1",
            "spiffe://d/host/../h1",
            "spiffe://d/host/h 1",
            "spiffe:///host/h1",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        assert!(matches!(
            SpiffeId::of_certificate(b"not a certificate"),
            Err(IdError::Parse(_))
        ));
    }
}
