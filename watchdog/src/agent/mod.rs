//! The watchdog's agent: starts (or adopts) the host's sidecar and keeps it alive — restarts it
//! with backoff when it exits, kills and restarts it when it hangs, replaces it without loss when
//! it outgrows its memory ceiling, marks the host `failed` while it crash-loops — and runs
//! upgrades and rollbacks by socket hand-over. When to restart is `supervise.rs`; what stays
//! in the registry meanwhile is `held.rs`; what survives a restart of the watchdog is
//! `kept.rs`. The gray rules it follows are saved in the state directory too; while they are
//! unknown (no registry answer and no saved copy) the sidecar's binary does not change.

mod probe;
mod upgrade;
mod watch;

use detour_proto::sync::Mutex;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_core::{Pool, PoolOptions};
use detour_proto::SidecarState;
use detour_registry::now_unix_ms;
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use crate::agent_config::Config;
use crate::api::{Command, Status};
use crate::held::Held;
use crate::kept::{Binaries, Kept};
use crate::proc::{Exit, Launch, SidecarProc};
use crate::supervise::Supervisor;
use detour_registry::docs::Followed;
use detour_registry::gray::RuleSet;

/// How often a starting sidecar is checked for readiness.
const TICK: Duration = Duration::from_millis(50);

/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to stop (SIGTERM): the sidecar runs on, the registrations stay (a successor
    /// watchdog adopts both).
    Left,
    /// Shut down: the sidecar drained and the host's registrations withdrawn.
    Shutdown,
}

/// What the gray rules say this host should run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    binary: PathBuf,
    /// The rule's version label (empty for the baseline).
    label: String,
    /// The rule that says so.
    rule: String,
    /// Why the rule's binary may not run (`binaries.rs`), if it may not.
    refused: Option<String>,
}

/// How watching one sidecar ended.
enum Watched {
    /// It exited (and why, as the watchdog saw it).
    Exited(Exit, &'static str),
    /// An upgrade replaced it.
    Replaced(Box<SidecarProc>),
    /// The agent stops.
    Stop(Stopped),
}

/// The agent of one host.
pub struct Agent {
    cfg: Arc<Config>,
    held: Arc<Held>,
    sup: Supervisor,
    status: Arc<Mutex<Status>>,
    cmds: mpsc::Receiver<Command>,
    binaries: Binaries,
    /// Connections to the sidecar's admin API (readiness and liveness).
    admin: Arc<Pool>,
    /// The gray rules document (version rules choose the binary), with its saved copy.
    rules_doc: tokio::sync::watch::Receiver<Followed>,
    /// Whether the rules are known (until they are, the binary does not change).
    rules_known: bool,
    /// The last well-formed rules.
    rules: RuleSet,
    /// A binary a rule asked for that could not be started (not tried again until the rules
    /// change).
    refused: Option<PathBuf>,
    /// When the running sidecar started.
    since_unix_ms: u64,
}

impl Agent {
    /// An agent for `cfg`, keeping registrations in `held`, reporting in `status`, taking
    /// `cmds` from the API; it carries on from the state an earlier watchdog kept.
    pub fn new(
        cfg: Arc<Config>,
        held: Arc<Held>,
        status: Arc<Mutex<Status>>,
        cmds: mpsc::Receiver<Command>,
        rules_doc: tokio::sync::watch::Receiver<Followed>,
    ) -> Agent {
        let kept = crate::kept::load(&cfg.sidecar.state_dir, &cfg.sidecar.run_dir)
            .filter(|k| k.binaries.current.is_file());
        let sup = match &kept {
            Some(k) => Supervisor::restore(cfg.policy, &k.memory(), Instant::now()),
            None => Supervisor::new(cfg.policy),
        };
        let kept = kept.unwrap_or_else(|| {
            Kept::new(Binaries {
                current: cfg.sidecar_binary.clone(),
                previous: None,
                baseline: None,
            })
        });
        {
            let mut s = status.lock();
            s.restarts = kept.restarts;
            s.last_exit = kept.last_exit.clone();
            s.last_upgrade = kept.last_upgrade.clone();
            s.rule_version = kept.rule_version.clone();
            s.crash_loop = sup.crash_loop();
            s.recent_crashes = sup.recent_crashes();
        }
        Agent {
            sup,
            admin: Pool::new(PoolOptions {
                connect_timeout: cfg.probe_timeout,
                ..PoolOptions::default()
            }),
            cfg,
            held,
            status,
            cmds,
            binaries: kept.binaries,
            rules_doc,
            rules_known: false,
            rules: RuleSet::default(),
            refused: None,
            since_unix_ms: 0,
        }
    }

