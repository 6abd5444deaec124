//! The ZooKeeper source, in Dubbo's layout: every interface is a child of the root (`/dubbo`),
//! its providers the (ephemeral) children of `{root}/{interface}/providers`.
//!
//! A full listing at every (re)connection, then one-shot watches: when one fires, the path is
//! listed again *with a new watch*, so a change between the fire and the re-arm is in that
//! listing and none is missed. While the session is disconnected the last snapshot is published
//! as not connected (nothing is deleted from it); an expired session is replaced by a new one,
//! which lists everything again.

use detour_registry::backoff::Backoff;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use async_trait::async_trait;
use detour_proto::{Endpoint, InstanceId, ServiceName};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use zookeeper_client as zk;

use super::dubbo::{Mapping, parse_provider};
use super::{LegacySource, Providers, Skip, SourceView, report_skip};

/// Settings of the ZooKeeper source.
#[derive(Debug, Clone)]
pub struct ZkOptions {
    /// `host:port[,host:port…]`.
    pub servers: String,
    /// The Dubbo root (`/dubbo`).
    pub root: String,
    /// The session timeout asked for.
    pub session_timeout: Duration,
    /// How URLs map to endpoints.
    pub mapping: Mapping,
    /// Most providers taken per interface (more are skipped and counted).
    pub max_per_interface: usize,
}

/// Mirrors a ZooKeeper registry in Dubbo's layout.
#[derive(Debug)]
pub struct ZkSource {
    opts: ZkOptions,
}

impl ZkSource {
    /// A source for these settings (nothing is connected before [`LegacySource::run`]).
    pub fn new(opts: ZkOptions) -> Self {
        Self { opts }
    }
}

/// Which path a fired watch was on.
#[derive(Debug)]
enum Fired {
    Root,
    Interface(String),
}

/// One session's state: what each interface lists, and its pending watch.
struct Session {
    client: zk::Client,
    opts: ZkOptions,
    interfaces: BTreeMap<String, BTreeMap<InstanceId, Endpoint>>,
    watches: HashMap<String, JoinHandle<()>>,
    root_watch: Option<JoinHandle<()>>,
    observed: HashMap<ServiceName, Instant>,
    fired: mpsc::UnboundedSender<(Fired, Instant)>,
    reported: HashSet<String>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for w in self.watches.values() {
            w.abort();
        }
        if let Some(w) = &self.root_watch {
            w.abort();
        }
    }
}

#[async_trait]
impl LegacySource for ZkSource {
    fn describe(&self) -> String {
        format!("zookeeper {}{}", self.opts.servers, self.opts.root)
    }

    async fn run(self: Box<Self>, out: watch::Sender<SourceView>) {
        let mut backoff = Backoff::REGISTRY;
        loop {
            let connector = zk::Client::connector()
                .with_session_timeout(self.opts.session_timeout)
                .with_connection_timeout(Duration::from_secs(2));
            let client = match connector.connect(&self.opts.servers).await {
                Ok(c) => c,
                Err(e) => {
                    disconnected(&out, format!("cannot connect to ZooKeeper: {e}"));
                    backoff.wait().await;
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(servers = %self.opts.servers, session = ?client.session_id(), "ZooKeeper session established");
            let why = follow_session(client, &self.opts, &out).await;
            disconnected(&out, why.clone());
            tracing::warn!(reason = %why, "ZooKeeper session ended; the mirrored entries are kept while a new one starts");
        }
    }
}

/// Publishes the last snapshot as not connected.
fn disconnected(out: &watch::Sender<SourceView>, why: String) {
    metrics::gauge!("detour_sync_source_up").set(0.0);
    out.send_if_modified(|v| {
        let changed = v.connected || v.problem.as_deref() != Some(why.as_str());
        v.connected = false;
        v.problem = Some(why.clone());
        changed
    });
}

/// Follows one session until it ends; returns why it ended.
async fn follow_session(
    client: zk::Client,
    opts: &ZkOptions,
    out: &watch::Sender<SourceView>,
) -> String {
    let mut states = client.state_watcher();
    let (tx, mut fired) = mpsc::unbounded_channel();
    let mut s = Session {
        client,
        opts: opts.clone(),
        interfaces: BTreeMap::new(),
        watches: HashMap::new(),
        root_watch: None,
        observed: HashMap::new(),
        fired: tx,
        reported: HashSet::new(),
    };
    if let Err(e) = s.list_all(Instant::now()).await {
        return format!("listing failed: {e}");
    }
    s.publish(out, true);
    loop {
        tokio::select! {
            state = states.changed() => match state {
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    // Watches survive a reconnection, but list everything again anyway: cheap,
                    // and it cannot miss what changed while the connection was down.
                    if let Err(e) = s.list_all(Instant::now()).await {
                        return format!("listing after reconnection failed: {e}");
                    }
                    s.publish(out, true);
                }
                zk::SessionState::Disconnected => {
                    disconnected(out, "ZooKeeper connection lost (session still valid)".into());
                }
                other => return format!("session {other:?}"),
            },
            Some((what, at)) = fired.recv() => {
                let listed = match what {
                    Fired::Root => s.list_root(at).await,
                    Fired::Interface(i) => s.list_interface(&i, at).await,
                };
                match listed {
                    Ok(()) => s.publish(out, true),
                    Err(zk::Error::SessionExpired | zk::Error::ClientClosed) => {
                        return "session expired".into();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "re-listing after a watch failed; waiting for the connection");
                    }
                }
            }
        }
    }
}

