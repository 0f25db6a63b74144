//! Partition settings and their validation.

use std::fmt;
use std::time::Duration;

use crate::limit::{Aimd, Gradient, Limit};

/// The settings of one partition: its limit, its wait queue and how long a
/// queued call waits at most.
///
/// Built with [`BulkheadConfig::builder`], which checks every value and
/// names the bad one; read with the getters.
///
/// ```
/// use std::time::Duration;
/// use grpc_bulkhead::{BulkheadConfig, Limit};
///
/// let config = BulkheadConfig::builder()
///     .max_concurrent(32)
///     .max_queue(64)
///     .max_wait(Duration::from_millis(50))
///     .build()?;
/// assert_eq!(config.limit(), &Limit::Fixed(32));
///
/// let err = BulkheadConfig::builder().max_concurrent(0).build().unwrap_err();
/// assert_eq!(err.field(), "max_concurrent");
/// assert_eq!(err.to_string(), "invalid bulkhead setting `max_concurrent` = 0: must be at least 1");
/// # Ok::<(), grpc_bulkhead::BulkheadConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BulkheadConfig {
    limit: Limit,
    max_queue: u32,
    max_wait: Duration,
}

impl Default for BulkheadConfig {
    /// 64 calls in flight, no queue: a call over the limit is rejected at
    /// once.
    fn default() -> Self {
        BulkheadConfig {
            limit: Limit::Fixed(64),
            max_queue: 0,
            max_wait: Duration::ZERO,
        }
    }
}

impl BulkheadConfig {
    /// A builder starting from the defaults (see [`BulkheadConfig::default`]).
    pub fn builder() -> BulkheadConfigBuilder {
        BulkheadConfigBuilder {
            config: BulkheadConfig::default(),
        }
    }

    /// The concurrency limit.
    pub fn limit(&self) -> &Limit {
        &self.limit
    }

    /// How many calls may wait for a slot; 0 means a call over the limit
    /// is rejected at once.
    pub fn max_queue(&self) -> u32 {
        self.max_queue
    }

    /// How long a queued call waits at most before it is rejected.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Checks every setting (the builder does; this is for configs changed
    /// since).
    ///
    /// # Errors
    ///
    /// [`BulkheadConfigError`] naming the first bad field and its value.
    pub fn validate(&self) -> Result<(), BulkheadConfigError> {
        let err =
            |field, value: String, reason| Err(BulkheadConfigError::new(field, value, reason));
        if self.max_queue > 0 && self.max_wait.is_zero() {
            return err(
                "max_wait",
                "0ms".into(),
                "must be greater than zero when max_queue is set",
            );
        }
        match &self.limit {
            Limit::Fixed(0) => err("max_concurrent", "0".into(), "must be at least 1"),
            Limit::Fixed(_) => Ok(()),
            Limit::Aimd(a) => validate_aimd(a),
            Limit::Gradient(g) => validate_gradient(g),
        }
    }
}

fn validate_bounds(
    prefix: &'static [&'static str; 3],
    initial: u32,
    min: u32,
    max: u32,
) -> Result<(), BulkheadConfigError> {
    if min == 0 {
        return Err(BulkheadConfigError::new(
            prefix[1],
            "0".into(),
            "must be at least 1",
        ));
    }
    if max < min {
        return Err(BulkheadConfigError::new(
            prefix[2],
            max.to_string(),
            "must be at least min_limit",
        ));
    }
    if initial < min || initial > max {
        return Err(BulkheadConfigError::new(
            prefix[0],
            initial.to_string(),
            "must be within min_limit and max_limit",
        ));
    }
    Ok(())
}

