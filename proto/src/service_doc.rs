//! The shape the registry's per-service documents share (`policy/services`, `routes/services`):
//! `{"version": N, "services": {NAME: ENTRY, …}}`, read whole-or-nothing for its shape, version
//! and size, then entry by entry — a malformed entry is left out with its reason, the others
//! stand.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ServiceName;

/// The document as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    version: u32,
    #[serde(default)]
    services: BTreeMap<String, serde_json::Value>,
}

/// Why a whole document was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceDocError {
    /// Not JSON of the document's shape.
    #[error("not a {0} document: {1}")]
    Shape(&'static str, serde_json::Error),
    /// A version this build does not read.
    #[error("{what} document version {found}, this build reads {reads}")]
    Version {
        /// The document's kind.
        what: &'static str,
        /// The version it has.
        found: u32,
        /// The version this build reads.
        reads: u32,
    },
    /// Too many services.
    #[error("{what} document names {found} services, at most {max} are read")]
    TooMany {
        /// The document's kind.
        what: &'static str,
        /// How many it names.
        found: usize,
        /// The most read.
        max: usize,
    },
}

/// A document as read: each well-formed entry, and the reasons of those left out.
pub type Parsed<T> = Result<(BTreeMap<ServiceName, T>, Vec<String>), ServiceDocError>;

/// What a document of `what` (version `version`, at most `max` services) holds: each well-formed
/// entry as `entry` reads it, and the reasons of those left out.
pub fn parse<T>(
    bytes: &[u8],
    (what, version, max): (&'static str, u32, usize),
    entry: impl Fn(&str, serde_json::Value) -> Result<T, String>,
) -> Parsed<T> {
    let raw: Raw = serde_json::from_slice(bytes).map_err(|e| ServiceDocError::Shape(what, e))?;
    if raw.version != version {
        return Err(ServiceDocError::Version {
            what,
            found: raw.version,
            reads: version,
        });
    }
    if raw.services.len() > max {
        return Err(ServiceDocError::TooMany {
            what,
            found: raw.services.len(),
            max,
        });
    }
    let mut services = BTreeMap::new();
    let mut malformed = Vec::new();
    for (name, value) in raw.services {
        let service = match ServiceName::new(name.clone()) {
            Ok(s) => s,
            Err(e) => {
                malformed.push(format!("{name:?}: {e}"));
                continue;
            }
        };
        match entry(&name, value) {
            Ok(t) => {
                services.insert(service, t);
            }
            Err(e) => malformed.push(e),
        }
    }
    Ok((services, malformed))
}

/// The bytes of a document of `version` holding `services`.
pub fn to_bytes(
    version: u32,
    services: impl Iterator<Item = (String, serde_json::Value)>,
) -> Vec<u8> {
    let raw = Raw {
        version,
        services: services.collect(),
    };
    serde_json::to_vec_pretty(&raw).unwrap_or_default()
}
