//! What the watchdog keeps in the registry for its host: the sidecar's last publication (its
//! providers' endpoints and its status), under the watchdog's own lease (etcd) or heartbeat
//! (directory registry), so it outlives the sidecar; and the status the watchdog sets itself
//! while the sidecar is away (`stopped`) or crash-looping (`failed`). The publication is kept
//! on disk too, so a restarted watchdog republishes it before the sidecar says anything.

use std::path::PathBuf;
use std::sync::Arc;

use detour_proto::{
    HostId, HostPublication, HostStatus, InstanceId, ServiceName, SidecarState, WatchdogReport,
};
use detour_registry::{Registered, Registry, RegistryError, now_unix_ms, sync_endpoints};
use tokio::sync::Mutex;

/// A publication the watchdog will not take.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// It names another host.
    #[error("endpoint {instance} of {service} claims host {claimed}; this watchdog holds {host}")]
    OtherHost {
        /// The endpoint's service.
        service: ServiceName,
        /// The endpoint.
        instance: InstanceId,
        /// The host it claims.
        claimed: HostId,
        /// This watchdog's host.
        host: HostId,
    },
    /// The status names another host.
    #[error("the status claims host {0}")]
    OtherHostStatus(HostId),
    /// The registry refused or could not be written (kept; written again on the next push).
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// The host's registrations, held by the watchdog.
pub struct Held {
    registry: Arc<dyn Registry>,
    host: HostId,
    /// Where the last publication is kept across restarts of the watchdog.
    file: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The sidecar's last publication.
    publication: HostPublication,
    /// What is registered now, by (service, instance).
    registered: Registered,
    /// The watchdog's own status, over the sidecar's.
    mark: Option<SidecarState>,
    /// What the watchdog reports beside the status.
    report: WatchdogReport,
    /// The status last written.
    written: Option<(
        SidecarState,
        String,
        WatchdogReport,
        Option<std::net::SocketAddr>,
    )>,
}

impl Held {
    /// Holds `host`'s registrations in `registry`, republishing what `file` kept.
    pub async fn restore(registry: Arc<dyn Registry>, host: HostId, file: PathBuf) -> Held {
        let held = Held {
            registry,
            host,
            file,
            inner: Mutex::new(Inner::default()),
        };
        if let Some(p) = held.read_file() {
            tracing::info!(
                endpoints = p.endpoints.len(),
                "republishing the kept registrations"
            );
            if let Err(e) = held.apply(p).await {
                tracing::warn!(error = %e, "cannot republish the kept registrations");
            }
        }
        held
    }

