//! Hedging policies (gRFC A6 `hedgingPolicy`).

use std::time::Duration;

use grpc_resilience_core::CodeSet;
use tonic::Code;

use crate::{DEFAULT_MAX_PUSHBACK, RetryConfigError};

/// How one method is hedged (gRFC A6's `hedgingPolicy`): the first attempt
/// is sent at once, and each further one `hedging_delay` later unless a
/// response has committed the call, up to `max_attempts` in all. The first
/// response that is not a non-fatal failure commits the call and every
/// other attempt is cancelled (its stream is reset, so the server sees the
/// cancel). A failure with one of the `non_fatal_codes` (a Trailers-Only
/// response) lets the next hedge go at once.
///
/// Defaults: 3 attempts, a 50 ms delay, no non-fatal codes, the method
/// treated as idempotent, server pushback waited up to
/// [`DEFAULT_MAX_PUSHBACK`]. Hedging sends a call more than once *at the
/// same time*, so only idempotent methods may be hedged: a method marked
/// [`non_idempotent`](Self::non_idempotent) is rejected unless it also
/// sends [idempotency keys](Self::with_idempotency_keys).
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience_core::CodeSet;
/// use grpc_retry::HedgingPolicy;
/// use tonic::Code;
///
/// let reads = HedgingPolicy::default()
///     .with_max_attempts(2)
///     .with_hedging_delay(Duration::from_millis(20))
///     .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable]));
/// reads.validate()?;
/// assert_eq!(reads.hedging_delay(), Duration::from_millis(20));
/// # Ok::<(), grpc_retry::RetryConfigError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HedgingPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) hedging_delay: Duration,
    pub(crate) non_fatal_codes: CodeSet,
    pub(crate) idempotent: bool,
    pub(crate) idempotency_keys: bool,
    pub(crate) max_pushback: Duration,
}

impl Default for HedgingPolicy {
    fn default() -> Self {
        HedgingPolicy {
            max_attempts: 3,
            hedging_delay: Duration::from_millis(50),
            non_fatal_codes: CodeSet::EMPTY,
            idempotent: true,
            idempotency_keys: false,
            max_pushback: DEFAULT_MAX_PUSHBACK,
        }
    }
}

impl HedgingPolicy {
    /// Attempts in all, the first included (2 to 100).
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// The wait before each further attempt; zero sends them all at once.
    pub fn with_hedging_delay(mut self, delay: Duration) -> Self {
        self.hedging_delay = delay;
        self
    }

    /// The codes that do not commit the call: an attempt failing with one
    /// lets the next hedge go at once, and the others go on.
    pub fn with_non_fatal_codes(mut self, codes: CodeSet) -> Self {
        self.non_fatal_codes = codes;
        self
    }

    /// Marks the method as a write that must not run twice; it is then
    /// only valid with [`with_idempotency_keys`](Self::with_idempotency_keys).
    pub fn non_idempotent(mut self) -> Self {
        self.idempotent = false;
        self
    }

    /// Sends one random `idempotency-key` per logical call, the same on
    /// every attempt, so the server can deduplicate.
    pub fn with_idempotency_keys(mut self) -> Self {
        self.idempotency_keys = true;
        self
    }

    /// The longest server pushback (`grpc-retry-pushback-ms` on a
    /// non-fatal failure) that delays the next hedge; a longer one, or an
    /// invalid one, stops new hedges (attempts in flight go on).
    pub fn with_max_pushback(mut self, limit: Duration) -> Self {
        self.max_pushback = limit;
        self
    }

    /// Attempts in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The wait before each further attempt.
    pub fn hedging_delay(&self) -> Duration {
        self.hedging_delay
    }

    /// The codes that do not commit the call.
    pub fn non_fatal_codes(&self) -> CodeSet {
        self.non_fatal_codes
    }

    /// Whether the method is idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// Whether idempotency keys are sent.
    pub fn sends_idempotency_keys(&self) -> bool {
        self.idempotency_keys
    }

    /// The longest server pushback that delays the next hedge.
    pub fn max_pushback(&self) -> Duration {
        self.max_pushback
    }

    /// Checks every field.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the first bad field (prefixed
    /// `hedging.`) and its value.
    pub fn validate(&self) -> Result<(), RetryConfigError> {
        let err = |field, value: String, reason| Err(RetryConfigError::new(field, value, reason));
        if !(2..=100).contains(&self.max_attempts) {
            return err(
                "hedging.max_attempts",
                self.max_attempts.to_string(),
                "must be within [2, 100]",
            );
        }
        if self.non_fatal_codes.contains(Code::Ok) {
            return err(
                "hedging.non_fatal_codes",
                self.non_fatal_codes.to_string(),
                "OK is not a failure",
            );
        }
        if !self.idempotent && !self.idempotency_keys {
            return err(
                "hedging.idempotent",
                "false".into(),
                "a non-idempotent method may only be hedged with idempotency keys",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_policies_name_field_and_value() {
        let d = HedgingPolicy::default();
        assert!(d.validate().is_ok());
        assert!(
            d.non_idempotent()
                .with_idempotency_keys()
                .validate()
                .is_ok()
        );
        assert!(d.with_hedging_delay(Duration::ZERO).validate().is_ok());
        for (policy, expected) in [
            (d.with_max_attempts(1), "`hedging.max_attempts` = 1"),
            (d.with_max_attempts(101), "`hedging.max_attempts` = 101"),
            (
                d.with_non_fatal_codes(CodeSet::of(&[Code::Ok])),
                "`hedging.non_fatal_codes`",
            ),
            (d.non_idempotent(), "`hedging.idempotent` = false"),
        ] {
            let err = policy.validate().unwrap_err();
            assert!(err.to_string().contains(expected), "{err} / {expected}");
        }
    }
}
