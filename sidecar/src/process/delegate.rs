//! Registrations and the host status of a sidecar that runs under a watchdog: published
//! through the watchdog (`PUT /v1/publication` on its Unix socket), which holds them under its
//! own lease (etcd) or heartbeat (directory registry), so they outlive this process — callers keep
//! reaching the host's providers while the sidecar restarts, however long that takes. Reads
//! (watches, host statuses) go to the sidecar's own registry client, which then writes nothing.
//!
//! The whole publication is sent on every change and once a second, so a watchdog that
//! restarted learns it at once. A write waits (briefly) until the watchdog has taken it, so that
//! announcements keep their order with what follows them.
//!
//! **A watchdog away for long.** The watchdog's registrations live as long as its lease (or
//! heartbeat). When a publication has waited `takeover` for it (a third of the registry's
//! time-to-live by default, so well before its lease can run out), this sidecar writes the
//! publication with its own registry client and keeps it alive (`self_held`). When the watchdog
//! answers again, the publication it receives says so; a watchdog of protocol 2 or later then
//! writes every registration again under its own lease before it answers, and only then does
//! this sidecar let go of its copies (`Registry::release`, which removes nothing). A watchdog
//! that does not state a protocol (version 1) is not trusted with that: the sidecar keeps its
//! copies alive too.

use detour_proto::sync::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use detour_core::body::full;
use detour_core::{Dial, Pool, PoolOptions};
use detour_proto::{
    AppProtocol, Endpoint, EndpointSet, HostId, HostPublication, HostStatus, InstanceId,
    PUBLICATION_PROTOCOL, PUBLICATION_PROTOCOL_HEADER, ServiceName,
};
use detour_registry::{
    DocName, DocState, HostStatuses, Registered, Registry, RegistryError, sync_endpoints,
};
use http::Request;
use http_body_util::BodyExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

/// The path a sidecar publishes its host on, on the watchdog's Unix socket.
pub const PUBLICATION_PATH: &str = "/v1/publication";

/// How long a write waits for the watchdog before carrying on (the publication is re-sent).
const WAIT: Duration = Duration::from_secs(1);

/// A registry whose writes go through the watchdog and whose reads go to `reads`.
pub struct Delegated {
    reads: Arc<dyn Registry>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

/// Where the CA's link states come from (those not on their primary path are published).
pub type LinkStates = Box<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

struct Shared {
    host: HostId,
    socket: PathBuf,
    /// The registry client this sidecar writes with itself while the watchdog is away.
    reads: Arc<dyn Registry>,
    /// How long the watchdog may be away before this sidecar keeps the registrations itself.
    takeover: Duration,
    /// The CA's link states, once the links exist.
    links: OnceLock<LinkStates>,
    publication: Mutex<HostPublication>,
    /// Bumped by every write.
    generation: AtomicU64,
    /// The last generation the watchdog took.
    taken: watch::Sender<u64>,
    wake: Notify,
}

impl Shared {
    /// The publication to push now, saying whether this sidecar holds the registrations.
    fn publication(&self, self_held: bool) -> HostPublication {
        let mut p = (self.publication.lock()).clone();
        p.protocol = PUBLICATION_PROTOCOL;
        p.self_held = self_held;
        p
    }
}

impl Delegated {
    /// Publishes through the watchdog at `socket`; reads from `reads`, and writes there itself
    /// when the watchdog has not answered for `takeover`.
    pub fn new(
        reads: Arc<dyn Registry>,
        host: HostId,
        socket: PathBuf,
        takeover: Duration,
    ) -> Self {
        let shared = Arc::new(Shared {
            host,
            socket,
            reads: reads.clone(),
            takeover,
            publication: Mutex::new(HostPublication {
                pid: std::process::id(),
                ..HostPublication::default()
            }),
            generation: AtomicU64::new(0),
            taken: watch::channel(0).0,
            wake: Notify::new(),
            links: OnceLock::new(),
        });
        let task = tokio::spawn(push_loop(shared.clone()));
        Self {
            reads,
            shared,
            task,
        }
    }

    /// Publishes the CA's link states from `states` too (with every push).
    pub fn set_links(&self, states: LinkStates) {
        let _ = self.shared.links.set(states);
    }

