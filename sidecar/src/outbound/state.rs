//! What the CA holds beside its routing: the registry's documents it follows, its upstream
//! connection pools, and per service routed its balancer, golden metrics, policy and retry
//! budget.

use detour_proto::sync::Mutex;
use std::sync::Arc;
use tokio::time::Instant;

use detour_core::Pool;
use detour_core::transport::Target;
use detour_proto::ServiceName;

use crate::outbound::balance::Balancer;
use crate::outbound::budget::RetryBudget;
use crate::outbound::gray::Gray;
use crate::outbound::retry::{Plan, Step};
use crate::outbound::routes::Routes;
use crate::policy::{Policies, ServicePolicy};
use crate::telemetry::ServiceMetrics;

/// What the registry's documents decide for the CA.
#[derive(Clone)]
pub struct Documents {
    /// The gray rules (a service switched off goes straight to its providers).
    pub gray: Arc<Gray>,
    /// Each service's traffic policy.
    pub policies: Arc<Policies>,
    /// Each service's routes by version and label.
    pub routes: Arc<Routes>,
}

/// The CA's upstream connections.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// To providers (the direct path, C→CA→P).
    pub providers: Arc<Pool>,
    /// To PAs (mutual TLS unless plaintext is configured).
    pub pas: Arc<Pool>,
}

/// What the CA keeps per service it routes.
pub(super) struct PerService {
    /// The service's name.
    pub(super) name: ServiceName,
    /// The service's name as requests carry it to the next hop, parsed once (`None` for a
    /// name that is no authority, which the service's requests then fail on).
    pub(super) target: Option<Target>,
    /// Endpoint selection, ejections and outliers.
    pub(super) balancer: Balancer,
    /// The service's golden metrics.
    pub(super) metrics: ServiceMetrics,
    /// The policy in force and the retry budget.
    pub(super) state: Mutex<PerState>,
}

pub(super) struct PerState {
    /// Resends of requests a provider may have processed.
    pub(super) budget: RetryBudget,
    /// The service's policy, as of `generation` of the policies.
    pub(super) policy: Arc<ServicePolicy>,
    pub(super) generation: u64,
}

impl PerService {
    /// Counts a new request in the budget and returns the policy in force (re-read when the
    /// policies changed since it was last read).
    pub(super) fn begin(
        &self,
        policies: &Policies,
        service: &ServiceName,
        now: Instant,
    ) -> Arc<ServicePolicy> {
        let mut state = self.state.lock();
        let generation = policies.generation();
        if state.generation != generation {
            let policy = policies.of(service);
            if policy.budget != state.policy.budget {
                state.budget = RetryBudget::new(policy.budget, now);
            }
            state.policy = Arc::new(policy);
            state.generation = generation;
        }
        state.budget.request(now);
        state.policy.clone()
    }
}

impl PerService {
    /// The step `plan` asks for, once the retry budget has had its say (a resend it refuses
    /// gets the attempt's own error); counts try timeouts, retries and refusals.
    pub(super) fn budgeted(&self, plan: Plan) -> Step {
        if plan.try_timed_out {
            metrics::counter!("detour_try_timeouts_total").increment(1);
        }
        if !plan.budgeted {
            return plan.step;
        }
        let mut state = self.state.lock();
        let granted = state.budget.try_retry(Instant::now());
        match granted {
            true => metrics::counter!("detour_retries_total").increment(1),
            false => metrics::counter!("detour_retry_budget_exhausted_total").increment(1),
        }
        plan.with_budget(granted)
    }
}
