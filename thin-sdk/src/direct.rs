//! The direct path's choice of providers: the endpoints of the last snapshot the sidecar sent,
//! in turn (round-robin across calls), healthy and recently working ones first — a provider
//! that refused a connection is passed over for a while, one whose sidecar marked it unhealthy
//! comes last, and none is ever skipped altogether — except those reached through their PA
//! only (`no_direct`), which the direct path never calls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use detour_proto::Endpoint;
use tokio::time::Instant;

/// How long a provider that refused a connection is tried last.
const EJECT_FOR: Duration = Duration::from_secs(2);

/// Round-robin order and recent refusals, shared by every call of one client.
#[derive(Debug, Default)]
pub(crate) struct Direct {
    next: AtomicUsize,
    ejected: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Direct {
    /// The order in which one call tries `endpoints`.
    pub(crate) fn order(&self, endpoints: &[Endpoint]) -> Vec<Endpoint> {
        let endpoints: Vec<&Endpoint> = endpoints.iter().filter(|e| e.direct_allowed()).collect();
        if endpoints.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut order: Vec<Endpoint> = (0..endpoints.len())
            .map(|i| endpoints[(start + i) % endpoints.len()].clone())
            .collect();
        let ejected = self.ejected.lock().unwrap_or_else(|p| p.into_inner());
        let rank = |e: &Endpoint| {
            let refused = ejected
                .get(&e.app_address)
                .is_some_and(|until| *until > now);
            (!e.healthy, refused)
        };
        order.sort_by_key(|e| rank(e));
        order
    }

    /// Notes that the provider at `addr` refused a connection.
    pub(crate) fn refused(&self, addr: SocketAddr) {
        self.ejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, Instant::now() + EJECT_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::{HostId, InstanceId, ServiceName};

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

    fn ports(v: &[Endpoint]) -> Vec<u16> {
        v.iter().map(|e| e.app_address.port()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_working_providers_first_in_turn() {
        let d = Direct::default();
        let all = [ep(1, true), ep(2, true), ep(3, false)];
        assert_eq!(ports(&d.order(&all)), [1, 2, 3]);
        assert_eq!(
            ports(&d.order(&all)),
            [2, 1, 3],
            "round-robin start, unhealthy last"
        );
        d.refused(all[1].app_address);
        assert_eq!(ports(&d.order(&all)), [1, 2, 3]);
        assert_eq!(
            ports(&d.order(&all)),
            [1, 2, 3],
            "a refusing provider goes after the others"
        );
        tokio::time::advance(EJECT_FOR + Duration::from_millis(1)).await;
        assert_eq!(
            ports(&d.order(&all)),
            [2, 1, 3],
            "and comes back after a while"
        );
        assert!(d.order(&[]).is_empty());
    }
}
