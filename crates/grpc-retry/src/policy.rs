//! Retry policies per method and their validation.

use std::fmt;
use std::time::Duration;

use grpc_resilience_core::{CodeSet, MethodId, MethodMap, Selector};
use tonic::Code;

use crate::HedgingPolicy;
use crate::backoff::Jitter;

/// The codes retried by default: `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
/// `RESOURCE_EXHAUSTED`, `ABORTED`, `INTERNAL`.
pub const DEFAULT_RETRYABLE_CODES: CodeSet = CodeSet::EMPTY
    .with(Code::Unavailable)
    .with(Code::DeadlineExceeded)
    .with(Code::ResourceExhausted)
    .with(Code::Aborted)
    .with(Code::Internal);

/// How one method is retried. The defaults: 3 attempts, 100 ms initial
/// delay, 5 s maximum, multiplier 2, ±20 % jitter ([`Jitter`] says why),
/// the [`DEFAULT_RETRYABLE_CODES`], server pushback waited up to the larger
/// of `max_delay` and 10 s ([`RetryPolicy::with_max_pushback`]), and the
/// method treated as idempotent.
///
/// ```
/// use std::time::Duration;
/// use grpc_retry::{Jitter, RetryPolicy};
///
/// let writes = RetryPolicy::default()
///     .with_max_attempts(5)
///     .with_jitter(Jitter::Full)
///     .non_idempotent()
///     .with_idempotency_keys();
/// writes.validate()?;
/// # Ok::<(), grpc_retry::RetryConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial_delay: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: Jitter,
    pub(crate) retryable_codes: CodeSet,
    pub(crate) idempotent: bool,
    pub(crate) idempotency_keys: bool,
    pub(crate) max_pushback: Option<Duration>,
}

/// Without [`RetryPolicy::with_max_pushback`], a pushback is waited up to
/// the larger of `max_delay` and this.
pub const DEFAULT_MAX_PUSHBACK: Duration = Duration::from_secs(10);

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(5000),
            multiplier: 2.0,
            jitter: Jitter::Proportional(0.2),
            retryable_codes: DEFAULT_RETRYABLE_CODES,
            idempotent: true,
            idempotency_keys: false,
            max_pushback: None,
        }
    }
}

impl RetryPolicy {
    /// Attempts in all, the first included (at least 1; 1 means no retry).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The delay before the first retry.
    pub fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// The longest delay between attempts, jitter included.
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// How much each delay grows: retry `n` waits
    /// `min(initial * multiplier^(n-1), max_delay)` before jitter.
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// How delays are randomised.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The status codes that are retried.
    pub fn with_retryable_codes(mut self, codes: CodeSet) -> Self {
        self.retryable_codes = codes;
        self
    }

    /// Marks the method as a write that must not run twice: only calls the
    /// server provably never processed are retried (a refused connection,
    /// a refused stream), unless idempotency keys are on.
    pub fn non_idempotent(mut self) -> Self {
        self.idempotent = false;
        self
    }

    /// Sends an `idempotency-key` header, one random key per logical call
    /// and the same on every attempt, so the server can deduplicate; with
    /// it a non-idempotent method is retried like any other.
    pub fn with_idempotency_keys(mut self) -> Self {
        self.idempotency_keys = true;
        self
    }

    /// The longest server pushback (`grpc-retry-pushback-ms`) that is
    /// waited; a server asking for a longer pause is not retried and the
    /// caller gets its status at once. A pushback is also never waited past
    /// the call's deadline.
    ///
    /// The default is the larger of `max_delay` and [`DEFAULT_MAX_PUSHBACK`]
    /// (10 s): a server may ask for more than the policy's own longest
    /// backoff, but a server that asks for longer than that is saying "not
    /// soon", and a caller blocked for it (with no deadline, for as long as
    /// the server says) is worse off than one holding the status, free to
    /// decide itself.
    pub fn with_max_pushback(mut self, limit: Duration) -> Self {
        self.max_pushback = Some(limit);
        self
    }

    /// The longest server pushback that is waited; see
    /// [`with_max_pushback`](Self::with_max_pushback).
    pub fn max_pushback(&self) -> Duration {
        self.max_pushback
            .unwrap_or_else(|| self.max_delay.max(DEFAULT_MAX_PUSHBACK))
    }

