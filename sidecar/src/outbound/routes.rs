//! The route document (`routes/services`) as the CA applies it: followed live from the registry
//! (with the copy saved in the state directory before the registry answers), each service's
//! routes matched against the request before an endpoint is picked — on the mesh path and the
//! CA-direct path alike — and the counts per subset that `/state` shows.
//!
//! A document that does not parse leaves the last good one in force; a malformed service entry
//! is left out. Both are logged and counted (`detour_route_invalid_total`). A request of a
//! service with routes is counted in `detour_route_requests_total{service,subset}`, a fallback
//! (its subset had no healthy endpoint) in `detour_route_fallbacks_total{service}`.

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use detour_core::route::{RequestView, RouteDoc, ServiceRoutes};
use detour_proto::{Endpoint, EndpointSet, InstanceId, ServiceName};
use detour_registry::docs::{DocStatus, Followed};
use tokio::sync::watch;

use crate::config::ZonePreference;
use crate::outbound::balance::{Balancer, InFlight, NoPick, Pick};
use crate::policy::{ServicePolicy, services_in};

/// The routes in force, and what they did.
pub struct Routes {
    doc: RwLock<Arc<BTreeMap<ServiceName, Arc<ServiceRoutes>>>>,
    status: RwLock<DocStatus>,
    generation: AtomicU64,
    changed: watch::Sender<u64>,
    /// Whether any service has routes (a request of a mesh without routes looks no further).
    any: AtomicBool,
    /// Per service, its subsets' endpoints for the endpoint set last seen.
    compiled: Mutex<FastMap<ServiceName, Arc<Compiled>>>,
    /// Per service, the requests routed to each subset since the routes last changed.
    tallies: Mutex<FastMap<ServiceName, Arc<Tally>>>,
}

/// What one service's routes did since they last changed, with its metric handles resolved
/// once (a request allocates nothing to be counted).
struct Tally {
    /// Per subset, then for every endpoint (`all`).
    requests: Vec<AtomicU64>,
    fallbacks: AtomicU64,
    /// `detour_route_requests_total` per subset, then `all`.
    counters: Vec<metrics::Counter>,
    /// `detour_route_fallbacks_total`.
    fallback_counter: metrics::Counter,
}

impl Tally {
    fn new(service: &ServiceName, routes: &ServiceRoutes) -> Tally {
        let label = detour_proto::labels::service(service);
        // Past the bound on service labels, subsets share one label too.
        let other = label == detour_proto::labels::OTHER;
        let names = routes
            .subsets
            .iter()
            .map(|s| s.name.as_str())
            .chain(["all"]);
        let counters = names
            .map(|name| {
                let subset = if other {
                    detour_proto::labels::OTHER
                } else {
                    name
                };
                metrics::counter!("detour_route_requests_total", "service" => label.clone(),
                    "subset" => subset.to_owned())
            })
            .collect::<Vec<_>>();
        Tally {
            requests: counters.iter().map(|_| AtomicU64::new(0)).collect(),
            fallbacks: AtomicU64::new(0),
            counters,
            fallback_counter: metrics::counter!("detour_route_fallbacks_total", "service" => label),
        }
    }

    fn count(&self, subset: Option<usize>, fell_back: bool) {
        let i = subset.unwrap_or(self.requests.len() - 1);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        self.counters[i].increment(1);
        if fell_back {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.fallback_counter.increment(1);
        }
    }
}

/// A service's routes over one endpoint set.
struct Compiled {
    generation: u64,
    set: Arc<EndpointSet>,
    routes: Arc<ServiceRoutes>,
    /// Each subset's endpoints, in the set's order.
    members: Vec<Arc<[Endpoint]>>,
    /// Whether each subset has a healthy endpoint.
    usable: Vec<bool>,
    /// What the service's routes did.
    tally: Arc<Tally>,
}

/// Where one request may go.
#[derive(Debug, Default)]
pub struct Routed {
    /// The chosen subset's endpoints (`None`: every endpoint of the service).
    pub members: Option<Arc<[Endpoint]>>,
    /// The pinning key's hash: the endpoint is chosen by rendezvous hashing.
    pub key: Option<u64>,
}