    /// Takes the rules document as it is now; true when the well-formed rules changed.
    fn read_rules(&mut self) -> bool {
        let doc = self.rules_doc.borrow_and_update().clone();
        if !doc.known() {
            return false;
        }
        let set = match doc.bytes.as_deref().map(RuleSet::parse) {
            None => RuleSet::default(),
            Some(Ok((set, errors))) => {
                for e in &errors {
                    tracing::warn!(error = %e, "ignoring a malformed gray rule");
                }
                set
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring a malformed gray rules document");
                return false;
            }
        };
        let changed = !self.rules_known || set != self.rules;
        if !self.rules_known {
            tracing::info!(
                source = doc.source.as_str(),
                revision = doc.revision,
                "gray rules known"
            );
        }
        self.rules_known = true;
        self.rules = set;
        if changed {
            self.refused = None;
        }
        changed
    }

    /// The binary the rules want this host to run, if they say (nothing while they are
    /// unknown: a watchdog that cannot read the rules moves nothing).
    fn wanted(&self) -> Option<Wanted> {
        if !self.rules_known {
            return None;
        }
        let rule = self.rules.version(&self.cfg.sidecar.host);
        match rule.and_then(|r| r.sidecar.as_ref().map(|v| (r, v))) {
            Some((r, v)) if !v.baseline => {
                // A registry write names no code to run: only a binary of the local directory
                // with the sha256 the rule gives.
                let checked = crate::binaries::verify(&self.cfg.binaries_dir, &v.binary, &v.sha256);
                Some(Wanted {
                    binary: checked
                        .as_ref()
                        .map_or_else(|_| PathBuf::from(&v.binary), Clone::clone),
                    label: v.version.clone(),
                    rule: r.id.clone(),
                    refused: checked.err(),
                })
            }
            // A baseline rule, or no rule: back to what ran before a rule moved the host.
            Some((r, _)) => self.binaries.baseline.clone().map(|b| Wanted {
                binary: b,
                label: String::new(),
                rule: r.id.clone(),
                refused: None,
            }),
            None => self.binaries.baseline.clone().map(|b| Wanted {
                binary: b,
                label: String::new(),
                rule: String::new(),
                refused: None,
            }),
        }
    }

