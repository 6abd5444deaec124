//! The sidecar's lifecycle: its state (starting → ready → draining → stopped), the drain
//! request that SIGTERM and `POST /drain` raise, the hand-off a ready successor asks for, the
//! moments listeners stop accepting and connections close (after a drain or hand-off has been
//! announced for a while), and the count of open connections either waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use detour_proto::SidecarState;
use tokio::sync::{Notify, watch};

/// Shared lifecycle state of one sidecar.
#[derive(Debug)]
pub struct Lifecycle {
    /// The current state; every connection and control session watches it.
    state: watch::Sender<SidecarState>,
    /// Raised once when a graceful stop is asked for.
    drain: watch::Sender<bool>,
    /// Raised once when a successor is ready to take the sockets over.
    handover: watch::Sender<bool>,
    /// Raised once when control sessions must tell their SDKs to move to the successor.
    handing_over: watch::Sender<bool>,
    /// Raised once when listeners must stop accepting.
    stop_accepting: watch::Sender<bool>,
    /// Raised once when connections must close gracefully.
    closing: watch::Sender<bool>,
    /// Open connections on every listener.
    conns: AtomicUsize,
    /// Woken whenever a connection closes.
    closed: Notify,
}

impl Lifecycle {
    /// A lifecycle in the `starting` state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: watch::channel(SidecarState::Starting).0,
            drain: watch::channel(false).0,
            handover: watch::channel(false).0,
            handing_over: watch::channel(false).0,
            stop_accepting: watch::channel(false).0,
            closing: watch::channel(false).0,
            conns: AtomicUsize::new(0),
            closed: Notify::new(),
        })
    }

    /// The current state.
    pub fn state(&self) -> SidecarState {
        *self.state.borrow()
    }

    /// Follows the state.
    pub fn subscribe(&self) -> watch::Receiver<SidecarState> {
        self.state.subscribe()
    }

    /// Moves to `state`.
    pub fn set(&self, state: SidecarState) {
        let prev = self.state.send_replace(state);
        if prev != state {
            tracing::info!(from = prev.as_str(), to = state.as_str(), "sidecar state");
        }
    }

    /// Stops the listeners and closes connections gracefully (idempotent).
    pub fn close(&self) {
        self.stop_accepting.send_replace(true);
        self.closing.send_replace(true);
    }

    /// Resolves once connections must close ([`Lifecycle::close`]).
    pub async fn closed(&self) {
        wait_raised(&self.closing).await;
    }

    /// Stops the listeners only; open connections keep serving (idempotent).
    pub fn stop_accepting(&self) {
        self.stop_accepting.send_replace(true);
    }

    /// Resolves once listeners must stop accepting.
    pub async fn accepting_stopped(&self) {
        wait_raised(&self.stop_accepting).await;
    }

    /// A successor is ready: hand off to it (idempotent).
    pub fn request_handover(&self) {
        self.handover.send_replace(true);
    }

    /// Whether a hand-off has been asked for.
    pub fn handover_requested_now(&self) -> bool {
        *self.handover.borrow()
    }

    /// Resolves once a successor is ready to take over.
    pub async fn handover_requested(&self) {
        wait_raised(&self.handover).await;
    }

    /// Tells control sessions to send their SDKs to the successor (idempotent).
    pub fn announce_handover(&self) {
        self.handing_over.send_replace(true);
    }

    /// Resolves once the hand-off is announced.
    pub async fn handover_announced(&self) {
        wait_raised(&self.handing_over).await;
    }

    /// Whether a drain has been announced.
    pub fn is_draining(&self) -> bool {
        matches!(self.state(), SidecarState::Draining | SidecarState::Stopped)
    }

    /// Asks for a graceful stop (idempotent).
    pub fn request_drain(&self) {
        self.drain.send_replace(true);
    }

    /// Resolves once a graceful stop has been asked for.
    pub async fn drain_requested(&self) {
        wait_raised(&self.drain).await;
    }

    /// Counts a connection until the guard drops.
    pub fn conn_guard(self: &Arc<Self>) -> ConnGuard {
        self.conns.fetch_add(1, Ordering::SeqCst);
        ConnGuard(self.clone())
    }

    /// Open connections now.
    pub fn open_connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open, up to `limit`; returns whether they all closed.
    pub async fn wait_connections_closed(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.closed.notified();
                if self.open_connections() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Resolves once `flag` is raised (at once if it is).
async fn wait_raised(flag: &watch::Sender<bool>) {
    let mut rx = flag.subscribe();
    let _ = rx.wait_for(|raised| *raised).await;
}

/// Holds one connection open in the count.
#[derive(Debug)]
pub struct ConnGuard(Arc<Lifecycle>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.conns.fetch_sub(1, Ordering::SeqCst);
        self.0.closed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_connections() {
        let lc = Lifecycle::new();
        let g = lc.conn_guard();
        assert!(!lc.wait_connections_closed(Duration::from_millis(100)).await);
        let lc2 = lc.clone();
        let waiter =
            tokio::spawn(async move { lc2.wait_connections_closed(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        drop(g);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn drain_is_latched() {
        let lc = Lifecycle::new();
        lc.request_drain();
        lc.drain_requested().await;
        lc.set(SidecarState::Draining);
        assert!(lc.is_draining());
    }
}
