//! Routing one call: the mesh path through the local sidecar, or the direct path to a
//! provider from the last endpoint snapshot, chosen by the link and moved between by the one
//! retry decision (`detour_core::decide`); and the hedge that re-sends a waiting idempotent
//! call direct when the link leaves the mesh (a hung or draining sidecar).
//!
//! Trust: on the mesh path the response comes from the app's own sidecar, which removed every
//! `x-detour-*` header a provider or remote sidecar set, so its mesh error and path headers are
//! believed. On the direct path a provider answered: its `x-detour-*` headers are removed.

use std::collections::VecDeque;

use detour_core::body::{BoxBody, watched};
use detour_core::decide::{Alternatives, Failure, Next, Outcome, Part, decide};
use detour_core::failure::{Blame, Delivery, strip_mesh_headers};
use detour_core::link::{Event, LinkState, Reason};
use detour_core::replay::{Held, is_idempotent, prepare};
use detour_core::trace::{Span, SpanKind};
use detour_core::transport::{Failed, TransportError, set_target};
use detour_core::{Dial, MeshErrorKind, PathTaken};
use detour_proto::{AppProtocol, Endpoint, ServiceName};
use http::{Request, Response};

use crate::client::Client;
use crate::error::Error;

/// Which path the next attempt takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Mesh,
    Direct,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Route::Mesh => "mesh",
            Route::Direct => "direct",
        }
    }
}

/// What an attempt leads to.
enum Step {
    /// The call is answered.
    Answered(Response<BoxBody>),
    /// Try this path next.
    Go(Route),
    /// Give up.
    GiveUp(Failure),
    /// The request cannot be sent at all.
    Invalid(Error),
}

/// One call being routed.
struct Call<'a> {
    service: &'a ServiceName,
    protocol: AppProtocol,
    /// The request and its copy.
    held: Held,
    /// Whether the direct path may be used at all (control session on).
    direct_allowed: bool,
    mesh_tried: bool,
    /// Providers the direct path has yet to try (filled when it is first taken).
    direct: Option<VecDeque<Endpoint>>,
    /// What went wrong so far, for the error the app gets.
    sidecar_failed: Option<TransportError>,
    provider_failed: Option<TransportError>,
    no_snapshot: bool,
    /// Every provider in the snapshot is reached through its PA only (`no_direct`).
    direct_forbidden: bool,
    /// The sidecar's own error answer, returned when nothing does better.
    mesh_answer: Option<Response<BoxBody>>,
    /// The call's span (attempts are its children; hedges and path switches its events).
    trace: &'a mut Span,
    /// Attempts made.
    attempts: u32,
}

impl Call<'_> {
    /// The span of the next attempt, on `route`.
    fn attempt(&mut self, route: Route) -> Span {
        self.attempts += 1;
        let mut span = self.trace.child("attempt", SpanKind::Client);
        if span.is_recording() {
            span.attr("detour.attempt", self.attempts);
            span.attr("detour.path", route.as_str());
        }
        span
    }

    /// Whether the direct path still has providers to try (or has not been looked at).
    fn direct_left(&self) -> bool {
        self.direct_allowed && self.direct.as_ref().is_none_or(|d| !d.is_empty())
    }
}

impl Client {
    pub(crate) async fn route(
        &self,
        service: &ServiceName,
        protocol: AppProtocol,
        req: Request<BoxBody>,
        trace: &mut Span,
    ) -> Result<Response<BoxBody>, Error> {
        let direct_allowed = self.inner.control.is_some();
        let idempotent = is_idempotent(&req);
        // The app's own body failing as it streams is the app's doing: no path is blamed.
        let (parts, body) = req.into_parts();
        let (body, body_fault) = watched(body);
        let req = Request::from_parts(parts, body);
        let (req, replay) = if direct_allowed {
            prepare(req, self.inner.max_replay, self.inner.timeout)
                .await
                .map_err(|e| Error::InvalidRequest(e.to_string()))?
        } else {
            (req, None)
        };
        if let Some(c) = &self.inner.control {
            c.interest(service);
        }
        let mut call = Call {
            service,
            protocol,
            held: Held::new(req, replay, idempotent, body_fault),
            direct_allowed,
            mesh_tried: false,
            direct: None,
            sidecar_failed: None,
            provider_failed: None,
            no_snapshot: false,
            direct_forbidden: false,
            mesh_answer: None,
            trace,
            attempts: 0,
        };
        // The sidecar's link, then the service's own switch (a gray rule or a rollback).
        let mesh = !direct_allowed
            || (self.inner.link.choose_primary()
                && self
                    .inner
                    .control
                    .as_ref()
                    .is_none_or(|c| c.mesh_switched_on(service)));
        let mut route = if mesh { Route::Mesh } else { Route::Direct };
        loop {
            let step = match route {
                Route::Mesh => self.mesh_step(&mut call).await,
                Route::Direct => self.direct_step(&mut call).await,
            };
            match step {
                Step::Answered(resp) => return Ok(resp),
                Step::Go(next) => {
                    if next != route {
                        call.trace.event("switch_path", || {
                            vec![
                                ("detour.from", route.as_str().into()),
                                ("detour.to", next.as_str().into()),
                            ]
                        });
                    }
                    route = next;
                }
                Step::GiveUp(failure) => return self.give_up(call, failure),
                Step::Invalid(e) => return Err(e),
            }
        }
    }

