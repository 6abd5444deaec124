//! The CA's connections to PAs over mutual TLS: which host each PA address belongs to (kept by
//! `links`), and a connector that completes the handshake and then checks the PA is that host.
//!
//! Failures are told apart, because only one kind may send a request around the PA: a PA that
//! cannot be *reached* — the TCP connect is refused or times out, or the PA closes or stays
//! silent without having sent a byte of TLS (a dead or hung process) — is a reachability failure
//! (the link may go straight to the provider). A PA that *spoke* and then failed the handshake,
//! or that proved another identity, is a refusal ([`UntrustedPeer`]): the request is answered
//! `untrusted-peer` and goes nowhere else.

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use detour_core::connect::{Connect, Connecting, UntrustedPeer, timed_out};
use detour_core::{Dial, Stream};
use detour_proto::HostId;
use rustls::pki_types::ServerName;

use super::TlsState;
use super::identity::SpiffeId;

/// Most hosts that may claim one PA address at once (more are refused as conflicts).
const MAX_CLAIMANTS: usize = 4;

/// Which host each PA address in use belongs to. Every host whose endpoints name an address
/// claims it; the TLS handshake says which claimant is really there: the identity a PA proves
/// at an address makes that host its owner, and from then on another host's endpoints naming
/// the address are refused (`untrusted-peer`), counted (`detour_pa_address_conflicts_total`)
/// and logged — a registered host cannot take another host's PA address over. An address no
/// host claims any more is forgotten (`retain`, with the catalog).
#[derive(Debug, Default)]
pub struct PaHosts {
    by_addr: Mutex<FastMap<SocketAddr, Claim>>,
}

/// The hosts that claim one address, and the one proven to be there.
#[derive(Debug, Default)]
struct Claim {
    claimants: Vec<HostId>,
    owner: Option<HostId>,
}

impl PaHosts {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<SocketAddr, Claim>> {
        self.by_addr.lock()
    }

    /// Records that `host` says its PA is at `pa`, no longer at `old`.
    pub fn set(&self, host: &HostId, pa: SocketAddr, old: Option<SocketAddr>) {
        let mut map = self.lock();
        if let Some(old) = old.filter(|o| *o != pa) {
            Self::unclaim(&mut map, host, old);
        }
        let claim = map.entry(pa).or_default();
        if !claim.claimants.contains(host) {
            if claim.claimants.len() >= MAX_CLAIMANTS {
                conflict(pa, host, "too many hosts claim this PA address");
                return;
            }
            claim.claimants.push(host.clone());
            if claim.claimants.len() > 1 {
                conflict(pa, host, "another host already claims this PA address");
            }
        }
    }

    fn unclaim(map: &mut FastMap<SocketAddr, Claim>, host: &HostId, pa: SocketAddr) {
        if let Some(c) = map.get_mut(&pa) {
            c.claimants.retain(|h| h != host);
            if c.owner.as_ref() == Some(host) {
                c.owner = None;
            }
            if c.claimants.is_empty() {
                map.remove(&pa);
            }
        }
    }

    /// Forgets `host`'s claim of `pa`.
    pub fn remove(&self, host: &HostId, pa: SocketAddr) {
        Self::unclaim(&mut self.lock(), host, pa);
    }

    /// Keeps only the claims of hosts `keep` says are still in use.
    pub fn retain(&self, keep: impl Fn(&HostId) -> bool) {
        let mut map = self.lock();
        map.retain(|_, c| {
            c.claimants.retain(&keep);
            if c.owner.as_ref().is_some_and(|o| !keep(o)) {
                c.owner = None;
            }
            !c.claimants.is_empty()
        });
    }

    /// Whether `host`'s endpoints may use the PA at `pa`: not when the address has been proven
    /// to be another host's.
    pub fn may_use(&self, host: &HostId, pa: SocketAddr) -> Result<(), HostId> {
        // The owner is cloned only when it is another host (a request on the usual path
        // allocates nothing here).
        let map = self.lock();
        match map.get(&pa).and_then(|c| c.owner.as_ref()) {
            Some(owner) if owner != host => {
                metrics::counter!("detour_pa_address_conflicts_total").increment(1);
                Err(owner.clone())
            }
            _ => Ok(()),
        }
    }

