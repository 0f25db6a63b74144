//! The keys of a balanced channel: `endpoints` or `dns`, and its
//! `outlier`, `health` and `endpoint_breaker` tables.

use std::collections::BTreeMap;
use std::time::Duration;

use grpc_balance::{BalanceConfig, HealthConfig, OutlierConfig, SuccessRate};
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;

use super::serde_helpers::opt_duration;
use super::{ChannelSettings, breaker_error_at};
use crate::error::{ConfigError, key_path};

/// `[channels.<name>.outlier]`: when an endpoint of a balanced channel is
/// taken out of the balancer's ready set, for how long, and how it comes
/// back. Unset fields take [`OutlierConfig`]'s defaults (30 s base
/// ejection, at most 300 s, at most 10 % of the endpoints out at once, one
/// probe whose success brings it back, no success-rate mode).
///
/// Mind `max_ejection_percent` with few endpoints: it is rounded down, so
/// with three endpoints the default 10 % ejects none (each endpoint's
/// breaker still fails its calls fast); 50 % lets one out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSettings {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    base_ejection_time: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_ejection_time: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_ejection_percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    probe_successes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_probes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    success_rate: Option<SuccessRateSettings>,
}

impl OutlierSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// The first ejection in a row lasts this long, the n-th n times as
        /// long; also the endpoint breakers' OPEN timeout.
        base_ejection_time, with_base_ejection_time, Duration);
    option_field!(
        /// The longest an ejection lasts.
        max_ejection_time, with_max_ejection_time, Duration);
    option_field!(
        /// At most this percentage of the endpoints (rounded down) is out
        /// at once.
        max_ejection_percent, with_max_ejection_percent, u8);
    option_field!(
        /// Successful probes that bring an ejected endpoint back.
        probe_successes, with_probe_successes, u32);
    option_field!(
        /// Probes in flight at once to an endpoint coming back.
        max_probes, with_max_probes, u32);
    option_field!(
        /// Ejects endpoints whose success rate is far below the others'.
        success_rate, with_success_rate, SuccessRateSettings);

    fn to_outlier(&self) -> OutlierConfig {
        let mut o = OutlierConfig::default();
        if let Some(v) = self.base_ejection_time {
            o = o.with_base_ejection_time(v);
        }
        if let Some(v) = self.max_ejection_time {
            o = o.with_max_ejection_time(v);
        }
        if let Some(v) = self.max_ejection_percent {
            o = o.with_max_ejection_percent(v);
        }
        if let Some(v) = self.probe_successes {
            o = o.with_probe_successes(v);
        }
        if let Some(v) = self.max_probes {
            o = o.with_max_probes(v);
        }
        if let Some(rate) = &self.success_rate {
            o = o.with_success_rate(rate.to_success_rate());
        }
        o
    }
}

/// `[channels.<name>.outlier.success_rate]`: Envoy's success-rate
/// ejection. Every `interval` the endpoints with at least `request_volume`
/// calls are compared, and those below `mean - stdev_factor * stdev` are
/// ejected, when at least `minimum_hosts` qualify. Unset fields take
/// [`SuccessRate`]'s defaults (10 s, 5 hosts, 100 calls, 1.9).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuccessRateSettings {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    interval: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    minimum_hosts: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_volume: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stdev_factor: Option<f64>,
}

impl SuccessRateSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// How often the endpoints are compared.
        interval, with_interval, Duration);
    option_field!(
        /// Endpoints that must qualify for a comparison (at least 2).
        minimum_hosts, with_minimum_hosts, usize);
    option_field!(
        /// Calls an endpoint needs within an interval to be judged.
        request_volume, with_request_volume, u64);
    option_field!(
        /// How many standard deviations below the mean ejects.
        stdev_factor, with_stdev_factor, f64);

    fn to_success_rate(&self) -> SuccessRate {
        let mut r = SuccessRate::default();
        if let Some(v) = self.interval {
            r = r.with_interval(v);
        }
        if let Some(v) = self.minimum_hosts {
            r = r.with_minimum_hosts(v);
        }
        if let Some(v) = self.request_volume {
            r = r.with_request_volume(v);
        }
        if let Some(v) = self.stdev_factor {
            r = r.with_stdev_factor(v);
        }
        r
    }
}