impl Routed {
    /// Picks the request's next endpoint, passing over those `tried`: from its subset while
    /// one is left that can take it, then from every endpoint of `set` (never an error while
    /// any endpoint can); by the pinning key when the request has one.
    /// With `zone`, the caller's zone is preferred in each; when every candidate of the zone is
    /// at its limit of requests in flight, the others are drawn from.
    pub(super) fn pick<'a>(
        &'a self,
        balancer: &Balancer,
        set: &'a EndpointSet,
        tried: &[InstanceId],
        policy: &ServicePolicy,
        zone: Option<&ZonePreference>,
    ) -> Result<(&'a Endpoint, InFlight), NoPick> {
        let how = Pick {
            limit: policy.max_concurrent_per_endpoint,
            panic_percent: policy.outlier.panic_threshold_percent,
            key: self.key,
            zone,
        };
        let anywhere = Pick { zone: None, ..how };
        let members = self.members.as_deref();
        for candidates in members.into_iter().chain([&set.endpoints[..]]) {
            if let Ok(picked) = balancer.pick_with(candidates, tried, &how) {
                return Ok(picked);
            }
            if zone.is_some()
                && let Ok(picked) = balancer.pick_with(candidates, tried, &anywhere)
            {
                return Ok(picked);
            }
        }
        // Nothing anywhere: the error says why.
        balancer.pick_with(&set.endpoints, tried, &anywhere)
    }
}

impl Routes {
    /// No routes yet.
    pub fn new() -> Arc<Routes> {
        Arc::new(Routes {
            doc: RwLock::new(Arc::new(BTreeMap::new())),
            status: RwLock::new(Followed::unknown().status()),
            generation: AtomicU64::new(0),
            changed: watch::channel(0).0,
            any: AtomicBool::new(false),
            compiled: Mutex::new(FastMap::default()),
            tallies: Mutex::new(FastMap::default()),
        })
    }