impl Session {
    fn providers_path(&self, interface: &str) -> String {
        format!(
            "{}/{interface}/providers",
            self.opts.root.trim_end_matches('/')
        )
    }

    async fn list_all(&mut self, at: Instant) -> Result<(), zk::Error> {
        self.list_root(at).await?;
        let names: Vec<String> = self.interfaces.keys().cloned().collect();
        for i in names {
            self.list_interface(&i, at).await?;
        }
        Ok(())
    }

    /// Lists the interfaces (and re-arms the root's watch); lists those not seen before.
    async fn list_root(&mut self, at: Instant) -> Result<(), zk::Error> {
        let root = self.opts.root.clone();
        let children = match self.client.get_and_watch_children(&root).await {
            Ok((children, _, w)) => {
                self.arm(Fired::Root, async move { w.changed().await });
                children
            }
            Err(zk::Error::NoNode) => {
                let (stat, w) = self.client.check_and_watch_stat(&root).await?;
                self.arm(Fired::Root, async move { w.changed().await });
                if stat.is_some() {
                    // Created between the two calls: list it again now.
                    let _ = self.fired.send((Fired::Root, at));
                }
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let now: HashSet<&String> = children.iter().collect();
        let gone: Vec<String> = self
            .interfaces
            .keys()
            .filter(|i| !now.contains(i))
            .cloned()
            .collect();
        for i in gone {
            if let Some(eps) = self.interfaces.remove(&i) {
                self.touch(eps.values(), at);
            }
            if let Some(w) = self.watches.remove(&i) {
                w.abort();
            }
        }
        for i in children {
            if !self.interfaces.contains_key(&i) {
                self.interfaces.insert(i.clone(), BTreeMap::new());
                self.list_interface(&i, at).await?;
            }
        }
        Ok(())
    }

    /// Lists one interface's providers (and re-arms its watch).
    async fn list_interface(&mut self, interface: &str, at: Instant) -> Result<(), zk::Error> {
        if !self.interfaces.contains_key(interface) {
            return Ok(()); // removed meanwhile
        }
        let path = self.providers_path(interface);
        let fired = Fired::Interface(interface.to_owned());
        let children = match self.client.get_and_watch_children(&path).await {
            Ok((children, _, w)) => {
                self.arm(fired, async move { w.changed().await });
                children
            }
            Err(zk::Error::NoNode) => {
                // No providers node (yet): watch for its creation.
                let (stat, w) = self.client.check_and_watch_stat(&path).await?;
                self.arm(fired, async move { w.changed().await });
                if stat.is_some() {
                    // Created between the two calls: list it again now.
                    let _ = self
                        .fired
                        .send((Fired::Interface(interface.to_owned()), at));
                }
                Vec::new()
            }
            Err(zk::Error::BadArguments(_)) => Vec::new(), // an interface name no path can hold
            Err(e) => return Err(e),
        };
        let mut eps = BTreeMap::new();
        for child in children {
            if eps.len() >= self.opts.max_per_interface {
                report_skip(
                    &mut self.reported,
                    &child,
                    Skip::Limit,
                    "too many providers",
                );
                continue;
            }
            match parse_provider(&child, interface, &self.opts.mapping) {
                Ok(ep) => {
                    eps.entry(ep.instance.clone()).or_insert(ep);
                }
                Err(r) => report_skip(&mut self.reported, &child, r.why, &r.detail),
            }
        }
        let before = self.interfaces.insert(interface.to_owned(), eps);
        let after = &self.interfaces[interface];
        if before.as_ref() != Some(after) {
            let mut touched: Vec<Endpoint> = before
                .map(|b| b.into_values().collect())
                .unwrap_or_default();
            touched.extend(after.values().cloned());
            self.touch(touched.iter(), at);
        }
        Ok(())
    }

    /// Records when the services of `eps` changed.
    fn touch<'a>(&mut self, eps: impl Iterator<Item = &'a Endpoint>, at: Instant) {
        for ep in eps {
            self.observed.insert(ep.service.clone(), at);
        }
    }

    /// Waits on a one-shot watch in the background; when it fires, the path is listed again.
    fn arm(
        &mut self,
        what: Fired,
        changed: impl std::future::Future<Output = zk::WatchedEvent> + Send + 'static,
    ) {
        let tx = self.fired.clone();
        let key = match &what {
            Fired::Root => None,
            Fired::Interface(i) => Some(i.clone()),
        };
        let task = tokio::spawn(async move {
            let event = changed.await;
            // A session event (expiry, closing) is handled by the state watcher.
            if event.event_type != zk::EventType::Session {
                let _ = tx.send((what, Instant::now()));
            }
        });
        let old = match key {
            None => self.root_watch.replace(task),
            Some(i) => self.watches.insert(i, task),
        };
        if let Some(old) = old {
            old.abort();
        }
    }

    fn publish(&self, out: &watch::Sender<SourceView>, listed: bool) {
        let mut providers = Providers::new();
        for eps in self.interfaces.values() {
            for ep in eps.values() {
                providers
                    .entry(ep.service.clone())
                    .or_default()
                    .entry(ep.instance.clone())
                    .or_insert_with(|| ep.clone());
            }
        }
        metrics::gauge!("detour_sync_source_up").set(1.0);
        out.send_replace(SourceView {
            connected: true,
            listed,
            providers: Arc::new(providers),
            observed: Arc::new(self.observed.clone()),
            problem: None,
        });
    }
}