fn validate_aimd(a: &Aimd) -> Result<(), BulkheadConfigError> {
    validate_bounds(
        &["aimd.initial_limit", "aimd.min_limit", "aimd.max_limit"],
        a.initial_limit,
        a.min_limit,
        a.max_limit,
    )?;
    if !(0.5..1.0).contains(&a.backoff_ratio) {
        return Err(BulkheadConfigError::new(
            "aimd.backoff_ratio",
            a.backoff_ratio.to_string(),
            "must be within [0.5, 1)",
        ));
    }
    if a.latency_threshold.is_zero() {
        return Err(BulkheadConfigError::new(
            "aimd.latency_threshold",
            "0ms".into(),
            "must be greater than zero",
        ));
    }
    Ok(())
}

fn validate_gradient(g: &Gradient) -> Result<(), BulkheadConfigError> {
    validate_bounds(
        &[
            "gradient.initial_limit",
            "gradient.min_limit",
            "gradient.max_limit",
        ],
        g.initial_limit,
        g.min_limit,
        g.max_limit,
    )?;
    let bad =
        |field, value: f64, reason| Err(BulkheadConfigError::new(field, value.to_string(), reason));
    if !(g.smoothing > 0.0 && g.smoothing <= 1.0) {
        return bad("gradient.smoothing", g.smoothing, "must be within (0, 1]");
    }
    if !(g.tolerance >= 1.0 && g.tolerance.is_finite()) {
        return bad("gradient.tolerance", g.tolerance, "must be at least 1");
    }
    if !(g.queue_allowance >= 0.0 && g.queue_allowance.is_finite()) {
        return bad(
            "gradient.queue_allowance",
            g.queue_allowance,
            "must be zero or more",
        );
    }
    if g.short_window == 0 {
        return Err(BulkheadConfigError::new(
            "gradient.short_window",
            "0".into(),
            "must be at least 1",
        ));
    }
    if g.min_rtt_window.is_zero() {
        return Err(BulkheadConfigError::new(
            "gradient.min_rtt_window",
            "0ms".into(),
            "must be greater than zero",
        ));
    }
    Ok(())
}

/// Builds a [`BulkheadConfig`]; [`build`](BulkheadConfigBuilder::build)
/// validates it.
#[derive(Clone, Debug)]
pub struct BulkheadConfigBuilder {
    config: BulkheadConfig,
}

impl BulkheadConfigBuilder {
    /// A fixed limit: at most `n` calls in flight.
    pub fn max_concurrent(mut self, n: u32) -> Self {
        self.config.limit = Limit::Fixed(n);
        self
    }

    /// The limit, fixed or adaptive.
    pub fn limit(mut self, limit: Limit) -> Self {
        self.config.limit = limit;
        self
    }

    /// An adaptive AIMD limit (see [`Aimd`]).
    pub fn aimd(self, aimd: Aimd) -> Self {
        self.limit(Limit::Aimd(aimd))
    }

    /// An adaptive gradient limit (see [`Gradient`]).
    pub fn gradient(self, gradient: Gradient) -> Self {
        self.limit(Limit::Gradient(gradient))
    }

    /// How many calls may wait for a slot (0: none).
    pub fn max_queue(mut self, n: u32) -> Self {
        self.config.max_queue = n;
        self
    }

    /// How long a queued call waits at most (less when its deadline comes
    /// first).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config.max_wait = wait;
        self
    }

    /// The config, checked.
    ///
    /// # Errors
    ///
    /// [`BulkheadConfigError`] naming the first bad field and its value.
    pub fn build(self) -> Result<BulkheadConfig, BulkheadConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// A bulkhead setting that was rejected; it names the field and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkheadConfigError {
    partition: Option<String>,
    field: &'static str,
    value: String,
    reason: &'static str,
}

impl BulkheadConfigError {
    pub(crate) fn new(field: &'static str, value: String, reason: &'static str) -> Self {
        BulkheadConfigError {
            partition: None,
            field,
            value,
            reason,
        }
    }

    pub(crate) fn for_partition(mut self, name: &str) -> Self {
        self.partition = Some(name.to_owned());
        self
    }

    /// The rejected field, e.g. `max_concurrent` or `gradient.tolerance`.
    pub fn field(&self) -> &str {
        self.field
    }

