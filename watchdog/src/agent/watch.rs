//! Watching one running sidecar: readiness, liveness probes, the memory ceiling, gray rules
//! that name another binary, and the operator's commands — until it exits, is replaced, or the
//! agent stops.

use std::future::Future;
use std::pin::Pin;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::{Agent, Stopped, TICK, Watched};
use crate::api::{Command, UpgradeTo};
use crate::proc::SidecarProc;

/// What the watch knows of its sidecar.
struct Seen {
    /// It said it was ready.
    ready: bool,
    /// Why it was killed, once it was.
    killed: Option<&'static str>,
    /// Liveness probes failed in a row.
    failed_probes: u32,
    /// When the next liveness probe is due.
    next_probe: Instant,
}

impl Agent {
    /// Watches one sidecar until it exits, is replaced, or the agent stops.
    pub(super) async fn watch(
        &mut self,
        sc: &mut SidecarProc,
        stop: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Watched {
        let mut seen = Seen {
            ready: false,
            killed: None,
            failed_probes: 0,
            next_probe: Instant::now(),
        };
        let mut ticks = tokio::time::interval(TICK);
        loop {
            let done = tokio::select! {
                exit = sc.exited() => {
                    let exited = if seen.ready { "exited" } else { "exited_starting" };
                    return Watched::Exited(exit, seen.killed.unwrap_or(exited));
                }
                _ = ticks.tick() => self.on_tick(sc, &mut seen).await,
                changed = self.rules_doc.changed() => {
                    if changed.is_err() || !self.read_rules() || !seen.ready || seen.killed.is_some() {
                        continue;
                    }
                    self.follow_rules(sc).await.map(|new| Watched::Replaced(Box::new(new)))
                }
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.on_command(sc, cmd, seen.ready).await,
                    None => None,
                },
                () = stop.as_mut() => return Watched::Stop(Stopped::Left),
            };
            if let Some(done) = done {
                return done;
            }
        }
    }

    /// One tick: the crash-loop mark, readiness of a starting sidecar, then (when due) a
    /// liveness probe and the memory ceiling of a ready one.
    async fn on_tick(&mut self, sc: &mut SidecarProc, seen: &mut Seen) -> Option<Watched> {
        let now = Instant::now();
        if self.sup.tick(now) {
            tracing::info!("the sidecar stayed ready: the crash loop is over");
            self.set(|s| s.crash_loop = false);
            metrics::gauge!("detour_watchdog_crash_loop").set(0.0);
            let _ = self.held.mark(None).await;
            self.keep();
        }
        if seen.killed.is_some() {
            return None;
        }
        if !seen.ready {
            if self.is_ready(sc).await {
                seen.ready = true;
                self.became_ready(sc).await;
                return (self.follow_rules(sc).await).map(|new| Watched::Replaced(Box::new(new)));
            }
            if sc.since.elapsed() > self.cfg.ready_timeout {
                tracing::warn!(
                    pid = sc.pid,
                    "the sidecar did not become ready in time: killing it"
                );
                sc.signal(Signal::SIGKILL);
                seen.killed = Some("not_ready");
            }
            return None;
        }
        if now < seen.next_probe {
            return None;
        }
        seen.next_probe = now + self.cfg.probe_interval;
        if self.live(sc).await {
            seen.failed_probes = 0;
        } else {
            seen.failed_probes += 1;
            if seen.failed_probes >= self.cfg.fail_after {
                let failed_probes = seen.failed_probes;
                tracing::warn!(
                    pid = sc.pid,
                    failed_probes,
                    "the sidecar is hung: killing it"
                );
                self.set(|s| s.sidecar_state = "hung".into());
                sc.signal(Signal::SIGKILL);
                seen.killed = Some("hung");
                return None;
            }
        }
        self.over_memory(sc).await
    }

    /// Replaces a sidecar over its memory ceiling by a new process of the same binary.
    async fn over_memory(&mut self, sc: &mut SidecarProc) -> Option<Watched> {
        let (Some(limit), Some(rss)) = (self.cfg.memory_limit, sc.rss_bytes()) else {
            return None;
        };
        if rss <= limit {
            return None;
        }
        tracing::warn!(
            pid = sc.pid,
            rss,
            limit,
            "the sidecar passed its memory ceiling: replacing it"
        );
        metrics::counter!("detour_watchdog_restarts_total", "reason" => "memory").increment(1);
        let binary = sc.binary.clone();
        match self.upgrade(sc, &binary).await {
            Ok((new, _)) => Some(Watched::Replaced(Box::new(new))),
            Err(e) => {
                tracing::warn!(error = %e, "replacing it failed; it serves on");
                None
            }
        }
    }

    /// An operator's command while a sidecar runs (`ready`: it said it was).
    async fn on_command(
        &mut self,
        sc: &mut SidecarProc,
        cmd: Command,
        ready: bool,
    ) -> Option<Watched> {
        match cmd {
            Command::Upgrade { reply, .. }
                if self.rules.version(&self.cfg.sidecar.host).is_some() =>
            {
                let rule = self.rules.version(&self.cfg.sidecar.host);
                let id = rule.map(|r| r.id.clone()).unwrap_or_default();
                let _ = reply.send(Err(format!(
                    "gray rule {id:?} decides this host's sidecar binary: change the rule (detourctl gray) instead"
                )));
                None
            }
            Command::Upgrade { to, reply } => {
                let binary = match to {
                    UpgradeTo::Binary(b) => Some(b),
                    UpgradeTo::Rollback => self.binaries.previous.clone(),
                };
                let outcome = match binary {
                    None => Err("no previous binary to roll back to".to_owned()),
                    Some(_) if !ready => Err("the sidecar is not ready yet; try again".to_owned()),
                    Some(b) => self.upgrade(sc, &b).await,
                };
                match outcome {
                    Ok((new, done)) => {
                        let _ = reply.send(Ok(done));
                        Some(Watched::Replaced(Box::new(new)))
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            }
            Command::Shutdown { reply } => {
                self.shutdown(sc).await;
                let _ = reply.send(());
                Some(Watched::Stop(Stopped::Shutdown))
            }
        }
    }
}
