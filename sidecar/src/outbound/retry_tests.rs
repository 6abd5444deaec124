//! Every row of the CA's rule after a failed attempt.

use detour_core::decide::{Failure, Outcome, Part, RequestKind};

use super::{Failed, Options, Plan, Step, plan};

const IDEM_KEPT: RequestKind = RequestKind {
    idempotent: true,
    resendable: true,
};
const POST_KEPT: RequestKind = RequestKind {
    idempotent: false,
    resendable: true,
};
const IDEM_GONE: RequestKind = RequestKind {
    idempotent: true,
    resendable: false,
};
const BOTH: Options = Options {
    around_pa: true,
    other_endpoint: true,
};
const NONE: Options = Options {
    around_pa: false,
    other_endpoint: false,
};
const ENDPOINT_ONLY: Options = Options {
    around_pa: false,
    other_endpoint: true,
};

fn failed(outcome: Outcome) -> Failed {
    Failed {
        outcome,
        time_left: true,
        untrusted: false,
    }
}

/// (what failed, the request, the options, the plan's step, budgeted, try timed out)
#[test]
fn every_row() {
    let lost_provider = Outcome::Lost(Part::Provider);
    let lost_sidecar = Outcome::Lost(Part::Sidecar);
    let never_provider = Outcome::NeverReached(Part::Provider);
    let never_sidecar = Outcome::NeverReached(Part::Sidecar);
    let over = Failed {
        outcome: Outcome::TimedOut,
        time_left: false,
        untrusted: false,
    };
    let untrusted = Failed {
        untrusted: true,
        ..failed(never_provider)
    };
    let rows: Vec<(Failed, RequestKind, Options, Step, bool, bool)> = vec![
        // A provider that may have processed it: elsewhere only when idempotent and kept,
        // and then on the budget.
        (
            failed(lost_provider),
            IDEM_KEPT,
            BOTH,
            Step::NextEndpoint { eject: false },
            true,
            false,
        ),
        (
            failed(lost_provider),
            POST_KEPT,
            BOTH,
            Step::GiveUp(Failure::OutcomeUnknown),
            false,
            false,
        ),
        (
            failed(lost_provider),
            IDEM_GONE,
            BOTH,
            Step::GiveUp(Failure::OutcomeUnknown),
            false,
            false,
        ),
        (
            failed(lost_provider),
            IDEM_KEPT,
            NONE,
            Step::GiveUp(Failure::OutcomeUnknown),
            false,
            false,
        ),
        // Lost with the PA: straight to the provider, whatever the method, off the budget.
        (
            failed(lost_sidecar),
            IDEM_KEPT,
            BOTH,
            Step::OtherPath,
            false,
            false,
        ),
        // Never reached a provider: elsewhere whatever the method; the endpoint is ejected.
        (
            failed(never_provider),
            POST_KEPT,
            BOTH,
            Step::NextEndpoint { eject: true },
            false,
            false,
        ),
        (
            failed(never_provider),
            POST_KEPT,
            NONE,
            Step::GiveUp(Failure::NeverReached),
            false,
            false,
        ),
        (
            failed(never_sidecar),
            POST_KEPT,
            BOTH,
            Step::OtherPath,
            false,
            false,
        ),
        // Untrusted PA: never around it.
        (
            untrusted,
            POST_KEPT,
            Options {
                around_pa: true,
                other_endpoint: false,
            },
            Step::GiveUp(Failure::NeverReached),
            false,
            false,
        ),
        (
            untrusted,
            POST_KEPT,
            BOTH,
            Step::NextEndpoint { eject: true },
            false,
            false,
        ),
        // The attempt's own time-out, request time left: a possibly processed request.
        (
            failed(Outcome::TimedOut),
            IDEM_KEPT,
            ENDPOINT_ONLY,
            Step::NextEndpoint { eject: false },
            true,
            true,
        ),
        (
            failed(Outcome::TimedOut),
            POST_KEPT,
            ENDPOINT_ONLY,
            Step::Return,
            false,
            true,
        ),
        (
            failed(Outcome::TimedOut),
            IDEM_KEPT,
            NONE,
            Step::Return,
            false,
            true,
        ),
        // The request's own time is over: a give-up as timed out.
        (
            over,
            IDEM_KEPT,
            BOTH,
            Step::GiveUp(Failure::TimedOut),
            false,
            false,
        ),
        // An answer is handed on.
        (
            failed(Outcome::Answered),
            IDEM_KEPT,
            BOTH,
            Step::Return,
            false,
            false,
        ),
    ];
    for (i, (f, kind, options, step, budgeted, try_timed_out)) in rows.into_iter().enumerate() {
        let want = Plan {
            step,
            budgeted,
            try_timed_out,
        };
        assert_eq!(
            plan(f, kind, options),
            want,
            "row {i}: {f:?} {kind:?} {options:?}"
        );
    }
}

#[test]
fn the_budget_turns_a_budgeted_resend_into_the_attempts_own_error() {
    let p = plan(failed(Outcome::Lost(Part::Provider)), IDEM_KEPT, BOTH);
    assert!(p.budgeted);
    assert_eq!(p.with_budget(true), Step::NextEndpoint { eject: false });
    assert_eq!(p.with_budget(false), Step::Return);
    // A failover around a PA is not the budget's to refuse.
    let p = plan(failed(Outcome::Lost(Part::Sidecar)), IDEM_KEPT, BOTH);
    assert_eq!(p.with_budget(false), Step::OtherPath);
}
