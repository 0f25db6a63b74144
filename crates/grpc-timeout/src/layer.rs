use std::sync::Arc;

use tower_layer::Layer;

use crate::{Resolved, Scope, Timeout, TimeoutPolicy};

/// Applies [`Timeout`] to a service.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    policy: Arc<Resolved>,
    scope: Scope,
    head_timer: bool,
}

impl TimeoutLayer {
    /// A layer enforcing `policy` as the deadline of each whole call.
    pub fn new(policy: TimeoutPolicy) -> Self {
        TimeoutLayer {
            policy: Arc::new(Resolved::new(policy)),
            scope: Scope::Call,
            head_timer: true,
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

    /// Leaves the response head's deadline to the inner service, which must
    /// enforce the `grpc-timeout` header this layer writes, as a tonic
    /// `Channel` does; keeps the timer that bounds the response body. Saves
    /// a second timer per call that waits. See
    /// [One timer with a tonic `Channel`](crate#one-timer-with-a-tonic-channel)
    /// for when this is safe. The channel's expiry (`tonic::TimeoutExpired`)
    /// is reported as this layer's `DEADLINE_EXCEEDED`, counted and logged
    /// as its own would be.
    pub fn rely_on_channel_for_head(mut self) -> Self {
        self.head_timer = false;
        self
    }

    /// Whether this layer arms its own timer for the response head (it
    /// does unless [`TimeoutLayer::rely_on_channel_for_head`] was used).
    pub fn times_the_head(&self) -> bool {
        self.head_timer
    }

    /// The policy this layer enforces.
    pub fn policy(&self) -> &TimeoutPolicy {
        &self.policy.policy
    }

    /// The methods worked out so far (one entry each), for tests.
    #[cfg(test)]
    pub(crate) fn methods(
        &self,
    ) -> &grpc_resilience_core::MethodTable<Option<crate::policy::Entry>> {
        &self.policy.methods
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout::from_parts(inner, self.policy.clone(), self.scope, self.head_timer)
    }
}
