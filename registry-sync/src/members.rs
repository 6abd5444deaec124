//! The members of an etcd cluster, tried in turn: each request goes to the member that answered
//! last, then to the others, so one dead or frozen member fails nothing (etcd-client fails a
//! request as soon as one listed endpoint is down; its maintainers leave this to the caller).

use detour_proto::sync::Mutex;
use std::time::Duration;

use etcd_client::Client;

use crate::etcd_security::EtcdSecurity;
use crate::registry::RegistryError;

/// One connection per member, opened on first use and dropped after a failure.
pub struct Members {
    endpoints: Vec<String>,
    request_timeout: Duration,
    security: EtcdSecurity,
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    /// The member that answered last.
    preferred: Mutex<usize>,
}

impl Members {
    /// The members at `endpoints`, each request bounded by `request_timeout`.
    pub fn new(endpoints: Vec<String>, request_timeout: Duration, security: EtcdSecurity) -> Self {
        let n = endpoints.len();
        Self {
            endpoints,
            request_timeout,
            security,
            clients: tokio::sync::Mutex::new(vec![None; n]),
            preferred: Mutex::new(0),
        }
    }

    /// Runs `op` against the members in turn, starting with the one that answered last.
    pub async fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let start = *self.preferred.lock();
        let mut last = String::from("no member tried");
        for i in 0..n {
            let idx = (start + i) % n;
            let client = match self.client(idx).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match tokio::time::timeout(self.request_timeout, op(client)).await {
                Ok(Ok(v)) => {
                    *self.preferred.lock() = idx;
                    return Ok(v);
                }
                Ok(Err(e)) => last = format!("{}: {e}", self.endpoints[idx]),
                Err(_) => last = format!("{}: timed out", self.endpoints[idx]),
            }
            // Forget the connection so the next use reconnects.
            self.clients.lock().await[idx] = None;
        }
        metrics::counter!("detour_registry_errors_total", "op" => what.to_owned()).increment(1);
        Err(RegistryError::Unavailable {
            backend: "etcd".into(),
            source: std::io::Error::other(format!("{what}: {last}")),
        })
    }

    /// Drops the connection to the member that answered last and starts the next request with
    /// the one after it: its watch stream stalled (a frozen or partitioned member whose
    /// connection still looks open).
    pub async fn distrust_preferred(&self) {
        let n = self.endpoints.len();
        let idx = {
            let mut p = self.preferred.lock();
            let idx = *p;
            *p = (idx + 1) % n.max(1);
            idx
        };
        if let Some(c) = self.clients.lock().await.get_mut(idx) {
            *c = None;
        }
    }

    async fn client(&self, idx: usize) -> Result<Client, String> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = &clients[idx] {
            return Ok(c.clone());
        }
        let url = &self.endpoints[idx];
        // HTTP/2 keep-alive pings find a member that stopped answering (frozen, partitioned)
        // even on the otherwise silent watch stream, which then ends and is reopened on
        // another member; `require_leader` makes a member cut off from the quorum end its
        // watches instead of leaving them silently stale.
        let ping = self.request_timeout.min(Duration::from_secs(1));
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_timeout(self.request_timeout)
            .with_keep_alive(ping, self.request_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let opts = self.security.apply(opts);
        match tokio::time::timeout(
            self.request_timeout,
            Client::connect([url.as_str()], Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => {
                clients[idx] = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => Err(format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: connect timed out")),
        }
    }
}