    /// Whether a failed attempt with a status may be retried at all.
    pub(crate) fn retries_statuses(&self) -> bool {
        self.idempotent || self.idempotency_keys
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the first bad field and its value.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        let err = |field, value: String, reason| Err(RetryConfigError::new(field, value, reason));
        if self.max_attempts == 0 {
            return err(
                "max_attempts",
                "0".into(),
                "must be at least 1 (1 means no retry)",
            );
        }
        if self.max_attempts > 100 {
            return err(
                "max_attempts",
                self.max_attempts.to_string(),
                "must be at most 100",
            );
        }
        if self.initial_delay.is_zero() {
            return err("initial_delay", "0ms".into(), "must be greater than zero");
        }
        if self.max_delay.is_zero() {
            return err("max_delay", "0ms".into(), "must be greater than zero");
        }
        if self.max_delay < self.initial_delay {
            return err(
                "max_delay",
                format!("{:?}", self.max_delay),
                "must not be less than initial_delay",
            );
        }
        if !self.multiplier.is_finite() || self.multiplier <= 0.0 {
            return err(
                "multiplier",
                self.multiplier.to_string(),
                "must be a finite number above 0",
            );
        }
        if let Jitter::Proportional(f) = self.jitter
            && !(f.is_finite() && (0.0..=1.0).contains(&f))
        {
            return err(
                "jitter",
                f.to_string(),
                "a proportional jitter must be within [0, 1]",
            );
        }
        if self.retryable_codes.is_empty() {
            return err(
                "retryable_codes",
                "[]".into(),
                "must name at least one code",
            );
        }
        if self.retryable_codes.contains(Code::Ok) {
            return err(
                "retryable_codes",
                self.retryable_codes.to_string(),
                "OK is not an error and cannot be retried",
            );
        }
        Ok(())
    }
}

/// Retry policies per method: a default plus per-operation policies,
/// matched as the rest of the workspace matches methods (`GetProduct`,
/// `catalog.v1.QueryService/*`, `catalog.v1.QueryService/GetProduct`, `*`).
/// Methods without a policy are not retried and pass straight through.
///
/// ```
/// use grpc_retry::{RetryPolicies, RetryPolicy};
///
/// let policies = RetryPolicies::new(RetryPolicy::default())?
///     .with_operation("CreateProduct", RetryPolicy::default().non_idempotent())?
///     .without_retry("ImportProducts")?;
/// # Ok::<(), grpc_retry::RetryConfigError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct RetryPolicies {
    map: MethodMap<Option<MethodPolicy>>,
}

/// What a method has: a retry policy or a hedging policy, never both (gRFC
/// A6).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum MethodPolicy {
    Retry(RetryPolicy),
    Hedge(HedgingPolicy),
}

impl RetryPolicies {
    /// Every method retried with `default`.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] if `default` is invalid.
    pub fn new(default: RetryPolicy) -> Result<Self, RetryConfigError> {
        Self::none().with_operation("*", default)
    }

    /// No method retried until one is added.
    pub fn none() -> Self {
        Self::default()
    }

    /// Retries the methods `selector` names with `policy`.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the selector if it is malformed or given
    /// twice, or the policy is invalid.
    pub fn with_operation(
        self,
        selector: &str,
        policy: RetryPolicy,
    ) -> Result<Self, RetryConfigError> {
        policy.validate().map_err(|e| e.for_operation(selector))?;
        self.insert(selector, Some(MethodPolicy::Retry(policy)))
    }

    /// Hedges the methods `selector` names with `policy` instead of
    /// retrying them (a method has one or the other, as gRFC A6 says).
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the selector if it is malformed or given
    /// twice, or the policy is invalid (a non-idempotent method without
    /// idempotency keys included).
    pub fn with_hedging(
        self,
        selector: &str,
        policy: HedgingPolicy,
    ) -> Result<Self, RetryConfigError> {
        policy.validate().map_err(|e| e.for_operation(selector))?;
        self.insert(selector, Some(MethodPolicy::Hedge(policy)))
    }

    /// Does not retry the methods `selector` names, overriding a less
    /// specific policy.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] if the selector is malformed or given twice.
    pub fn without_retry(self, selector: &str) -> Result<Self, RetryConfigError> {
        self.insert(selector, None)
    }

    fn insert(
        mut self,
        selector: &str,
        policy: Option<MethodPolicy>,
    ) -> Result<Self, RetryConfigError> {
        let parsed: Selector = selector.parse().map_err(|e| {
            RetryConfigError::new("operation", selector.to_owned(), "").with_detail(format!("{e}"))
        })?;
        self.map.insert(parsed, policy).map_err(|e| {
            RetryConfigError::new("operation", selector.to_owned(), "").with_detail(e.to_string())
        })?;
        Ok(self)
    }

