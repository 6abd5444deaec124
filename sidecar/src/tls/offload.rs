//! The PA's TLS handshakes on a thread of their own. A handshake costs a few hundred
//! microseconds of CPU (a signature, a key exchange, the caller's chain verified); on the
//! sidecar's one runtime thread a burst of them would delay every request and `/live`. They
//! run on a second, current-thread runtime started on first use; the connection's socket stays
//! registered with the main runtime's reactor, which still does its I/O, and the established
//! stream comes back to the main runtime to be served. Should the thread not start, handshakes
//! run inline as before.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::runtime::Handle;
use tokio_rustls::server::TlsStream;

use super::TlsState;
use super::identity::SpiffeId;

/// The handshake runtime, once started (`None`: it could not be).
static THREAD: OnceLock<Option<Handle>> = OnceLock::new();

fn start() -> Option<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("detour-tls".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = tx.send(Some(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no TLS handshake thread: handshakes run inline");
                    let _ = tx.send(None);
                }
            }
        });
    match spawned {
        Ok(_) => rx.recv().ok().flatten(),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS handshake thread: handshakes run inline");
            None
        }
    }
}

/// [`TlsState::accept`] on the handshake thread.
pub async fn accept<S>(
    tls: Arc<TlsState>,
    io: S,
    within: Duration,
) -> io::Result<(TlsStream<S>, SpiffeId)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match THREAD.get_or_init(start) {
        Some(handle) => handle
            .spawn(async move { tls.accept(io, within).await })
            .await
            .map_err(|e| io::Error::other(format!("TLS handshake task: {e}")))?,
        None => tls.accept(io, within).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_thread_starts_once() {
        let a = super::THREAD.get_or_init(super::start).clone();
        let b = super::THREAD.get_or_init(super::start).clone();
        assert!(a.is_some());
        assert_eq!(a.map(|h| h.id()), b.map(|h| h.id()));
    }
}
