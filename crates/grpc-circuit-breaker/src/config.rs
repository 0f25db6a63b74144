//! Breaker settings and their validation.

use std::fmt;
use std::time::Duration;

use grpc_resilience_core::CodeSet;
use tonic::Code;

use crate::events::Trigger;

/// The most probes HALF_OPEN can admit (`half_open_max_calls`, or
/// `success_threshold` when that is not set).
pub const MAX_PROBES: u32 = 10_000;

/// The largest `failure_threshold` and failure-rate `window`.
pub const MAX_WINDOW: u32 = 1_000_000;

/// The codes that count as failures by default: the server is in trouble,
/// not the request. Client errors (`INVALID_ARGUMENT`, `NOT_FOUND`,
/// `ALREADY_EXISTS`, `PERMISSION_DENIED`, `UNAUTHENTICATED`,
/// `FAILED_PRECONDITION`, `OUT_OF_RANGE`, `UNIMPLEMENTED`, ...) count as
/// successes, and a caller's cancellation counts as nothing.
pub const DEFAULT_FAILURE_CODES: CodeSet = CodeSet::EMPTY
    .with(Code::Unavailable)
    .with(Code::DeadlineExceeded)
    .with(Code::Internal)
    .with(Code::Unknown)
    .with(Code::ResourceExhausted)
    .with(Code::DataLoss);

/// The failure-rate trip mode, as resilience4j's: over a sliding window of
/// the last `window` calls, the breaker opens when at least
/// `minimum_calls` were seen and the failure rate, or the slow-call rate,
/// reaches its threshold.
///
/// In this mode HALF_OPEN judges a sample: it admits
/// `half_open_max_calls` probes (by default `success_threshold` of them)
/// and, once they have all finished, closes when their failure rate and
/// slow-call rate are below the thresholds and opens again otherwise. It
/// opens as soon as the failures alone reach the failure rate of the whole
/// sample. A cancelled probe gives its place to another.
///
/// A call is slow when its response headers (the first byte of the answer)
/// take at least `slow_call_duration`: a long server stream that answered
/// at once is not slow, however long it then streams.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureRate {
    /// How many of the most recent calls the window holds.
    pub window: u32,
    /// Calls the window must hold before a rate can open the breaker.
    pub minimum_calls: u32,
    /// Failure rate in percent, within (0, 100], that opens the breaker.
    pub failure_rate: f64,
    /// A call whose response headers take at least this long is slow.
    /// `None`: no slow-call detection.
    pub slow_call_duration: Option<Duration>,
    /// Slow-call rate in percent, within (0, 100], that opens the breaker.
    pub slow_call_rate: f64,
}

impl FailureRate {
    /// Why `calls` calls with these failures and slow calls open the
    /// breaker, if they do.
    pub(crate) fn trips(&self, calls: u32, failures: u32, slow: u32) -> Option<Trigger> {
        let percent = |n: u32| f64::from(n) * 100.0 / f64::from(calls.max(1));
        if failures > 0 && percent(failures) >= self.failure_rate {
            Some(Trigger::FailureRate {
                percent: percent(failures),
                calls,
            })
        } else if self.slow_call_duration.is_some()
            && slow > 0
            && percent(slow) >= self.slow_call_rate
        {
            Some(Trigger::SlowCallRate {
                percent: percent(slow),
                calls,
            })
        } else {
            None
        }
    }
}

impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            window: 100,
            minimum_calls: 10,
            failure_rate: 50.0,
            slow_call_duration: None,
            slow_call_rate: 100.0,
        }
    }
}

/// The settings of one breaker. The defaults: `failure_threshold` 5,
/// `success_threshold` 2, `timeout` 30 s, `reset_timeout` 60 s, failures
/// counted by number (not rate), and HALF_OPEN admits `success_threshold`
/// probes: the two successes in a row that close it, and any failure
/// reopens it (count mode). In the failure-rate mode HALF_OPEN judges its
/// probes as a sample instead (see [`FailureRate`]).
///
/// Durations are exact up to `u64::MAX` milliseconds; a longer `timeout`
/// means the breaker never half-opens on its own.
///
/// ```
/// use std::time::Duration;
/// use grpc_circuit_breaker::BreakerConfig;
///
/// let config = BreakerConfig::default()
///     .with_failure_threshold(3)
///     .with_timeout(Duration::from_secs(10));
/// config.validate()?;
/// # Ok::<(), grpc_circuit_breaker::BreakerConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    pub(crate) failure_threshold: u32,
    pub(crate) success_threshold: u32,
    pub(crate) timeout: Duration,
    pub(crate) reset_timeout: Duration,
    pub(crate) half_open_max_calls: Option<u32>,
    pub(crate) failure_rate: Option<FailureRate>,
    pub(crate) failure_codes: CodeSet,
    pub(crate) latency_metric: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            success_threshold: 2,
            timeout: Duration::from_secs(30),
            reset_timeout: Duration::from_secs(60),
            half_open_max_calls: None,
            failure_rate: None,
            failure_codes: DEFAULT_FAILURE_CODES,
            latency_metric: true,
        }
    }
}