    /// Where the routes in force came from.
    pub fn document(&self) -> DocStatus {
        *self.status.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the generation (woken on every change).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The routes of `service`, if any.
    pub fn of(&self, service: &ServiceName) -> Option<Arc<ServiceRoutes>> {
        let doc = self.doc.read().unwrap_or_else(|p| p.into_inner());
        doc.get(service).cloned()
    }

    /// Routes one request of `service` over `set`.
    pub fn route(
        &self,
        service: &ServiceName,
        req: &RequestView<'_>,
        set: &Arc<EndpointSet>,
    ) -> Routed {
        if !self.any.load(Ordering::Acquire) {
            return Routed::default();
        }
        let Some(c) = self.compiled_for(service, set) else {
            return Routed::default();
        };
        let sel = c.routes.select(req, fastrand::u64(..), |i| c.usable[i]);
        if sel.fell_back {
            tracing::debug!(%service, subset = %c.routes.subset_name(sel.subset), "route fell back: no healthy endpoint in the subset chosen");
        }
        c.tally.count(sel.subset, sel.fell_back);
        Routed {
            members: sel.subset.map(|i| c.members[i].clone()),
            key: sel.key,
        }
    }

    /// `service`'s routes compiled over `set` (compiled again when either changed).
    fn compiled_for(&self, service: &ServiceName, set: &Arc<EndpointSet>) -> Option<Arc<Compiled>> {
        let generation = self.generation.load(Ordering::Acquire);
        let mut compiled = self.compiled.lock();
        if let Some(c) = compiled.get(service)
            && c.generation == generation
            && Arc::ptr_eq(&c.set, set)
        {
            return Some(c.clone());
        }
        let Some(routes) = self.of(service) else {
            compiled.remove(service);
            return None;
        };
        let members: Vec<Arc<[Endpoint]>> = routes
            .subsets
            .iter()
            .map(|s| {
                set.endpoints
                    .iter()
                    .filter(|e| s.contains(e))
                    .cloned()
                    .collect()
            })
            .collect();
        let usable = members
            .iter()
            .map(|m| m.iter().any(|e| e.healthy))
            .collect();
        let tally = self
            .tallies
            .lock()
            .entry(service.clone())
            .or_insert_with(|| Arc::new(Tally::new(service, &routes)))
            .clone();
        let c = Arc::new(Compiled {
            generation,
            set: set.clone(),
            routes,
            members,
            usable,
            tally,
        });
        compiled.insert(service.clone(), c.clone());
        Some(c)
    }

    /// Follows the route document for as long as `doc` lives.
    pub fn follow(self: &Arc<Self>, doc: watch::Receiver<Followed>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        detour_registry::docs::apply_each(doc, move |d| me.apply_followed(d))
    }

    /// Takes the document as followed: unknown changes nothing (no routes apply).
    pub fn apply_followed(&self, doc: &Followed) {
        if !doc.known() {
            return;
        }
        *self.status.write().unwrap_or_else(|p| p.into_inner()) = doc.status();
        self.apply(doc.bytes.as_deref());
    }

    /// Takes a new route document (`None`: there is none).
    pub fn apply(&self, doc: Option<&[u8]>) {
        let parsed = doc.map(|b| RouteDoc::parse(b).map(|d| (d.services, d.malformed)));
        let Some(services) = services_in(
            parsed,
            "route",
            metrics::counter!("detour_route_invalid_total"),
        ) else {
            return;
        };
        let mut current = self.doc.write().unwrap_or_else(|p| p.into_inner());
        if **current == services {
            return;
        }
        tracing::info!(
            services = services.len(),
            "routes from the registry changed"
        );
        metrics::gauge!("detour_route_services").set(services.len() as f64);
        self.any.store(!services.is_empty(), Ordering::Release);
        *current = Arc::new(services);
        drop(current);
        self.tallies.lock().clear();
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.changed.send_replace(g);
    }

    /// What `/state` shows: each service's routes as written, and its requests per subset
    /// since they last changed.
    pub fn state(&self) -> serde_json::Value {
        let doc = self.doc.read().unwrap_or_else(|p| p.into_inner()).clone();
        let tallies = self.tallies.lock();
        let services: serde_json::Map<String, serde_json::Value> = doc
            .iter()
            .map(|(service, r)| {
                let t = tallies.get(service);
                let names = r.subsets.iter().map(|s| s.name.as_str()).chain(["all"]);
                let requests: BTreeMap<&str, u64> = match t {
                    Some(t) => names
                        .zip(&t.requests)
                        .map(|(n, c)| (n, c.load(Ordering::Relaxed)))
                        .filter(|(_, c)| *c > 0)
                        .collect(),
                    None => BTreeMap::new(),
                };
                let routes: serde_json::Value =
                    serde_json::from_str(&r.json).unwrap_or(serde_json::Value::Null);
                let v = serde_json::json!({
                    "routes": routes,
                    "requests": requests,
                    "fallbacks": t.map_or(0, |t| t.fallbacks.load(Ordering::Relaxed)),
                });
                (service.to_string(), v)
            })
            .collect();
        serde_json::Value::Object(services)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::{HostId, InstanceId};
    use http::{HeaderMap, Method};

    fn ep(instance: &str, version: &str, healthy: bool) -> Endpoint {
        let mut e = Endpoint::new(
            ServiceName::new("hello").unwrap(),
            InstanceId::new(instance).unwrap(),
            HostId::new("h").unwrap(),
            "127.0.0.1:1".parse().unwrap(),
        );
        e.version = version.into();
        e.healthy = healthy;
        e
    }

    #[test]
    fn routed_requests_draw_from_their_subset_and_fall_back_when_it_is_down() {
        let routes = Routes::new();
        let hello = ServiceName::new("hello").unwrap();
        let h = HeaderMap::new();
        let req = RequestView {
            method: &Method::GET,
            path: "/",
            headers: &h,
        };
        let set = Arc::new(EndpointSet::known(vec![
            ep("a", "1", true),
            ep("b", "2", true),
        ]));
        assert!(
            routes.route(&hello, &req, &set).members.is_none(),
            "no routes"
        );
        routes.apply(Some(
            br#"{"version":1,"services":{"hello":{"subsets":{"v2":{"version":"2"}},"default":"v2"}}}"#,
        ));
        let r = routes.route(&hello, &req, &set);
        let members = r.members.unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].instance.as_str(), "b");
        // v2's only endpoint unhealthy: every endpoint, counted.
        let down = Arc::new(EndpointSet::known(vec![
            ep("a", "1", true),
            ep("b", "2", false),
        ]));
        assert!(routes.route(&hello, &req, &down).members.is_none());
        let st = routes.state();
        assert_eq!(st["hello"]["requests"]["v2"], 1, "{st}");
        assert_eq!(st["hello"]["requests"]["all"], 1, "{st}");
        assert_eq!(st["hello"]["fallbacks"], 1, "{st}");
        // A broken document keeps the routes; none removes them.
        routes.apply(Some(b"{broken"));
        assert!(routes.of(&hello).is_some());
        routes.apply(None);
        assert!(routes.route(&hello, &req, &set).members.is_none());
    }
}