    /// The hosts a PA at `pa` may prove to be: its owner, else every claimant.
    fn expected(&self, pa: SocketAddr) -> Vec<HostId> {
        match self.lock().get(&pa) {
            Some(Claim { owner: Some(o), .. }) => vec![o.clone()],
            Some(c) => c.claimants.clone(),
            None => Vec::new(),
        }
    }

    /// `host` proved to be at `pa`.
    fn proven(&self, pa: SocketAddr, host: &HostId) {
        if let Some(c) = self.lock().get_mut(&pa)
            && c.owner.as_ref() != Some(host)
        {
            c.owner = Some(host.clone());
        }
    }
}

/// Counts and logs a refused claim of a PA address.
fn conflict(pa: SocketAddr, host: &HostId, why: &str) {
    metrics::counter!("detour_pa_address_conflicts_total").increment(1);
    tracing::warn!(%pa, %host, why, "conflicting PA address in the registry");
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

    /// Connects to the PA at `addr` and completes the handshake, all within `timeout`.
    async fn connect_tls(&self, addr: SocketAddr, timeout: Duration) -> io::Result<Stream> {
        let start = tokio::time::Instant::now();
        let dial = Dial::Tcp(addr);
        let candidates = self.hosts.expected(addr);
        if candidates.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no host is known for the PA at {addr}"),
            ));
        }
        let host = candidates
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        let tcp = match tokio::time::timeout(timeout, Stream::connect(&dial)).await {
            Ok(Ok(Stream::Tcp(s))) => s,
            Ok(Ok(_)) => return Err(io::Error::other("not a TCP stream")),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timed_out(&dial, timeout)),
        };
        let spoke = Arc::new(AtomicBool::new(false));
        let io = Heard {
            io: tcp,
            spoke: spoke.clone(),
        };
        let connector = tokio_rustls::TlsConnector::from(self.tls.client());
        let name = ServerName::IpAddress(addr.ip().into());
        let left = timeout.saturating_sub(start.elapsed());
        let handshake = tokio::time::timeout(left, connector.connect(name, io)).await;
        let stream = match handshake {
            Ok(Ok(s)) => s,
            Err(_) if !spoke.load(Ordering::Relaxed) => {
                // Not a byte from the PA: a hung process, not a refusal.
                return Err(timed_out(&dial, timeout));
            }
            Ok(Err(e)) if !spoke.load(Ordering::Relaxed) => {
                // Closed or reset before it said anything: not reached.
                return Err(e);
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("the TLS handshake did not finish within {timeout:?}"),
                };
                tracing::debug!(pa = %addr, %host, error = %why, "TLS handshake with a PA failed");
                metrics::counter!("detour_tls_handshake_failures_total", "side" => "outbound")
                    .increment(1);
                return Err(
                    UntrustedPeer(format!("TLS handshake with the PA of {host}: {why}")).into_io(),
                );
            }
        };
        let found = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| SpiffeId::of_certificate(c))
            .transpose()
            .map_err(io::Error::other)?;
        let proven = candidates
            .iter()
            .find(|h| found.as_ref() == Some(&SpiffeId::host(self.tls.trust_domain(), h)));
        let Some(proven) = proven else {
            metrics::counter!("detour_tls_handshake_failures_total", "side" => "outbound")
                .increment(1);
            let found = found.map_or_else(|| "nothing".to_owned(), |f| f.to_string());
            tracing::debug!(pa = %addr, expected = %host, %found, "a PA presented another host's identity");
            return Err(UntrustedPeer(format!(
                "the PA at {addr} is {found}, expected the host {host}"
            ))
            .into_io());
        };
        self.hosts.proven(addr, proven);
        metrics::counter!("detour_tls_handshakes_total", "side" => "outbound").increment(1);
        Ok(Stream::Other(Box::new(stream)))
    }
}

impl Connect for PaConnect {
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a> {
        self.connect_within(dial, Duration::from_secs(10))
    }