impl BreakerConfig {
    /// CLOSED opens after this many failures within `reset_timeout`.
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// In count mode, HALF_OPEN closes after this many successful probes.
    /// In the failure-rate mode it is the default number of probes.
    pub fn with_success_threshold(mut self, n: u32) -> Self {
        self.success_threshold = n;
        self
    }

    /// Time in OPEN before the breaker lets probes through (HALF_OPEN).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Failures in CLOSED older than this are forgotten (counted in 16
    /// buckets, so to within a sixteenth of it).
    pub fn with_reset_timeout(mut self, reset_timeout: Duration) -> Self {
        self.reset_timeout = reset_timeout;
        self
    }

    /// How many probes HALF_OPEN admits (default: `success_threshold`; at
    /// most [`MAX_PROBES`]). A probe that is cancelled gives its place back.
    /// In count mode it must be at least `success_threshold`; in the
    /// failure-rate mode it is the size of the sample HALF_OPEN judges.
    pub fn with_half_open_max_calls(mut self, n: u32) -> Self {
        self.half_open_max_calls = Some(n);
        self
    }

    /// Opens on a failure rate over a sliding window instead of on a count
    /// of failures.
    pub fn with_failure_rate(mut self, rate: FailureRate) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// The status codes that count as failures (default
    /// [`DEFAULT_FAILURE_CODES`]). Errors without a status from the server
    /// (transport errors) are failures when their code, usually
    /// `UNAVAILABLE`, is in the set.
    pub fn with_failure_codes(mut self, codes: CodeSet) -> Self {
        self.failure_codes = codes;
        self
    }

    /// Whether each call is timed for the `circuit_breaker.call.latency`
    /// histogram (default: on). Off, a call through the breaker reads the
    /// clock only when a slow-call threshold
    /// ([`FailureRate::slow_call_duration`]) needs its latency: two clock
    /// reads fewer per call where nobody reads the histogram.
    pub fn with_latency_metric(mut self, on: bool) -> Self {
        self.latency_metric = on;
        self
    }

    /// Whether calls are timed: for the latency histogram or for a
    /// slow-call threshold.
    pub(crate) fn times_calls(&self) -> bool {
        self.latency_metric
            || self
                .failure_rate
                .as_ref()
                .is_some_and(|rate| rate.slow_call_duration.is_some())
    }

    pub(crate) fn half_open_max(&self) -> u32 {
        self.half_open_max_calls.unwrap_or(self.success_threshold)
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`BreakerConfigError`] naming the first bad field and its value.
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        let err = |field, value: String, reason| Err(BreakerConfigError::new(field, value, reason));
        if self.failure_threshold == 0 {
            return err("failure_threshold", "0".into(), "must be at least 1");
        }
        if self.failure_threshold > MAX_WINDOW {
            return err(
                "failure_threshold",
                self.failure_threshold.to_string(),
                "must be at most 1000000",
            );
        }
        if self.success_threshold == 0 {
            return err("success_threshold", "0".into(), "must be at least 1");
        }
        if self.timeout.is_zero() {
            return err("timeout", "0ms".into(), "must be greater than zero");
        }
        if self.reset_timeout.is_zero() {
            return err("reset_timeout", "0ms".into(), "must be greater than zero");
        }
        let max = self.half_open_max();
        if max == 0 {
            return err("half_open_max_calls", "0".into(), "must be at least 1");
        }
        if max > MAX_PROBES {
            let field = match self.half_open_max_calls {
                Some(_) => "half_open_max_calls",
                None => "success_threshold",
            };
            return err(field, max.to_string(), "must be at most 10000");
        }
        if self.failure_rate.is_none() && max < self.success_threshold {
            return err(
                "half_open_max_calls",
                max.to_string(),
                "must be at least success_threshold, or the breaker could never close",
            );
        }
        if self.failure_codes.is_empty() {
            return err("failure_codes", "[]".into(), "must name at least one code");
        }
        if self.failure_codes.contains(Code::Ok) {
            return err(
                "failure_codes",
                self.failure_codes.to_string(),
                "OK cannot be a failure",
            );
        }
        if let Some(rate) = &self.failure_rate {
            let percent = |v: f64| v > 0.0 && v <= 100.0;
            if rate.window == 0 {
                return err("failure_rate.window", "0".into(), "must be at least 1");
            }
            if rate.window > MAX_WINDOW {
                return err(
                    "failure_rate.window",
                    rate.window.to_string(),
                    "must be at most 1000000",
                );
            }
            if rate.minimum_calls == 0 || rate.minimum_calls > rate.window {
                return err(
                    "failure_rate.minimum_calls",
                    rate.minimum_calls.to_string(),
                    "must be within 1 and the window size",
                );
            }
            // NaN fails these comparisons too.
            if !percent(rate.failure_rate) {
                return err(
                    "failure_rate.failure_rate",
                    rate.failure_rate.to_string(),
                    "must be within (0, 100]",
                );
            }
            if !percent(rate.slow_call_rate) {
                return err(
                    "failure_rate.slow_call_rate",
                    rate.slow_call_rate.to_string(),
                    "must be within (0, 100]",
                );
            }
            if rate.slow_call_duration.is_some_and(|d| d.is_zero()) {
                return err(
                    "failure_rate.slow_call_duration",
                    "0ms".into(),
                    "must be greater than zero",
                );
            }
        }
        Ok(())
    }
}

