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

/// Whether the sidecar at `dial` answers its ping with 200 within `timeout`.
pub async fn ping(pool: &Arc<Pool>, dial: &Dial, protocol: AppProtocol, timeout: Duration) -> bool {
    let Ok(req) = Request::get(PING_PATH).body(empty()) else {
        return false;
    };
    let Ok(req) = set_target(CONTROL_AUTHORITY, protocol, req) else {
        return false;
    };
    let exchange = async {
        match pool.send(dial, protocol, req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                ok && resp.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(false)
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
