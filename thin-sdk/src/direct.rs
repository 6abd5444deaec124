//! The direct path's choice of providers: the endpoints of the last snapshot the sidecar sent,
//! those of the subset the service's routes choose for the call first (the same decision as
//! the CA's, `detour_core::route`), in turn (round-robin across calls) or by the call's pinning
//! key (rendezvous hashing), healthy and recently working ones first — a provider
//! that refused a connection is passed over for a while, one whose sidecar marked it unhealthy
//! comes last, and none is ever skipped altogether — except those reached through their PA
//! only (`no_direct`), which the direct path never calls.

use detour_proto::sync::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use detour_core::route::{RequestView, ZonePreference, rendezvous_order};
use detour_proto::Endpoint;
use tokio::time::Instant;

use crate::control::Snapshot;

/// How long a provider that refused a connection is tried last.
const EJECT_FOR: Duration = Duration::from_secs(2);

/// Round-robin order and recent refusals, shared by every call of one client.
#[derive(Debug, Default)]
pub(crate) struct Direct {
    next: AtomicUsize,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Direct {
    /// The order in which one call (`req`) tries the endpoints of `snap`: the subset its
    /// routes choose first, then the others; by the pinning key when the call has one.
    /// With `zone`, the endpoints of the caller's zone come first in each part while enough of
    /// them are usable, as at the CA.
    pub(crate) fn order(
        &self,
        snap: &Snapshot,
        req: Option<RequestView<'_>>,
        zone: Option<&ZonePreference>,
    ) -> Vec<Endpoint> {
        let allowed: Vec<&Endpoint> = snap
            .endpoints
            .iter()
            .filter(|e| e.direct_allowed())
            .collect();
        if allowed.is_empty() {
            return Vec::new();
        }
        let (subset, key) = match (&snap.routes, req) {
            (Some(r), Some(req)) => {
                let sel = r.select(&req, fastrand::u64(..), |i| {
                    allowed
                        .iter()
                        .any(|e| e.healthy && r.subsets[i].contains(e))
                });
                if sel.fell_back {
                    metrics::counter!("detour_sdk_route_fallbacks_total").increment(1);
                }
                (sel.subset.map(|i| &r.subsets[i]), sel.key)
            }
            _ => (None, None),
        };
        let mut order: Vec<&Endpoint> = match key {
            Some(key) => rendezvous_order(key, &allowed)
                .into_iter()
                .map(|i| allowed[i])
                .collect(),
            None => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..allowed.len())
                    .map(|i| allowed[(start + i) % allowed.len()])
                    .collect()
            }
        };
        let now = Instant::now();
        let ejected = self.ejected.lock();
        let refused = |e: &Endpoint| {
            ejected
                .get(&e.app_address)
                .is_some_and(|until| *until > now)
        };
        let first: Vec<&&Endpoint> = allowed
            .iter()
            .filter(|e| subset.is_none_or(|s| s.contains(e)))
            .collect();
        let stays = zone.is_some_and(|z| {
            let local = first.iter().filter(|e| e.zone == z.zone).count();
            let up = first
                .iter()
                .filter(|e| e.zone == z.zone && e.healthy && !refused(e))
                .count();
            z.stays(local, up, first.len())
        });
        let away = |e: &Endpoint| stays && zone.is_some_and(|z| e.zone != z.zone);
        let rank = |e: &Endpoint| {
            let out = subset.is_some_and(|s| !s.contains(e));
            (out, away(e), !e.healthy, refused(e))
        };
        order.sort_by_key(|e| rank(e));
        order.into_iter().cloned().collect()
    }

    /// Notes that the provider at `addr` refused a connection.
    pub(crate) fn refused(&self, addr: SocketAddr) {
        self.ejected.lock().insert(addr, Instant::now() + EJECT_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_core::route::ServiceRoutes;
    use detour_proto::{HostId, InstanceId, ServiceName};
    use http::{HeaderMap, HeaderValue, Method};

    fn ep(i: u16, healthy: bool) -> Endpoint {
        let mut e = Endpoint::new(
            ServiceName::new("s").unwrap(),
            InstanceId::new(format!("i{i}")).unwrap(),
            HostId::new("h").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], i)),
        );
        e.healthy = healthy;
        e
    }

    /// The order of a call without routes.
    struct Order<'a>(&'a Direct, &'a Snapshot);

    impl Order<'_> {
        fn get(&self) -> Vec<Endpoint> {
            self.0.order(self.1, None, None)
        }
    }

    fn ports(v: &[Endpoint]) -> Vec<u16> {
        v.iter().map(|e| e.app_address.port()).collect()
    }

    fn snap(endpoints: &[Endpoint], routes: &str) -> Snapshot {
        Snapshot {
            revision: 1,
            endpoints: endpoints.to_vec(),
            routes: (!routes.is_empty())
                .then(|| std::sync::Arc::new(ServiceRoutes::parse(routes).unwrap())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_working_providers_first_in_turn() {
        let d = Direct::default();
        let all = snap(&[ep(1, true), ep(2, true), ep(3, false)], "");
        let all = Order(&d, &all);
        assert_eq!(ports(&all.get()), [1, 2, 3]);
        assert_eq!(
            ports(&all.get()),
            [2, 1, 3],
            "round-robin start, unhealthy last"
        );
        d.refused(all.1.endpoints[1].app_address);
        assert_eq!(ports(&all.get()), [1, 2, 3]);
        assert_eq!(
            ports(&all.get()),
            [1, 2, 3],
            "a refusing provider goes after the others"
        );
        tokio::time::advance(EJECT_FOR + Duration::from_millis(1)).await;
        assert_eq!(ports(&all.get()), [2, 1, 3], "and comes back after a while");
        assert!(d.order(&snap(&[], ""), None, None).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_routed_subset_comes_first_and_a_pinned_call_keeps_its_provider() {
        let d = Direct::default();
        let mut eps: Vec<Endpoint> = (1..=4).map(|i| ep(i, true)).collect();
        eps[2].version = "2".into();
        eps[3].version = "2".into();
        let routes = r#"{"subsets":{"v2":{"version":"2"}},
            "rules":[{"match":{"headers":{"x-canary":"1"}},"to":"v2"}],
            "hash":{"header":"x-user"}}"#;
        let s = snap(&eps, routes);
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("1"));
        static GET: Method = Method::GET;
        fn view(h: &HeaderMap) -> RequestView<'_> {
            RequestView {
                method: &GET,
                path: "/",
                headers: h,
            }
        }
        for _ in 0..4 {
            let first_two = ports(&d.order(&s, Some(view(&h)), None))[..2].to_vec();
            assert!(
                first_two.iter().all(|p| *p == 3 || *p == 4),
                "{first_two:?}"
            );
        }
        // Pinned: the same order every call, whatever the round-robin counter.
        h.insert("x-user", HeaderValue::from_static("alice"));
        let pinned = ports(&d.order(&s, Some(view(&h)), None));
        for _ in 0..4 {
            assert_eq!(ports(&d.order(&s, Some(view(&h)), None)), pinned);
        }
        // The subset down: every endpoint, the others first.
        let mut down = eps.clone();
        down[2].healthy = false;
        down[3].healthy = false;
        let order = ports(&d.order(&snap(&down, routes), Some(view(&h)), None));
        assert_eq!(order.len(), 4);
        assert!(order[..2].iter().all(|p| *p == 1 || *p == 2), "{order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_zone_comes_first_while_enough_of_it_works() {
        let d = Direct::default();
        let mut eps: Vec<Endpoint> = (1..=4).map(|i| ep(i, true)).collect();
        for e in &mut eps {
            e.zone = if e.app_address.port() <= 2 { "a" } else { "b" }.into();
        }
        let zone = ZonePreference {
            zone: "a".into(),
            min_healthy_percent: 50,
        };
        let s = snap(&eps, "");
        for _ in 0..4 {
            let order = ports(&d.order(&s, None, Some(&zone)));
            assert!(order[..2].iter().all(|p| *p <= 2), "{order:?}");
        }
        // Zone a refusing: the others first.
        d.refused(eps[0].app_address);
        d.refused(eps[1].app_address);
        let order = ports(&d.order(&s, None, Some(&zone)));
        assert!(order[..2].iter().all(|p| *p > 2), "{order:?}");
    }
}
