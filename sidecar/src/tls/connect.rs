//! The CA's connections to PAs over mutual TLS: which host each PA address belongs to (kept by
//! `links`), and a connector that completes the handshake and then checks the PA is that host.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use detour_core::connect::{Connect, Connecting};
use detour_core::{Dial, Stream};
use detour_proto::HostId;
use rustls::pki_types::ServerName;

use super::TlsState;
use super::identity::SpiffeId;

/// The host behind each PA address in use.
#[derive(Debug, Default)]
pub struct PaHosts {
    by_addr: Mutex<HashMap<SocketAddr, HostId>>,
}

impl PaHosts {
    /// Records that `host`'s PA is at `pa`, forgetting `old`, its previous address.
    pub fn set(&self, host: &HostId, pa: SocketAddr, old: Option<SocketAddr>) {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = old.filter(|o| *o != pa) {
            map.remove(&old);
        }
        map.insert(pa, host.clone());
    }

    /// Forgets the PA at `pa`.
    pub fn remove(&self, pa: SocketAddr) {
        self.by_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pa);
    }

    fn get(&self, pa: SocketAddr) -> Option<HostId> {
        self.by_addr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pa)
            .cloned()
    }
}

/// Opens mutual-TLS connections to PAs.
#[derive(Debug)]
pub struct PaConnect {
    tls: Arc<TlsState>,
    hosts: Arc<PaHosts>,
}

impl PaConnect {
    /// Connects with `tls`'s current material to the PAs `hosts` knows.
    pub fn new(tls: Arc<TlsState>, hosts: Arc<PaHosts>) -> Self {
        Self { tls, hosts }
    }

    async fn connect_tls(&self, addr: SocketAddr) -> io::Result<Stream> {
        let host = self.hosts.get(addr).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no host is known for the PA at {addr}"),
            )
        })?;
        let expected = SpiffeId::host(self.tls.trust_domain(), &host);
        let tcp = match Stream::connect(&Dial::Tcp(addr)).await? {
            Stream::Tcp(s) => s,
            _ => return Err(io::Error::other("not a TCP stream")),
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.client());
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = connector.connect(name, tcp).await.inspect_err(|e| {
            tracing::warn!(pa = %addr, %host, error = %e, "TLS handshake with a PA failed");
            metrics::counter!("detour_tls_handshake_failures_total", "side" => "outbound")
                .increment(1);
        })?;
        let found = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| SpiffeId::of_certificate(c))
            .transpose()
            .map_err(io::Error::other)?;
        if found.as_ref() != Some(&expected) {
            metrics::counter!("detour_tls_handshake_failures_total", "side" => "outbound")
                .increment(1);
            let found = found.map_or_else(|| "nothing".to_owned(), |f| f.to_string());
            tracing::warn!(pa = %addr, %expected, %found, "a PA presented another host's identity");
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the PA at {addr} is {found}, expected {expected}"),
            ));
        }
        metrics::counter!("detour_tls_handshakes_total", "side" => "outbound").increment(1);
        Ok(Stream::Other(Box::new(stream)))
    }
}

impl Connect for PaConnect {
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a> {
        Box::pin(async move {
            match dial {
                Dial::Tcp(addr) => self.connect_tls(*addr).await,
                Dial::Unix(_) => Stream::connect(dial).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config_tls::TlsFiles;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use std::time::Duration;

    /// Writes a CA and certificates for `hosts` under `dir`; returns each host's files.
    fn pki(dir: &std::path::Path, hosts: &[&str]) -> Vec<TlsFiles> {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        hosts
            .iter()
            .map(|h| {
                let key = KeyPair::generate().unwrap();
                let mut p = CertificateParams::default();
                let uri = format!("spiffe://detour.local/host/{h}");
                p.subject_alt_names = vec![SanType::URI(uri.as_str().try_into().unwrap())];
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                let cert = p.signed_by(&key, &issuer).unwrap();
                let d = dir.join(h);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join("cert.pem"), cert.pem()).unwrap();
                std::fs::write(d.join("key.pem"), key.serialize_pem()).unwrap();
                std::fs::write(d.join("bundle.pem"), &ca_pem).unwrap();
                TlsFiles {
                    trust_domain: "detour.local".into(),
                    cert: d.join("cert.pem"),
                    key: d.join("key.pem"),
                    bundle: d.join("bundle.pem"),
                    reload: Duration::from_secs(1),
                }
            })
            .collect()
    }

    fn host(h: &str) -> HostId {
        HostId::new(h).unwrap()
    }

    #[tokio::test]
    async fn the_pa_must_be_the_host_the_registry_names() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path(), &["h1", "h2"]);
        let ca = TlsState::load(files[0].clone(), &host("h1")).unwrap();
        let pa = TlsState::load(files[1].clone(), &host("h2")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let pa = pa.clone();
                tokio::spawn(async move {
                    if let Ok((mut tls, caller)) = pa.accept(s, Duration::from_secs(5)).await {
                        use tokio::io::AsyncWriteExt;
                        let _ = tls.write_all(caller.as_str().as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        let hosts = Arc::new(PaHosts::default());
        let connect = PaConnect::new(ca, hosts.clone());
        let dial = Dial::Tcp(addr);

        let unknown = connect.connect(&dial).await.unwrap_err();
        assert_eq!(unknown.kind(), io::ErrorKind::NotFound);

        hosts.set(&host("h3"), addr, None);
        let other = connect.connect(&dial).await.unwrap_err();
        assert_eq!(other.kind(), io::ErrorKind::PermissionDenied, "{other}");
        assert!(other.to_string().contains("host/h2"), "{other}");

        hosts.set(&host("h2"), addr, None);
        let mut s = connect.connect(&dial).await.unwrap();
        let mut seen = String::new();
        use tokio::io::AsyncReadExt;
        s.read_to_string(&mut seen).await.unwrap();
        assert_eq!(
            seen, "spiffe://detour.local/host/h1",
            "the PA saw the CA's identity"
        );
    }

    #[test]
    fn a_certificate_for_another_host_is_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path(), &["h1"]);
        let err = TlsState::load(files[0].clone(), &host("h2")).unwrap_err();
        assert!(
            matches!(err, super::super::TlsError::WrongHost { .. }),
            "{err}"
        );
    }
}
