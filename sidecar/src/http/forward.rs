//! One forwarding attempt to an upstream (a PA or a local provider), shared by both
//! directions: set the target, send with a timeout, remove hop-by-hop headers from the answer,
//! and say how a failed attempt ended in the terms of the retry decision.

use std::sync::Arc;
use std::time::Duration;

use detour_core::body::CallerBodyFault;
use detour_core::decide::{Outcome, Part};
use detour_core::failure::{HOPS_NAME, MAX_HOPS, MeshErrorKind};
use detour_core::transport::{Target, TransportError, to_target};
use detour_core::{BoxBody, Dial, Pool};
use detour_proto::{AppProtocol, ServiceName};
use http::{Request, Response};

use crate::http::headers::strip_hop_by_hop;
use crate::http::respond::MeshError;

/// An attempt that produced no response.
#[derive(Debug)]
pub struct AttemptFailed {
    /// How it ended, for the retry decision.
    pub outcome: Outcome,
    /// The request, when it never left (to send elsewhere whatever its method).
    pub request: Option<Request<BoxBody>>,
    /// Whether the upstream refused the stream unprocessed (an HTTP/2 peer that is draining).
    pub refused: bool,
    /// What to answer if the request is given up after this attempt.
    pub error: MeshError,
}

/// Sets the hop count of the request this sidecar sends on one higher than `hops`, the count
/// it arrived with (`take_hops` or `hops_of`, before its mesh headers are removed); a request that has
/// passed [`MAX_HOPS`] sidecars already is refused as a forwarding loop (`malformed-request`:
/// final, sent nowhere, and no sign of sickness).
pub fn next_hop(hops: u32, headers: &mut http::HeaderMap) -> Result<(), MeshError> {
    if hops >= MAX_HOPS {
        let why = format!(
            "forwarding loop: the request has passed {hops} sidecars (a provider address leads back into the mesh)"
        );
        return Err(MeshError::new(MeshErrorKind::MalformedRequest, why));
    }
    // The count's text without an allocation: a static value for each count a request may carry.
    const COUNTS: [&str; MAX_HOPS as usize] = [
        "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let value = http::HeaderValue::from_static(COUNTS[hops as usize]);
    // Where the request still carries its count (a PA's), set in place, every other value of
    // it gone: one lookup.
    match headers.entry(HOPS_NAME) {
        http::header::Entry::Occupied(mut e) => {
            e.insert(value);
        }
        http::header::Entry::Vacant(e) => {
            e.insert(value);
        }
    }
    Ok(())
}

/// The error of a request to a service whose name cannot be a request's target (a
/// [`Target`]: a service name always can, so this is a guard, not a path).
pub fn not_a_target(service: &ServiceName) -> MeshError {
    let why = format!("{service} cannot be a request's authority");
    MeshError::new(MeshErrorKind::MalformedRequest, why)
}

/// Logs a refusal of an untrusted peer, once a minute per peer at most (an attacker must not be
/// able to flood the log), and counts every one.
fn warn_untrusted(target: &Dial, reason: &str) {
    use detour_proto::sync::Mutex;
    use std::collections::HashMap;
    use tokio::time::Instant;
    static LAST: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);
    metrics::counter!("detour_untrusted_peer_refusals_total").increment(1);
    let key = target.to_string();
    let mut last = LAST.lock();
    let map = last.get_or_insert_with(HashMap::new);
    if map.len() > 1024 {
        map.clear();
    }
    let now = Instant::now();
    if map
        .get(&key)
        .is_none_or(|t| now.duration_since(*t) > Duration::from_secs(60))
    {
        map.insert(key, now);
        tracing::warn!(%target, %reason, "refusing to send to a peer that is not trusted (nothing goes to another path)");
    }
}

/// The failure of an attempt whose request body failed on the caller's side (`why`) while it
/// was sent: the caller's doing, whatever the upstream made of the broken stream. The answer is
/// final (nothing goes elsewhere), and no link, outlier or health state hears of it.
fn caller_body_failed(why: &str) -> AttemptFailed {
    AttemptFailed {
        outcome: Outcome::Answered,
        request: None,
        refused: false,
        error: MeshError::new(
            MeshErrorKind::MalformedRequest,
            format!("reading the request body: {why}"),
        ),
    }
}