    /// One attempt through the sidecar; an idempotent call with a copy is hedged.
    async fn mesh_step(&self, call: &mut Call<'_>) -> Step {
        call.mesh_tried = true;
        let Some(req) = call.held.take() else {
            return Step::GiveUp(Failure::NeverReached);
        };
        let mut req = match set_target(call.service.as_str(), call.protocol, req) {
            Ok(r) => r,
            Err(e) => return self.invalid(call, e),
        };
        let mut attempt = call.attempt(Route::Mesh);
        attempt.inject(req.headers_mut());
        let step = self.mesh_attempt(call, req).await;
        if !matches!(step, Step::Answered(_)) {
            attempt.fail(|| "no answer through the sidecar".into());
        }
        step
    }

    /// Sends the request to the sidecar and judges what comes back (hedged when it may be).
    async fn mesh_attempt(&self, call: &mut Call<'_>, req: Request<BoxBody>) -> Step {
        let sent = self
            .inner
            .pool
            .send(&self.inner.sidecar, call.protocol, req);
        tokio::pin!(sent);
        if !(call.held.idempotent() && call.held.has_copy() && call.direct_left()) {
            let r = sent.await;
            return self.judge_mesh(call, r);
        }
        tokio::select! {
            biased;
            r = &mut sent => self.judge_mesh(call, r),
            () = self.inner.link.left_primary() => self.hedge(call, sent).await,
        }
    }