/// `[channels.<name>.health]`: watches every endpoint of a balanced
/// channel with the standard `grpc.health.v1.Health/Watch` stream; an
/// endpoint that reports anything but `SERVING` is ejected until it
/// reports `SERVING` again. A server without the health service is judged
/// by its calls only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    service: Option<String>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    retry_backoff: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_retry_backoff: Option<Duration>,
}

impl HealthSettings {
    /// Health checks on, for the whole server (`service = ""`).
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// `false` turns the health checks off (default: on when the table
        /// is there).
        enabled, with_enabled, bool);
    option_field!(
        /// Backoff before a broken watch is opened again (default 200 ms),
        /// doubling up to `max_retry_backoff`.
        retry_backoff, with_retry_backoff, Duration);
    option_field!(
        /// The longest wait between attempts to open the watch (default
        /// 30 s).
        max_retry_backoff, with_max_retry_backoff, Duration);

    /// The service whose health is watched, fully qualified (e.g.
    /// `catalog.v1.QueryService`); `""` (the default) is the whole server.
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// The service set, if any.
    pub fn service(&self) -> Option<&str> {
        self.service.as_deref()
    }

    fn to_health(&self) -> Option<HealthConfig> {
        if self.enabled == Some(false) {
            return None;
        }
        let mut h = HealthConfig::new(self.service.clone().unwrap_or_default());
        if let Some(v) = self.retry_backoff {
            h = h.with_retry_backoff(v);
        }
        if let Some(v) = self.max_retry_backoff {
            h = h.with_max_retry_backoff(v);
        }
        Some(h)
    }
}

/// The endpoint breakers' fields that the outlier settings decide.
const SET_BY_OUTLIER: [(&str, &str); 3] = [
    ("timeout", "base_ejection_time"),
    ("success_threshold", "probe_successes"),
    ("half_open_max_calls", "max_probes"),
];

