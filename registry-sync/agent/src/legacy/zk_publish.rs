//! Publishing a provider into ZooKeeper the way a Dubbo application does: an ephemeral child of
//! `{root}/{interface}/providers`, re-created after a session expiry, deleted on a planned stop
//! (before the process stops serving). Used by `detourctl provider --zookeeper` to play a legacy
//! application in scripts.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zookeeper_client as zk;

use super::dubbo::percent_encode;

/// A provider URL held in ZooKeeper until [`ZkRegistration::withdraw`].
#[derive(Debug)]
pub struct ZkRegistration {
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: JoinHandle<()>,
}

/// The child name of a provider URL (`rest://ip:port/interface?application=…&weight=…`).
pub fn provider_url(addr: SocketAddr, interface: &str, application: &str, weight: u32) -> String {
    format!("rest://{addr}/{interface}?application={application}&weight={weight}&side=provider")
}

impl ZkRegistration {
    /// Starts holding `url` under `{root}/{interface}/providers` on `servers`.
    pub fn hold(servers: String, root: &str, interface: &str, url: &str) -> Self {
        let parent = format!("{}/{interface}/providers", root.trim_end_matches('/'));
        let node = format!("{parent}/{}", percent_encode(url));
        let (stop, mut stopped) = oneshot::channel::<oneshot::Sender<()>>();
        let task = tokio::spawn(async move {
            loop {
                let client = match zk::Client::connector()
                    .with_session_timeout(Duration::from_secs(10))
                    .connect(&servers)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "ZooKeeper not reachable; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                            done = &mut stopped => { if let Ok(d) = done { let _ = d.send(()); } return; }
                        }
                    }
                };
                let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
                let created = async {
                    client.mkdir(&parent, &persistent).await?;
                    match client.create(&node, b"", &ephemeral).await {
                        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
                        Err(e) => Err(e),
                    }
                };
                if let Err(e) = created.await {
                    tracing::warn!(error = %e, "registration failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                tracing::info!(%node, "registered in ZooKeeper");
                let mut states = client.state_watcher();
                loop {
                    tokio::select! {
                        s = states.changed() => match s {
                            zk::SessionState::Disconnected | zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {}
                            other => {
                                tracing::warn!(state = ?other, "ZooKeeper session ended; registering again");
                                break;
                            }
                        },
                        done = &mut stopped => {
                            let _ = client.delete(&node, None).await;
                            if let Ok(d) = done { let _ = d.send(()); }
                            return;
                        }
                    }
                }
            }
        });
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Deletes the node (a planned stop) and ends the session.
    pub async fn withdraw(mut self) {
        if let Some(stop) = self.stop.take() {
            let (tx, rx) = oneshot::channel();
            if stop.send(tx).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
        }
        self.task.abort();
    }
}
