//! Per-call changes to the retry policy.

use std::time::Duration;

use grpc_resilience_core::CodeSet;

use crate::{Jitter, RetryPolicy};

/// Changes the retry policy of one call: put it in the request's
/// extensions (`tonic::Request::extensions_mut().insert(...)`). Unset
/// fields keep the method's policy (or the default policy, for a method
/// that has none).
///
/// ```
/// use std::time::Duration;
/// use grpc_retry::RetryOverride;
///
/// let mut request = tonic::Request::new(());
/// request
///     .extensions_mut()
///     .insert(RetryOverride::new().with_max_attempts(3).with_initial_delay(Duration::from_millis(200)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetryOverride {
    max_attempts: Option<u32>,
    initial_delay: Option<Duration>,
    max_delay: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<Jitter>,
    retryable_codes: Option<CodeSet>,
    max_pushback: Option<Duration>,
    pub(crate) idempotent: Option<bool>,
    pub(crate) disabled: bool,
}

impl RetryOverride {
    /// Changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// No retry for this call.
    pub fn disabled() -> Self {
        RetryOverride {
            disabled: true,
            ..Self::default()
        }
    }

    /// See [`RetryPolicy::with_max_attempts`].
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// See [`RetryPolicy::with_initial_delay`].
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = Some(d);
        self
    }

    /// See [`RetryPolicy::with_max_delay`].
    pub fn with_max_delay(mut self, d: Duration) -> Self {
        self.max_delay = Some(d);
        self
    }

    /// See [`RetryPolicy::with_multiplier`].
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = Some(m);
        self
    }

    /// See [`RetryPolicy::with_jitter`].
    pub fn with_jitter(mut self, j: Jitter) -> Self {
        self.jitter = Some(j);
        self
    }

    /// See [`RetryPolicy::with_retryable_codes`].
    pub fn with_retryable_codes(mut self, c: CodeSet) -> Self {
        self.retryable_codes = Some(c);
        self
    }

    /// See [`RetryPolicy::with_max_pushback`].
    pub fn with_max_pushback(mut self, limit: Duration) -> Self {
        self.max_pushback = Some(limit);
        self
    }

    /// Whether this call may be retried after the server saw it: `true`
    /// treats it as idempotent; `false` as not (see
    /// [`RetryPolicy::non_idempotent`]), and sends no idempotency key
    /// either, so only attempts the server provably never processed are
    /// retried.
    pub fn with_idempotent(mut self, idempotent: bool) -> Self {
        self.idempotent = Some(idempotent);
        self
    }

    pub(crate) fn apply(&self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            idempotent: self.idempotent.unwrap_or(base.idempotent),
            idempotency_keys: self.idempotent != Some(false) && base.idempotency_keys,
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            initial_delay: self.initial_delay.unwrap_or(base.initial_delay),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            jitter: self.jitter.unwrap_or(base.jitter),
            retryable_codes: self.retryable_codes.unwrap_or(base.retryable_codes),
            max_pushback: self.max_pushback.or(base.max_pushback),
        }
    }
}
