//! The two ways a sidecar ends: a graceful stop (SIGTERM, SIGINT, `POST /drain`), which moves
//! its callers to their other paths first; and a hand-off to a successor that took its sockets
//! over (an upgrade), which moves its callers' connections to the successor instead.

use detour_proto::{ADDRESS_FILE, SidecarState};

use crate::app::{Sidecar, publish_status};

/// How a stop went.
#[derive(Debug, Clone, Copy)]
pub struct DrainReport {
    /// Whether every connection closed within the drain timeout.
    pub clean: bool,
    /// Connections still open when the sidecar gave up waiting.
    pub left_open: usize,
}

impl Sidecar {
    /// Stops gracefully, losing nothing:
    /// 1. announce: state `draining` (control sessions tell their SDKs, `/detour/ping` answers
    ///    503) and host status `draining` in the registry (remote CAs go straight to this host's
    ///    providers), while still serving normally for `lifecycle.announce_ms`;
    /// 2. close the listeners; HTTP/1.1 connections close after their current response, HTTP/2
    ///    ones get GOAWAY; wait for in-flight requests (bounded by the drain timeout);
    /// 3. publish `stopped`. The local providers stay registered: they keep serving while this
    ///    sidecar is away (callers reach them C→CA→P), and the record expires after its TTL
    ///    unless a new sidecar (or the watchdog) keeps it.
    pub async fn drain(self) -> DrainReport {
        tracing::info!(announce = ?self.cfg.announce, timeout = ?self.cfg.drain_timeout, "draining");
        let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
        self.lifecycle.set(SidecarState::Draining);
        if let Err(e) = publish_status(
            &*self.registry,
            &self.cfg,
            &self.bound,
            SidecarState::Draining,
        )
        .await
        {
            tracing::warn!(error = %e, "could not announce the drain in the registry");
        }
        tokio::time::sleep_until((tokio::time::Instant::now() + self.cfg.announce).min(deadline))
            .await;
        self.lifecycle.close();
        let report = self.wait_closed(deadline).await;
        self.lifecycle.set(SidecarState::Stopped);
        if let Err(e) = publish_status(
            &*self.registry,
            &self.cfg,
            &self.bound,
            SidecarState::Stopped,
        )
        .await
        {
            tracing::warn!(error = %e, "could not publish the stop in the registry");
        }
        if let Some(p) = &self.bound.outbound_unix {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.cfg.run_dir.join(ADDRESS_FILE));
        self.finish();
        report
    }

    /// Hands off to the successor that took the sockets over and said it is ready:
    /// 1. stop publishing (the successor publishes now) and stop accepting (every new
    ///    connection goes to the successor);
    /// 2. tell every SDK's control session `handing_over`: the SDK stops reusing its
    ///    connections to this process and reconnects, to the successor, staying on the mesh;
    /// 3. after `lifecycle.announce_ms`, close the remaining connections gracefully (HTTP/2
    ///    ones with GOAWAY: callers send what was not processed to the successor) and wait for
    ///    in-flight requests, within the drain timeout.
    ///
    /// The registry, the Unix socket file and `sidecar.json` are left to the successor.
    pub async fn hand_off(self) -> DrainReport {
        tracing::info!("handing off to the successor");
        let deadline = tokio::time::Instant::now() + self.cfg.drain_timeout;
        for p in &self.publishers {
            p.abort();
        }
        if let Some(d) = &self.delegated {
            d.stop();
        }
        self.lifecycle.stop_accepting();
        self.lifecycle.announce_handover();
        tokio::time::sleep_until((tokio::time::Instant::now() + self.cfg.announce).min(deadline))
            .await;
        self.lifecycle.close();
        let report = self.wait_closed(deadline).await;
        self.finish();
        report
    }

    async fn wait_closed(&self, deadline: tokio::time::Instant) -> DrainReport {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let clean = self.lifecycle.wait_connections_closed(left).await;
        let left_open = self.lifecycle.open_connections();
        if !clean {
            tracing::warn!(
                left_open,
                "drain timeout reached with connections still open"
            );
        }
        DrainReport { clean, left_open }
    }

    fn finish(&self) {
        self.catalog.flush_cache();
        if let Some(h) = &self.bound.health {
            let _ = std::fs::remove_file(h);
        }
        for t in self.tasks.iter().chain(&self.publishers) {
            t.abort();
        }
    }
}
