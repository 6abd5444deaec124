//! Active probes: `GET /detour/ping` under authority `detour.control`, answered 200 by a ready
//! sidecar. The SDK probes its own sidecar; a CA probes the PAs it uses.

use std::sync::Arc;
use std::time::Duration;

use detour_proto::{AppProtocol, CONTROL_AUTHORITY, PING_PATH};
use http::Request;
use http_body_util::BodyExt;

use crate::body::empty;
use crate::link::Event;
use crate::link_handle::LinkHandle;
use crate::transport::{Dial, Pool, set_target};

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// The sidecar answered 200.
    Ok,
    /// It could not be reached, or did not answer 200 in time.
    Failed,
    /// It answered and was not trusted (a TLS or identity failure): reachable, and refused.
    Untrusted,
}

/// Whether the sidecar at `dial` answers its ping with 200 within `timeout`.
pub async fn ping(pool: &Arc<Pool>, dial: &Dial, protocol: AppProtocol, timeout: Duration) -> bool {
    probe(pool, dial, protocol, timeout).await == Probed::Ok
}

/// Pings the sidecar at `dial` (within `timeout`) and says what it found.
pub async fn probe(
    pool: &Arc<Pool>,
    dial: &Dial,
    protocol: AppProtocol,
    timeout: Duration,
) -> Probed {
    let Ok(req) = Request::get(PING_PATH).body(empty()) else {
        return Probed::Failed;
    };
    let Ok(req) = set_target(CONTROL_AUTHORITY, protocol, req) else {
        return Probed::Failed;
    };
    let exchange = async {
        match pool.send(dial, protocol, req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                if ok && resp.into_body().collect().await.is_ok() {
                    Probed::Ok
                } else {
                    Probed::Failed
                }
            }
            Err(f) if matches!(f.error, crate::transport::TransportError::Untrusted { .. }) => {
                Probed::Untrusted
            }
            Err(_) => Probed::Failed,
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Probed::Failed)
}

/// Probes `dial` forever, feeding `link`: a probe starts every `interval`, or at once when the
/// previous one took longer (a hung peer is declared after `fail_after` timeouts back to back,
/// not after `fail_after` intervals plus timeouts).
pub async fn probe_loop(
    pool: Arc<Pool>,
    dial: Dial,
    protocol: AppProtocol,
    link: Arc<LinkHandle>,
    interval: Duration,
    timeout: Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ok = ping(&pool, &dial, protocol, timeout).await;
        link.event(if ok {
            Event::ProbeOk
        } else {
            Event::ProbeFailed
        });
    }
}