    /// Stops publishing (a sidecar handing off to its successor, which publishes instead).
    pub fn stop(&self) {
        self.task.abort();
    }

    async fn change(&self, edit: impl FnOnce(&mut HostPublication)) {
        {
            let mut p = self.shared.publication.lock();
            edit(&mut p);
        }
        let mine = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.wake.notify_one();
        let mut taken = self.shared.taken.subscribe();
        // The watchdog may be restarting: the push loop keeps trying, this write does not wait
        // for it.
        let _ = tokio::time::timeout(WAIT, taken.wait_for(|t| *t >= mine)).await;
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What this sidecar itself holds in the registry while its watchdog is away.
#[derive(Default)]
struct SelfHeld {
    /// Whether it holds the registrations now.
    active: bool,
    /// What it has written, by (service, instance).
    endpoints: Registered,
    /// The status it has written.
    status: Option<HostStatus>,
}

impl SelfHeld {
    /// Writes what changed in `p` with `registry`.
    async fn sync(&mut self, registry: &dyn Registry, p: &HostPublication) {
        if let Err(e) = sync_endpoints(registry, &mut self.endpoints, &p.endpoints).await {
            tracing::debug!(error = %e, "registrations not all written yet; again on the next round");
        }
        if let Some(st) = &p.status {
            let same = self
                .status
                .as_ref()
                .is_some_and(|s| s.sidecar == st.sidecar && s.version == st.version);
            if !same && registry.set_host_status(st.clone()).await.is_ok() {
                self.status = Some(st.clone());
            }
        }
    }
}

async fn push_loop(shared: Arc<Shared>) {
    let pool = Pool::new(PoolOptions {
        connect_timeout: Duration::from_millis(500),
        ..PoolOptions::default()
    });
    let dial = Dial::Unix(shared.socket.clone());
    let mut failures = 0u32;
    // Since when a publication has been waiting for the watchdog (the start of the oldest
    // attempt not answered yet); `None` while the watchdog takes them.
    let mut waiting_since: Option<tokio::time::Instant> = None;
    let mut held = SelfHeld::default();
    // Pushes come often enough that a watchdog gone quiet is noticed well within `takeover`.
    let every = (shared.takeover / 2).min(Duration::from_secs(1));
    loop {
        let deadline = waiting_since.map(|t| t + shared.takeover);
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(every) => {}
            () = sleep_until_some(deadline), if !held.active && deadline.is_some() => {}
        }
        let generation = shared.generation.load(Ordering::SeqCst);
        let publication = shared.publication(held.active);
        if held.active {
            // Written before the watchdog is asked: a change must not wait for its timeout.
            held.sync(&*shared.reads, &publication).await;
            mark_taken(&shared, generation);
        }
        let Ok(body) = serde_json::to_vec(&publication) else {
            continue;
        };
        let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
        let pushed = if held.active {
            Some(push(&pool, &dial, body).await)
        } else {
            tokio::select! {
                r = push(&pool, &dial, body) => Some(r),
                () = tokio::time::sleep_until(since + shared.takeover) => None,
            }
        };
        match pushed {
            Some(Ok(protocol)) => {
                failures = 0;
                waiting_since = None;
                mark_taken(&shared, generation);
                taken_by_watchdog(&shared, &mut held, protocol).await;
            }
            Some(Err(e)) => {
                failures += 1;
                // Logged once, then every minute or so, while the watchdog is away.
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(socket = %shared.socket.display(), error = %e, "cannot publish through the watchdog; retrying");
                }
                metrics::counter!("detour_registry_errors_total", "op" => "publish").increment(1);
            }
            None => {}
        }
        if !held.active
            && let Some(since) = waiting_since
            && since.elapsed() >= shared.takeover
        {
            tracing::warn!(
                away_ms = since.elapsed().as_millis() as u64,
                "the watchdog has not taken a publication in time: this sidecar keeps its host's registrations alive itself until it is back"
            );
            metrics::counter!("detour_watchdog_takeovers_total", "event" => "taken").increment(1);
            held.active = true;
            held.sync(&*shared.reads, &publication).await;
            mark_taken(&shared, generation);
            shared.wake.notify_one();
        }
        metrics::gauge!("detour_registrations_self_held").set(if held.active { 1.0 } else { 0.0 });
    }
}

/// The watchdog took a publication (it speaks `protocol`): registrations this sidecar held
/// while it was away are handed back to it.
async fn taken_by_watchdog(shared: &Shared, held: &mut SelfHeld, protocol: u32) {
    if held.active && protocol >= 2 {
        // The watchdog wrote every registration again under its own lease before it answered:
        // let go of the copies, removing nothing.
        match shared.reads.release().await {
            Ok(()) => {
                tracing::info!("the watchdog is back and holds the registrations again");
                metrics::counter!("detour_watchdog_takeovers_total", "event" => "returned")
                    .increment(1);
                *held = SelfHeld::default();
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand the registrations back yet"),
        }
    }
    if protocol > PUBLICATION_PROTOCOL + 1 {
        tracing::warn!(
            watchdog = protocol,
            sidecar = PUBLICATION_PROTOCOL,
            "the watchdog speaks a newer publication protocol than this sidecar knows"
        );
    }
}

/// Sleeps until `deadline` (for ever when there is none).
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Notes that the publication of `generation` is in the registry (a waiting write goes on).
fn mark_taken(shared: &Shared, generation: u64) {
    shared.taken.send_if_modified(|t| {
        let newer = generation > *t;
        *t = (*t).max(generation);
        newer
    });
}

/// Sends one publication; the watchdog's protocol version on success (1 when it states none).
async fn push(pool: &Arc<Pool>, dial: &Dial, body: Vec<u8>) -> Result<u32, String> {
    let req = Request::put(PUBLICATION_PATH)
        .header(http::header::HOST, "detour.watchdog")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = pool
            .send(dial, AppProtocol::Http1, req)
            .await
            .map_err(|f| f.error.to_string())?;
        let status = resp.status();
        let protocol = resp
            .headers()
            .get(PUBLICATION_PROTOCOL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(protocol)
        } else {
            Err(format!("the watchdog answered {status}: {}", text.trim()))
        }
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| "no answer within 2 s".to_owned())?
}

#[async_trait]
impl Registry for Delegated {
    async fn register(&self, endpoint: Endpoint) -> Result<(), RegistryError> {
        if endpoint.host != self.shared.host {
            return Err(RegistryError::Refused(format!(
                "host {} cannot register an endpoint of host {}",
                self.shared.host, endpoint.host
            )));
        }
        self.change(|p| {
            p.endpoints
                .retain(|e| !(e.service == endpoint.service && e.instance == endpoint.instance));
            p.endpoints.push(endpoint);
        })
        .await;
        Ok(())
    }

