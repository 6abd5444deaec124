//! A throw-away certificate authority for meshes that bring none (`detourctl certs`, the demo
//! and the tests): a self-signed CA and, per host, a certificate whose one URI SAN is the
//! SPIFFE ID the sidecars check (`spiffe://<trust-domain>/host/<host>`), written as the PEM
//! files `[tls]` names. Production meshes issue these from their own CA (SPIRE, Vault, …).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
}

/// A certificate authority for one trust domain.
pub struct Authority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// How long issued certificates are valid by default.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

impl Authority {
    /// A new CA (ECDSA P-256, valid ten years) for `trust_domain`.
    pub fn new(trust_domain: &str) -> Result<Authority, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Detour CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA as read back from its certificate and key (PEM).
    pub fn load(trust_domain: &str, ca_pem: &str, key_pem: &str) -> Result<Authority, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let der = rustls_der(ca_pem)?;
        Ok(Authority {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::from_ca_cert_der(&der, key)?,
            ca_pem: ca_pem.to_owned(),
        })
    }

    /// The trust bundle: this CA's certificate (PEM).
    pub fn bundle_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A certificate for `host`'s sidecar, valid from an hour ago for `validity`.
    pub fn issue_host(&self, host: &str, validity: Duration) -> Result<Issued, CertError> {
        let now = OffsetDateTime::now_utc();
        let id = format!("spiffe://{}/host/{host}", self.trust_domain);
        self.issue(&id, now - time::Duration::hours(1), now + validity)
    }

    /// A certificate whose one URI SAN is `uri`, valid from `not_before` to `not_after`
    /// (tests use it for identities of other trust domains and for expired certificates).
    pub fn issue(
        &self,
        uri: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, uri);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `ip` (an IP SAN, server and client use), valid for `validity`:
    /// for services outside the mesh's identities, such as an etcd member in tests.
    pub fn issue_server(
        &self,
        ip: std::net::IpAddr,
        validity: Duration,
    ) -> Result<Issued, CertError> {
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ip.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `host`'s `cert.pem`, `key.pem` (mode 0600) and `bundle.pem` into `dir`, each
    /// with write + fsync + rename (a sidecar re-reading them never sees half a file).
    pub fn write_host(&self, dir: &Path, host: &str, validity: Duration) -> Result<(), CertError> {
        let issued = self.issue_host(host, validity)?;
        write_files(dir, &issued, self.bundle_pem())
    }

    /// Writes the CA's own certificate and key (`ca.pem`, `ca-key.pem`, mode 0600) into `dir`.
    pub fn write_ca(&self, dir: &Path) -> Result<(), CertError> {
        write(dir, "ca.pem", self.ca_pem.as_bytes(), 0o644)?;
        write(
            dir,
            "ca-key.pem",
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )
    }
}

/// The CA kept in `dir` (`ca.pem`, `ca-key.pem`), made and written there when absent.
pub fn open_or_create(dir: &Path, trust_domain: &str) -> Result<Authority, CertError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertError::Io { path, source })
    };
    if dir.join("ca.pem").exists() {
        return Authority::load(trust_domain, &read("ca.pem")?, &read("ca-key.pem")?);
    }
    let ca = Authority::new(trust_domain)?;
    ca.write_ca(dir)?;
    Ok(ca)
}

/// Writes `issued` and `bundle` as `cert.pem`, `key.pem` and `bundle.pem` under `dir`.
pub fn write_files(dir: &Path, issued: &Issued, bundle: &str) -> Result<(), CertError> {
    write(dir, "bundle.pem", bundle.as_bytes(), 0o644)?;
    write(dir, "key.pem", issued.key_pem.as_bytes(), 0o600)?;
    write(dir, "cert.pem", issued.cert_pem.as_bytes(), 0o644)
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |path: PathBuf| move |source| CertError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(err(dir.to_owned()))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(tmp.clone()))?;
    f.write_all(bytes).map_err(err(tmp.clone()))?;
    f.sync_all().map_err(err(tmp.clone()))?;
    std::fs::rename(&tmp, &path).map_err(err(path.clone()))
}

fn rustls_der(pem: &str) -> Result<rustls::pki_types::CertificateDer<'static>, CertError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate.into())
}
