//! Endpoint selection for one service: power-of-two-choices on in-flight requests (weighted) or
//! on peak-EWMA latency times in-flight requests (`peak-ewma`),
//! round-robin, or rendezvous hashing on a request's pinning key (routes with `hash`), passing over endpoints their PA marked unhealthy and endpoints recently
//! ejected — for refusing connections, or as outliers answering server errors in a row
//! ([`Outlier`]) — unless fewer than the panic threshold are left, in which case all are
//! eligible again (as Envoy's panic mode) — and, when a service sets one, passing over
//! endpoints at their limit of requests in flight. A caller with a zone draws from the
//! candidates of its zone while at least `proxy.zone_min_healthy_percent` of them are usable,
//! and from every zone otherwise (counted in `detour_zone_spillover_total`).

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use detour_core::route::rendezvous_best;
use detour_proto::{Endpoint, EndpointSet, InstanceId};
use detour_registry::now_unix_ms;
use tokio::time::Instant;

use crate::config::limits::Outlier;
use crate::config::{Balance, ZonePreference};
use crate::outbound::ewma::{self, PeakEwma};

/// Live load of one endpoint.
#[derive(Debug, Default)]
pub struct Load {
    /// Requests sent and not yet finished.
    in_flight: AtomicUsize,
    /// Passed over until this time (ms since the epoch); 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Server errors answered in a row.
    consecutive_5xx: AtomicU32,
    /// Outlier ejections so far (the next lasts that many times the base, at most 10).
    ejections: AtomicU32,
    /// Its latency estimate (the latency-aware balancer's).
    latency: PeakEwma,
}

impl Load {
    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether ejected at the time `now_ms` gives, which is read only for an endpoint ever
    /// ejected (the usual pick reads no clock).
    fn ejected(&self, now_ms: impl FnOnce() -> u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms()
    }
}

/// Counts one request in flight on an endpoint until dropped.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<Load>,
    /// When it was sent (read only by the latency-aware balancer).
    started: Option<Instant>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How one pick chooses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick<'a> {
    /// Most requests in flight per endpoint (0: no limit).
    pub limit: usize,
    /// Below this share of usable candidates (percent), every candidate is used.
    pub panic_percent: u8,
    /// A pinned request's key: rendezvous hashing chooses.
    pub key: Option<u64>,
    /// The caller's zone: its candidates are preferred.
    pub zone: Option<&'a ZonePreference>,
}

/// Keeps only `pool`'s candidates in `zone` when at least its share of them is `usable` (and
/// one at least); leaves the pool whole (spills over to every zone) otherwise.
fn stay_in_zone(
    pool: &mut Candidates<'_>,
    zone: &ZonePreference,
    usable: impl Fn(&(&Endpoint, Arc<Load>)) -> bool,
) {
    let local = pool.iter().filter(|(e, _)| e.zone == zone.zone).count();
    if local == pool.len() || local == 0 {
        return;
    }
    let up = pool
        .iter()
        .filter(|x| x.0.zone == zone.zone && usable(x))
        .count();
    if zone.stays(local, up, pool.len()) {
        pool.retain(|(e, _)| e.zone == zone.zone);
    } else {
        metrics::counter!("detour_zone_spillover_total").increment(1);
    }
}

/// The endpoints a pick draws from, with their loads: on the stack up to 8 of them (a
/// request's pick allocates nothing for most services).
type Candidates<'a> = SmallVec<[(&'a Endpoint, Arc<Load>); 8]>;

/// Why [`Balancer::pick_limited`] found no endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// No candidate at all (none left that was not tried).
    None,
    /// Every candidate has its limit of requests in flight.
    AllBusy,
}

/// The selector of one service.
#[derive(Debug)]
pub struct Balancer {
    policy: Balance,
    next: AtomicUsize,
    loads: Mutex<FastMap<InstanceId, Arc<Load>>>,
    /// Address of the endpoint set `loads` was last pruned for (pruning is per change, not per
    /// request).
    pruned_for: AtomicUsize,
}

impl Balancer {
    /// A selector with `policy`.
    pub fn new(policy: Balance) -> Self {
        Self {
            policy,
            next: AtomicUsize::new(0),
            loads: Mutex::new(FastMap::default()),
            pruned_for: AtomicUsize::new(0),
        }
    }

