//! Active probes: `GET /detour/ping` under authority `detour.control`, answered 200 by a ready
//! sidecar. The SDK probes its own sidecar; a CA probes the PAs it uses — at a fast pace while
//! the link carries requests, is off its primary path or its last probe failed, at an idle pace
//! otherwise ([`ProbePace`]).

use std::sync::Arc;
use std::time::Duration;

use detour_proto::{AppProtocol, CONTROL_AUTHORITY, PING_PATH};
use http::Request;
use http_body_util::BodyExt;

use crate::body::empty;
use crate::link::{Event, LinkState};
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

/// How often a link's peer is probed. A link nobody used for `idle_after` (on its primary path,
/// its last probe good) is probed every `idle_interval` instead of every `interval`: a caller
/// that once used a hundred hosts does not ping them all five times a second forever. The
/// next request on the link brings a probe at once and the fast pace back, so a peer that hung
/// meanwhile is found as quickly as under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePace {
    /// Between two probes while the link is in use.
    pub interval: Duration,
    /// Between two probes of an idle link (at least `interval`).
    pub idle_interval: Duration,
    /// How long without a request makes a link idle.
    pub idle_after: Duration,
}

impl ProbePace {
    /// The time from one probe's start to the next one's, for a link in `state` that has
    /// carried no request for `idle_for`, whose last probe was good or not.
    pub fn wait(&self, state: LinkState, idle_for: Duration, last_ok: bool) -> Duration {
        if state == LinkState::Primary && last_ok && idle_for >= self.idle_after {
            self.idle_interval.max(self.interval)
        } else {
            self.interval
        }
    }
}

/// Waits until the next probe of `link` is due, the last one having started at `started`: at
/// the idle pace, the link's next request ends the wait.
pub async fn until_next(
    link: &LinkHandle,
    pace: &ProbePace,
    started: tokio::time::Instant,
    last_ok: bool,
) {
    let wait = pace.wait(link.state(), link.idle_for(), last_ok);
    let due = tokio::time::sleep_until(started + wait);
    if wait <= pace.interval {
        return due.await;
    }
    tokio::select! {
        () = due => {}
        () = link.next_use() => {}
    }
    link.busy();
}

/// Probes `dial` forever, feeding `link`, at `pace`: a probe starts an interval after the last
/// one started, or at once when that one took longer (a hung peer is declared after
/// `fail_after` timeouts back to back, not after `fail_after` intervals plus timeouts).
pub async fn probe_loop(
    pool: Arc<Pool>,
    dial: Dial,
    protocol: AppProtocol,
    link: Arc<LinkHandle>,
    pace: ProbePace,
    timeout: Duration,
) {
    let (mut started, mut ok) = (tokio::time::Instant::now(), true);
    loop {
        until_next(&link, &pace, started, ok).await;
        started = tokio::time::Instant::now();
        ok = ping(&pool, &dial, protocol, timeout).await;
        link.event(if ok {
            Event::ProbeOk
        } else {
            Event::ProbeFailed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_unused_on_its_primary_path_with_good_probes_is_probed_at_the_idle_pace() {
        let ms = Duration::from_millis;
        let pace = ProbePace {
            interval: ms(200),
            idle_interval: ms(30_000),
            idle_after: ms(10_000),
        };
        let t = tokio::time::Instant::now();
        let recovering = LinkState::Recovering { since: t };
        // (state, time since the last request, last probe good) → wait
        let table = [
            (LinkState::Primary, ms(0), true, ms(200)),
            (LinkState::Primary, ms(9_999), true, ms(200)),
            (LinkState::Primary, ms(10_000), true, ms(30_000)),
            (LinkState::Primary, ms(600_000), true, ms(30_000)),
            (LinkState::Primary, ms(600_000), false, ms(200)),
            (LinkState::Fallback, ms(600_000), true, ms(200)),
            (recovering, ms(600_000), true, ms(200)),
        ];
        for (state, idle, ok, want) in table {
            assert_eq!(pace.wait(state, idle, ok), want, "{state:?} {idle:?} {ok}");
        }
        // Never faster than the busy pace.
        let odd = ProbePace {
            idle_interval: ms(50),
            ..pace
        };
        assert_eq!(odd.wait(LinkState::Primary, ms(600_000), true), ms(200));
    }
}