    async fn deregister(
        &self,
        service: &ServiceName,
        instance: &InstanceId,
    ) -> Result<(), RegistryError> {
        self.change(|p| {
            p.endpoints
                .retain(|e| !(&e.service == service && &e.instance == instance));
        })
        .await;
        Ok(())
    }

    async fn watch(
        &self,
        service: &ServiceName,
    ) -> Result<watch::Receiver<Arc<EndpointSet>>, RegistryError> {
        self.reads.watch(service).await
    }

    async fn set_host_status(&self, status: HostStatus) -> Result<(), RegistryError> {
        self.change(|p| p.status = Some(status)).await;
        Ok(())
    }

    fn watch_hosts(&self) -> watch::Receiver<Arc<HostStatuses>> {
        self.reads.watch_hosts()
    }

    async fn host_status(&self, host: &HostId) -> Result<Option<HostStatus>, RegistryError> {
        self.reads.host_status(host).await
    }

    async fn withdraw(&self) -> Result<(), RegistryError> {
        self.change(|p| {
            p.endpoints.clear();
            p.status = None;
        })
        .await;
        Ok(())
    }

    fn synced(&self) -> bool {
        self.reads.synced()
    }

    fn applied(&self) -> detour_registry::Applied {
        self.reads.applied()
    }

    fn watch_doc(&self, doc: DocName) -> watch::Receiver<DocState> {
        self.reads.watch_doc(doc)
    }
}
