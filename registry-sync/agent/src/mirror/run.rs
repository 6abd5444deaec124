//! The mirror loop: campaign for the election; while elected, keep the target equal to what the
//! source (through self-protection) says, health-check held instances, and re-read the target
//! now and then; step down as soon as the election is lost.

use detour_proto::sync::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_proto::ServiceName;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::plan::{Current, Held as Entry, plan};
use super::target::{Campaign, Outcome, Target, TargetError};
use super::{Held, Mirror};
use crate::legacy::{Providers, SourceView};
use detour_registry::health::HealthCheck;
use detour_registry::protection::{Change, ProtectionPolicy};

/// Timing of the mirror loop.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// This replica's id (the election key's value).
    pub replica: String,
    /// The election lease: a dead leader is replaced within it.
    pub election_ttl: Duration,
    /// The lease the entries are attached to (longer than the election's, so a successor
    /// re-attaches them before they expire).
    pub lease_ttl: Duration,
    /// How often the whole target is read again and compared.
    pub resync_interval: Duration,
    /// How often held instances are health-checked.
    pub check_interval: Duration,
    /// Self-protection.
    pub policy: ProtectionPolicy,
    /// How long a removal seen in the source waits for the rest of its batch.
    pub settle: Duration,
}

/// What the mirror is doing, for `/state` and `/ready`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// `starting`, `standby` or `leader`.
    pub role: String,
    /// The elected replica's id, as last seen.
    pub leader: String,
    /// Entries this mirror holds in the target.
    pub entries: usize,
    /// Entries per service.
    pub services: HashMap<String, usize>,
    /// Desired keys held by another writer (left alone).
    pub conflicts: usize,
    /// Protected services and their held instances.
    pub protected: Vec<Held>,
    /// Instances held against the source (deletions not applied).
    pub held_deletions: usize,
    /// Lag from a source change to the target write, milliseconds, over the last changes.
    pub lag_ms: LagSummary,
    /// The last error talking to the target.
    pub last_error: Option<String>,
    /// Times this replica was elected.
    pub elected: u64,
}

/// Percentiles of recent lags.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LagSummary {
    /// Changes measured (the last ones, up to a bound).
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Recent lags, bounded.
#[derive(Debug, Default)]
struct Lags(VecDeque<f64>);

impl Lags {
    fn push(&mut self, ms: f64) {
        if self.0.len() == 4096 {
            self.0.pop_front();
        }
        self.0.push_back(ms);
    }