/// Where an attempt goes: `dial`, from `pool`, over `protocol`, with `target` as the request's
/// target.
pub struct Upstream<'a> {
    /// The pool of connections to it.
    pub pool: &'a Arc<Pool>,
    /// Its address.
    pub dial: &'a Dial,
    /// What it speaks.
    pub protocol: AppProtocol,
    /// The service's name as it gets it.
    pub target: &'a Target,
}

/// Sends `req` to `to`; `part` says what the upstream is (a sidecar or a provider);
/// `caller_body` watches the body the caller streams.
pub async fn attempt(
    to: Upstream<'_>,
    req: Request<BoxBody>,
    timeout: Duration,
    part: Part,
    caller_body: Option<&CallerBodyFault>,
) -> Result<Response<BoxBody>, AttemptFailed> {
    let Upstream {
        pool,
        dial,
        protocol,
        target,
    } = to;
    let body_failed = || caller_body.and_then(CallerBodyFault::get);
    let req = to_target(target, protocol, req).map_err(|e| AttemptFailed {
        outcome: Outcome::Answered,
        request: None,
        refused: false,
        error: MeshError::new(MeshErrorKind::MalformedRequest, e.to_string()),
    })?;
    match tokio::time::timeout(timeout, pool.send(dial, protocol, req)).await {
        Err(_) if let Some(why) = body_failed() => Err(caller_body_failed(why)),
        Err(_) => Err(AttemptFailed {
            outcome: Outcome::TimedOut,
            request: None,
            refused: false,
            error: MeshError::new(
                MeshErrorKind::Timeout,
                format!("{dial}: no answer within {} ms", timeout.as_millis()),
            ),
        }),
        // No request of the mesh asks for a protocol switch (`Upgrade` is removed as hop by
        // hop): a 1xx as the answer is the upstream's garbage, and passed on it would break the
        // HTTP/2 stream it went back on — which the CA would take for a broken PA.
        Ok(Ok(resp)) if resp.status().is_informational() => Err(AttemptFailed {
            outcome: Outcome::Lost(part),
            request: None,
            refused: false,
            error: MeshError::new(
                MeshErrorKind::UpstreamReset,
                format!(
                    "{dial} answered {}, which ends no request here (the mesh switches no protocol)",
                    resp.status()
                ),
            ),
        }),
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
        Ok(Err(failed)) => {
            if let TransportError::Untrusted { target, reason } = &failed.error {
                // A refusal, not an unreachable peer: the answer is final — nothing goes to
                // another path, and the link to that host is not told of a fault.
                warn_untrusted(target, reason);
                return Err(AttemptFailed {
                    outcome: Outcome::Answered,
                    request: None,
                    refused: false,
                    error: MeshError::new(
                        MeshErrorKind::UntrustedPeer,
                        format!("{target}: {reason}"),
                    ),
                });
            }
            if let Some(why) = body_failed() {
                return Err(caller_body_failed(why));
            }
            let outcome = failed.outcome(part);
            let kind = match outcome {
                Outcome::Lost(_) => MeshErrorKind::UpstreamReset,
                _ => MeshErrorKind::UpstreamConnect,
            };
            Err(AttemptFailed {
                outcome,
                refused: matches!(failed.error, TransportError::Refused { .. }),
                error: MeshError::new(kind, failed.error.to_string()),
                request: failed.request,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hop_sets_the_count_one_higher_until_the_limit() {
        for hops in 0..MAX_HOPS {
            let mut h = http::HeaderMap::new();
            next_hop(hops, &mut h).unwrap();
            let expected = (hops + 1).to_string();
            assert_eq!(h.get(HOPS_NAME).unwrap().to_str().unwrap(), expected);
        }
        // A count already there is replaced, every value of it.
        let mut h = http::HeaderMap::new();
        h.append(HOPS_NAME, http::HeaderValue::from_static("2"));
        h.append(HOPS_NAME, http::HeaderValue::from_static("0"));
        next_hop(2, &mut h).unwrap();
        let all: Vec<_> = h.get_all(HOPS_NAME).iter().collect();
        assert_eq!(all, ["3"]);
        let mut h = http::HeaderMap::new();
        let e = next_hop(MAX_HOPS, &mut h).unwrap_err();
        assert_eq!(e.kind, MeshErrorKind::MalformedRequest);
        assert!(h.get(HOPS_NAME).is_none());
    }
}