    /// The link left the mesh while an idempotent call waited on the sidecar: send it direct
    /// too; the first answer wins and the other attempt is dropped (cancelled).
    async fn hedge<F>(&self, call: &mut Call<'_>, mut sent: std::pin::Pin<&mut F>) -> Step
    where
        F: Future<Output = Result<Response<BoxBody>, Failed>>,
    {
        metrics::counter!("detour_sdk_hedged_total").increment(1);
        call.trace
            .event("hedge", || vec![("detour.to", "direct".into())]);
        let mut from_mesh = None;
        let direct_answer = {
            let direct = self.direct_all(call);
            tokio::pin!(direct);
            loop {
                tokio::select! {
                    r = &mut sent, if from_mesh.is_none() => {
                        let answered = matches!(&r, Ok(resp) if mesh_answered(resp));
                        from_mesh = Some(r);
                        if answered {
                            break None;
                        }
                    }
                    d = &mut direct => break Some(d),
                }
            }
        };
        let winner = match (&direct_answer, &from_mesh) {
            (Some(Some(_)), _) => "direct",
            (None, _) => "mesh",
            (Some(None), _) => "none",
        };
        metrics::counter!("detour_sdk_hedge_wins_total", "path" => winner).increment(1);
        match (direct_answer, from_mesh) {
            (Some(Some(resp)), _) => Step::Answered(resp),
            (_, Some(r)) => self.judge_mesh(call, r),
            (_, None) => {
                let r = sent.await;
                self.judge_mesh(call, r)
            }
        }
    }

    /// What the sidecar's answer (or the failure to get one) means for the call.
    fn judge_mesh(&self, call: &mut Call<'_>, result: Result<Response<BoxBody>, Failed>) -> Step {
        let outcome = match result {
            Ok(mut resp) => {
                let path = PathTaken::from_headers(resp.headers());
                resp.extensions_mut().insert(path);
                let Some(kind) = MeshErrorKind::from_headers(resp.headers()) else {
                    self.inner.errors.record(false);
                    return Step::Answered(resp);
                };
                resp.extensions_mut().insert(kind);
                self.sick_sidecar_evidence(kind);
                call.mesh_answer = Some(resp);
                Outcome::of_mesh_error(kind)
            }
            Err(failed) => {
                if let Some(step) = body_failed(call) {
                    return step;
                }
                let reason = match failed.error {
                    TransportError::Refused { .. } => Reason::DrainAnnounced,
                    _ => Reason::ConnectFailed,
                };
                if call.direct_allowed {
                    self.inner.link.event(Event::Fault(reason));
                }
                let outcome = failed.outcome(Part::Sidecar);
                call.held.give_back(failed.request);
                call.sidecar_failed = Some(failed.error);
                outcome
            }
        };
        let alt = Alternatives {
            other_path: call.direct_left(),
            other_endpoint: false,
        };
        match decide(outcome, call.held.kind(), alt) {
            Next::Return => match call.mesh_answer.take() {
                Some(resp) => Step::Answered(resp),
                None => Step::GiveUp(Failure::NeverReached),
            },
            Next::OtherPath => Step::Go(Route::Direct),
            Next::Again | Next::NextEndpoint => Step::Go(Route::Mesh),
            Next::Fail(f) => Step::GiveUp(f),
        }
    }

    /// Errors the sidecar blames on itself make it look sick: half of a recent window of them
    /// (or one while ramping back) moves the link to direct.
    fn sick_sidecar_evidence(&self, kind: MeshErrorKind) {
        let link = &self.inner.link;
        let own = kind.blame() == Blame::Sidecar;
        let ramping = matches!(link.state(), LinkState::Recovering { .. });
        if (self.inner.errors.record(own) || (own && ramping)) && self.inner.control.is_some() {
            link.event(Event::Fault(Reason::MeshErrors));
        }
    }

    /// One attempt to the next provider of the snapshot.
    async fn direct_step(&self, call: &mut Call<'_>) -> Step {
        if !call.direct_allowed {
            return Step::GiveUp(Failure::NeverReached);
        }
        if call.direct.is_none() {
            let snapshot = self.snapshot(call.service);
            let known = snapshot.as_ref().is_some_and(|s| !s.endpoints.is_empty());
            // Providers reached through their PA only are never called directly.
            let endpoints = snapshot
                .map(|s| {
                    let zone = self.inner.control.as_ref().and_then(|c| c.zone());
                    self.inner.direct.order(&s, call.held.view(), zone.as_ref())
                })
                .unwrap_or_default();
            call.no_snapshot = !known;
            call.direct_forbidden = known && endpoints.is_empty();
            call.direct = Some(endpoints.into());
        }
        let Some(ep) = call.direct.as_mut().and_then(VecDeque::pop_front) else {
            // Nothing known or nothing left: the sidecar may still take it.
            return if call.mesh_tried {
                Step::GiveUp(Failure::NeverReached)
            } else {
                Step::Go(Route::Mesh)
            };
        };
        let Some(req) = call.held.take() else {
            return Step::GiveUp(Failure::NeverReached);
        };
        let mut req = match set_target(call.service.as_str(), ep.protocol, req) {
            Ok(r) => r,
            Err(e) => return self.invalid(call, e),
        };
        // Mesh headers are the mesh's word (`x-detour-caller` is set by a PA from a verified
        // identity): an app's own never reach a provider, on this path either.
        strip_mesh_headers(req.headers_mut());
        let mut attempt = call.attempt(Route::Direct);
        if attempt.is_recording() {
            attempt.attr("server.address", ep.app_address.to_string());
            attempt.attr("detour.instance", ep.instance.to_string());
        }
        attempt.inject(req.headers_mut());
        let dial = Dial::Tcp(ep.app_address);
        let failed = match self.inner.pool.send(&dial, ep.protocol, req).await {
            // The call asked for no protocol switch: a 1xx as the answer is the provider's
            // garbage (the mesh path answers `upstream-reset` for it).
            Ok(resp) if resp.status().is_informational() => {
                let detail = format!(
                    "{} answered {}, which ends no request (no protocol switch was asked for)",
                    ep.app_address,
                    resp.status()
                );
                attempt.fail(|| detail.clone());
                let service = call.service.clone();
                return Step::Invalid(Error::OutcomeUnknown { service, detail });
            }
            Ok(mut resp) => {
                strip_mesh_headers(resp.headers_mut());
                resp.extensions_mut().insert(PathTaken::Direct);
                return Step::Answered(resp);
            }
            Err(f) => f,
        };
        attempt.fail(|| failed.error.to_string());
        if let Some(step) = body_failed(call) {
            return step;
        }
        let outcome = failed.outcome(Part::Provider);
        if matches!(outcome, Outcome::NeverReached(_)) {
            self.inner.direct.refused(ep.app_address);
            tracing::debug!(service = %call.service, provider = %ep.app_address, error = %failed.error, "provider refused; trying the next");
        }
        call.held.give_back(failed.request);
        call.provider_failed = Some(failed.error);
        let alt = Alternatives {
            other_path: !call.mesh_tried,
            other_endpoint: call.direct_left(),
        };
        match decide(outcome, call.held.kind(), alt) {
            Next::OtherPath => Step::Go(Route::Mesh),
            Next::Fail(f) => Step::GiveUp(f),
            Next::Return | Next::Again | Next::NextEndpoint => Step::Go(Route::Direct),
        }
    }

    /// The direct path until it answers or has nothing left (the hedge).
    async fn direct_all(&self, call: &mut Call<'_>) -> Option<Response<BoxBody>> {
        loop {
            match self.direct_step(call).await {
                Step::Answered(resp) => return Some(resp),
                Step::Go(Route::Direct) => {}
                Step::Go(Route::Mesh) | Step::GiveUp(_) | Step::Invalid(_) => return None,
            }
        }
    }

    fn invalid(&self, call: &Call<'_>, e: http::Error) -> Step {
        Step::Invalid(Error::InvalidRequest(format!(
            "cannot address a request to {}: {e}",
            call.service
        )))
    }

    /// The error (or the sidecar's own error answer) the app gets when the call is given up.
    fn give_up(&self, call: Call<'_>, failure: Failure) -> Result<Response<BoxBody>, Error> {
        let service = call.service.clone();
        match (failure, call.mesh_answer) {
            (Failure::OutcomeUnknown, Some(resp)) => Err(Error::OutcomeUnknown {
                service,
                detail: format!(
                    "the mesh lost the connection after sending ({})",
                    mesh_error_text(&resp)
                ),
            }),
            (_, Some(resp)) => Ok(resp),
            (Failure::OutcomeUnknown | Failure::TimedOut, None) => Err(Error::OutcomeUnknown {
                service,
                detail: call
                    .provider_failed
                    .or(call.sidecar_failed)
                    .map_or_else(|| "no answer in time".into(), |e| e.to_string()),
            }),
            (Failure::NeverReached, None) if call.direct_forbidden => {
                let cause = format!(
                    "every provider of {service} is reached through its host's sidecar only (no direct path)"
                );
                let cause = match call.sidecar_failed {
                    Some(e) => format!("the sidecar is unavailable ({e}) and {cause}"),
                    None => cause,
                };
                Err(Error::NoRoute { service, cause })
            }
            (Failure::NeverReached, None) if call.no_snapshot => {
                let cause = format!(
                    "no endpoint of {service} is known (no snapshot from the sidecar, none in the snapshot file)"
                );
                let cause = match call.sidecar_failed {
                    Some(e) => format!("the sidecar is unavailable ({e}) and {cause}"),
                    None => cause,
                };
                Err(Error::NoRoute { service, cause })
            }
            (Failure::NeverReached, None) => match (call.provider_failed, call.sidecar_failed) {
                (Some(e), _) => Err(Error::NoRoute {
                    service,
                    cause: format!("no provider accepted a direct connection ({e})"),
                }),
                (None, Some(e)) => Err(Error::SidecarUnavailable {
                    sidecar: self.inner.sidecar.clone(),
                    source: Box::new(e),
                }),
                (None, None) => Err(Error::NoRoute {
                    service,
                    cause: "the request could not be sent again (its body was not kept)".into(),
                }),
            },
        }
    }
}

/// The end of a call whose attempt failed because the app's own request body failed while it
/// was sent: the call's error, with neither the sidecar nor the provider blamed (no link
/// event, no provider passed over) and nothing sent again.
fn body_failed(call: &Call<'_>) -> Option<Step> {
    let why = call.held.caller_body_failed()?;
    Some(Step::Invalid(Error::InvalidRequest(format!(
        "reading the request body: {why}"
    ))))
}

/// Whether a sidecar's response is an answer to keep (no mesh error, or one the request caused).
fn mesh_answered(resp: &Response<BoxBody>) -> bool {
    MeshErrorKind::from_headers(resp.headers()).is_none_or(|k| k.delivery() == Delivery::Rejected)
}

fn mesh_error_text(resp: &Response<BoxBody>) -> String {
    MeshErrorKind::from_headers(resp.headers()).map_or_else(|| "?".into(), |k| k.to_string())
}

#[cfg(test)]
#[path = "call_tests.rs"]
mod tests;