    fn connect_within<'a>(&'a self, dial: &'a Dial, timeout: Duration) -> Connecting<'a> {
        Box::pin(async move {
            match dial {
                Dial::Tcp(addr) => self.connect_tls(*addr, timeout).await,
                Dial::Unix(_) => match tokio::time::timeout(timeout, Stream::connect(dial)).await {
                    Ok(r) => r,
                    Err(_) => Err(timed_out(dial, timeout)),
                },
            }
        })
    }
}

/// A TCP stream that notes whether the peer has sent anything (a silent peer is an unreachable
/// one; a peer that spoke and failed the handshake is an untrusted one).
struct Heard {
    io: tokio::net::TcpStream,
    spoke: Arc<AtomicBool>,
}

impl tokio::io::AsyncRead for Heard {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before && !self.spoke.load(Ordering::Relaxed) {
            self.spoke.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for Heard {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::tls::TlsFiles;
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
        assert!(UntrustedPeer::of(&other).is_some(), "a refusal: {other}");
        assert!(other.to_string().contains("host/h2"), "{other}");

        // h2 claims it too: the handshake proves it is h2's, and h3 may not use it any more.
        hosts.set(&host("h2"), addr, None);
        let mut s = connect.connect(&dial).await.unwrap();
        assert_eq!(hosts.may_use(&host("h3"), addr), Err(host("h2")));
        assert_eq!(hosts.may_use(&host("h2"), addr), Ok(()));
        assert_eq!(hosts.expected(addr), vec![host("h2")]);
        // Pruned with the catalog: a host no longer in use lets go of its claim.
        hosts.retain(|h| h.as_str() != "h3");
        assert_eq!(hosts.lock()[&addr].claimants, vec![host("h2")]);
        hosts.retain(|_| false);
        assert!(hosts.expected(addr).is_empty());
        let mut seen = String::new();
        use tokio::io::AsyncReadExt;
        s.read_to_string(&mut seen).await.unwrap();
        assert_eq!(
            seen, "spiffe://detour.local/host/h1",
            "the PA saw the CA's identity"
        );
    }

    /// A listener on loopback whose connections `serve` handles.
    async fn peer<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_silent_or_closing_pa_is_unreachable_and_one_that_spoke_and_failed_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let files = pki(dir.path(), &["h1"]);
        let ca = TlsState::load(files[0].clone(), &host("h1")).unwrap();
        let hosts = Arc::new(PaHosts::default());
        let connect = PaConnect::new(ca, hosts.clone());
        let within = Duration::from_millis(300);
        // Accepts and never says a word (a stopped process): a timeout, not a refusal.
        let silent = peer(|s| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        })
        .await;
        // Accepts and closes at once: not reached either.
        let closing = peer(|s| async move { drop(s) }).await;
        // Answers the ClientHello with something that is no TLS: it spoke, and failed.
        let garbage = peer(|mut s| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        for (addr, untrusted, what) in [
            (silent, false, "silent"),
            (closing, false, "closing"),
            (garbage, true, "garbage"),
        ] {
            hosts.set(&host("h2"), addr, None);
            let e = connect
                .connect_within(&Dial::Tcp(addr), within)
                .await
                .map(|_| ())
                .unwrap_err();
            assert_eq!(UntrustedPeer::of(&e).is_some(), untrusted, "{what}: {e}");
            if what == "silent" {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            }
        }
    }

    #[tokio::test]
    async fn a_pa_with_a_certificate_of_another_authority_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let ours = pki(&dir.path().join("ours"), &["h1"]);
        let theirs = pki(&dir.path().join("theirs"), &["h2"]);
        let ca = TlsState::load(ours[0].clone(), &host("h1")).unwrap();
        let pa = TlsState::load(theirs[0].clone(), &host("h2")).unwrap();
        let addr = peer(move |s| {
            let pa = pa.clone();
            async move {
                let _ = pa.accept(s, Duration::from_secs(5)).await;
            }
        })
        .await;
        let hosts = Arc::new(PaHosts::default());
        hosts.set(&host("h2"), addr, None);
        let connect = PaConnect::new(ca, hosts);
        let e = connect
            .connect_within(&Dial::Tcp(addr), Duration::from_secs(2))
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(UntrustedPeer::of(&e).is_some(), "{e}");
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
