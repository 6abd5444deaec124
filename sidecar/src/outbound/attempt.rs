//! One attempt of an outbound request: through the endpoint's PA (C→CA→PA→P) or straight to
//! its provider (C→CA→P), in its tracing spans, and what the attempt's failure tells the link.

use std::net::SocketAddr;
use std::time::Duration;

use detour_core::decide::{Outcome, Part};
use detour_core::failure::{MeshErrorKind, strip_mesh_headers};
use detour_core::link::{Event, Reason};
use detour_core::link_handle::LinkHandle;
use detour_core::replay::Held;
use detour_core::trace::{Span, SpanKind};
use detour_core::transport::Target;
use detour_core::{BoxBody, Dial, PathTaken};
use detour_proto::{Endpoint, ServiceName};
use http::Response;
use tracing::Instrument;

use super::Outbound;
use crate::http::forward::{AttemptFailed, Upstream, attempt};
use crate::http::respond::MeshError;

/// An attempt's answer and the path it took, or why it failed.
pub(super) type Tried = Result<(Response<BoxBody>, PathTaken), AttemptFailed>;

/// Where attempt `n` of a request goes, and how long it may take.
pub(super) struct Try<'a> {
    pub(super) service: &'a ServiceName,
    /// The service's name as the next hop gets it.
    pub(super) target: &'a Target,
    pub(super) ep: &'a Endpoint,
    pub(super) n: u32,
    pub(super) timeout: Duration,
    /// Through the endpoint's PA (else straight to its provider).
    pub(super) via_pa: bool,
    /// Whether the provider may be reached around its PA.
    pub(super) direct_ok: bool,
}

impl Outbound {
    /// Attempt `t.n`, in a `tracing` span and a child span of `hop`; a failure is recorded in
    /// the child span.
    pub(super) async fn one_attempt(&self, t: &Try<'_>, flight: &mut Held, hop: &Span) -> Tried {
        let span = tracing::debug_span!("attempt", n = t.n, instance = %t.ep.instance,
            path = if t.via_pa { "pa" } else { "provider" });
        let mut try_span = attempt_span(hop, t.n, t.via_pa, t.ep);
        let result = if t.via_pa {
            (self.via_pa(t, flight, &try_span)).instrument(span).await
        } else {
            (self.straight(t, flight, &try_span)).instrument(span).await
        };
        if let Err(failed) = &result {
            try_span.fail(|| failed.error.to_string());
        }
        result
    }

    /// One attempt through the endpoint's PA. A mesh error the PA answers with becomes the
    /// attempt's outcome; transport failures feed the link to the PA's host. A request waiting
    /// on a PA the link gives up on is abandoned only when the provider may be reached around
    /// it (`t.direct_ok`).
    async fn via_pa(&self, t: &Try<'_>, flight: &mut Held, trace: &Span) -> Tried {
        let (service, ep) = (t.service, t.ep);
        let pa = (self.usable_pa(service, ep)).map_err(|(kind, why)| unusable(kind, why))?;
        let link = self.links.get(&ep.host, pa);
        let mut req = flight.take().ok_or_else(|| consumed(ep))?;
        trace.inject(req.headers_mut());
        let dial = Dial::Tcp(pa);
        let to = Upstream {
            pool: &self.pools.pas,
            dial: &dial,
            protocol: self.cfg.pa_protocol,
            target: t.target,
        };
        let sent = attempt(to, req, t.timeout, Part::Sidecar, flight.body_fault());
        let result = if t.direct_ok && flight.idempotent() && flight.has_copy() {
            // A PA the link gives up on (hung: probes time out) holds no idempotent request:
            // it is abandoned there and sent straight to the provider.
            tokio::select! {
                biased;
                r = sent => r,
                () = link.left_primary() => {
                    metrics::counter!("detour_abandoned_total", "peer" => "pa").increment(1);
                    Err(abandoned(ep))
                }
            }
        } else {
            sent.await
        };
        match result {
            Ok(mut resp) => match pa_said(&mut resp) {
                None => Ok((resp, PathTaken::Mesh)),
                Some(kind) => Err(pa_error(kind, ep)),
            },
            Err(f) => Err(pa_failed(f, &link, flight, service, ep)),
        }
    }