    /// Moves the sidecar to the binary the rules want, when it runs another one.
    async fn follow_rules(&mut self, sc: &mut SidecarProc) -> Option<SidecarProc> {
        let wanted = self.wanted()?;
        if wanted.binary == sc.binary || self.refused.as_ref() == Some(&wanted.binary) {
            return None;
        }
        let refused = match wanted.refused.clone() {
            Some(why) => Some(why),
            None if !wanted.binary.is_file() => {
                Some(format!("{} not found", wanted.binary.display()))
            }
            None => None,
        };
        if let Some(why) = refused {
            tracing::error!(binary = %wanted.binary.display(), rule = %wanted.rule, %why, "refusing a version rule's binary: the running sidecar serves on");
            metrics::counter!("detour_watchdog_rules_refused_total").increment(1);
            self.set(|s| s.last_upgrade = Some(format!("refused: rule {}: {why}", wanted.rule)));
            self.refused = Some(wanted.binary);
            self.keep();
            self.report().await;
            return None;
        }
        // Entering a rule's binary remembers where to come back to; coming back forgets it.
        let back_to_baseline = self.binaries.baseline.as_ref() == Some(&wanted.binary);
        let from = sc.binary.clone();
        tracing::info!(rule = %wanted.rule, to = %wanted.binary.display(), "a version rule moves this host's sidecar");
        match self.upgrade(sc, &wanted.binary).await {
            Ok((new, _)) => {
                if back_to_baseline {
                    self.binaries.baseline = None;
                } else if self.binaries.baseline.is_none() {
                    self.binaries.baseline = Some(from);
                }
                self.set(|s| s.rule_version = wanted.label.clone());
                self.keep();
                Some(new)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the version rule's upgrade failed; the running sidecar serves on");
                self.refused = Some(wanted.binary);
                None
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock());
    }

    fn run_dir(&self) -> &Path {
        &self.cfg.sidecar.run_dir
    }

    /// Writes what a restarted watchdog carries on from (`kept.rs`).
    fn keep(&self) {
        let mut k = Kept::new(self.binaries.clone());
        k.set_memory(&self.sup.memory(Instant::now()));
        {
            let s = self.status.lock();
            k.restarts = s.restarts;
            k.last_exit = s.last_exit.clone();
            k.last_upgrade = s.last_upgrade.clone();
            k.rule_version = s.rule_version.clone();
        }
        if let Err(e) = crate::kept::save(&self.cfg.sidecar.state_dir, &k) {
            tracing::warn!(error = %e, "cannot keep the watchdog's state on disk");
            metrics::counter!("detour_state_file_errors_total", "file" => crate::kept::STATE_FILE)
                .increment(1);
        }
    }

    /// Runs until `stop` resolves (the sidecar is left running) or a shutdown is asked for.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Stopped {
        tokio::pin!(stop);
        self.set(|s| {
            s.binary = self.binaries.current.clone();
            s.previous_binary = self.binaries.previous.clone();
            s.upgrade = "idle".into();
            s.sidecar_state = "down".into();
        });
        self.read_rules();
        if self.sup.crash_loop() {
            // A crash loop survives a restart of the watchdog: the host stays marked `failed`
            // whatever the sidecar says, until it has stayed ready long enough.
            if let Err(e) = self.held.mark(Some(SidecarState::Failed)).await {
                tracing::warn!(error = %e, "cannot publish the host status");
            }
            metrics::gauge!("detour_watchdog_crash_loop").set(1.0);
        }
        let mut next = SidecarProc::adopt(self.run_dir(), &self.cfg.sidecar_config);
        if let Some(sc) = &next {
            tracing::info!(pid = sc.pid, binary = %sc.binary.display(), "adopted the running sidecar");
            self.binaries.current = sc.binary.clone();
        }
        let mut delay = Duration::ZERO;
        loop {
            let mut sc = match next.take() {
                Some(sc) => sc,
                None => {
                    if let Some(s) = self.pause(delay, &mut stop).await {
                        return s;
                    }
                    match self.spawn() {
                        Ok(sc) => sc,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the sidecar");
                            delay = self
                                .exited(&format!("spawn_failed: {e}"), "spawn_failed")
                                .await;
                            continue;
                        }
                    }
                }
            };
            if let Err(e) = sc.write_pid_file(self.run_dir()) {
                tracing::warn!(error = %e, "cannot write the sidecar's pid file");
            }
            self.since_unix_ms = now_unix_ms();
            let adopted = sc.adopted;
            self.set(|s| {
                s.sidecar_pid = Some(sc.pid);
                s.sidecar_state = "starting".into();
                s.adopted = adopted;
                s.binary = sc.binary.clone();
            });
            match self.watch(&mut sc, &mut stop).await {
                Watched::Exited(exit, reason) => {
                    tracing::warn!(pid = sc.pid, %exit, reason, "the sidecar is gone");
                    delay = self.exited(&format!("{reason}: {exit}"), reason).await;
                }
                Watched::Replaced(new) => {
                    next = Some(*new);
                    delay = Duration::ZERO;
                }
                Watched::Stop(s) => return s,
            }
        }
    }

