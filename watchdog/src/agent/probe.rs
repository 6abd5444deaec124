//! What the agent asks its sidecar (ready, live: on its own health socket, else its admin
//! port) and what it reports beside the host status.

use detour_core::Dial;
use detour_core::body::empty;
use detour_proto::{ADDRESS_FILE, AppProtocol, SidecarAddresses, WatchdogReport};
use http::Request;
use http_body_util::BodyExt;

use super::Agent;
use crate::proc::SidecarProc;

impl Agent {
    /// Publishes what the watchdog reports beside the host status.
    pub(super) async fn report(&self) {
        let (restarts, rule_version, last_upgrade) = {
            let s = self.status.lock();
            (s.restarts, s.rule_version.clone(), s.last_upgrade.clone())
        };
        let report = WatchdogReport {
            binary: self.binaries.current.display().to_string(),
            rule_version,
            since_unix_ms: self.since_unix_ms,
            restarts,
            links: Default::default(),
            refused: last_upgrade
                .filter(|u| u.starts_with("refused"))
                .unwrap_or_default(),
        };
        if let Err(e) = self.held.report(report).await {
            tracing::warn!(error = %e, "cannot publish the watchdog's report");
        }
    }

    /// Whether `sc` is ready: it wrote its address file (it does once ready) and answers
    /// `/ready`.
    pub(super) async fn is_ready(&self, sc: &SidecarProc) -> bool {
        match self.addresses() {
            Some(a) if a.pid == sc.pid => self.admin_get(&a, "/ready").await,
            _ => false,
        }
    }

    pub(super) async fn live(&self, sc: &SidecarProc) -> bool {
        match self.addresses() {
            Some(a) if a.pid == sc.pid => self.admin_get(&a, "/live").await,
            // An adopted sidecar whose address file is gone: ask the process itself.
            _ => std::path::Path::new(&format!("/proc/{}", sc.pid)).exists(),
        }
    }

    pub(super) fn addresses(&self) -> Option<SidecarAddresses> {
        let bytes = std::fs::read(self.run_dir().join(ADDRESS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// `GET path` of the sidecar at `a`: on its own liveness socket when it has one (no other
    /// local user can take its slots there), else on its admin port.
    pub(super) async fn admin_get(&self, a: &SidecarAddresses, path: &str) -> bool {
        let dial = match &a.health {
            Some(h) => Dial::Unix(h.clone()),
            None => Dial::Tcp(a.admin),
        };
        let Ok(req) = Request::get(path)
            .header(http::header::HOST, "localhost")
            .body(empty())
        else {
            return false;
        };
        let exchange = async {
            match self.admin.send(&dial, AppProtocol::Http1, req).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    ok && resp.into_body().collect().await.is_ok()
                }
                Err(_) => false,
            }
        };
        tokio::time::timeout(self.cfg.probe_timeout, exchange)
            .await
            .unwrap_or(false)
    }
}