    fn summary(&self) -> LagSummary {
        let mut v: Vec<f64> = self.0.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        LagSummary {
            count: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// Shared status.
pub type SharedStatus = Arc<Mutex<Status>>;

fn set_status(status: &SharedStatus, f: impl FnOnce(&mut Status)) {
    f(&mut status.lock());
}

/// Runs until `stop` turns true; then resigns (the entries stay, for the successor to adopt).
pub async fn run(
    opts: RunOptions,
    target: Arc<dyn Target>,
    mut source: watch::Receiver<SourceView>,
    health: Arc<dyn HealthCheck>,
    status: SharedStatus,
    mut stop: watch::Receiver<bool>,
) {
    set_status(&status, |s| s.role = "starting".into());
    let poll =
        (opts.election_ttl / 10).clamp(Duration::from_millis(100), Duration::from_millis(250));
    loop {
        if *stop.borrow() {
            return;
        }
        let election = match target.grant(opts.election_ttl).await {
            Ok(l) => l,
            Err(e) => {
                set_status(&status, |s| s.last_error = Some(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(poll * 4) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut keeper = LeaseKeeper::new(election, opts.election_ttl);
        let fence = match campaign(
            &opts,
            &*target,
            election,
            &mut keeper,
            &status,
            &mut stop,
            poll,
        )
        .await
        {
            Campaigned::Won(fence) => fence,
            Campaigned::Expired => continue,
            Campaigned::Stopped => {
                let _ = target.revoke(election).await;
                return;
            }
        };
        tracing::info!(replica = %opts.replica, fence, "elected: mirroring into the target");
        metrics::counter!("detour_sync_elected_total").increment(1);
        metrics::gauge!("detour_sync_leader").set(1.0);
        set_status(&status, |s| {
            s.role = "leader".into();
            s.leader = opts.replica.clone();
            s.elected += 1;
        });
        let mut term = Term {
            opts: &opts,
            target: &*target,
            fence,
            keeper,
            status: &status,
            health: &health,
        };
        let why = term.lead(&mut source, &mut stop).await;
        metrics::gauge!("detour_sync_leader").set(0.0);
        let resigned = *stop.borrow();
        set_status(&status, |s| {
            s.role = if resigned { "stopped" } else { "standby" }.into()
        });
        // Resign: the election key goes with its lease; the entries stay on the data lease for
        // the successor to adopt.
        let _ = target.revoke(election).await;
        tracing::warn!(reason = %why, "no longer mirroring");
        if resigned {
            return;
        }
    }
}

/// How a campaign ended.
enum Campaigned {
    /// Elected, with this fence.
    Won(i64),
    /// The election lease expired first.
    Expired,
    /// `stop` came first.
    Stopped,
}

/// Campaigns with `election` every `poll` until elected, keeping the election lease alive
/// meanwhile; the status says who leads while this replica stands by.
async fn campaign(
    opts: &RunOptions,
    target: &dyn Target,
    election: i64,
    keeper: &mut LeaseKeeper,
    status: &SharedStatus,
    stop: &mut watch::Receiver<bool>,
    poll: Duration,
) -> Campaigned {
    loop {
        if !keeper.tick(target).await {
            return Campaigned::Expired;
        }
        match target.campaign(&opts.replica, election).await {
            Ok(Campaign::Won { fence }) => return Campaigned::Won(fence),
            Ok(Campaign::Lost { leader }) => {
                metrics::gauge!("detour_sync_leader").set(0.0);
                set_status(status, |s| {
                    s.role = "standby".into();
                    s.leader = leader;
                });
            }
            Err(e) => set_status(status, |s| s.last_error = Some(e.to_string())),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = stop.changed() => return Campaigned::Stopped,
        }
    }
}

/// Keeps one lease alive every third of its time-to-live.
struct LeaseKeeper {
    lease: i64,
    ttl: Duration,
    next: Instant,
    last_ok: Instant,
}

impl LeaseKeeper {
    fn new(lease: i64, ttl: Duration) -> Self {
        let now = Instant::now();
        Self {
            lease,
            ttl,
            next: now + ttl / 3,
            last_ok: now,
        }
    }

    /// Keeps the lease alive if it is time; false once it expired or went unconfirmed for a
    /// whole time-to-live.
    async fn tick(&mut self, target: &dyn Target) -> bool {
        let now = Instant::now();
        if now < self.next {
            return true;
        }
        self.next = now + self.ttl / 3;
        match target.keep_alive(self.lease).await {
            Ok(true) => {
                self.last_ok = Instant::now();
                true
            }
            Ok(false) => false,
            Err(_) => self.last_ok.elapsed() < self.ttl,
        }
    }
}

/// One elected term.
struct Term<'a> {
    opts: &'a RunOptions,
    target: &'a dyn Target,
    fence: i64,
    keeper: LeaseKeeper,
    status: &'a SharedStatus,
    health: &'a Arc<dyn HealthCheck>,
}

/// What a term keeps from one round to the next.
struct TermState {
    /// Lags are measured from the first converged listing on (not the initial copy).
    baseline: Option<Instant>,
    mirror: Mirror,
    /// The data lease and its keeper, once granted.
    data: Option<(i64, LeaseKeeper)>,
    /// What the target holds, as last listed and written.
    current: Current,
    lags: Lags,
    recorded: HashMap<ServiceName, Instant>,
    /// When the target is listed again.
    resync_at: Instant,
    /// Whether the mirror was seeded from a first listing.
    seeded: bool,
    /// The providers of the last complete listing of the source.
    applied: Arc<Providers>,
}

impl Term<'_> {
    /// Leads until the election is lost or `stop`; returns why it ended.
    async fn lead(
        &mut self,
        source: &mut watch::Receiver<SourceView>,
        stop: &mut watch::Receiver<bool>,
    ) -> String {
        let mut st = TermState {
            baseline: None,
            mirror: Mirror::new(self.opts.policy.clone()),
            data: None,
            current: Current::default(),
            lags: Lags::default(),
            recorded: HashMap::new(),
            resync_at: Instant::now(),
            seeded: false,
            applied: Arc::default(),
        };
        let mut checks = tokio::time::interval(self.opts.check_interval);
        let mut ticks = tokio::time::interval(Duration::from_millis(200));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !self.keeper.tick(self.target).await {
                return "the election lease expired".into();
            }
            self.keep_data_lease(&mut st).await;
            if Instant::now() >= st.resync_at {
                self.resync(&mut st).await;
            }
            if let Err(why) = self.follow_source(&mut st, source).await {
                return why;
            }
            self.publish(&st.mirror, &st.current, &st.lags);
            tokio::select! {
                _ = source.changed() => {
                    if self.settle(&st, source, stop).await {
                        return "stopping".into();
                    }
                }
                _ = checks.tick() => self.check_held(&mut st.mirror).await,
                _ = ticks.tick() => {}
                _ = stop.changed() => return "stopping".into(),
            }
        }
    }

    /// The data lease: granted at the start of the term and again if it ever expires (the
    /// target is then listed again: what the old lease held is gone).
    async fn keep_data_lease(&self, st: &mut TermState) {
        let lease_ok = match &mut st.data {
            Some((_, k)) => k.tick(self.target).await,
            None => false,
        };
        if lease_ok {
            return;
        }
        match self.target.grant(self.opts.lease_ttl).await {
            Ok(l) => {
                st.data = Some((l, LeaseKeeper::new(l, self.opts.lease_ttl)));
                st.resync_at = Instant::now();
            }
            Err(e) => self.error(&e),
        }
    }

    /// Lists what the target holds; the first listing seeds the mirror.
    async fn resync(&self, st: &mut TermState) {
        match self.target.list().await {
            Ok(c) => {
                st.current = c;
                st.resync_at = Instant::now() + self.opts.resync_interval;
                if !st.seeded {
                    st.mirror.seed(&st.current, Instant::now());
                    st.seeded = true;
                }
            }
            Err(e) => self.error(&e),
        }
    }

    /// Takes the source's view into the mirror and converges the target on it; `Err` with why
    /// the term ends when another replica was elected.
    async fn follow_source(
        &self,
        st: &mut TermState,
        source: &mut watch::Receiver<SourceView>,
    ) -> Result<(), String> {
        let Some(lease) = st.data.as_ref().map(|(l, _)| *l).filter(|_| st.seeded) else {
            return Ok(());
        };
        let view = source.borrow_and_update().clone();
        if view.connected && view.listed {
            st.applied = view.providers.clone();
        }
        let now = Instant::now();
        report(st.mirror.on_source(&view, now));
        report(st.mirror.expire(now));
        let converged = self
            .converge(
                &st.mirror,
                &mut st.current,
                lease,
                &view,
                st.baseline,
                &mut st.recorded,
                &mut st.lags,
            )
            .await;
        match converged {
            Ok(()) => {
                if st.baseline.is_none() && view.connected && view.listed {
                    st.baseline = Some(Instant::now());
                }
            }
            Err(TargetError::NotLeader) => return Err("another replica was elected".into()),
            Err(e) => self.error(&e),
        }
        Ok(())
    }

    /// After a change of the source: a removal waits a moment for the rest of its batch, so
    /// that a mass removal is judged as one (and held) rather than trusted in its first few.
    /// True when `stop` came meanwhile.
    async fn settle(
        &self,
        st: &TermState,
        source: &watch::Receiver<SourceView>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let removes = {
            let v = source.borrow();
            v.connected && removes_any(&st.applied, &v.providers)
        };
        if !removes || self.opts.settle.is_zero() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(self.opts.settle) => false,
            _ = stop.changed() => true,
        }
    }

    fn error(&self, e: &TargetError) {
        tracing::warn!(error = %e, "target not reachable; retrying");
        set_status(self.status, |s| s.last_error = Some(e.to_string()));
    }

    /// Plans and applies the writes that make the target hold what the mirror wants.
    #[allow(clippy::too_many_arguments)]
    async fn converge(
        &self,
        mirror: &Mirror,
        current: &mut Current,
        lease: i64,
        view: &SourceView,
        baseline: Option<Instant>,
        recorded: &mut HashMap<ServiceName, Instant>,
        lags: &mut Lags,
    ) -> Result<(), TargetError> {
        let desired = mirror.desired();
        let p = plan(&desired, current, lease);
        if p.conflicts.len() != current_conflicts(self.status) {
            for k in &p.conflicts {
                tracing::warn!(service = %k.0, instance = %k.1, "entry held by another writer; not mirrored");
            }
            metrics::gauge!("detour_sync_conflicts").set(p.conflicts.len() as f64);
            set_status(self.status, |s| s.conflicts = p.conflicts.len());
        }
        if p.ops.is_empty() {
            return Ok(());
        }
        let results = self.target.apply(self.fence, lease, &p.ops).await?;
        let done = Instant::now();
        let mut stale = false;
        for ((key, outcome), op) in results.into_iter().zip(&p.ops) {
            let kind = match op {
                super::plan::Op::Create(_) => "create",
                super::plan::Op::Update { .. } => "update",
                super::plan::Op::Delete { .. } => "delete",
            };
            match outcome {
                Outcome::Written(revision) => {
                    if let Some(ep) = desired.get(&key) {
                        current.ours.insert(
                            key.clone(),
                            Entry {
                                endpoint: ep.clone(),
                                revision,
                                lease,
                            },
                        );
                    }
                }
                Outcome::Deleted => {
                    current.ours.remove(&key);
                }
                Outcome::Stale => {
                    stale = true;
                    continue;
                }
            }
            metrics::counter!("detour_sync_writes_total", "op" => kind).increment(1);
            if let Some(&seen) = view.observed.get(&key.0)
                && baseline.is_some_and(|b| seen > b)
                && recorded.get(&key.0) != Some(&seen)
            {
                let lag = done.saturating_duration_since(seen);
                metrics::histogram!("detour_sync_lag_seconds").record(lag.as_secs_f64());
                lags.push(lag.as_secs_f64() * 1000.0);
                recorded.insert(key.0.clone(), seen);
            }
        }
        if stale {
            // Someone else changed an entry: read the target again before the next plan.
            *current = self.target.list().await?;
        }
        Ok(())
    }

    /// Health-checks every held instance once, concurrently.
    async fn check_held(&self, mirror: &mut Mirror) {
        let kept = mirror.kept();
        if kept.is_empty() {
            return;
        }
        let mut set = JoinSet::new();
        for ep in kept {
            let spec = self.opts.policy.for_service(&ep.service).check.clone();
            let check = self.health.check(&ep, &spec);
            set.spawn(async move { (ep, check.await) });
        }
        while let Some(Ok((ep, healthy))) = set.join_next().await {
            if mirror.on_health(&ep.service, &ep.instance, healthy) {
                tracing::info!(service = %ep.service, instance = %ep.instance, healthy, "held instance health changed");
            }
        }
    }

    fn publish(&self, mirror: &Mirror, current: &Current, lags: &Lags) {
        let held = mirror.held();
        let held_deletions: usize = held.iter().map(|h| h.kept.len()).sum();
        metrics::gauge!("detour_sync_entries").set(current.ours.len() as f64);
        metrics::gauge!("detour_sync_held_deletions").set(held_deletions as f64);
        metrics::gauge!("detour_sync_protected_services").set(held.len() as f64);
        set_status(self.status, |s| {
            s.entries = current.ours.len();
            s.services = mirror.counts();
            s.protected = held;
            s.held_deletions = held_deletions;
            s.lag_ms = lags.summary();
        });
    }
}

/// Whether `new` lacks an instance `old` has.
fn removes_any(old: &Providers, new: &Providers) -> bool {
    old.iter().any(|(svc, eps)| match new.get(svc) {
        None => true,
        Some(n) => eps.keys().any(|i| !n.contains_key(i)),
    })
}

fn current_conflicts(status: &SharedStatus) -> usize {
    status.lock().conflicts
}

/// Logs and counts protection changes.
fn report(changes: Vec<(ServiceName, Change)>) {
    for (service, c) in changes {
        match c {
            Change::Entered { kept } => {
                tracing::warn!(%service, kept, "mass de-registration in the source: deletions held, held instances health-checked");
                metrics::counter!("detour_sync_protection_total", "event" => "entered")
                    .increment(1);
            }
            Change::Left(why) => {
                tracing::info!(%service, ?why, "protection ended");
                metrics::counter!("detour_sync_protection_total", "event" => "left").increment(1);
            }
        }
    }
}
