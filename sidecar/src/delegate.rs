//! Registrations and the host status of a sidecar that runs under a watchdog: published
//! through the watchdog (`PUT /v1/publication` on its Unix socket), which holds them under its
//! own lease (etcd) or heartbeat (directory registry), so they outlive this process — callers keep
//! reaching the host's providers while the sidecar restarts, however long that takes. Reads
//! (watches, host statuses) go to the sidecar's own registry client, which then writes nothing.
//!
//! The whole publication is sent on every change and once a second, so a watchdog that
//! restarted learns it at once. A write waits (briefly) until the watchdog has taken it, so that
//! announcements keep their order with what follows them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use detour_core::body::full;
use detour_core::{Dial, Pool, PoolOptions};
use detour_proto::{
    AppProtocol, Endpoint, EndpointSet, HostId, HostPublication, HostStatus, InstanceId,
    ServiceName,
};
use detour_registry_sync::{DocName, HostStatuses, Registry, RegistryError};
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
    /// The CA's link states, once the links exist.
    links: OnceLock<LinkStates>,
    publication: Mutex<HostPublication>,
    /// Bumped by every write.
    generation: AtomicU64,
    /// The last generation the watchdog took.
    taken: watch::Sender<u64>,
    wake: Notify,
}

impl Delegated {
    /// Publishes through the watchdog at `socket`; reads from `reads`.
    pub fn new(reads: Arc<dyn Registry>, host: HostId, socket: PathBuf) -> Self {
        let shared = Arc::new(Shared {
            host,
            socket,
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
            let mut p = self
                .shared
                .publication
                .lock()
                .unwrap_or_else(|e| e.into_inner());
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

async fn push_loop(shared: Arc<Shared>) {
    let pool = Pool::new(PoolOptions {
        connect_timeout: Duration::from_millis(500),
        ..PoolOptions::default()
    });
    let dial = Dial::Unix(shared.socket.clone());
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = shared.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let generation = shared.generation.load(Ordering::SeqCst);
        let body = {
            let p = shared.publication.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_vec(&*p)
        };
        let Ok(body) = body else { continue };
        match push(&pool, &dial, body).await {
            Ok(()) => {
                failures = 0;
                shared.taken.send_if_modified(|t| {
                    let newer = generation > *t;
                    *t = (*t).max(generation);
                    newer
                });
            }
            Err(e) => {
                failures += 1;
                // Logged once, then every minute or so, while the watchdog is away.
                if failures == 1 || failures.is_multiple_of(60) {
                    tracing::warn!(socket = %shared.socket.display(), error = %e, "cannot publish through the watchdog; retrying");
                }
                metrics::counter!("detour_registry_errors_total", "op" => "publish").increment(1);
            }
        }
    }
}

async fn push(pool: &Arc<Pool>, dial: &Dial, body: Vec<u8>) -> Result<(), String> {
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
        let text = resp
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        if status.is_success() {
            Ok(())
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

    fn watch_doc(&self, doc: DocName) -> watch::Receiver<Option<Arc<[u8]>>> {
        self.reads.watch_doc(doc)
    }
}
