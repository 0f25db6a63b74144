use std::sync::Arc;

use grpc_resilience_core::{MethodTable, Striped};
use tower_layer::Layer;

use crate::replay::Limits;
use crate::spare::PerService;
use crate::{Retry, RetryBudget, RetryConfigError, RetryPolicies, RetryThrottle, Shared};

/// The default per-call replay limit: 256 KiB, as grpc-go and grpc-core.
pub const DEFAULT_PER_CALL_BUFFER: usize = 256 * 1024;
/// The default limit of replay data held by all calls of one layer: 16 MiB.
pub const DEFAULT_TOTAL_BUFFER: usize = 16 * 1024 * 1024;

/// Applies [`Retry`] to a service.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    // What every service of this layer shares; each wrapped service keeps
    // it beside its prototype, striped per thread (`spare::PerService`).
    shared: Arc<Shared>,
}

impl RetryLayer {
    /// Retries as `policies` say, without throttling, with the default
    /// replay limits.
    pub fn new(policies: RetryPolicies) -> Self {
        RetryLayer {
            shared: Arc::new(Shared {
                policies,
                methods: MethodTable::default(),
                throttle: None,
                budget: None,
                limits: Arc::new(Striped::new(Arc::new(Limits::new(
                    DEFAULT_PER_CALL_BUFFER,
                    DEFAULT_TOTAL_BUFFER,
                )))),
            }),
        }
    }

    /// Throttles retries with a token bucket (gRFC A6's retry throttling).
    /// `throttle` is a handle: give clones of one throttle to every layer
    /// that calls the same target and they share its bucket.
    pub fn with_throttle(self, throttle: RetryThrottle) -> Self {
        self.rebuild(|s| s.throttle = Some(throttle))
    }

    /// Limits retries with a [`RetryBudget`]: a share of recent calls plus
    /// a minimum rate. `budget` is a handle: give clones of one budget to
    /// every layer that calls the same target. With a throttle as well, a
    /// retry is sent only when both allow it.
    pub fn with_budget(self, budget: RetryBudget) -> Self {
        self.rebuild(|s| s.budget = Some(budget))
    }

    /// Sets how many request bytes one call (`per_call`) and all calls
    /// together (`total`) may hold for replay. A call over either limit is
    /// still sent; it is just not retried.
    ///
    /// The bytes held never exceed `total`. So that calls on different
    /// cores do not all update one shared count, each thread takes a little
    /// of the total ahead of need and uses it for its calls (each of eight
    /// stripes of threads keeps at most 2 × `total` / 256, and 128 KiB,
    /// once its calls settle); a call that does not fit while other
    /// threads hold such credit takes it back before it is refused: a call
    /// is refused only when the bytes held, and any credit another thread
    /// takes at that same moment, leave no room for it.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] if `per_call` is zero or `total` is less than
    /// `per_call`.
    pub fn with_buffer_limits(
        self,
        per_call: usize,
        total: usize,
    ) -> Result<Self, RetryConfigError> {
        if per_call == 0 {
            return Err(RetryConfigError::new(
                "buffer.per_call",
                "0".into(),
                "must be at least 1 byte",
            ));
        }
        if total < per_call {
            return Err(RetryConfigError::new(
                "buffer.total",
                total.to_string(),
                "must be at least the per-call limit",
            ));
        }
        Ok(self.rebuild(|s| {
            s.limits = Arc::new(Striped::new(Arc::new(Limits::new(per_call, total))));
        }))
    }

    fn rebuild(self, f: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = Shared {
            policies: self.shared.policies.clone(),
            // Worked out afresh for the layer it builds.
            methods: MethodTable::default(),
            throttle: self.shared.throttle.clone(),
            budget: self.shared.budget.clone(),
            limits: self.shared.limits.clone(),
        };
        f(&mut shared);
        RetryLayer {
            shared: Arc::new(shared),
        }
    }

    /// The state every service of this layer shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The throttle, if any, to read its tokens.
    pub fn throttle(&self) -> Option<&RetryThrottle> {
        self.shared.throttle.as_ref()
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<&RetryBudget> {
        self.shared.budget.as_ref()
    }

    /// Request bytes held for replay by this layer's calls now. Exact when
    /// no call is starting or ending at that moment; else it may be off by
    /// what those calls are taking or giving back.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.limits.in_use()
    }
}

impl<S: Clone> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            shared: PerService::new(self.shared().clone(), &inner),
            inner,
            last: Default::default(),
        }
    }
}