    /// Notes an unplanned end; returns the delay before the next start.
    async fn exited(&mut self, what: &str, reason: &'static str) -> Duration {
        let r = self.sup.on_exit(Instant::now(), false);
        metrics::counter!("detour_watchdog_restarts_total", "reason" => reason).increment(1);
        let crash_loop = self.sup.crash_loop();
        let recent = self.sup.recent_crashes();
        self.set(|s| {
            s.restarts += 1;
            s.last_exit = Some(what.to_owned());
            s.sidecar_pid = None;
            s.sidecar_state = "down".into();
            s.crash_loop = crash_loop;
            s.recent_crashes = recent;
        });
        if r.crash_loop_began {
            tracing::error!(
                crashes = recent,
                "crash loop: the host is marked failed (callers reach its providers straight)"
            );
        }
        metrics::gauge!("detour_watchdog_crash_loop").set(if crash_loop { 1.0 } else { 0.0 });
        metrics::gauge!("detour_watchdog_sidecar_ready").set(0.0);
        self.keep();
        let mark = if crash_loop {
            SidecarState::Failed
        } else {
            SidecarState::Stopped
        };
        if let Err(e) = self.held.mark(Some(mark)).await {
            tracing::warn!(error = %e, "cannot publish the host status");
        }
        self.since_unix_ms = 0;
        self.report().await;
        r.after
    }

    /// Waits `delay` before a start, answering the API meanwhile. `Some` when the agent stops.
    async fn pause(
        &mut self,
        delay: Duration,
        stop: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Option<Stopped> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return None,
                () = stop.as_mut() => return Some(Stopped::Left),
                cmd = self.cmds.recv() => match cmd {
                    Some(Command::Upgrade { reply, .. }) => {
                        let _ = reply.send(Err("no sidecar runs now (it is being restarted); try again".into()));
                    }
                    Some(Command::Shutdown { reply }) => {
                        self.withdraw().await;
                        let _ = reply.send(());
                        return Some(Stopped::Shutdown);
                    }
                    None => {}
                },
            }
        }
    }

    fn launch(&self, binary: &Path, take_over: bool) -> std::io::Result<SidecarProc> {
        SidecarProc::spawn(&Launch {
            binary,
            config: &self.cfg.sidecar_config,
            log: &self.run_dir().join("sidecar.log"),
            watchdog_socket: &self.cfg.admin_unix,
            take_over,
        })
    }

    fn spawn(&self) -> std::io::Result<SidecarProc> {
        let sc = self.launch(&self.binaries.current, false)?;
        tracing::info!(pid = sc.pid, binary = %sc.binary.display(), "sidecar started");
        Ok(sc)
    }

    async fn became_ready(&mut self, sc: &SidecarProc) {
        let took = sc.since.elapsed();
        tracing::info!(
            pid = sc.pid,
            ms = took.as_millis() as u64,
            "the sidecar is ready"
        );
        metrics::histogram!("detour_watchdog_sidecar_ready_seconds").record(took.as_secs_f64());
        metrics::gauge!("detour_watchdog_sidecar_ready").set(1.0);
        self.sup.on_ready(Instant::now());
        self.set(|s| s.sidecar_state = "ready".into());
        let mark = self.sup.crash_loop().then_some(SidecarState::Failed);
        if let Err(e) = self.held.mark(mark).await {
            tracing::warn!(error = %e, "cannot publish the host status");
        }
        self.report().await;
    }

    /// Drains the sidecar and withdraws the host's registrations.
    async fn shutdown(&mut self, sc: &mut SidecarProc) {
        tracing::info!(pid = sc.pid, "shutdown: draining the sidecar");
        sc.signal(Signal::SIGTERM);
        let bound =
            self.cfg.sidecar.drain_timeout + self.cfg.sidecar.announce + Duration::from_secs(5);
        if tokio::time::timeout(bound, sc.exited()).await.is_err() {
            sc.signal(Signal::SIGKILL);
            let _ = sc.exited().await;
        }
        let _ = std::fs::remove_file(self.run_dir().join(crate::proc::PID_FILE));
        self.withdraw().await;
    }

    async fn withdraw(&self) {
        if let Err(e) = self.held.withdraw().await {
            tracing::warn!(error = %e, "cannot withdraw the host's registrations");
        }
    }
}

/// The last lines of a log file (for an error that explains itself).
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