    /// The retry policy for a method; `None` when it is not retried (or
    /// is hedged).
    pub fn policy_for(&self, path: &str) -> Option<&RetryPolicy> {
        match self.map.get_path(path) {
            Some(Some(MethodPolicy::Retry(p))) => Some(p),
            _ => None,
        }
    }

    /// The hedging policy for a method; `None` when it is not hedged.
    pub fn hedging_policy_for(&self, path: &str) -> Option<&HedgingPolicy> {
        match self.map.get_path(path) {
            Some(Some(MethodPolicy::Hedge(p))) => Some(p),
            _ => None,
        }
    }

    pub(crate) fn get(&self, method: &MethodId<'_>) -> Option<&MethodPolicy> {
        self.map.get(method).and_then(Option::as_ref)
    }
}

/// A retry setting that was rejected; it names the field and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryConfigError {
    operation: Option<String>,
    field: &'static str,
    value: String,
    reason: String,
}

impl RetryConfigError {
    pub(crate) fn new(field: &'static str, value: String, reason: &str) -> Self {
        RetryConfigError {
            operation: None,
            field,
            value,
            reason: reason.to_owned(),
        }
    }

    fn with_detail(mut self, detail: String) -> Self {
        self.reason = detail;
        self
    }

    fn for_operation(mut self, selector: &str) -> Self {
        self.operation = Some(selector.to_owned());
        self
    }

    /// The rejected field, e.g. `max_attempts`.
    pub fn field(&self) -> &str {
        self.field
    }

    /// The rejected value, as text.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for RetryConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.operation {
            Some(op) => write!(f, "invalid retry setting `{}` for `{op}`", self.field)?,
            None => write!(f, "invalid retry setting `{}`", self.field)?,
        }
        write!(f, " = {}: {}", self.value, self.reason)
    }
}

impl std::error::Error for RetryConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.initial_delay, Duration::from_millis(100));
        assert_eq!(p.max_delay, Duration::from_millis(5000));
        assert_eq!(p.multiplier, 2.0);
        assert!(p.validate().is_ok());
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ] {
            assert!(p.retryable_codes.contains(code));
        }
        assert!(!p.retryable_codes.contains(Code::NotFound));
    }

    #[test]
    fn invalid_policies_name_field_and_value() {
        let d = RetryPolicy::default();
        let cases = [
            (d.with_max_attempts(0), "`max_attempts` = 0"),
            (
                d.with_initial_delay(Duration::ZERO),
                "`initial_delay` = 0ms",
            ),
            (d.with_max_delay(Duration::ZERO), "`max_delay` = 0ms"),
            (
                d.with_initial_delay(Duration::from_secs(2))
                    .with_max_delay(Duration::from_secs(1)),
                "`max_delay` = 1s: must not be less than initial_delay",
            ),
            (d.with_multiplier(0.0), "`multiplier` = 0"),
            (d.with_multiplier(-1.5), "`multiplier` = -1.5"),
            (d.with_multiplier(f64::NAN), "`multiplier` = NaN"),
            (d.with_multiplier(f64::INFINITY), "`multiplier` = inf"),
            (d.with_jitter(Jitter::Proportional(1.5)), "`jitter` = 1.5"),
            (
                d.with_retryable_codes(CodeSet::EMPTY),
                "`retryable_codes` = []",
            ),
            (
                d.with_retryable_codes(CodeSet::of(&[Code::Ok, Code::Unavailable])),
                "OK is not an error",
            ),
        ];
        for (policy, expected) in cases {
            let err = policy.validate().unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
        let err = RetryPolicies::none()
            .with_operation("GetProduct", d.with_max_attempts(0))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid retry setting `max_attempts` for `GetProduct` = 0: must be at least 1 (1 means no retry)"
        );
        let err = RetryPolicies::none()
            .with_operation("Get Product", d)
            .unwrap_err();
        assert!(err.to_string().contains("`Get Product`"), "{err}");
    }

    #[test]
    fn policies_match_methods() {
        let policies = RetryPolicies::new(RetryPolicy::default())
            .and_then(|p| {
                p.with_operation("CreateProduct", RetryPolicy::default().non_idempotent())
            })
            .and_then(|p| p.without_retry("ImportProducts"))
            .unwrap();
        assert!(
            policies
                .policy_for("/catalog.v1.QueryService/GetProduct")
                .unwrap()
                .idempotent
        );
        assert!(
            !policies
                .policy_for("/catalog.v1.CommandService/CreateProduct")
                .unwrap()
                .idempotent
        );
        assert!(
            policies
                .policy_for("/catalog.v1.CommandService/ImportProducts")
                .is_none()
        );
        assert!(RetryPolicies::none().policy_for("/a.B/C").is_none());
    }
}
