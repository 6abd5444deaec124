//! The directory-registry source: another Detour directory registry (one JSON record per host,
//! see [`detour_registry::dir`]) read every poll interval, for setups without ZooKeeper.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use async_trait::async_trait;
use detour_proto::Source;
use tokio::sync::watch;

use super::{LegacySource, Providers, SourceView};

/// Mirrors a directory registry.
#[derive(Debug)]
pub struct DirSource {
    /// The directory.
    pub path: PathBuf,
    /// How often it is read.
    pub poll_interval: Duration,
    /// The legacy name (`source = sync:<name>`).
    pub legacy: String,
}

#[async_trait]
impl LegacySource for DirSource {
    fn describe(&self) -> String {
        format!("directory {}", self.path.display())
    }

    async fn run(self: Box<Self>, out: watch::Sender<SourceView>) {
        let mut last = Providers::new();
        let mut observed = HashMap::new();
        let mut ticks = tokio::time::interval(self.poll_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let at = Instant::now();
            let path = self.path.clone();
            let read = tokio::task::spawn_blocking(move || {
                detour_registry::dir::read_records(&path, |file, len, why| {
                    tracing::debug!(file = %file.display(), len, %why, "skipping unreadable record");
                })
            })
            .await;
            let view = match read {
                Ok(Ok(view)) => view,
                Ok(Err(e)) => {
                    metrics::gauge!("detour_sync_source_up").set(0.0);
                    out.send_if_modified(|v| {
                        let was = v.connected;
                        v.connected = false;
                        v.problem = Some(format!("cannot read {}: {e}", self.path.display()));
                        was
                    });
                    continue;
                }
                Err(_) => continue,
            };
            let mut now = Providers::new();
            for (service, set) in view.services {
                let eps = now.entry(service).or_default();
                for mut ep in set.endpoints {
                    ep.source = Source::Sync(self.legacy.clone());
                    eps.insert(ep.instance.clone(), ep);
                }
            }
            now.retain(|_, eps| !eps.is_empty());
            let changed: Vec<_> = now
                .keys()
                .chain(last.keys())
                .filter(|s| now.get(*s) != last.get(*s))
                .cloned()
                .collect();
            observed.retain(|s, _| now.contains_key(s) || last.contains_key(s));
            for s in changed {
                observed.insert(s, at);
            }
            let fresh = !out.borrow().connected || now != last;
            last = now;
            metrics::gauge!("detour_sync_source_up").set(1.0);
            if fresh {
                out.send_replace(SourceView {
                    connected: true,
                    listed: true,
                    providers: Arc::new(last.clone()),
                    observed: Arc::new(observed.clone()),
                    problem: None,
                });
            }
        }
    }
}
