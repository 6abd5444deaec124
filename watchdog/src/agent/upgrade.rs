//! Upgrades and rollbacks of the agent's sidecar by socket hand-over: the new process takes the
//! listening sockets over, says it is ready, and the old one drains; on any failure the running
//! sidecar is untouched.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{Agent, TICK, log_tail};
use crate::api::UpgradeDone;
use crate::proc::SidecarProc;

impl Agent {
    /// Replaces `sc` by a sidecar running `binary` that takes its sockets over. On failure the
    /// running one is untouched.
    pub(super) async fn upgrade(
        &mut self,
        sc: &mut SidecarProc,
        binary: &Path,
    ) -> Result<(SidecarProc, UpgradeDone), String> {
        let t0 = Instant::now();
        tracing::info!(from = %sc.binary.display(), to = %binary.display(), "upgrade: starting the new sidecar");
        self.set(|s| s.upgrade = format!("starting {}", binary.display()));
        metrics::gauge!("detour_watchdog_upgrade_in_progress").set(1.0);
        let outcome = self.hand_over(sc, binary, t0).await;
        metrics::gauge!("detour_watchdog_upgrade_in_progress").set(0.0);
        let (result, line) = match &outcome {
            Ok((_, d)) => ("ok", format!("{} in {} ms", d.binary.display(), d.done_ms)),
            Err(e) => ("failed", e.clone()),
        };
        metrics::counter!("detour_watchdog_upgrades_total", "result" => result).increment(1);
        self.set(|s| {
            s.upgrade = "idle".into();
            s.last_upgrade = Some(format!("{result}: {line}"));
        });
        self.keep();
        outcome
    }

    pub(super) async fn hand_over(
        &mut self,
        sc: &mut SidecarProc,
        binary: &Path,
        t0: Instant,
    ) -> Result<(SidecarProc, UpgradeDone), String> {
        let mut new = self
            .launch(binary, true)
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let deadline = t0 + self.cfg.upgrade_timeout;
        loop {
            tokio::select! {
                exit = new.exited() => {
                    return Err(format!(
                        "the new sidecar ({}) ended before it was ready ({exit}); the running one serves on. Its log:\n{}",
                        binary.display(),
                        log_tail(&self.run_dir().join("sidecar.log"))
                    ));
                }
                () = tokio::time::sleep(TICK) => {
                    if self.is_ready(&new).await {
                        break;
                    }
                    if Instant::now() > deadline {
                        new.signal(Signal::SIGKILL);
                        let _ = new.exited().await;
                        return Err(format!(
                            "the new sidecar ({}) was not ready within {} ms; the running one serves on",
                            binary.display(),
                            self.cfg.upgrade_timeout.as_millis()
                        ));
                    }
                }
            }
        }
        let ready_ms = t0.elapsed().as_millis() as u64;
        self.set(|s| s.upgrade = "handing off".into());
        // The old one hands off and exits by itself; it is killed if it does not in time.
        let bound =
            self.cfg.sidecar.drain_timeout + self.cfg.sidecar.announce + Duration::from_secs(5);
        if tokio::time::timeout(bound, sc.exited()).await.is_err() {
            tracing::warn!(
                pid = sc.pid,
                "the old sidecar did not exit after the hand-off: killing it"
            );
            sc.signal(Signal::SIGKILL);
            let _ = sc.exited().await;
        }
        let previous = std::mem::replace(&mut self.binaries.current, binary.to_owned());
        self.binaries.previous = Some(previous.clone());
        self.keep();
        let prev = self.binaries.previous.clone();
        self.set(|s| {
            s.binary = binary.to_owned();
            s.previous_binary = prev;
        });
        let done = UpgradeDone {
            pid: new.pid,
            binary: binary.to_owned(),
            previous,
            ready_ms,
            done_ms: t0.elapsed().as_millis() as u64,
        };
        tracing::info!(
            pid = new.pid,
            ready_ms,
            done_ms = done.done_ms,
            "upgrade done"
        );
        Ok((new, done))
    }
}
