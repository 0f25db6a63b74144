use std::sync::Arc;

use tower_layer::Layer;

use crate::{Scope, Timeout, TimeoutPolicy};

/// Applies [`Timeout`] to a service.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    policy: Arc<TimeoutPolicy>,
    scope: Scope,
}

impl TimeoutLayer {
    /// A layer enforcing `policy` as the deadline of each whole call.
    pub fn new(policy: TimeoutPolicy) -> Self {
        TimeoutLayer {
            policy: Arc::new(policy),
            scope: Scope::Call,
        }
    }

    /// Enforces the policy per attempt instead of per call: for use below
    /// a retry layer, as Envoy's per-try timeout. Each attempt's deadline is
    /// the earlier of now plus its configured timeout and the call's
    /// deadline (the [`CallDeadline`](crate::CallDeadline) on the attempt's
    /// request, else its `grpc-timeout`), and is recorded on the attempt's
    /// request.
    pub fn per_attempt(mut self) -> Self {
        self.scope = Scope::Attempt;
        self
    }

    /// The policy this layer enforces.
    pub fn policy(&self) -> &TimeoutPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::from_parts(inner, self.policy.clone(), self.scope)
    }
}
