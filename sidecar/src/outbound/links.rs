//! The CA half of the link state machine: one [`LinkHandle`] per remote host this sidecar
//! routes to, fed by the registry's host status, by active probes of that host's PA, and by
//! connection failures seen on real traffic (reported by `outbound`). While a link is on its
//! fallback, requests for that host's providers go C→CA→P.

use detour_proto::fastmap::FastMap;
use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use detour_core::link::{Event, Reason};
use detour_core::link_handle::{LinkHandle, StateNames};
use detour_core::probe::{ProbePace, Probed, probe, until_next};
use detour_core::{Dial, Pool, PoolOptions};
use detour_proto::{AppProtocol, HostId, SidecarState};
use detour_registry::HostStatuses;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::tls::connect::PaHosts;

/// The CA half's names for the three states.
pub const CA_NAMES: StateNames = StateNames {
    scope: "ca",
    primary: "via_pa",
    fallback: "ca_direct",
};

struct Entry {
    link: Arc<LinkHandle>,
    /// The PA address to probe (it changes when the PA restarts on another port).
    pa: Arc<Mutex<SocketAddr>>,
    probe: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// Links to every remote host in use.
pub struct Links {
    cfg: Arc<Config>,
    /// Probe connections, apart from data traffic.
    pool: Arc<Pool>,
    entries: Mutex<FastMap<HostId, Entry>>,
    hosts: watch::Receiver<Arc<HostStatuses>>,
    /// The host behind each PA address, for the TLS connector's identity check.
    pa_hosts: Arc<PaHosts>,
}

impl Links {
    /// Links fed by `hosts` (the registry's host statuses); starts the task that applies them.
    /// Probes use their own connections, opened like `data`'s (the connections to PAs);
    /// `pa_hosts` learns which host each PA address belongs to.
    pub fn new(
        cfg: Arc<Config>,
        hosts: watch::Receiver<Arc<HostStatuses>>,
        data: &Pool,
        pa_hosts: Arc<PaHosts>,
    ) -> Arc<Self> {
        let pool = data.fresh(PoolOptions {
            connect_timeout: cfg.probe_timeout,
            ..PoolOptions::default()
        });
        let links = Arc::new(Self {
            cfg,
            pool,
            entries: Mutex::new(FastMap::default()),
            hosts: hosts.clone(),
            pa_hosts,
        });
        tokio::spawn(follow_hosts(Arc::downgrade(&links), hosts));
        links
    }

    /// The link to `host`, whose PA is at `pa`; created (and probed from then on) on first use.
    pub fn get(&self, host: &HostId, pa: SocketAddr) -> Arc<LinkHandle> {
        let mut entries = self.entries.lock();
        if let Some(e) = entries.get(host) {
            let old = std::mem::replace(&mut *e.pa.lock(), pa);
            if old != pa {
                self.pa_hosts.set(host, pa, Some(old));
            }
            return e.link.clone();
        }
        self.pa_hosts.set(host, pa, None);
        let link = Arc::new(LinkHandle::new(
            CA_NAMES,
            host.to_string(),
            self.cfg.link,
            false,
        ));
        if let Some(ev) = status_event(self.hosts.borrow().get(host).map(|s| s.sidecar)) {
            link.event(ev);
        }
        let pa = Arc::new(Mutex::new(pa));
        let probe = tokio::spawn(probe_loop(
            self.pool.clone(),
            pa.clone(),
            link.clone(),
            self.cfg.probe,
            self.cfg.probe_timeout,
        ));
        entries.insert(
            host.clone(),
            Entry {
                link: link.clone(),
                pa,
                probe,
            },
        );
        link
    }

    /// Whether `host`'s endpoints may go through the PA at `pa` (not when the address has been
    /// proven to be another host's: the owner is returned).
    pub fn may_use(&self, host: &HostId, pa: SocketAddr) -> Result<(), HostId> {
        self.pa_hosts.may_use(host, pa)
    }

    /// Forgets the links (and their probes) and PA address claims of every host `keep` does
    /// not name: the state per remote host follows the catalog, whatever names came and went.
    pub fn prune(&self, keep: &std::collections::HashSet<HostId>) {
        let mut entries = self.entries.lock();
        let before = entries.len();
        entries.retain(|h, _| keep.contains(h));
        if entries.len() < before {
            tracing::debug!(
                forgotten = before - entries.len(),
                "links to hosts no longer in the catalog forgotten"
            );
        }
        drop(entries);
        self.pa_hosts.retain(|h| keep.contains(h));
    }

    /// Every link's state, for `/state`.
    pub fn states(&self) -> BTreeMap<String, &'static str> {
        let entries = self.entries.lock();
        entries
            .iter()
            .map(|(h, e)| (h.to_string(), e.link.state_name()))
            .collect()
    }

    fn apply(&self, statuses: &HostStatuses) {
        let entries = self.entries.lock();
        for (host, e) in entries.iter() {
            if let Some(ev) = status_event(statuses.get(host).map(|s| s.sidecar)) {
                e.link.event(ev);
            }
        }
    }
}

/// What a host status means for its link.
fn status_event(state: Option<SidecarState>) -> Option<Event> {
    match state {
        Some(SidecarState::Ready) => Some(Event::PeerReady),
        Some(SidecarState::Draining | SidecarState::Stopped | SidecarState::Failed) => {
            Some(Event::Fault(Reason::HostStatus))
        }
        Some(SidecarState::Starting) => Some(Event::PeerNotReady),
        // No record (expired or never written): let probes and traffic decide.
        None => None,
    }
}

async fn follow_hosts(
    links: std::sync::Weak<Links>,
    mut hosts: watch::Receiver<Arc<HostStatuses>>,
) {
    while hosts.changed().await.is_ok() {
        let statuses = hosts.borrow_and_update().clone();
        let Some(links) = links.upgrade() else { return };
        links.apply(&statuses);
    }
}

async fn probe_loop(
    pool: Arc<Pool>,
    pa: Arc<Mutex<SocketAddr>>,
    link: Arc<LinkHandle>,
    pace: ProbePace,
    timeout: std::time::Duration,
) {
    // As the SDK's probes: at `pace`, or at once after a probe that took longer.
    let (mut started, mut ok) = (tokio::time::Instant::now(), true);
    loop {
        until_next(&link, &pace, started, ok).await;
        started = tokio::time::Instant::now();
        let addr = *pa.lock();
        // A PA that answers and is not trusted is reachable: the link stays on it, and the
        // requests sent there are refused (`untrusted-peer`) rather than sent around it.
        let event = match probe(&pool, &Dial::Tcp(addr), AppProtocol::Http2, timeout).await {
            Probed::Ok | Probed::Untrusted => Event::ProbeOk,
            Probed::Failed => Event::ProbeFailed,
        };
        ok = event == Event::ProbeOk;
        link.event(event);
    }
}