impl ChannelSettings {
    /// The balanced-channel keys set, by name (for the error of a single
    /// `endpoint` with them).
    fn balance_keys(&self) -> impl Iterator<Item = &'static str> {
        [
            self.dns_refresh.is_some().then_some("dns_refresh"),
            self.outlier.is_some().then_some("outlier"),
            self.health.is_some().then_some("health"),
            self.endpoint_breaker
                .is_some()
                .then_some("endpoint_breaker"),
            self.max_concurrent_per_endpoint
                .is_some()
                .then_some("max_concurrent_per_endpoint"),
        ]
        .into_iter()
        .flatten()
    }

    /// A balanced channel: the entry gives `endpoints`, `dns`, or one of
    /// the balanced channel's settings (its endpoints then come from code,
    /// [`ResilientChannelsBuilder::with_endpoint`](crate::ResilientChannelsBuilder::with_endpoint)
    /// or `with_endpoints`).
    pub fn is_balanced(&self) -> bool {
        self.endpoints.is_some() || self.dns.is_some() || self.balance_keys().next().is_some()
    }

    /// The balanced channel's settings for channel `name` (its endpoint
    /// breakers are named `<name>@<host:port>`), checked.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the key under `channels.<name>`, the value
    /// and why.
    pub fn to_balance_config(&self, name: &str) -> Result<BalanceConfig, ConfigError> {
        let at = |field: &str| {
            let mut path = vec!["channels", name];
            path.extend(field.split('.'));
            key_path(path)
        };
        let mut config = BalanceConfig::new(name);
        if let Some(o) = &self.outlier {
            config = config.with_outlier(o.to_outlier());
        }
        if let Some(b) = &self.endpoint_breaker {
            for (field, by) in SET_BY_OUTLIER {
                let set = match field {
                    "timeout" => b.timeout.is_some(),
                    "success_threshold" => b.success_threshold.is_some(),
                    _ => b.half_open_max_calls.is_some(),
                };
                if set {
                    return Err(ConfigError::new(
                        at(&format!("endpoint_breaker.{field}")),
                        None,
                        format!(
                            "an endpoint breaker's `{field}` is the outlier settings' `{by}`: \
                             set `[channels.{name}.outlier] {by}` instead"
                        ),
                    ));
                }
            }
            let breaker = b.to_breaker_config();
            breaker
                .validate()
                .map_err(|e| breaker_error_at(&["channels", name, "endpoint_breaker"], &e))?;
            config = config.with_endpoint_breaker(breaker);
        }
        if let Some(h) = self.health.as_ref().and_then(HealthSettings::to_health) {
            config = config.with_health(h);
        }
        if let Some(d) = self.dns_refresh {
            config = config.with_dns_refresh(d);
        }
        if let Some(d) = self.connect_timeout {
            config = config.with_connect_timeout(d);
        }
        if let Some(n) = self.max_concurrent_per_endpoint {
            config = config.with_max_concurrent_calls(n);
        }
        config.validate().map_err(|e| {
            let field = match e.field() {
                "max_concurrent_calls" => "max_concurrent_per_endpoint",
                "name" => {
                    return ConfigError::new(
                        key_path(["channels", name]),
                        None,
                        "a balanced channel's name names its endpoint breakers \
                         (`<name>@<host:port>`): it must not contain `@`",
                    );
                }
                f => f,
            };
            ConfigError::new(at(field), Some(e.value().to_owned()), e.reason())
        })?;
        Ok(config)
    }

    /// Checks the endpoint keys of channel `name`: one source of
    /// endpoints, valid URIs and `host:port`, no balanced-channel key on a
    /// single endpoint.
    pub(crate) fn check_endpoints(&self, name: &str) -> Result<(), ConfigError> {
        let at = |key: &str| key_path(["channels", name, key]);
        let sources: Vec<&str> = [
            self.endpoint.is_some().then_some("endpoint"),
            self.endpoints.is_some().then_some("endpoints"),
            self.dns.is_some().then_some("dns"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if sources.len() > 1 {
            return Err(ConfigError::new(
                at(sources[1]),
                None,
                format!(
                    "a channel has one source of endpoints: `{}` is set too \
                     (choose endpoint, endpoints or dns)",
                    sources[0]
                ),
            ));
        }
        if let Some(uri) = &self.endpoint {
            Endpoint::from_shared(uri.clone()).map_err(|e| {
                ConfigError::new(
                    at("endpoint"),
                    Some(format!("{uri:?}")),
                    format!("not a valid URI: {e}"),
                )
            })?;
            if let Some(key) = self.balance_keys().next() {
                return Err(ConfigError::new(
                    at(key),
                    None,
                    "applies to a balanced channel: list its endpoints as \
                     `endpoints = [...]` or give `dns`, instead of one `endpoint`",
                ));
            }
        }
        if let Some(list) = &self.endpoints {
            if list.is_empty() {
                return Err(ConfigError::new(
                    at("endpoints"),
                    Some("[]".into()),
                    "must list at least one endpoint",
                ));
            }
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for (i, uri) in list.iter().enumerate() {
                let index = i.to_string();
                let here = key_path(["channels", name, "endpoints", index.as_str()]);
                let endpoint = Endpoint::from_shared(uri.clone()).map_err(|e| {
                    ConfigError::new(
                        here.clone(),
                        Some(format!("{uri:?}")),
                        format!("not a valid URI: {e}"),
                    )
                })?;
                let uri_parts = endpoint.uri();
                let Some(authority) = uri_parts
                    .authority()
                    .filter(|_| uri_parts.scheme().is_some())
                else {
                    return Err(ConfigError::new(
                        here,
                        Some(format!("{uri:?}")),
                        "an endpoint is written `http://host:port`",
                    ));
                };
                if let Some(first) = seen.insert(authority.to_string(), i) {
                    return Err(ConfigError::new(
                        here,
                        Some(format!("{uri:?}")),
                        format!("the same endpoint as endpoints[{first}]"),
                    ));
                }
            }
        }
        if let Some(dns) = &self.dns {
            let ok = dns
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok || dns.contains("://") {
                return Err(ConfigError::new(
                    at("dns"),
                    Some(format!("{dns:?}")),
                    "a DNS name is written `host:port`, e.g. `query.internal:50051`",
                ));
            }
        }
        if self.is_balanced() {
            self.to_balance_config(name)?;
        }
        Ok(())
    }
}
