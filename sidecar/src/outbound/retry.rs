//! The CA's rule after a failed attempt, pure: the retry decision (`detour_core::decide`)
//! with the try timeout and the retry budget folded in. `Outbound::route` asks it once per
//! failed attempt and carries the step out; the tests below hold every row.
//!
//! - An attempt that ran out of its own time (`proxy.try_timeout_ms`) while the request's
//!   time is left counts as a request the provider may have processed: it goes elsewhere only
//!   when idempotent and kept; otherwise its timeout is the answer (not a give-up).
//! - An endpoint its PA refused as untrusted is never tried around that PA.
//! - Sending again a request a provider may have processed spends the retry budget; one the
//!   budget refuses gets the attempt's own error. A request lost with a sidecar (a PA that died
//!   or hung) goes straight to the provider without spending it: that is the mesh's failover.

use detour_core::decide::{Alternatives, Failure, Next, Outcome, Part, RequestKind, decide};

/// One failed attempt, as the rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// What became of the attempt.
    pub outcome: Outcome,
    /// The request's own time is not over (so a time-out was the attempt's).
    pub time_left: bool,
    /// The endpoint's PA was refused as untrusted.
    pub untrusted: bool,
}

/// Where the request could go besides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The attempt went through a PA and the provider may be reached around it.
    pub around_pa: bool,
    /// An endpoint not tried yet exists.
    pub other_endpoint: bool,
}

/// What the CA does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The same endpoint, the same path, a fresh connection.
    Again,
    /// The same endpoint, straight to its provider.
    OtherPath,
    /// The next endpoint; `eject`: pass this one over for a while (it was never reached).
    NextEndpoint {
        /// Whether the endpoint is ejected.
        eject: bool,
    },
    /// Answer with the attempt's own error.
    Return,
    /// Give up with the mesh's give-up error.
    GiveUp(Failure),
}

/// The step, before the retry budget has its say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The step when the budget allows it.
    pub step: Step,
    /// Whether taking the step spends the retry budget.
    pub budgeted: bool,
    /// Whether the attempt ran out of its own time.
    pub try_timed_out: bool,
}

/// The plan after `failed`, for a request of `kind` with `options`.
pub fn plan(failed: Failed, kind: RequestKind, options: Options) -> Plan {
    let try_timed_out = failed.outcome == Outcome::TimedOut && failed.time_left;
    let outcome = match try_timed_out {
        true => Outcome::Lost(Part::Provider),
        false => failed.outcome,
    };
    let alt = Alternatives {
        other_path: options.around_pa && !failed.untrusted,
        other_endpoint: options.other_endpoint,
    };
    let next = decide(outcome, kind, alt);
    let budgeted = outcome == Outcome::Lost(Part::Provider)
        && matches!(next, Next::Again | Next::OtherPath | Next::NextEndpoint);
    let step = match next {
        Next::Again => Step::Again,
        Next::OtherPath => Step::OtherPath,
        Next::NextEndpoint => Step::NextEndpoint {
            eject: matches!(outcome, Outcome::NeverReached(_)),
        },
        Next::Return => Step::Return,
        Next::Fail(_) if try_timed_out => Step::Return,
        Next::Fail(f) => Step::GiveUp(f),
    };
    Plan {
        step,
        budgeted,
        try_timed_out,
    }
}

impl Plan {
    /// The step once the budget answered (`granted`: it allowed a resend; asked only when
    /// the plan is budgeted).
    pub fn with_budget(self, granted: bool) -> Step {
        match self.budgeted && !granted {
            true => Step::Return,
            false => self.step,
        }
    }
}

/// The name of the span event a failed attempt leaves on its hop: what happens next.
pub fn event_name(step: &Step) -> &'static str {
    match step {
        Step::Again => "retry",
        Step::OtherPath => "switch_path",
        Step::NextEndpoint { .. } => "next_endpoint",
        Step::Return | Step::GiveUp(_) => "give_up",
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
