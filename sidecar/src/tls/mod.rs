//! Mutual TLS between sidecars (rustls with the ring provider, TLS 1.3 only): this host's
//! certificate, key and trust bundle loaded from files and re-read when they change — new
//! connections use the new material, open ones keep theirs — the PA's handshake with its
//! caller's identity, and the CA's connector to PAs (`connect`).

pub mod connect;
pub mod guard;
pub mod identity;
pub mod offload;
pub mod verify;

use detour_proto::sync::Mutex;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use detour_proto::HostId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use crate::config::tls::TlsFiles;
use identity::{IdError, SpiffeId};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file held no usable PEM of the kind needed.
    #[error("{path}: {detail}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// This host's certificate has no usable identity.
    #[error("{path}: {source}")]
    Identity {
        /// The certificate file.
        path: PathBuf,
        /// Why.
        source: IdError,
    },
    /// This host's certificate is another host's.
    #[error("{path}: the certificate is for {found}, this sidecar is {expected}")]
    WrongHost {
        /// The certificate file.
        path: PathBuf,
        /// Its identity.
        found: SpiffeId,
        /// This host's.
        expected: SpiffeId,
    },
    /// Peers would refuse this host's certificate (expired, or not from the bundle's CA).
    #[error("{path}: peers would refuse this certificate: {source}")]
    Refused {
        /// The certificate file.
        path: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// One loaded set of material.
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// What the files looked like when last read (a change to any reloads all three).
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

/// This sidecar's TLS material, current.
pub struct TlsState {
    files: TlsFiles,
    own: SpiffeId,
    current: RwLock<Arc<Material>>,
    stamp: Mutex<Stamp>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("files", &self.files)
            .field("own", &self.own)
            .finish()
    }
}

impl TlsState {
    /// Loads `files` for `host`.
    pub fn load(files: TlsFiles, host: &HostId) -> Result<Arc<TlsState>, TlsError> {
        let own = SpiffeId::host(&files.trust_domain, host);
        let stamp = stamp(&files);
        let material = build(&files, &own)?;
        let state = TlsState {
            files,
            own,
            current: RwLock::new(Arc::new(material)),
            stamp: Mutex::new(stamp),
        };
        Ok(Arc::new(state))
    }

    /// This sidecar's identity.
    pub fn own(&self) -> &SpiffeId {
        &self.own
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.files.trust_domain
    }

    fn material(&self) -> Arc<Material> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The client side, for connections to PAs.
    pub fn client(&self) -> Arc<ClientConfig> {
        self.material().client.clone()
    }

    /// Re-reads the files if any changed since last read; a bad new set is reported and the
    /// current one kept. Returns whether new material is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.files);
        {
            let mut last = self.stamp.lock();
            if *last == now {
                return Ok(false);
            }
            *last = now;
        }
        let material = build(&self.files, &self.own)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(material);
        Ok(true)
    }

    /// Checks the files every `reload` interval until the sidecar stops.
    pub async fn watch(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.files.reload);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(identity = %self.own, "TLS material re-read: new connections use it");
                    metrics::counter!("detour_tls_reloads_total", "result" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::error!(error = %e, "new TLS material refused; the current one stays in use");
                    metrics::counter!("detour_tls_reloads_total", "result" => "error").increment(1);
                }
            }
        }
    }

    /// The PA's handshake on an accepted connection: the caller must present a certificate of
    /// this trust domain; returns the stream and the caller's identity.
    pub async fn accept<S>(&self, io: S, within: Duration) -> io::Result<(TlsStream<S>, SpiffeId)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.material().server.clone());
        let stream = tokio::time::timeout(within, acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| io::Error::other("the caller presented no certificate"))
            .and_then(|c| SpiffeId::of_certificate(c).map_err(io::Error::other))?;
        Ok((stream, peer))
    }
}

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.bundle]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

/// The most a PEM file may hold.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() || meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            detail: format!("not a regular file of at most {MAX_PEM_BYTES} bytes"),
        });
    }
    std::fs::read(path).map_err(err)
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

fn build(files: &TlsFiles, own: &SpiffeId) -> Result<Material, TlsError> {
    let chain = certs(&files.cert)?;
    let key_bytes = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Pem {
        path: files.key.clone(),
        detail: format!("no usable private key: {e}"),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.bundle)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            path: files.bundle.clone(),
            detail: format!("a CA certificate is unusable: {e}"),
        })?;
    }
    let roots = Arc::new(roots);
    let found = SpiffeId::of_certificate(&chain[0]).map_err(|source| TlsError::Identity {
        path: files.cert.clone(),
        source,
    })?;
    if &found != own {
        return Err(TlsError::WrongHost {
            path: files.cert.clone(),
            found,
            expected: own.clone(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let callers = verify::CallerVerifier::new(roots.clone(), &files.trust_domain, provider.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // What every peer will check of this host's certificate, checked here first.
    callers
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|source| TlsError::Refused {
            path: files.cert.clone(),
            source,
        })?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_client_cert_verifier(Arc::new(callers))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(cfg_err)?;
    let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    server.alpn_protocols = alpn.clone();
    if let Some(t) = identity::not_after(&chain[0]) {
        metrics::gauge!("detour_tls_certificate_expiry_unix_seconds").set(t as f64);
    }
    let pas = verify::PaVerifier::new(roots, &files.trust_domain, &provider);
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pas))
        .with_client_auth_cert(chain, key)
        .map_err(cfg_err)?;
    client.alpn_protocols = alpn;
    Ok(Material {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}
