//! The retry decision, row by row: every outcome, every kind of request, every set of
//! alternatives, and the expected next step.

use super::*;

use Next::{Again, Fail, NextEndpoint, OtherPath, Return};
use Outcome::{Answered, Lost, NeverReached, Stale, TimedOut};
use Part::{Provider, Sidecar};

/// Request kinds: (idempotent, resendable).
const GET: (bool, bool) = (true, true);
const POST: (bool, bool) = (false, true);
/// A request whose body streamed without a copy (and was not handed back).
const GET_NO_COPY: (bool, bool) = (true, false);
const POST_NO_COPY: (bool, bool) = (false, false);

/// Alternatives: (other_path, other_endpoint).
const BOTH: (bool, bool) = (true, true);
const PATH: (bool, bool) = (true, false);
const ENDPOINT: (bool, bool) = (false, true);
const NONE: (bool, bool) = (false, false);

const NEVER: Next = Fail(Failure::NeverReached);
const UNKNOWN: Next = Fail(Failure::OutcomeUnknown);
const LATE: Next = Fail(Failure::TimedOut);

/// (outcome, (idempotent, resendable), (other_path, other_endpoint), expected next step).
type Row = (Outcome, (bool, bool), (bool, bool), Next);

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // An answer is returned, whatever else is possible.
    (Answered, POST, BOTH, Return),
    (Answered, GET_NO_COPY, NONE, Return),
    // A stale pooled connection: the same target again, on a fresh connection.
    (Stale, POST, NONE, Again),
    (Stale, GET, BOTH, Again),
    (Stale, POST_NO_COPY, BOTH, NEVER),
    // Never reached a provider because the sidecar hop failed: the other path first, whatever
    // the method; then another endpoint.
    (NeverReached(Sidecar), POST, BOTH, OtherPath),
    (NeverReached(Sidecar), GET, BOTH, OtherPath),
    (NeverReached(Sidecar), POST, ENDPOINT, NextEndpoint),
    (NeverReached(Sidecar), POST, NONE, NEVER),
    (NeverReached(Sidecar), POST_NO_COPY, BOTH, NEVER),
    // Never reached because the provider failed (connect refused, or its PA says so): another
    // endpoint first, whatever the method; then the other path.
    (NeverReached(Provider), POST, BOTH, NextEndpoint),
    (NeverReached(Provider), GET, BOTH, NextEndpoint),
    (NeverReached(Provider), POST, PATH, OtherPath),
    (NeverReached(Provider), POST, NONE, NEVER),
    (NeverReached(Provider), GET_NO_COPY, BOTH, NEVER),
    // Lost after it left: only an idempotent request with a copy goes again.
    (Lost(Sidecar), GET, BOTH, OtherPath),
    (Lost(Sidecar), GET, ENDPOINT, NextEndpoint),
    (Lost(Sidecar), GET, NONE, UNKNOWN),
    (Lost(Sidecar), POST, BOTH, UNKNOWN),
    (Lost(Sidecar), GET_NO_COPY, BOTH, UNKNOWN),
    (Lost(Provider), GET, BOTH, NextEndpoint),
    // A provider that lost it is not tried again the other way (that is the same provider).
    (Lost(Provider), GET, PATH, UNKNOWN),
    (Lost(Provider), GET, NONE, UNKNOWN),
    (Lost(Provider), POST, BOTH, UNKNOWN),
    (Lost(Provider), POST_NO_COPY, BOTH, UNKNOWN),
    // Out of time: not repeated (a hung sidecar is left by the link, not by this decision).
    (TimedOut, GET, BOTH, LATE),
    (TimedOut, POST, NONE, LATE),
];

#[test]
fn every_row() {
    for (i, &(outcome, (idempotent, resendable), (other_path, other_endpoint), want)) in
        ROWS.iter().enumerate()
    {
        let got = decide(
            outcome,
            RequestKind {
                idempotent,
                resendable,
            },
            Alternatives {
                other_path,
                other_endpoint,
            },
        );
        assert_eq!(
            got, want,
            "row {i}: {outcome:?} idempotent={idempotent} resendable={resendable} other_path={other_path} other_endpoint={other_endpoint}"
        );
    }
}

#[test]
fn a_non_idempotent_request_is_never_sent_twice_after_it_left() {
    for part in [Sidecar, Provider] {
        for alt in [BOTH, PATH, ENDPOINT, NONE] {
            let next = decide(
                Lost(part),
                RequestKind {
                    idempotent: false,
                    resendable: true,
                },
                Alternatives {
                    other_path: alt.0,
                    other_endpoint: alt.1,
                },
            );
            assert_eq!(next, UNKNOWN, "{part:?} {alt:?}");
        }
    }
}

#[test]
fn mesh_errors_read_as_outcomes() {
    use crate::failure::MeshErrorKind as K;
    #[rustfmt::skip]
    let rows = [
        (K::MalformedRequest, Answered),
        (K::HeaderTooLarge, Answered),
        (K::BodyTimeout, Answered),
        (K::UnknownService, NeverReached(Sidecar)),
        (K::NoEndpoint, NeverReached(Sidecar)),
        (K::RegistryUnavailable, NeverReached(Sidecar)),
        (K::UpstreamConnect, NeverReached(Provider)),
        (K::UpstreamReset, Lost(Provider)),
        (K::Timeout, TimedOut),
        (K::RateLimited, Answered),
        (K::Denied, Answered),
        (K::Overloaded, Answered),
        (K::UntrustedPeer, Answered),
    ];
    assert_eq!(rows.len(), K::all().len(), "every kind has a row");
    for (kind, want) in rows {
        assert_eq!(Outcome::of_mesh_error(kind), want, "{kind}");
    }
}
