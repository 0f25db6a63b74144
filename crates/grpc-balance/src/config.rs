//! Settings of a balanced channel, built in code with validation.

use std::fmt;
use std::time::Duration;

use grpc_circuit_breaker::{BreakerConfig, BreakerConfigError};

/// A setting that was rejected: names the field, the value and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    value: String,
    reason: &'static str,
}

impl ConfigError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: &'static str,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: value.into(),
            reason,
        }
    }

    /// The rejected field, e.g. `outlier.max_ejection_percent`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The rejected value, as written.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid balanced channel setting `{}` = `{}`: {}",
            self.field, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

impl From<BreakerConfigError> for ConfigError {
    fn from(err: BreakerConfigError) -> Self {
        ConfigError::new(
            format!("endpoint_breaker.{}", err.field()),
            err.value(),
            "rejected by the endpoint breaker's validation",
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Envoy-style success-rate outlier detection: every `interval`, each
/// endpoint that served at least `request_volume` calls is compared with
/// the others, and those whose success rate is below
/// `mean - stdev_factor * stdev` are ejected. Runs only when at least
/// `minimum_hosts` endpoints have enough calls.
#[derive(Clone, Debug, PartialEq)]
pub struct SuccessRate {
    interval: Duration,
    minimum_hosts: usize,
    request_volume: u64,
    stdev_factor: f64,
}

impl Default for SuccessRate {
    /// Envoy's defaults: 10 s, 5 hosts, 100 calls, factor 1.9.
    fn default() -> Self {
        SuccessRate {
            interval: Duration::from_secs(10),
            minimum_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

impl SuccessRate {
    /// How often the endpoints are compared (and their counts restarted).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How many endpoints must have `request_volume` calls for a comparison.
    pub fn with_minimum_hosts(mut self, n: usize) -> Self {
        self.minimum_hosts = n;
        self
    }

    /// Calls an endpoint needs within an interval to be judged.
    pub fn with_request_volume(mut self, n: u64) -> Self {
        self.request_volume = n;
        self
    }

    /// How many standard deviations below the mean ejects.
    pub fn with_stdev_factor(mut self, factor: f64) -> Self {
        self.stdev_factor = factor;
        self
    }

    /// See [`SuccessRate::with_interval`].
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// See [`SuccessRate::with_minimum_hosts`].
    pub fn minimum_hosts(&self) -> usize {
        self.minimum_hosts
    }

    /// See [`SuccessRate::with_request_volume`].
    pub fn request_volume(&self) -> u64 {
        self.request_volume
    }

    /// See [`SuccessRate::with_stdev_factor`].
    pub fn stdev_factor(&self) -> f64 {
        self.stdev_factor
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let f = "outlier.success_rate";
        if self.interval.is_zero() {
            return Err(ConfigError::new(
                format!("{f}.interval"),
                ms(self.interval),
                "must be greater than zero",
            ));
        }
        if self.minimum_hosts < 2 {
            return Err(ConfigError::new(
                format!("{f}.minimum_hosts"),
                self.minimum_hosts.to_string(),
                "must be at least 2 (an endpoint is compared with the others)",
            ));
        }
        if self.request_volume == 0 {
            return Err(ConfigError::new(
                format!("{f}.request_volume"),
                "0",
                "must be at least 1",
            ));
        }
        if !(self.stdev_factor.is_finite() && self.stdev_factor >= 0.0) {
            return Err(ConfigError::new(
                format!("{f}.stdev_factor"),
                self.stdev_factor.to_string(),
                "must be a finite number, zero or more",
            ));
        }
        Ok(())
    }
}

/// When an endpoint is taken out of the balancer's ready set, for how long,
/// and how it comes back.
#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    base_ejection_time: Duration,
    max_ejection_time: Duration,
    max_ejection_percent: u8,
    probe_successes: u32,
    max_probes: u32,
    success_rate: Option<SuccessRate>,
}

impl Default for OutlierConfig {
    /// 30 s base ejection, at most 300 s, at most 10% of the endpoints
    /// ejected (Envoy's defaults), one successful probe to come back, no
    /// success-rate mode.
    fn default() -> Self {
        OutlierConfig {
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            probe_successes: 1,
            max_probes: 1,
            success_rate: None,
        }
    }
}

impl OutlierConfig {
    /// The first ejection lasts this long; the n-th in a row lasts n times
    /// as long, up to `max_ejection_time`. It is also the endpoint
    /// breakers' OPEN `timeout`.
    pub fn with_base_ejection_time(mut self, d: Duration) -> Self {
        self.base_ejection_time = d;
        self
    }

    /// The longest an ejection lasts.
    pub fn with_max_ejection_time(mut self, d: Duration) -> Self {
        self.max_ejection_time = d;
        self
    }

    /// At most this percentage of the endpoints (rounded down) is out of
    /// the ready set at once; an endpoint beyond it stays in, guarded only
    /// by its breaker. 100 allows ejecting every endpoint.
    pub fn with_max_ejection_percent(mut self, percent: u8) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// Successful probes in a row that bring an ejected endpoint back (also
    /// the endpoint breakers' `success_threshold`).
    pub fn with_probe_successes(mut self, n: u32) -> Self {
        self.probe_successes = n;
        self
    }

    /// Probes in flight at once to an endpoint coming back (also the
    /// endpoint breakers' `half_open_max_calls`).
    pub fn with_max_probes(mut self, n: u32) -> Self {
        self.max_probes = n;
        self
    }

    /// Turns on success-rate ejection.
    pub fn with_success_rate(mut self, rate: SuccessRate) -> Self {
        self.success_rate = Some(rate);
        self
    }

    /// See [`OutlierConfig::with_base_ejection_time`].
    pub fn base_ejection_time(&self) -> Duration {
        self.base_ejection_time
    }

    /// See [`OutlierConfig::with_max_ejection_time`].
    pub fn max_ejection_time(&self) -> Duration {
        self.max_ejection_time
    }

    /// See [`OutlierConfig::with_max_ejection_percent`].
    pub fn max_ejection_percent(&self) -> u8 {
        self.max_ejection_percent
    }

    /// See [`OutlierConfig::with_probe_successes`].
    pub fn probe_successes(&self) -> u32 {
        self.probe_successes
    }

    /// See [`OutlierConfig::with_max_probes`].
    pub fn max_probes(&self) -> u32 {
        self.max_probes
    }

    /// See [`OutlierConfig::with_success_rate`].
    pub fn success_rate(&self) -> Option<&SuccessRate> {
        self.success_rate.as_ref()
    }

    /// How long the `n`-th ejection in a row lasts (`n` from 1).
    pub fn ejection_time(&self, n: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(n.max(1))
            .min(self.max_ejection_time)
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad field and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.base_ejection_time.is_zero() {
            return Err(ConfigError::new(
                "outlier.base_ejection_time",
                "0ms",
                "must be greater than zero",
            ));
        }
        if self.max_ejection_time < self.base_ejection_time {
            return Err(ConfigError::new(
                "outlier.max_ejection_time",
                ms(self.max_ejection_time),
                "must be at least base_ejection_time",
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(ConfigError::new(
                "outlier.max_ejection_percent",
                self.max_ejection_percent.to_string(),
                "must be within 0 and 100",
            ));
        }
        if self.probe_successes == 0 {
            return Err(ConfigError::new(
                "outlier.probe_successes",
                "0",
                "must be at least 1",
            ));
        }
        if self.max_probes < self.probe_successes {
            return Err(ConfigError::new(
                "outlier.max_probes",
                self.max_probes.to_string(),
                "must be at least probe_successes",
            ));
        }
        if let Some(rate) = &self.success_rate {
            rate.validate()?;
        }
        Ok(())
    }
}

/// Watching each endpoint with the standard `grpc.health.v1.Health/Watch`
/// stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    service: String,
    retry_backoff: Duration,
    max_retry_backoff: Duration,
}

impl HealthConfig {
    /// Watches the health of `service` (a fully qualified gRPC service
    /// name such as `catalog.v1.QueryService`, or `""` for the whole
    /// server, as the protocol defines).
    pub fn new(service: impl Into<String>) -> Self {
        HealthConfig {
            service: service.into(),
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(30),
        }
    }

    /// The first wait before a broken watch is opened again; it doubles on
    /// each failure in a row, up to `max_retry_backoff`.
    pub fn with_retry_backoff(mut self, d: Duration) -> Self {
        self.retry_backoff = d;
        self
    }

    /// The longest wait between attempts to open the watch.
    pub fn with_max_retry_backoff(mut self, d: Duration) -> Self {
        self.max_retry_backoff = d;
        self
    }

    /// The watched service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// See [`HealthConfig::with_retry_backoff`].
    pub fn retry_backoff(&self) -> Duration {
        self.retry_backoff
    }

    /// See [`HealthConfig::with_max_retry_backoff`].
    pub fn max_retry_backoff(&self) -> Duration {
        self.max_retry_backoff
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.retry_backoff.is_zero() {
            return Err(ConfigError::new(
                "health.retry_backoff",
                "0ms",
                "must be greater than zero",
            ));
        }
        if self.max_retry_backoff < self.retry_backoff {
            return Err(ConfigError::new(
                "health.max_retry_backoff",
                ms(self.max_retry_backoff),
                "must be at least retry_backoff",
            ));
        }
        Ok(())
    }
}

/// Everything a [`BalancedChannel`](crate::BalancedChannel) runs with.
#[derive(Clone, Debug)]
pub struct BalanceConfig {
    name: String,
    outlier: OutlierConfig,
    endpoint_breaker: BreakerConfig,
    health: Option<HealthConfig>,
    buffer_capacity: usize,
    dns_refresh: Duration,
    connect_timeout: Duration,
    max_concurrent_calls: Option<usize>,
}

impl BalanceConfig {
    /// Settings for the backend called `name` (e.g. `query`): its
    /// endpoints' breakers are named `name@host:port`.
    pub fn new(name: impl Into<String>) -> Self {
        BalanceConfig {
            name: name.into(),
            outlier: OutlierConfig::default(),
            endpoint_breaker: BreakerConfig::default(),
            health: None,
            buffer_capacity: 1024,
            dns_refresh: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_concurrent_calls: None,
        }
    }

    /// Ejection settings.
    pub fn with_outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = outlier;
        self
    }

    /// The config of every endpoint's breaker. Its `timeout`,
    /// `success_threshold` and `half_open_max_calls` are replaced by the
    /// outlier settings' `base_ejection_time`, `probe_successes` and
    /// `max_probes`, so the breaker and the ejection agree.
    pub fn with_endpoint_breaker(mut self, config: BreakerConfig) -> Self {
        self.endpoint_breaker = config;
        self
    }

    /// Watches every endpoint's health.
    pub fn with_health(mut self, health: HealthConfig) -> Self {
        self.health = Some(health);
        self
    }

    /// How many calls may wait for an endpoint (the buffer in front of the
    /// balancer).
    pub fn with_buffer_capacity(mut self, n: usize) -> Self {
        self.buffer_capacity = n;
        self
    }

    /// How often a DNS name is resolved again.
    pub fn with_dns_refresh(mut self, d: Duration) -> Self {
        self.dns_refresh = d;
        self
    }

    /// The connect timeout of endpoints found by DNS.
    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// A bulkhead per endpoint: at most `n` calls in flight to each
    /// endpoint (until each call's response headers arrive); a full
    /// endpoint reads not-ready, so the balancer picks another, and calls
    /// wait in the buffer when all are full. Off by default.
    pub fn with_max_concurrent_calls(mut self, n: usize) -> Self {
        self.max_concurrent_calls = Some(n);
        self
    }

    /// See [`BalanceConfig::with_max_concurrent_calls`].
    pub fn max_concurrent_calls(&self) -> Option<usize> {
        self.max_concurrent_calls
    }

    /// See [`BalanceConfig::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// See [`BalanceConfig::with_outlier`].
    pub fn outlier(&self) -> &OutlierConfig {
        &self.outlier
    }

    /// The endpoint breakers' config as given (before the outlier settings
    /// replace their timeouts).
    pub fn endpoint_breaker(&self) -> &BreakerConfig {
        &self.endpoint_breaker
    }

    /// See [`BalanceConfig::with_health`].
    pub fn health(&self) -> Option<&HealthConfig> {
        self.health.as_ref()
    }

    /// See [`BalanceConfig::with_buffer_capacity`].
    pub fn buffer_capacity(&self) -> usize {
        self.buffer_capacity
    }

    /// See [`BalanceConfig::with_dns_refresh`].
    pub fn dns_refresh(&self) -> Duration {
        self.dns_refresh
    }

    /// See [`BalanceConfig::with_connect_timeout`].
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The config each endpoint's breaker is made with.
    pub fn effective_endpoint_breaker(&self) -> BreakerConfig {
        self.endpoint_breaker
            .clone()
            .with_timeout(self.outlier.base_ejection_time)
            .with_success_threshold(self.outlier.probe_successes)
            .with_half_open_max_calls(self.outlier.max_probes)
    }

    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad field and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.contains('@') {
            return Err(ConfigError::new(
                "name",
                self.name.clone(),
                "must be non-empty and without `@`",
            ));
        }
        self.outlier.validate()?;
        self.effective_endpoint_breaker().validate()?;
        if let Some(health) = &self.health {
            health.validate()?;
        }
        if self.max_concurrent_calls == Some(0) {
            return Err(ConfigError::new(
                "max_concurrent_calls",
                "0",
                "must be at least 1",
            ));
        }
        if self.buffer_capacity == 0 {
            return Err(ConfigError::new(
                "buffer_capacity",
                "0",
                "must be at least 1",
            ));
        }
        if self.dns_refresh.is_zero() {
            return Err(ConfigError::new(
                "dns_refresh",
                "0ms",
                "must be greater than zero",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new(
                "connect_timeout",
                "0ms",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_field() {
        let cases: Vec<(BalanceConfig, &str, &str)> = vec![
            (BalanceConfig::new(""), "name", ""),
            (BalanceConfig::new("a@b"), "name", "a@b"),
            (
                BalanceConfig::new("q")
                    .with_outlier(OutlierConfig::default().with_max_ejection_percent(101)),
                "outlier.max_ejection_percent",
                "101",
            ),
            (
                BalanceConfig::new("q")
                    .with_outlier(OutlierConfig::default().with_base_ejection_time(Duration::ZERO)),
                "outlier.base_ejection_time",
                "0ms",
            ),
            (
                BalanceConfig::new("q").with_outlier(
                    OutlierConfig::default()
                        .with_base_ejection_time(Duration::from_secs(10))
                        .with_max_ejection_time(Duration::from_secs(1)),
                ),
                "outlier.max_ejection_time",
                "1000ms",
            ),
            (
                BalanceConfig::new("q")
                    .with_outlier(OutlierConfig::default().with_probe_successes(3)),
                "outlier.max_probes",
                "1",
            ),
            (
                BalanceConfig::new("q").with_outlier(
                    OutlierConfig::default()
                        .with_success_rate(SuccessRate::default().with_minimum_hosts(1)),
                ),
                "outlier.success_rate.minimum_hosts",
                "1",
            ),
            (
                BalanceConfig::new("q").with_outlier(
                    OutlierConfig::default()
                        .with_success_rate(SuccessRate::default().with_stdev_factor(f64::NAN)),
                ),
                "outlier.success_rate.stdev_factor",
                "NaN",
            ),
            (
                BalanceConfig::new("q")
                    .with_endpoint_breaker(BreakerConfig::default().with_failure_threshold(0)),
                "endpoint_breaker.failure_threshold",
                "0",
            ),
            (
                BalanceConfig::new("q")
                    .with_health(HealthConfig::new("").with_retry_backoff(Duration::ZERO)),
                "health.retry_backoff",
                "0ms",
            ),
            (
                BalanceConfig::new("q").with_buffer_capacity(0),
                "buffer_capacity",
                "0",
            ),
        ];
        for (config, field, value) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!((err.field(), err.value()), (field, value), "{err}");
            assert!(err.to_string().contains(field));
        }
        BalanceConfig::new("query").validate().unwrap();
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let o = OutlierConfig::default()
            .with_base_ejection_time(Duration::from_secs(10))
            .with_max_ejection_time(Duration::from_secs(25));
        assert_eq!(o.ejection_time(1), Duration::from_secs(10));
        assert_eq!(o.ejection_time(2), Duration::from_secs(20));
        assert_eq!(o.ejection_time(3), Duration::from_secs(25));
        assert_eq!(o.ejection_time(u32::MAX), Duration::from_secs(25));
    }
}
