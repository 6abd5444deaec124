//! Certificate verification between sidecars: a peer's chain must lead to the trust bundle and
//! its one SPIFFE ID must be in this sidecar's trust domain. The PA requires a client
//! certificate; the CA checks, after the handshake, that the PA is the host it dialled
//! (`connect`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore};

use super::identity::SpiffeId;

/// Checks that `end_entity` names a SPIFFE ID in `trust_domain`.
fn in_trust_domain(end_entity: &CertificateDer<'_>, trust_domain: &str) -> Result<(), Error> {
    let reject = |what: String| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            std::io::Error::other(what),
        ))))
    };
    let id = SpiffeId::of_certificate(end_entity).map_err(|e| reject(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(reject(format!(
            "{id} is not in the trust domain {trust_domain}"
        )));
    }
    Ok(())
}

/// The PA's check of callers: a WebPKI client verifier over the bundle, then the trust domain.
#[derive(Debug)]
pub struct CallerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl CallerVerifier {
    /// Requires a client certificate chaining to `roots` in `trust_domain`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
        Ok(Self {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        in_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The CA's check of PAs: the chain leads to the bundle and the SPIFFE ID is in the trust
/// domain. The host name is not in the certificate as a DNS name; which host it must be is
/// checked after the handshake against the host the CA dialled.
#[derive(Debug)]
pub struct PaVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algs: WebPkiSupportedAlgorithms,
}

impl PaVerifier {
    /// Accepts PAs whose certificate chains to `roots` in `trust_domain`.
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: &str,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Self {
        Self {
            roots,
            trust_domain: trust_domain.to_owned(),
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        in_trust_domain(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}