    /// The rejected value, as text.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The partition (selector) the setting was for, if any.
    pub fn partition(&self) -> Option<&str> {
        self.partition.as_deref()
    }
}

impl fmt::Display for BulkheadConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.partition {
            Some(name) => write!(f, "invalid bulkhead setting `{name}.{}`", self.field)?,
            None => write!(f, "invalid bulkhead setting `{}`", self.field)?,
        }
        write!(f, " = {}: {}", self.value, self.reason)
    }
}

impl std::error::Error for BulkheadConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = BulkheadConfig::builder().build().unwrap();
        assert_eq!(c, BulkheadConfig::default());
        assert_eq!(c.limit(), &Limit::Fixed(64));
        assert_eq!((c.max_queue(), c.max_wait()), (0, Duration::ZERO));
        for limit in [
            Limit::Aimd(Aimd::default()),
            Limit::Gradient(Gradient::default()),
        ] {
            BulkheadConfig::builder().limit(limit).build().unwrap();
        }
    }

    #[test]
    fn bad_settings_name_field_and_value() {
        let b = BulkheadConfig::builder;
        let cases: Vec<(BulkheadConfigBuilder, &str)> = vec![
            (
                b().max_concurrent(0),
                "`max_concurrent` = 0: must be at least 1",
            ),
            (
                b().max_queue(4),
                "`max_wait` = 0ms: must be greater than zero when max_queue is set",
            ),
            (
                b().aimd(Aimd {
                    min_limit: 0,
                    ..Aimd::default()
                }),
                "`aimd.min_limit` = 0",
            ),
            (
                b().aimd(Aimd {
                    max_limit: 0,
                    min_limit: 1,
                    ..Aimd::default()
                }),
                "`aimd.max_limit` = 0: must be at least min_limit",
            ),
            (
                b().aimd(Aimd {
                    initial_limit: 500,
                    ..Aimd::default()
                }),
                "`aimd.initial_limit` = 500: must be within min_limit and max_limit",
            ),
            (
                b().aimd(Aimd {
                    backoff_ratio: 1.0,
                    ..Aimd::default()
                }),
                "`aimd.backoff_ratio` = 1: must be within [0.5, 1)",
            ),
            (
                b().aimd(Aimd {
                    latency_threshold: Duration::ZERO,
                    ..Aimd::default()
                }),
                "`aimd.latency_threshold` = 0ms",
            ),
            (
                b().gradient(Gradient {
                    smoothing: 0.0,
                    ..Gradient::default()
                }),
                "`gradient.smoothing` = 0: must be within (0, 1]",
            ),
            (
                b().gradient(Gradient {
                    tolerance: 0.9,
                    ..Gradient::default()
                }),
                "`gradient.tolerance` = 0.9: must be at least 1",
            ),
            (
                b().gradient(Gradient {
                    tolerance: f64::NAN,
                    ..Gradient::default()
                }),
                "`gradient.tolerance` = NaN",
            ),
            (
                b().gradient(Gradient {
                    queue_allowance: -1.0,
                    ..Gradient::default()
                }),
                "`gradient.queue_allowance` = -1",
            ),
            (
                b().gradient(Gradient {
                    short_window: 0,
                    ..Gradient::default()
                }),
                "`gradient.short_window` = 0",
            ),
            (
                b().gradient(Gradient {
                    min_rtt_window: Duration::ZERO,
                    ..Gradient::default()
                }),
                "`gradient.min_rtt_window` = 0ms",
            ),
        ];
        for (builder, expected) in cases {
            let err = builder.build().unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} should contain {expected}"
            );
        }
        let err = b()
            .max_concurrent(0)
            .build()
            .unwrap_err()
            .for_partition("catalog.v1.QueryService/*");
        assert_eq!(err.partition(), Some("catalog.v1.QueryService/*"));
        assert_eq!(err.value(), "0");
        assert_eq!(
            err.to_string(),
            "invalid bulkhead setting `catalog.v1.QueryService/*.max_concurrent` = 0: must be at least 1"
        );
    }
}
