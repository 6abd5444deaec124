//! Phase *serve* of a start: the tasks that run beside the listeners (documents, TLS reload,
//! the health socket, the hand-over socket) start at once; accepting on the shared listeners
//! starts when [`Serving::accept`] is called — a successor calls it only once it is ready,
//! just before it tells its predecessor, so one that fails before then has taken no
//! connection its predecessor would have served.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use super::StartError;
use super::route::Routing;
use crate::http::server::{ConnOptions, Listener, accept_loop};
use crate::inbound::providers::LocalProviders;
use crate::process::lifecycle::Lifecycle;
use crate::process::listeners::{BindError, Listeners};
use crate::tls::TlsState;

/// One accept loop, not yet spawned.
type Accepting = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A sidecar's serving tasks.
pub(super) struct Serving {
    /// Every task started (stopped at the end).
    pub tasks: Vec<JoinHandle<()>>,
    /// The local providers (registered in phase *ready*).
    pub providers: Arc<LocalProviders>,
    accepting: Vec<Accepting>,
}

impl Serving {
    /// Starts the tasks beside the listeners and prepares the accept loops.
    pub fn start(
        listeners: Listeners,
        routing: Routing,
        tls: Option<Arc<TlsState>>,
        health: UnixListener,
        lifecycle: &Arc<Lifecycle>,
    ) -> Result<Serving, StartError> {
        let handover_fds = listeners.dup().map_err(|source| BindError {
            listener: "handover",
            addr: "duplicate".into(),
            source,
        })?;
        let Routing {
            outbound,
            inbound,
            admin,
            providers,
            outbound_opts,
            inbound_opts,
            mut tasks,
        } = routing;
        tasks.push(tokio::spawn(async move {
            if let Some(t) = tls {
                t.watch().await;
            }
        }));
        tasks.push(tokio::spawn(admin.clone().serve_health(health)));
        tasks.push(tokio::spawn(crate::process::handover::serve(
            listeners.handover,
            handover_fds,
            lifecycle.clone(),
        )));
        let lc = lifecycle;
        let mut accepting: Vec<Accepting> = vec![Box::pin(admin.clone().serve(listeners.admin))];
        if let Some(l) = listeners.metrics {
            accepting.push(Box::pin(admin.serve_metrics(l)));
        }
        accepting.extend([Box::pin(accept_loop(
            Listener::Tcp(listeners.inbound),
            "inbound",
            inbound,
            lc.clone(),
            inbound_opts,
        )) as Accepting]);
        if let Some(l) = listeners.outbound_tcp {
            accepting.push(Box::pin(accept_loop(
                Listener::Tcp(l),
                "outbound",
                outbound.clone(),
                lc.clone(),
                outbound_opts.clone(),
            )));
        }
        if let Some(l) = listeners.outbound_unix {
            // The SDK's socket: a connection it closes carries only what it abandoned.
            let unix_opts = ConnOptions {
                half_close: false,
                ..(*outbound_opts).clone()
            };
            accepting.push(Box::pin(accept_loop(
                Listener::Unix(l),
                "outbound-unix",
                outbound,
                lc.clone(),
                Arc::new(unix_opts),
            )));
        }
        Ok(Serving {
            tasks,
            providers,
            accepting,
        })
    }

    /// Starts accepting on every listener.
    pub fn accept(&mut self) {
        self.tasks
            .extend(self.accepting.drain(..).map(tokio::spawn));
    }
}
