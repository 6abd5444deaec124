//! The etcd client's lease: granted when the client first owns something, kept alive on one
//! stream, and everything owned written again under a new lease when it is lost.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;

use super::Inner;
use crate::backoff::Backoff;
use crate::registry::RegistryError;

/// Keeps a lease, writing everything owned under it; grants a new one when it is lost. The
/// lease is renewed every third of its TTL on one keep-alive stream, reopened only when it
/// fails; failed grants and writes are retried with [`Backoff`]. A client that owns nothing
/// holds no lease (a sidecar under a watchdog only reads until it takes its registrations
/// over), so it costs etcd no keep-alives.
pub(super) async fn lease_loop(inner: Arc<Inner>) {
    let ttl_secs = inner.opts.ttl.as_secs().max(2) as i64;
    let period = Duration::from_secs_f64(ttl_secs as f64 / 3.0);
    let mut backoff = Backoff::REGISTRY;
    loop {
        while inner.owns_nothing() {
            // `register` and `set_host_status` notify after recording what they own.
            inner.own_changed.notified().await;
        }
        let granted = inner
            .call("lease", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await;
        let id = match granted {
            Ok(r) => r.id(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot get an etcd lease; retrying");
                backoff.wait().await;
                continue;
            }
        };
        *inner.lease.lock() = Some(id);
        tracing::info!(lease = id, ttl_secs, "etcd lease granted");
        let mut keeper = None;
        let mut dirty = true;
        loop {
            if dirty {
                dirty = false;
                let _writing = inner.writes.lock().await;
                for (k, v) in inner.owned_pairs() {
                    let written = inner
                        .call("put", |mut c| {
                            let (k, v) = (k.clone(), v.clone());
                            async move { c.put(k, v, Some(PutOptions::new().with_lease(id))).await }
                        })
                        .await;
                    dirty |= written.is_err();
                }
            }
            match keep_alive(&inner, id, &mut keeper).await {
                Ok(ttl) if ttl > 0 => {}
                Ok(_) => {
                    tracing::warn!(lease = id, "etcd lease expired; registering again");
                    metrics::counter!("detour_registry_lease_lost_total").increment(1);
                    break;
                }
                // Retried at the next period, well within the TTL; what was written stays.
                Err(e) => tracing::warn!(lease = id, error = %e, "etcd keep-alive failed"),
            }
            // A renewal every third of the TTL, shortened by up to a quarter at random: a fleet
            // started together does not renew in step.
            let wait = if dirty {
                backoff.next_delay().min(period)
            } else {
                backoff.reset();
                period.mul_f64(1.0 - fastrand::f64() / 4.0)
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = inner.own_changed.notified() => dirty = true,
            }
        }
        *inner.lease.lock() = None;
    }
}

/// The lease's keep-alive stream: the keeper that sends and the stream that answers.
type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews lease `id` once on the held stream, opening one (on the first member that answers)
/// when there is none or it failed; returns the TTL etcd gives back, 0 for an expired lease.
async fn keep_alive(
    inner: &Inner,
    id: i64,
    held: &mut Option<Keeper>,
) -> Result<i64, RegistryError> {
    if let Some((keeper, stream)) = held.as_mut() {
        let renewed = tokio::time::timeout(inner.opts.request_timeout, async {
            keeper.keep_alive().await?;
            stream.message().await
        })
        .await;
        match renewed {
            Ok(Ok(Some(r))) => return Ok(r.ttl()),
            Ok(Ok(None)) => tracing::debug!(lease = id, "keep-alive stream ended; reopening"),
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "keep-alive stream failed; reopening")
            }
            Err(_) => tracing::debug!(lease = id, "keep-alive stream silent; reopening"),
        }
        *held = None;
    }
    // Opening the stream renews the lease once and reads the answer.
    let opened = inner
        .call("keepalive", |mut c| async move {
            match c.lease_keep_alive(id).await {
                Ok(k) => Ok(Some(k)),
                // etcd answers an expired lease with TTL 0, which the client turns into this
                // error when it opens the keeper: an expired lease, not an outage.
                Err(etcd_client::Error::LeaseKeepAliveError(m))
                    if m.contains("lease not found") =>
                {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        })
        .await?;
    Ok(match opened {
        Some(k) => {
            *held = Some(k);
            1 // the client read a positive TTL (it refuses 0) without handing it out
        }
        None => 0,
    })
}