/// A breaker setting that was rejected; it names the field and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfigError {
    breaker: Option<String>,
    field: &'static str,
    value: String,
    reason: &'static str,
}

impl BreakerConfigError {
    fn new(field: &'static str, value: String, reason: &'static str) -> Self {
        BreakerConfigError {
            breaker: None,
            field,
            value,
            reason,
        }
    }

    pub(crate) fn for_breaker(mut self, name: &str) -> Self {
        self.breaker = Some(name.to_owned());
        self
    }

    /// The rejected field, e.g. `failure_threshold`.
    pub fn field(&self) -> &str {
        self.field
    }

    /// The rejected value, as text.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for BreakerConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.breaker {
            Some(name) => write!(f, "invalid circuit breaker setting `{name}.{}`", self.field)?,
            None => write!(f, "invalid circuit breaker setting `{}`", self.field)?,
        }
        write!(f, " = {}: {}", self.value, self.reason)
    }
}

impl std::error::Error for BreakerConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_designs_and_valid() {
        let c = BreakerConfig::default();
        assert_eq!((c.failure_threshold, c.success_threshold), (5, 2));
        assert_eq!(
            (c.timeout, c.reset_timeout),
            (Duration::from_secs(30), Duration::from_secs(60))
        );
        assert_eq!(c.half_open_max(), 2);
        assert!(c.validate().is_ok());
        assert!(c.failure_codes.contains(Code::Unavailable));
        assert!(!c.failure_codes.contains(Code::NotFound));
    }

    #[test]
    fn bad_settings_name_field_and_value() {
        let cases: Vec<(BreakerConfig, &str)> = vec![
            (
                BreakerConfig::default().with_failure_threshold(0),
                "`failure_threshold` = 0: must be at least 1",
            ),
            (
                BreakerConfig::default().with_success_threshold(0),
                "`success_threshold` = 0",
            ),
            (
                BreakerConfig::default().with_timeout(Duration::ZERO),
                "`timeout` = 0ms",
            ),
            (
                BreakerConfig::default().with_reset_timeout(Duration::ZERO),
                "`reset_timeout` = 0ms",
            ),
            (
                BreakerConfig::default().with_half_open_max_calls(0),
                "`half_open_max_calls` = 0",
            ),
            (
                BreakerConfig::default().with_half_open_max_calls(1),
                "`half_open_max_calls` = 1: must be at least success_threshold",
            ),
            (
                BreakerConfig::default().with_half_open_max_calls(10_001),
                "`half_open_max_calls` = 10001: must be at most 10000",
            ),
            (
                BreakerConfig::default()
                    .with_success_threshold(20_000)
                    .with_half_open_max_calls(20_000),
                "`half_open_max_calls` = 20000",
            ),
            (
                BreakerConfig::default().with_success_threshold(20_000),
                "`success_threshold` = 20000: must be at most 10000",
            ),
            (
                BreakerConfig::default().with_failure_threshold(2_000_000),
                "`failure_threshold` = 2000000: must be at most 1000000",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    window: 2_000_000,
                    ..FailureRate::default()
                }),
                "`failure_rate.window` = 2000000",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    failure_rate: f64::NAN,
                    ..FailureRate::default()
                }),
                "`failure_rate.failure_rate` = NaN",
            ),
            (
                BreakerConfig::default().with_failure_codes(CodeSet::EMPTY),
                "`failure_codes` = []",
            ),
            (
                BreakerConfig::default()
                    .with_failure_codes(CodeSet::of(&[Code::Ok, Code::Internal])),
                "OK cannot be a failure",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    failure_rate: 0.0,
                    ..FailureRate::default()
                }),
                "`failure_rate.failure_rate` = 0: must be within (0, 100]",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    failure_rate: 150.0,
                    ..FailureRate::default()
                }),
                "`failure_rate.failure_rate` = 150",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    window: 0,
                    ..FailureRate::default()
                }),
                "`failure_rate.window` = 0",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    minimum_calls: 101,
                    ..FailureRate::default()
                }),
                "`failure_rate.minimum_calls` = 101",
            ),
            (
                BreakerConfig::default().with_failure_rate(FailureRate {
                    slow_call_duration: Some(Duration::ZERO),
                    ..FailureRate::default()
                }),
                "`failure_rate.slow_call_duration` = 0ms",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
        let err = BreakerConfig::default()
            .with_failure_threshold(0)
            .validate()
            .unwrap_err()
            .for_breaker("command");
        assert_eq!(
            err.to_string(),
            "invalid circuit breaker setting `command.failure_threshold` = 0: must be at least 1"
        );
    }
}