    fn read_file(&self) -> Option<HostPublication> {
        let bytes = match std::fs::read(&self.file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "cannot read the kept registrations");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "ignoring unreadable kept registrations");
                metrics::counter!("detour_watchdog_state_errors_total").increment(1);
                None
            }
        }
    }

    fn write_file(&self, p: &HostPublication) {
        let res = serde_json::to_vec(p)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = self
                    .file
                    .with_extension(format!("tmp.{}", std::process::id()));
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(tmp, &self.file)
            });
        if let Err(e) = res {
            tracing::warn!(file = %self.file.display(), error = %e, "cannot keep the registrations on disk");
        }
    }

    /// Takes the sidecar's publication: registers what is new or changed, deregisters what
    /// is gone, and publishes its status (unless the watchdog's own mark overrides it).
    pub async fn apply(&self, p: HostPublication) -> Result<(), Refused> {
        let forced = p.self_held;
        for e in &p.endpoints {
            if e.host != self.host {
                return Err(Refused::OtherHost {
                    service: e.service.clone(),
                    instance: e.instance.clone(),
                    claimed: e.host.clone(),
                    host: self.host.clone(),
                });
            }
        }
        if let Some(s) = &p.status
            && s.host != self.host
        {
            return Err(Refused::OtherHostStatus(s.host.clone()));
        }
        let mut inner = self.inner.lock().await;
        if forced {
            // The sidecar kept the registrations alive itself while this watchdog was away (under
            // its own lease): write every one of them again, and the status, under this
            // watchdog's lease before answering, so the sidecar can let go of its copies.
            tracing::info!(
                endpoints = p.endpoints.len(),
                "taking the registrations back from the sidecar"
            );
            inner.registered.clear();
            inner.written = None;
        }
        let p = HostPublication {
            self_held: false,
            ..p
        };
        sync_endpoints(&*self.registry, &mut inner.registered, &p.endpoints).await?;
        if inner.publication != p {
            self.write_file(&p);
        }
        inner.report.links = p.links.clone();
        inner.publication = p;
        self.write_status(&mut inner).await
    }

    /// Sets (or, with `None`, lifts) the watchdog's own status over the sidecar's.
    pub async fn mark(&self, mark: Option<SidecarState>) -> Result<(), Refused> {
        let mut inner = self.inner.lock().await;
        inner.mark = mark;
        self.write_status(&mut inner).await
    }

    /// Sets what the watchdog reports beside the status (its binary, restarts, the sidecar's
    /// start); the links come from the sidecar's publication.
    pub async fn report(&self, report: WatchdogReport) -> Result<(), Refused> {
        let mut inner = self.inner.lock().await;
        inner.report = WatchdogReport {
            links: inner.report.links.clone(),
            ..report
        };
        self.write_status(&mut inner).await
    }

    /// The watchdog's own mark, if any.
    pub async fn current_mark(&self) -> Option<SidecarState> {
        self.inner.lock().await.mark
    }

    /// The publication held now (for `/state`).
    pub async fn publication(&self) -> HostPublication {
        self.inner.lock().await.publication.clone()
    }

    /// Removes everything (a planned shutdown of the host's mesh), here and on disk.
    pub async fn withdraw(&self) -> Result<(), Refused> {
        let mut inner = self.inner.lock().await;
        self.registry.withdraw().await?;
        inner.registered.clear();
        inner.publication = HostPublication::default();
        inner.written = None;
        let _ = std::fs::remove_file(&self.file);
        Ok(())
    }

    async fn write_status(&self, inner: &mut Inner) -> Result<(), Refused> {
        let (state, version) = match (&inner.publication.status, inner.mark) {
            (_, Some(mark)) => (
                mark,
                inner
                    .publication
                    .status
                    .as_ref()
                    .map(|s| s.version.clone())
                    .unwrap_or_default(),
            ),
            (Some(s), None) => (s.sidecar, s.version.clone()),
            (None, None) => return Ok(()),
        };
        let metrics = inner.publication.status.as_ref().and_then(|s| s.metrics);
        let written = (state, version, inner.report.clone(), metrics);
        if inner.written.as_ref() == Some(&written) {
            return Ok(());
        }
        self.registry
            .set_host_status(HostStatus {
                host: self.host.clone(),
                sidecar: state,
                version: written.1.clone(),
                updated_unix_ms: now_unix_ms(),
                watchdog: Some(written.2.clone()),
                metrics,
            })
            .await?;
        if inner.written.as_ref().map(|w| w.0) != Some(state) {
            tracing::info!(state = state.as_str(), "host status published");
        }
        inner.written = Some(written);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detour_proto::Endpoint;
    use detour_registry::memory::MemoryRegistry;

    fn ep(host: &str, i: &str) -> Endpoint {
        Endpoint::new(
            ServiceName::new("hello").unwrap(),
            InstanceId::new(i).unwrap(),
            HostId::new(host).unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        )
    }

    fn status(state: SidecarState) -> Option<HostStatus> {
        Some(HostStatus {
            host: HostId::new("h1").unwrap(),
            sidecar: state,
            version: "1".into(),
            updated_unix_ms: 1,
            watchdog: None,
            metrics: None,
        })
    }

    #[tokio::test]
    async fn publications_and_marks_of_the_watchdog() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kept.json");
        let registry = Arc::new(MemoryRegistry::new());
        let host = HostId::new("h1").unwrap();
        let held = Held::restore(registry.clone(), host.clone(), file.clone()).await;
        let svc = ServiceName::new("hello").unwrap();
        let rx = registry.watch(&svc).await.unwrap();
        held.apply(HostPublication {
            pid: 7,
            links: Default::default(),
            status: status(SidecarState::Ready),
            endpoints: vec![ep("h1", "a"), ep("h1", "b")],
            ..HostPublication::default()
        })
        .await
        .unwrap();
        assert_eq!(rx.borrow().endpoints.len(), 2);
        let h = registry.host_status(&host).await.unwrap().unwrap();
        assert_eq!(h.sidecar, SidecarState::Ready);
        // The watchdog's mark wins over the sidecar's word until lifted.
        held.mark(Some(SidecarState::Failed)).await.unwrap();
        held.apply(HostPublication {
            pid: 8,
            links: Default::default(),
            status: status(SidecarState::Ready),
            endpoints: vec![ep("h1", "a")],
            ..HostPublication::default()
        })
        .await
        .unwrap();
        assert_eq!(rx.borrow().endpoints.len(), 1, "b went away");
        let h = registry.host_status(&host).await.unwrap().unwrap();
        assert_eq!(h.sidecar, SidecarState::Failed);
        held.mark(None).await.unwrap();
        let h = registry.host_status(&host).await.unwrap().unwrap();
        assert_eq!(h.sidecar, SidecarState::Ready);
        // Another host's endpoint is refused, and nothing changes.
        let err = held
            .apply(HostPublication {
                pid: 9,
                links: Default::default(),
                status: None,
                endpoints: vec![ep("h2", "x")],
                ..HostPublication::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("claims host h2"), "{err}");
        assert_eq!(rx.borrow().endpoints.len(), 1);
    }

    #[tokio::test]
    async fn a_restarted_watchdog_republishes_what_was_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kept.json");
        let host = HostId::new("h1").unwrap();
        let held = Held::restore(Arc::new(MemoryRegistry::new()), host.clone(), file.clone()).await;
        let svc = ServiceName::new("hello").unwrap();
        held.apply(HostPublication {
            pid: 7,
            status: status(SidecarState::Ready),
            endpoints: vec![ep("h1", "a")],
            ..HostPublication::default()
        })
        .await
        .unwrap();
        // A new watchdog (a fresh registry client) republishes what was kept.
        let fresh = Arc::new(MemoryRegistry::new());
        let again = Held::restore(fresh.clone(), host.clone(), file.clone()).await;
        assert_eq!(fresh.watch(&svc).await.unwrap().borrow().endpoints.len(), 1);
        // A publication the sidecar held itself while the watchdog was away is written again
        // whole, even what this watchdog believes registered already.
        fresh
            .deregister(&svc, &InstanceId::new("a").unwrap())
            .await
            .unwrap();
        assert_eq!(fresh.watch(&svc).await.unwrap().borrow().endpoints.len(), 0);
        let same = again.publication().await;
        again.apply(same.clone()).await.unwrap();
        assert_eq!(
            fresh.watch(&svc).await.unwrap().borrow().endpoints.len(),
            0,
            "an unchanged publication writes nothing"
        );
        again
            .apply(HostPublication {
                self_held: true,
                ..same
            })
            .await
            .unwrap();
        assert_eq!(fresh.watch(&svc).await.unwrap().borrow().endpoints.len(), 1);
        assert!(
            !again.publication().await.self_held,
            "kept without the flag"
        );
        again.withdraw().await.unwrap();
        assert!(!file.exists());
        // A garbage file is ignored.
        std::fs::write(&file, b"{not json").unwrap();
        let g = Held::restore(Arc::new(MemoryRegistry::new()), host, file).await;
        assert!(g.publication().await.endpoints.is_empty());
    }
}