    /// The address of `ep`'s PA, if this CA may use it: the endpoint has one, and no other
    /// host has proved it its own; else the error of the endpoint.
    fn usable_pa(
        &self,
        service: &ServiceName,
        ep: &Endpoint,
    ) -> Result<SocketAddr, (MeshErrorKind, String)> {
        let Some(pa) = ep.pa_address else {
            // Reached through a PA only, and it has none: this endpoint cannot be used.
            let why = format!(
                "{} has no sidecar, and {service} allows no path around one",
                ep.instance
            );
            return Err((MeshErrorKind::UpstreamConnect, why));
        };
        if let Err(owner) = self.links.may_use(&ep.host, pa) {
            // The endpoint names another host's PA: it is not used (the next one is), and
            // nothing goes to its own address either.
            let why = format!("the PA at {pa} is {owner}'s, not {}'s", ep.host);
            return Err((MeshErrorKind::UntrustedPeer, why));
        }
        Ok(pa)
    }

    /// One attempt straight to the endpoint's provider.
    async fn straight(&self, t: &Try<'_>, flight: &mut Held, trace: &Span) -> Tried {
        let ep = t.ep;
        let mut req = flight.take().ok_or_else(|| consumed(ep))?;
        trace.inject(req.headers_mut());
        let dial = Dial::Tcp(ep.app_address);
        let to = Upstream {
            pool: &self.pools.providers,
            dial: &dial,
            protocol: ep.protocol,
            target: t.target,
        };
        let sent = attempt(to, req, t.timeout, Part::Provider, flight.body_fault());
        match sent.await {
            Ok(mut resp) => {
                strip_mesh_headers(resp.headers_mut());
                Ok((resp, PathTaken::CaDirect))
            }
            Err(mut f) => {
                flight.give_back(f.request.take());
                Err(f)
            }
        }
    }
}

/// The PA's own mesh error (`x-detour-error`) in its answer, if it said one; every mesh header
/// is removed from the answer (any other answer is the provider's).
fn pa_said(resp: &mut Response<BoxBody>) -> Option<MeshErrorKind> {
    let kind = MeshErrorKind::from_headers(resp.headers());
    strip_mesh_headers(resp.headers_mut());
    kind
}

/// The failure of an attempt the PA answered with its own mesh error `kind`.
fn pa_error(kind: MeshErrorKind, ep: &Endpoint) -> AttemptFailed {
    AttemptFailed {
        outcome: Outcome::of_mesh_error(kind),
        request: None,
        refused: false,
        error: MeshError::new(kind, format!("the sidecar of {} answered {kind}", ep.host)),
    }
}

/// An attempt through a PA that failed in transport: the link to its host hears of it when
/// the PA was not reached or the request was lost there, and the request (if it came back) is
/// held for the next attempt.
fn pa_failed(
    mut f: AttemptFailed,
    link: &LinkHandle,
    flight: &mut Held,
    service: &ServiceName,
    ep: &Endpoint,
) -> AttemptFailed {
    let reason = if f.refused {
        Reason::DrainAnnounced
    } else {
        Reason::ConnectFailed
    };
    if matches!(f.outcome, Outcome::NeverReached(_) | Outcome::Lost(_)) {
        tracing::debug!(%service, host = %ep.host, error = %f.error, "the PA failed; the link decides where to go");
        link.event(Event::Fault(reason));
    }
    flight.give_back(f.request.take());
    f
}

/// The failure of an idempotent request abandoned on a PA the link gave up on.
fn abandoned(ep: &Endpoint) -> AttemptFailed {
    AttemptFailed {
        outcome: Outcome::Lost(Part::Sidecar),
        request: None,
        refused: false,
        error: MeshError::new(
            MeshErrorKind::UpstreamReset,
            format!("the link to {} left it while the request waited", ep.host),
        ),
    }
}

/// The span of attempt `n` of a hop, through `ep`'s PA or straight to its provider.
fn attempt_span(hop: &Span, n: u32, via_pa: bool, ep: &Endpoint) -> Span {
    let mut span = hop.child("attempt", SpanKind::Client);
    if span.is_recording() {
        span.attr("detour.attempt", n);
        span.attr("detour.path", if via_pa { "mesh" } else { "ca_direct" });
        span.attr("detour.instance", ep.instance.to_string());
    }
    span
}

/// The failure of an attempt on an endpoint that cannot be used (nothing was sent).
fn unusable(kind: MeshErrorKind, why: String) -> AttemptFailed {
    AttemptFailed {
        outcome: Outcome::NeverReached(Part::Provider),
        request: None,
        refused: false,
        error: MeshError::new(kind, why),
    }
}

/// The failure of an attempt that has no request left to send (never expected: the retry
/// decision only asks for another attempt when a copy is at hand).
fn consumed(ep: &Endpoint) -> AttemptFailed {
    AttemptFailed {
        outcome: Outcome::Answered,
        request: None,
        refused: false,
        error: MeshError::new(
            MeshErrorKind::UpstreamConnect,
            format!("{}: the request was already consumed", ep.instance),
        ),
    }
}
