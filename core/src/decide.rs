//! The one retry decision of the data path, pure: an attempt ended a certain way — may the
//! request go elsewhere, and where? The SDK (mesh or direct) and the sidecar's outbound (via a
//! PA or straight to a provider) and inbound sides all ask it.
//!
//! The rules (DESIGN §5):
//! - a request no provider received may go anywhere else, whatever its method;
//! - a request that left and was lost may go again only when it is idempotent;
//! - either way only when a copy is at hand (the request was handed back, or its body was
//!   small enough to keep);
//! - a failed sidecar hop prefers the other path (the same endpoint without that sidecar), a
//!   failed provider prefers the next endpoint; a provider that lost a request is not tried
//!   again by another path (that would only repeat it on the same provider);
//! - an answer — a provider's, or an error the request itself caused — is returned as is, and
//!   an attempt that ran out of time is not repeated.

use crate::failure::{Blame, Delivery, MeshErrorKind};

/// Which part of an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The sidecar the attempt went through (the caller's own for the SDK, the provider
    /// host's PA for a CA), or its view of the registry.
    Sidecar,
    /// The provider: reached straight, or according to the sidecar in front of it.
    Provider,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer to hand on: the provider's, or a mesh error the request itself caused.
    Answered,
    /// A pooled connection turned out closed before the request was written on it: the
    /// request never left and the target may well be fine.
    Stale,
    /// No provider received the request (connect failed, the request was handed back or its
    /// stream refused unprocessed, or the sidecar in front says so).
    NeverReached(Part),
    /// The request left and its exchange failed: it may have been processed.
    Lost(Part),
    /// No answer within the time allowed.
    TimedOut,
}

impl Outcome {
    /// What a mesh error produced by the sidecar an attempt went through says about the
    /// attempt (only ever asked of a sidecar's answer: providers' `x-detour-*` headers are
    /// removed before anyone reads them).
    pub fn of_mesh_error(kind: MeshErrorKind) -> Outcome {
        match (kind.delivery(), kind.blame()) {
            (Delivery::Rejected, _) => Outcome::Answered,
            (Delivery::NeverReached, Blame::Sidecar) => Outcome::NeverReached(Part::Sidecar),
            (Delivery::NeverReached, _) => Outcome::NeverReached(Part::Provider),
            (Delivery::Unknown, _) if kind == MeshErrorKind::Timeout => Outcome::TimedOut,
            (Delivery::Unknown, _) => Outcome::Lost(Part::Provider),
        }
    }
}

/// What is known of the request being routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKind {
    /// Safe to process twice: its method is idempotent, or the app marked it.
    pub idempotent: bool,
    /// A copy can be sent: the request was handed back untouched, or its body was kept.
    pub resendable: bool,
}

/// Where else the request could go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alternatives {
    /// The link offers another path (SDK: mesh ↔ direct; CA: the provider straight instead of
    /// through its PA).
    pub other_path: bool,
    /// Another endpoint of the service has not been tried yet.
    pub other_endpoint: bool,
}

/// What to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Hand the answer to the caller.
    Return,
    /// Send it to the same target again (on a fresh connection).
    Again,
    /// Send it to another endpoint.
    NextEndpoint,
    /// Send it over the link's other path.
    OtherPath,
    /// Give up.
    Fail(Failure),
}

/// Why a request was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No provider received it, and nowhere else could take it (or no copy was at hand).
    NeverReached,
    /// It may have been processed and cannot be sent again.
    OutcomeUnknown,
    /// No answer in time.
    TimedOut,
}

/// The decision. See the module docs for the rules, and `decide_tests.rs` for every row.
pub fn decide(outcome: Outcome, request: RequestKind, alt: Alternatives) -> Next {
    let elsewhere = |part: Part, failure: Failure| {
        let (first, second) = match part {
            Part::Sidecar => (
                alt.other_path.then_some(Next::OtherPath),
                alt.other_endpoint.then_some(Next::NextEndpoint),
            ),
            Part::Provider => (
                alt.other_endpoint.then_some(Next::NextEndpoint),
                alt.other_path.then_some(Next::OtherPath),
            ),
        };
        first.or(second).unwrap_or(Next::Fail(failure))
    };
    match outcome {
        Outcome::Answered => Next::Return,
        Outcome::Stale if request.resendable => Next::Again,
        Outcome::Stale => Next::Fail(Failure::NeverReached),
        Outcome::NeverReached(_) if !request.resendable => Next::Fail(Failure::NeverReached),
        Outcome::NeverReached(part) => elsewhere(part, Failure::NeverReached),
        Outcome::Lost(Part::Provider) if request.idempotent && request.resendable => {
            if alt.other_endpoint {
                Next::NextEndpoint
            } else {
                Next::Fail(Failure::OutcomeUnknown)
            }
        }
        Outcome::Lost(part) if request.idempotent && request.resendable => {
            elsewhere(part, Failure::OutcomeUnknown)
        }
        Outcome::Lost(_) => Next::Fail(Failure::OutcomeUnknown),
        Outcome::TimedOut => Next::Fail(Failure::TimedOut),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