    fn load_of(&self, id: &InstanceId) -> Arc<Load> {
        let mut loads = self.loads.lock();
        load_in(&mut loads, id)
    }

    /// Picks an endpoint among `endpoints`, skipping those in `exclude` (already tried for this
    /// request). Returns the endpoint and its in-flight guard.
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Endpoint],
        exclude: &[InstanceId],
    ) -> Option<(&'a Endpoint, InFlight)> {
        self.pick_limited(endpoints, exclude, 0, 0).ok()
    }

    /// [`Self::pick`], passing over endpoints with `limit` requests in flight already (0: no
    /// limit), and using ejected endpoints too when fewer than `panic_percent` of the
    /// candidates are not ejected; [`NoPick::AllBusy`] when every candidate is at the limit.
    pub fn pick_limited<'a>(
        &self,
        endpoints: &'a [Endpoint],
        exclude: &[InstanceId],
        limit: usize,
        panic_percent: u8,
    ) -> Result<(&'a Endpoint, InFlight), NoPick> {
        let how = Pick {
            limit,
            panic_percent,
            ..Pick::default()
        };
        self.pick_with(endpoints, exclude, &how)
    }

    /// [`Self::pick_limited`] as `how` says: with a pinning key, the candidate rendezvous
    /// hashing ranks first for it instead of the policy's choice (the same key, the same
    /// endpoint, while it is usable); with a zone, among the candidates of that zone while
    /// enough of them are usable.
    pub fn pick_with<'a>(
        &self,
        endpoints: &'a [Endpoint],
        exclude: &[InstanceId],
        how: &Pick<'_>,
    ) -> Result<(&'a Endpoint, InFlight), NoPick> {
        let (limit, panic_percent, key) = (how.limit, how.panic_percent, how.key);
        let now = std::cell::OnceCell::new();
        let mut pool: Candidates<'a> = {
            let mut loads = self.loads.lock();
            endpoints
                .iter()
                .filter(|e| !exclude.contains(&e.instance))
                .map(|e| (e, load_in(&mut loads, &e.instance)))
                .collect()
        };
        // Ejected endpoints, and those their PA marked unhealthy, are passed over unless too
        // few are left (panic mode).
        let usable = |(e, l): &(&Endpoint, Arc<Load>)| {
            e.healthy && !l.ejected(|| *now.get_or_init(now_unix_ms))
        };
        if let Some(zone) = how.zone {
            stay_in_zone(&mut pool, zone, usable);
        }
        let left = pool.iter().filter(|x| usable(x)).count();
        if left > 0 && left * 100 >= pool.len() * usize::from(panic_percent) {
            pool.retain(|x| usable(x));
        } else if left < pool.len() {
            metrics::counter!("detour_lb_panic_total").increment(1);
        }
        if pool.is_empty() {
            return Err(NoPick::None);
        }
        loop {
            let i = match (pool.len(), key) {
                (0, _) => return Err(NoPick::AllBusy),
                (1, _) => 0,
                (_, Some(key)) => {
                    let candidates: Vec<&Endpoint> = pool.iter().map(|(e, _)| *e).collect();
                    rendezvous_best(key, &candidates, |_| true).unwrap_or(0)
                }
                (n, None) => match self.policy {
                    Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
                    Balance::P2c | Balance::PeakEwma => {
                        let a = fastrand::usize(..n);
                        let mut b = fastrand::usize(..n - 1);
                        if b >= a {
                            b += 1;
                        }
                        let first = match self.policy {
                            Balance::PeakEwma => latency_prefers(&pool[a], &pool[b]),
                            _ => cost(&pool[a]) <= cost(&pool[b]),
                        };
                        if first { a } else { b }
                    }
                },
            };
            let admitted = pool[i]
                .1
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (limit == 0 || n < limit).then_some(n + 1)
                })
                .is_ok();
            if admitted {
                let flight = InFlight {
                    load: pool[i].1.clone(),
                    started: ewma::started(self.policy == Balance::PeakEwma),
                };
                return Ok((pool[i].0, flight));
            }
            pool.swap_remove(i);
        }
    }

    /// Passes over `id` for `period` (it refused a connection).
    pub fn eject(&self, id: &InstanceId, period: Duration) {
        let until = now_unix_ms() + period.as_millis() as u64;
        self.load_of(id)
            .ejected_until_ms
            .store(until, Ordering::Relaxed);
    }

    /// Records an attempt on the endpoint `flight` went to that ended without an answer (reset,
    /// timed out, refused). For the latency-aware balancer it weighs as a 100 ms answer for a
    /// few seconds ([`ewma::FAILED_ATTEMPT`]): otherwise an endpoint that fails at once, never
    /// answering, would keep the lowest estimate and draw every first attempt.
    pub fn record_failure(&self, flight: &InFlight) {
        if flight.started.is_some() {
            flight.load.latency.failed();
        }
    }

    /// Records an answer of the endpoint `flight` went to, among `total` endpoints; true when
    /// it was ejected as an outlier by this answer under `o`.
    pub fn record_answer(
        &self,
        flight: &InFlight,
        server_error: bool,
        total: usize,
        o: Outlier,
    ) -> bool {
        let load = &flight.load;
        if let Some(started) = flight.started {
            load.latency.observe(started.elapsed());
        }
        if !server_error {
            if load.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                load.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if o.consecutive_5xx == 0
            || load.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1 < o.consecutive_5xx
        {
            return false;
        }
        load.consecutive_5xx.store(0, Ordering::Relaxed);
        let now = now_unix_ms();
        let ejected = {
            let loads = self.loads.lock();
            loads.values().filter(|l| l.ejected(|| now)).count()
        };
        if (ejected + 1) * 100 > total * usize::from(o.max_ejected_percent) {
            return false;
        }
        let until = load.ejected_until_ms.load(Ordering::Relaxed);
        if until + 300_000 < now {
            load.ejections.store(0, Ordering::Relaxed);
        }
        let n = (load.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(10);
        let period = o.base_ejection.as_millis() as u64 * u64::from(n);
        load.ejected_until_ms.store(now + period, Ordering::Relaxed);
        true
    }

    /// Forgets endpoints no longer in `set`; does nothing when `set` is the one already seen.
    pub fn retain(&self, set: &Arc<EndpointSet>) {
        let addr = Arc::as_ptr(set) as usize;
        if self.pruned_for.swap(addr, Ordering::Relaxed) == addr {
            return;
        }
        let mut loads = self.loads.lock();
        loads.retain(|id, _| set.endpoints.iter().any(|e| &e.instance == id));
    }
}

/// The load of `id`, created on first use (cloning the id only then).
fn load_in(loads: &mut FastMap<InstanceId, Arc<Load>>, id: &InstanceId) -> Arc<Load> {
    if let Some(l) = loads.get(id) {
        return l.clone();
    }
    loads.entry(id.clone()).or_default().clone()
}

/// Whether the latency-aware balancer takes `a` over `b`: by in-flight requests per unit of
/// weight (as `p2c`) when their estimates are alike ([`ewma::alike`]), else by the latency
/// cost — the estimate times the requests in flight plus one, per unit of weight.
fn latency_prefers(a: &(&Endpoint, Arc<Load>), b: &(&Endpoint, Arc<Load>)) -> bool {
    let (la, lb) = (a.1.latency.get(), b.1.latency.get());
    if ewma::alike(la, lb) {
        return cost(a) <= cost(b);
    }
    latency_cost(a, la) <= latency_cost(b, lb)
}

/// The latency-aware cost of an endpoint whose estimate is `ns` (plus 1 µs, so that an endpoint
/// not measured yet still costs more the more requests it has in flight).
fn latency_cost((ep, load): &(&Endpoint, Arc<Load>), ns: f64) -> f64 {
    (ns + 1_000.0) * (load.in_flight() as f64 + 1.0) / f64::from(ep.weight.max(1))
}

/// In-flight requests per unit of weight (scaled to stay in integers).
fn cost((ep, load): &(&Endpoint, Arc<Load>)) -> u64 {
    (load.in_flight() as u64 + 1) * 1000 / u64::from(ep.weight.max(1))
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
