//! The configuration: one TOML file (or the same in code) for timeouts,
//! retries, circuit breakers and named channels.
//!
//! ```toml
//! [retry.default]                  # every method not listed below
//! max_attempts = 3
//! initial_delay = 100              # integer milliseconds, or "100ms", "30s"
//! max_delay = "5s"
//! multiplier = 2.0
//! jitter = true                    # true (±20 %), false, "full", or a fraction such as 0.1
//! retryable_codes = ["UNAVAILABLE", "deadline_exceeded"]
//!
//! [retry.operations.create_product] # unset fields come from [retry.default]
//! idempotent = false               # a write: retried only when provably unprocessed
//!
//! [retry.throttle]                 # gRFC A6 token bucket, one per target
//! max_tokens = 10
//! token_ratio = 0.1
//!
//! [retry.budget]                   # retries at most 20 % of recent calls
//! ttl = "10s"                      # (+ 10/s), one per target; with a
//! min_retries_per_second = 10      # throttle too, both must allow
//! retry_ratio = 0.2
//!
//! [hedging.operations.get_product] # gRFC A6 hedging instead of retries
//! max_attempts = 2                 # (a method is retried or hedged)
//! hedging_delay = "20ms"
//! non_fatal_codes = ["UNAVAILABLE"]
//!
//! [bulkhead.default]               # a concurrency partition per service
//! max_concurrent = 32
//! max_queue = 16
//! max_wait = "50ms"
//! [bulkhead.operations.list_products.gradient] # its own, adaptive limit
//! initial_limit = 4
//!
//! [circuit_breakers.query]
//! failure_threshold = 5
//! latency_metric = true            # time calls for the latency histogram
//!
//! [timeouts]
//! default = 5000
//! [timeouts.operations]
//! list_products = 10000
//! "catalog.v1.QueryService/WatchProducts" = "none"
//!
//! [channels.query]
//! endpoint = "http://127.0.0.1:50051"
//! services = ["catalog.v1.QueryService"]
//! breaker = "query"                # default: the channel's own name
//! connect_timeout = "2s"
//!
//! [channels.search]                # a balanced channel over replicas
//! endpoints = ["http://10.0.0.1:50053", "http://10.0.0.2:50053"]
//! # or: dns = "search.internal:50053", dns_refresh = "30s"
//! max_concurrent_per_endpoint = 64 # optional bulkhead per replica
//! [channels.search.endpoint_breaker] # each replica's breaker (named
//! failure_threshold = 3            # `search@10.0.0.1:50053`)
//! [channels.search.outlier]        # ejection of a failing replica
//! base_ejection_time = "30s"
//! max_ejection_time = "300s"
//! max_ejection_percent = 50
//! probe_successes = 1
//! max_probes = 1
//! [channels.search.outlier.success_rate]
//! interval = "10s"
//! minimum_hosts = 5
//! request_volume = 100
//! stdev_factor = 1.9
//! [channels.search.health]         # grpc.health.v1 Watch per replica
//! service = "catalog.v1.QueryService"
//! ```
//!
//! # Balanced channels
//!
//! A `[channels]` entry with `endpoints` (a list of URIs) or `dns` (a
//! `host:port` resolved again every `dns_refresh`) instead of `endpoint`
//! is a balanced channel ([`grpc_balance::BalancedChannel`]): each replica
//! has its own circuit breaker, named `<channel>@<host:port>`, and is
//! ejected from the balancer when its breaker opens, its success rate
//! falls below the others' (`outlier.success_rate`), or its health watch
//! (`health`) reports anything but `SERVING`. The channel's stack (its
//! retry, its own breaker) sits on top: each attempt is balanced anew, so
//! a retry goes to another replica. Unset keys take `grpc-balance`'s
//! defaults ([`OutlierSettings`], [`HealthSettings`]); an `outlier`,
//! `health` or `endpoint_breaker` table, `dns_refresh` or
//! `max_concurrent_per_endpoint` alone also makes a balanced channel, whose
//! endpoints then come from code. These keys with a single `endpoint`, two
//! sources of endpoints, or an endpoint breaker's `timeout`,
//! `success_threshold` or `half_open_max_calls` (the outlier settings'
//! `base_ejection_time`, `probe_successes` and `max_probes`) are errors.
//!
//! # Operation selectors
//!
//! Keys of `[retry.operations]` and `[timeouts.operations]` are written as
//! gRPC writes them (`package.Service/Method`, `package.Service/*` or just
//! `package.Service`) or by a method's short name, in the proto's spelling
//! (`GetProduct`) or in snake case (`get_product`). The most specific
//! selector wins: a method, then a short name, then a service, then the
//! default.
//!
//! A short name means "a method of this name in any service", unless the
//! application tells which methods it calls
//! ([`ResilienceConfig::with_known_methods`], or the `*_with_methods`
//! loaders): then every selector is checked against them, a short name
//! resolves to the one method it names, and a short name that two services
//! share is an error listing both (`get_product` is ambiguous: it matches
//! `catalog.v1.QueryService/GetProduct, catalog.v2.QueryService/GetProduct`).
//! Only the application can know this: a config file cannot list methods,
//! and a channel's `services` say nothing of their methods.
//!
//! # Errors
//!
//! Unknown keys, unknown status codes and invalid values are rejected with
//! a [`ConfigError`] naming the file, the line, the key path, the value and
//! why: `resilience.toml:7: retry.default.max_attempts = 0: must be at
//! least 1 (1 means no retry)`. Each value is checked by the layer that uses
//! it ([`RetryPolicy::validate`], [`BreakerConfig::validate`],
//! [`TimeoutPolicy`], [`RetryThrottle::new`]), so a config built in code
//! and one read from a file pass the same checks.

/// A builder setter and a getter for an optional settings field.
macro_rules! option_field {
    ($(#[$doc:meta])* $field:ident, $with:ident, $ty:ty) => {
        $(#[$doc])*
        pub fn $with(mut self, value: $ty) -> Self {
            self.$field = Some(value);
            self
        }
        /// The value set, if any.
        pub fn $field(&self) -> Option<$ty> {
            self.$field.clone()
        }
    };
}

mod balance;
mod grpc_service_config;
mod selector;
pub(crate) mod serde_helpers;
mod spans;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use grpc_bulkhead::{Aimd, BulkheadConfig, BulkheadLayer, Gradient};
use grpc_circuit_breaker::{BreakerConfig, BreakerConfigError, FailureRate};
use grpc_resilience_core::CodeSet;
use grpc_retry::{
    HedgingPolicy, Jitter, RetryBudget, RetryConfigError, RetryPolicies, RetryPolicy, RetryThrottle,
};
use grpc_timeout::{TimeoutConfigError, TimeoutPolicy};
use serde::{Deserialize, Serialize};
use tonic::transport::Endpoint;

use crate::error::{ConfigError, key_path};
pub use balance::{HealthSettings, OutlierSettings, SuccessRateSettings};
pub use grpc_service_config::ImportWarning;
use selector::KnownMethods;
use serde_helpers::{MaybeTimeout, opt_codes, opt_duration, opt_jitter};
use spans::SpanIndex;

/// The whole configuration; see the [module docs](self) for the file.
///
/// Build it from a file ([`ResilienceConfig::from_file`]), from TOML text,
/// from a gRPC service config
/// ([`ResilienceConfig::from_grpc_service_config`]) or in code, and read it
/// back with its getters, `Debug` or [`ResilienceConfig::to_toml`].
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience::{BreakerSettings, ResilienceConfig, RetrySettings};
///
/// let config = ResilienceConfig::new()
///     .with_retry_default(RetrySettings::new().with_max_attempts(3))
///     .with_retry_operation("create_product", RetrySettings::new().with_idempotent(false))
///     .with_timeout_default(Duration::from_secs(5))
///     .with_timeout_operation("ListProducts", Duration::from_secs(10))
///     .with_breaker("query", BreakerSettings::new().with_failure_threshold(5));
/// config.validate()?;
/// assert_eq!(ResilienceConfig::from_toml(&config.to_toml())?, config);
///
/// let bad = config.with_retry_default(RetrySettings::new().with_max_attempts(0));
/// assert_eq!(
///     bad.validate().unwrap_err().to_string(),
///     "retry.default.max_attempts = 0: must be at least 1 (1 means no retry)"
/// );
/// # Ok::<(), grpc_resilience::ConfigError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResilienceConfig {
    #[serde(default, skip_serializing_if = "RetryConfig::is_empty")]
    retry: RetryConfig,
    #[serde(default, skip_serializing_if = "HedgingConfig::is_empty")]
    hedging: HedgingConfig,
    #[serde(default, skip_serializing_if = "BulkheadSection::is_empty")]
    bulkhead: BulkheadSection,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    circuit_breakers: BTreeMap<String, BreakerSettings>,
    #[serde(default, skip_serializing_if = "TimeoutConfig::is_empty")]
    timeouts: TimeoutConfig,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    channels: BTreeMap<String, ChannelSettings>,
    #[serde(skip)]
    known: KnownMethods,
}

/// `[retry]`: the default policy, per-operation overrides and the throttle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<RetrySettings>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    operations: BTreeMap<String, RetrySettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    throttle: Option<ThrottleSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget: Option<BudgetSettings>,
}

impl RetryConfig {
    fn is_empty(&self) -> bool {
        self.default.is_none()
            && self.operations.is_empty()
            && self.throttle.is_none()
            && self.budget.is_none()
    }

    /// `[retry.default]`; `None`: methods without an operation entry are
    /// not retried.
    pub fn default_settings(&self) -> Option<&RetrySettings> {
        self.default.as_ref()
    }

    /// `[retry.operations]`, by selector as written.
    pub fn operations(&self) -> &BTreeMap<String, RetrySettings> {
        &self.operations
    }

    /// `[retry.throttle]`.
    pub fn throttle(&self) -> Option<&ThrottleSettings> {
        self.throttle.as_ref()
    }

    /// `[retry.budget]`.
    pub fn budget(&self) -> Option<&BudgetSettings> {
        self.budget.as_ref()
    }
}

/// A retry policy as a config writes it. Unset fields come from
/// `[retry.default]` (for an operation) and then from
/// [`RetryPolicy::default`] (3 attempts, 100 ms, 5 s, ×2, ±20 % jitter,
/// `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`,
/// `INTERNAL`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    initial_delay: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    multiplier: Option<f64>,
    #[serde(default, with = "opt_jitter", skip_serializing_if = "Option::is_none")]
    jitter: Option<Jitter>,
    #[serde(default, with = "opt_codes", skip_serializing_if = "Option::is_none")]
    retryable_codes: Option<CodeSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency_keys: Option<bool>,
}

impl RetrySettings {
    /// Sets nothing: everything is inherited.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// `enabled = false` turns retries off for these methods.
        enabled, with_enabled, bool);
    option_field!(
        /// Attempts in all, the first included.
        max_attempts, with_max_attempts, u32);
    option_field!(
        /// The delay before the first retry.
        initial_delay, with_initial_delay, Duration);
    option_field!(
        /// The longest delay, jitter included.
        max_delay, with_max_delay, Duration);
    option_field!(
        /// How much each delay grows.
        multiplier, with_multiplier, f64);
    option_field!(
        /// How delays are randomised.
        jitter, with_jitter, Jitter);
    option_field!(
        /// The codes that are retried.
        retryable_codes, with_retryable_codes, CodeSet);
    option_field!(
        /// `false` marks a write: retried only when the server provably
        /// never saw it, unless idempotency keys are on.
        idempotent, with_idempotent, bool);
    option_field!(
        /// Sends one `idempotency-key` per logical call, the same on every
        /// attempt, so a write can be retried.
        idempotency_keys, with_idempotency_keys, bool);

    /// `self`, with the fields it leaves unset taken from `base`.
    fn over(&self, base: &RetrySettings) -> RetrySettings {
        RetrySettings {
            enabled: self.enabled.or(base.enabled),
            max_attempts: self.max_attempts.or(base.max_attempts),
            initial_delay: self.initial_delay.or(base.initial_delay),
            max_delay: self.max_delay.or(base.max_delay),
            multiplier: self.multiplier.or(base.multiplier),
            jitter: self.jitter.or(base.jitter),
            retryable_codes: self.retryable_codes.or(base.retryable_codes),
            idempotent: self.idempotent.or(base.idempotent),
            idempotency_keys: self.idempotency_keys.or(base.idempotency_keys),
        }
    }

    /// The retry layer's policy these settings describe (not validated).
    pub fn to_policy(&self) -> RetryPolicy {
        let mut p = RetryPolicy::default();
        if let Some(v) = self.max_attempts {
            p = p.with_max_attempts(v);
        }
        if let Some(v) = self.initial_delay {
            p = p.with_initial_delay(v);
        }
        if let Some(v) = self.max_delay {
            p = p.with_max_delay(v);
        }
        if let Some(v) = self.multiplier {
            p = p.with_multiplier(v);
        }
        if let Some(v) = self.jitter {
            p = p.with_jitter(v);
        }
        if let Some(v) = self.retryable_codes {
            p = p.with_retryable_codes(v);
        }
        if self.idempotent == Some(false) {
            p = p.non_idempotent();
        }
        if self.idempotency_keys == Some(true) {
            p = p.with_idempotency_keys();
        }
        p
    }
}

/// `[retry.throttle]`: gRFC A6's token bucket. One bucket per target
/// (endpoint): channels to the same endpoint share it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSettings {
    max_tokens: f64,
    token_ratio: f64,
}

impl ThrottleSettings {
    /// A bucket of `max_tokens` refilled by `token_ratio` per success.
    pub fn new(max_tokens: f64, token_ratio: f64) -> Self {
        ThrottleSettings {
            max_tokens,
            token_ratio,
        }
    }

    /// The bucket's size.
    pub fn max_tokens(&self) -> f64 {
        self.max_tokens
    }

    /// What a success gives back.
    pub fn token_ratio(&self) -> f64 {
        self.token_ratio
    }

    /// A new bucket with these settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad value.
    pub fn to_throttle(&self) -> Result<RetryThrottle, ConfigError> {
        RetryThrottle::new(self.max_tokens, self.token_ratio)
            .map_err(|e| retry_error(&["retry"], &e))
    }
}

/// `[hedging]`: gRFC A6 hedging, laid out as `[retry]`: `[hedging.default]`
/// for every method and `[hedging.operations."<selector>"]` per operation,
/// unset fields of an operation taken from `[hedging.default]`.
///
/// A method is either retried or hedged, never both (gRFC A6): a selector
/// may not be in both `[retry.operations]` and `[hedging.operations]`, nor
/// may both `[retry.default]` and `[hedging.default]` be set. The most
/// specific selector wins across both tables, so `[retry.default]` with
/// `[hedging.operations.get_product]` retries every method but hedges
/// `GetProduct`.
///
/// Hedging sends a call more than once at the same time, so a hedged
/// method must be idempotent: `idempotent = false` is an error unless
/// `idempotency_keys = true`. A call marked non-idempotent at run time
/// ([`CallOptions::idempotent`](crate::CallOptions::idempotent)`(false)`)
/// to a hedged method is sent once.
///
/// Retries and hedges draw on the same `[retry.throttle]` and
/// `[retry.budget]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgingConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<HedgingSettings>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    operations: BTreeMap<String, HedgingSettings>,
}

impl HedgingConfig {
    fn is_empty(&self) -> bool {
        self.default.is_none() && self.operations.is_empty()
    }

    /// `[hedging.default]`.
    pub fn default_settings(&self) -> Option<&HedgingSettings> {
        self.default.as_ref()
    }

    /// `[hedging.operations]`, by selector as written.
    pub fn operations(&self) -> &BTreeMap<String, HedgingSettings> {
        &self.operations
    }
}

/// A hedging policy as a config writes it. Unset fields come from
/// `[hedging.default]` (for an operation) and then from
/// [`HedgingPolicy::default`] (3 attempts, 50 ms apart, no non-fatal
/// codes, idempotent).
///
/// When to hedge rather than retry: for reads whose latency has a heavy
/// tail, where waiting for a timeout before retrying costs more than the
/// extra load of a second copy sent after `hedging_delay` (a delay near the
/// method's p95 latency adds about 5 % load).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgingSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    hedging_delay: Option<Duration>,
    #[serde(default, with = "opt_codes", skip_serializing_if = "Option::is_none")]
    non_fatal_codes: Option<CodeSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotent: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idempotency_keys: Option<bool>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_pushback: Option<Duration>,
}

impl HedgingSettings {
    /// Sets nothing: everything is inherited.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// Attempts in all, the first included (2 to 100).
        max_attempts, with_max_attempts, u32);
    option_field!(
        /// The wait before each further attempt; zero sends them all at once.
        hedging_delay, with_hedging_delay, Duration);
    option_field!(
        /// Codes that do not commit the call: the next hedge goes at once.
        non_fatal_codes, with_non_fatal_codes, CodeSet);
    option_field!(
        /// `false` marks a write: valid only with `idempotency_keys`.
        idempotent, with_idempotent, bool);
    option_field!(
        /// Sends one `idempotency-key` per logical call, the same on every
        /// attempt, so the server can deduplicate the copies.
        idempotency_keys, with_idempotency_keys, bool);
    option_field!(
        /// The longest server pushback that delays the next hedge.
        max_pushback, with_max_pushback, Duration);

    fn over(&self, base: &HedgingSettings) -> HedgingSettings {
        HedgingSettings {
            max_attempts: self.max_attempts.or(base.max_attempts),
            hedging_delay: self.hedging_delay.or(base.hedging_delay),
            non_fatal_codes: self.non_fatal_codes.or(base.non_fatal_codes),
            idempotent: self.idempotent.or(base.idempotent),
            idempotency_keys: self.idempotency_keys.or(base.idempotency_keys),
            max_pushback: self.max_pushback.or(base.max_pushback),
        }
    }

    /// The retry layer's hedging policy these settings describe (not
    /// validated).
    pub fn to_policy(&self) -> HedgingPolicy {
        let mut p = HedgingPolicy::default();
        if let Some(v) = self.max_attempts {
            p = p.with_max_attempts(v);
        }
        if let Some(v) = self.hedging_delay {
            p = p.with_hedging_delay(v);
        }
        if let Some(v) = self.non_fatal_codes {
            p = p.with_non_fatal_codes(v);
        }
        if self.idempotent == Some(false) {
            p = p.non_idempotent();
        }
        if self.idempotency_keys == Some(true) {
            p = p.with_idempotency_keys();
        }
        if let Some(v) = self.max_pushback {
            p = p.with_max_pushback(v);
        }
        p
    }
}

/// `[bulkhead]`: concurrency partitions ([`grpc_bulkhead`]), laid out as
/// `[retry]`: `[bulkhead.default]` gives every gRPC service its own
/// partition with these settings, and `[bulkhead.operations."<selector>"]`
/// gives the methods a selector names one partition of their own (unset
/// fields from `[bulkhead.default]`). Without a `[bulkhead]` section the
/// stack has no bulkhead at all, at no cost.
///
/// A call over its partition's limit waits in a queue of `max_queue` for
/// at most `max_wait`, or fails at once with `RESOURCE_EXHAUSTED`, a local
/// refusal the retry layer does not retry and the breaker never sees. The
/// wait also ends at the call's deadline (`DEADLINE_EXCEEDED`, not sent),
/// and a call sent after waiting tells the server the time it has left.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<BulkheadSettings>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    operations: BTreeMap<String, BulkheadSettings>,
}

impl BulkheadSection {
    fn is_empty(&self) -> bool {
        self.default.is_none() && self.operations.is_empty()
    }

    /// `[bulkhead.default]`: each gRPC service's partition.
    pub fn default_settings(&self) -> Option<&BulkheadSettings> {
        self.default.as_ref()
    }

    /// `[bulkhead.operations]`, by selector as written.
    pub fn operations(&self) -> &BTreeMap<String, BulkheadSettings> {
        &self.operations
    }
}

/// One partition's settings: a fixed limit (`max_concurrent`) or an
/// adaptive one (`[...aimd]` or `[...gradient]`), and the queue. Unset
/// fields take [`BulkheadConfig`]'s defaults (64 in flight, no queue).
///
/// Choose a fixed limit when you know what the server handles, or to cap
/// what one service may take from the client; AIMD when the server sheds
/// load clearly (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`) or you know the
/// latency that means trouble; the gradient when it slows down under load
/// rather than refusing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_queue: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_wait: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aimd: Option<AimdSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gradient: Option<GradientSettings>,
}

impl BulkheadSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// A fixed limit: at most this many calls in flight.
        max_concurrent, with_max_concurrent, u32);
    option_field!(
        /// Calls that may wait for a slot.
        max_queue, with_max_queue, u32);
    option_field!(
        /// The longest a call waits for a slot.
        max_wait, with_max_wait, Duration);
    option_field!(
        /// An AIMD limit instead of a fixed one.
        aimd, with_aimd, AimdSettings);
    option_field!(
        /// A gradient limit instead of a fixed one.
        gradient, with_gradient, GradientSettings);

    fn over(&self, base: &BulkheadSettings) -> BulkheadSettings {
        let own_limit =
            self.max_concurrent.is_some() || self.aimd.is_some() || self.gradient.is_some();
        let limit_from = if own_limit { self } else { base };
        BulkheadSettings {
            max_concurrent: limit_from.max_concurrent,
            aimd: limit_from.aimd.clone(),
            gradient: limit_from.gradient.clone(),
            max_queue: self.max_queue.or(base.max_queue),
            max_wait: self.max_wait.or(base.max_wait),
        }
    }

    /// The bulkhead crate's config these settings describe.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the key and value (relative to the section),
    /// for two limits at once or a value the bulkhead crate rejects.
    fn to_config(&self, path: &[&str]) -> Result<BulkheadConfig, ConfigError> {
        let limits = [
            self.max_concurrent.is_some().then_some("max_concurrent"),
            self.aimd.is_some().then_some("aimd"),
            self.gradient.is_some().then_some("gradient"),
        ];
        let set: Vec<&str> = limits.into_iter().flatten().collect();
        if set.len() > 1 {
            let mut p = path.to_vec();
            p.push(set[1]);
            return Err(ConfigError::new(
                key_path(p),
                None,
                format!(
                    "a partition has one limit: `{}` is set too (choose max_concurrent, aimd or gradient)",
                    set[0]
                ),
            ));
        }
        let mut b = BulkheadConfig::builder();
        if let Some(n) = self.max_concurrent {
            b = b.max_concurrent(n);
        }
        if let Some(a) = &self.aimd {
            b = b.aimd(a.to_aimd());
        }
        if let Some(g) = &self.gradient {
            b = b.gradient(g.to_gradient());
        }
        if let Some(n) = self.max_queue {
            b = b.max_queue(n);
        }
        if let Some(d) = self.max_wait {
            b = b.max_wait(d);
        }
        b.build().map_err(|e| {
            let mut p = path.to_vec();
            p.extend(e.field().split('.'));
            ConfigError::new(
                key_path(p),
                Some(e.value().to_owned()),
                reason_after(&e.to_string(), e.value()),
            )
        })
    }
}

/// `aimd`: an AIMD limit ([`Aimd`]); unset fields take its defaults
/// (20, between 1 and 200, backoff 0.9, 5 s latency threshold).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AimdSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initial_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backoff_ratio: Option<f64>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    latency_threshold: Option<Duration>,
}

impl AimdSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// The limit to start with.
        initial_limit, with_initial_limit, u32);
    option_field!(
        /// The lowest limit.
        min_limit, with_min_limit, u32);
    option_field!(
        /// The highest limit.
        max_limit, with_max_limit, u32);
    option_field!(
        /// What a backoff multiplies the limit by, within [0.5, 1).
        backoff_ratio, with_backoff_ratio, f64);
    option_field!(
        /// A call slower than this is an overload signal.
        latency_threshold, with_latency_threshold, Duration);

    fn to_aimd(&self) -> Aimd {
        let d = Aimd::default();
        Aimd {
            initial_limit: self.initial_limit.unwrap_or(d.initial_limit),
            min_limit: self.min_limit.unwrap_or(d.min_limit),
            max_limit: self.max_limit.unwrap_or(d.max_limit),
            backoff_ratio: self.backoff_ratio.unwrap_or(d.backoff_ratio),
            latency_threshold: self.latency_threshold.unwrap_or(d.latency_threshold),
        }
    }
}

/// `gradient`: a gradient limit ([`Gradient`]); unset fields take its
/// defaults (4, between 1 and 200, smoothing 0.2, tolerance 1.5, queue
/// allowance 4, short window 10 calls, no-load latency over 30 s).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradientSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initial_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_limit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    smoothing: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tolerance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_allowance: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    short_window: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    min_rtt_window: Option<Duration>,
}

impl GradientSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// The limit to start with.
        initial_limit, with_initial_limit, u32);
    option_field!(
        /// The lowest limit.
        min_limit, with_min_limit, u32);
    option_field!(
        /// The highest limit.
        max_limit, with_max_limit, u32);
    option_field!(
        /// How far one call moves the limit toward its target, within (0, 1].
        smoothing, with_smoothing, f64);
    option_field!(
        /// How much slower than the no-load latency calls may get; at least 1.
        tolerance, with_tolerance, f64);
    option_field!(
        /// Calls allowed beyond what the gradient says.
        queue_allowance, with_queue_allowance, f64);
    option_field!(
        /// About how many calls the current latency averages over.
        short_window, with_short_window, u32);
    option_field!(
        /// The window over which the no-load latency is the minimum.
        min_rtt_window, with_min_rtt_window, Duration);

    fn to_gradient(&self) -> Gradient {
        let d = Gradient::default();
        Gradient {
            initial_limit: self.initial_limit.unwrap_or(d.initial_limit),
            min_limit: self.min_limit.unwrap_or(d.min_limit),
            max_limit: self.max_limit.unwrap_or(d.max_limit),
            smoothing: self.smoothing.unwrap_or(d.smoothing),
            tolerance: self.tolerance.unwrap_or(d.tolerance),
            queue_allowance: self.queue_allowance.unwrap_or(d.queue_allowance),
            short_window: self.short_window.unwrap_or(d.short_window),
            min_rtt_window: self.min_rtt_window.unwrap_or(d.min_rtt_window),
        }
    }
}

/// A config's bulkheads, every value checked: the per-service partition
/// config and the selector partitions (resolved selector, config).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BulkheadSpec {
    pub(crate) per_service: Option<BulkheadConfig>,
    pub(crate) partitions: Vec<(String, BulkheadConfig)>,
}

impl BulkheadSpec {
    /// The layer this spec describes.
    pub(crate) fn to_layer(&self) -> Result<BulkheadLayer, grpc_bulkhead::BulkheadConfigError> {
        let mut layer = match &self.per_service {
            Some(c) => BulkheadLayer::new(c.clone()),
            None => BulkheadLayer::empty(),
        };
        for (selector, config) in &self.partitions {
            layer = layer.with_partition(selector, config.clone())?;
        }
        Ok(layer)
    }
}

/// `[retry.budget]`: a retry budget in the Finagle / Linkerd style
/// ([`RetryBudget`]): retries (and hedges) may be at most `retry_ratio` of
/// the calls made within the last `ttl`, plus `min_retries_per_second`.
/// One budget per target (endpoint), as the throttle. Unset fields take
/// Finagle's defaults: `ttl` 10 s, `min_retries_per_second` 10,
/// `retry_ratio` 0.2.
///
/// With `[retry.throttle]` as well, a retry is sent only when both allow
/// it. The throttle (gRFC A6) stops retries once failures outnumber
/// successes, which suits an overloaded server; the budget keeps retrying
/// a bounded share of calls whatever their outcome, which suits random
/// faults on a healthy server (where the throttle at ratio 0.5 stops
/// nearly all retries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_retries_per_second: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_ratio: Option<f32>,
}

impl BudgetSettings {
    /// Everything at its default (10 s, 10 a second, 20 %).
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// How long a call or a retry counts (1 s to 60 s).
        ttl, with_ttl, Duration);
    option_field!(
        /// Retries allowed per second whatever the traffic.
        min_retries_per_second, with_min_retries_per_second, u32);
    option_field!(
        /// Retries allowed per call made within `ttl` (0.2: 20 %).
        retry_ratio, with_retry_ratio, f32);

    /// A new budget with these settings.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad value (`retry.budget.ttl = ...`).
    pub fn to_budget(&self) -> Result<RetryBudget, ConfigError> {
        RetryBudget::new(
            self.ttl.unwrap_or(Duration::from_secs(10)),
            self.min_retries_per_second.unwrap_or(10),
            self.retry_ratio.unwrap_or(0.2),
        )
        .map_err(|e| retry_error(&["retry"], &e))
    }
}

/// `[timeouts]`: the default deadline, per-operation deadlines, and an
/// optional per-attempt timeout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    default: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    per_attempt: Option<Duration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    operations: BTreeMap<String, MaybeTimeout>,
}

impl TimeoutConfig {
    fn is_empty(&self) -> bool {
        self.default.is_none() && self.per_attempt.is_none() && self.operations.is_empty()
    }

    /// `default`: every method's deadline unless listed.
    pub fn default_timeout(&self) -> Option<Duration> {
        self.default
    }

    /// `per_attempt`: a bound on each attempt below the retry layer.
    pub fn per_attempt(&self) -> Option<Duration> {
        self.per_attempt
    }

    /// `[timeouts.operations]`, by selector as written; `None` is `"none"`
    /// (no deadline for those methods).
    pub fn operations(&self) -> impl Iterator<Item = (&str, Option<Duration>)> {
        self.operations.iter().map(|(k, v)| (k.as_str(), v.0))
    }
}

/// `[circuit_breakers.<name>]`. Unset fields take [`BreakerConfig`]'s
/// defaults (5 failures, 2 successes, 30 s open, failures forgotten after
/// 60 s, counted by number).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    success_threshold: Option<u32>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    reset_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    half_open_max_calls: Option<u32>,
    #[serde(default, with = "opt_codes", skip_serializing_if = "Option::is_none")]
    failure_codes: Option<CodeSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_rate: Option<FailureRateSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency_metric: Option<bool>,
}

impl BreakerSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// CLOSED opens after this many failures within `reset_timeout`.
        failure_threshold, with_failure_threshold, u32);
    option_field!(
        /// HALF_OPEN closes after this many successful probes.
        success_threshold, with_success_threshold, u32);
    option_field!(
        /// Time in OPEN before probes are let through.
        timeout, with_timeout, Duration);
    option_field!(
        /// Failures in CLOSED older than this are forgotten.
        reset_timeout, with_reset_timeout, Duration);
    option_field!(
        /// Probes HALF_OPEN admits.
        half_open_max_calls, with_half_open_max_calls, u32);
    option_field!(
        /// The codes that count as failures.
        failure_codes, with_failure_codes, CodeSet);
    option_field!(
        /// Opens on a failure rate over a sliding window instead of a count.
        failure_rate, with_failure_rate, FailureRateSettings);
    option_field!(
        /// Whether calls are timed for `circuit_breaker.call.latency`
        /// (default: on). Off, the breaker reads the clock only for a
        /// slow-call threshold: two clock reads fewer per call where
        /// nobody reads the histogram.
        latency_metric, with_latency_metric, bool);

    /// The breaker crate's config these settings describe (not validated).
    pub fn to_breaker_config(&self) -> BreakerConfig {
        let mut c = BreakerConfig::default();
        if let Some(v) = self.failure_threshold {
            c = c.with_failure_threshold(v);
        }
        if let Some(v) = self.success_threshold {
            c = c.with_success_threshold(v);
        }
        if let Some(v) = self.timeout {
            c = c.with_timeout(v);
        }
        if let Some(v) = self.reset_timeout {
            c = c.with_reset_timeout(v);
        }
        if let Some(v) = self.half_open_max_calls {
            c = c.with_half_open_max_calls(v);
        }
        if let Some(v) = self.failure_codes {
            c = c.with_failure_codes(v);
        }
        if let Some(rate) = &self.failure_rate {
            c = c.with_failure_rate(rate.to_failure_rate());
        }
        if let Some(on) = self.latency_metric {
            c = c.with_latency_metric(on);
        }
        c
    }
}

/// `[circuit_breakers.<name>.failure_rate]`: resilience4j's failure-rate
/// mode. Unset fields take [`FailureRate`]'s defaults (window 100, minimum
/// 10 calls, 50 %, no slow-call detection).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRateSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    minimum_calls: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure_rate: Option<f64>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    slow_call_duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    slow_call_rate: Option<f64>,
}

impl FailureRateSettings {
    /// Everything at its default.
    pub fn new() -> Self {
        Self::default()
    }

    option_field!(
        /// How many recent calls the window holds.
        window, with_window, u32);
    option_field!(
        /// Calls the window must hold before a rate can open the breaker.
        minimum_calls, with_minimum_calls, u32);
    option_field!(
        /// Failure rate in percent that opens the breaker.
        failure_rate, with_failure_rate, f64);
    option_field!(
        /// A call at least this long is slow.
        slow_call_duration, with_slow_call_duration, Duration);
    option_field!(
        /// Slow-call rate in percent that opens the breaker.
        slow_call_rate, with_slow_call_rate, f64);

    fn to_failure_rate(&self) -> FailureRate {
        let d = FailureRate::default();
        FailureRate {
            window: self.window.unwrap_or(d.window),
            minimum_calls: self.minimum_calls.unwrap_or(d.minimum_calls),
            failure_rate: self.failure_rate.unwrap_or(d.failure_rate),
            slow_call_duration: self.slow_call_duration.or(d.slow_call_duration),
            slow_call_rate: self.slow_call_rate.unwrap_or(d.slow_call_rate),
        }
    }
}

/// `[channels.<name>]`: one downstream target, at one `endpoint`, or
/// balanced over `endpoints` or the addresses of `dns` (see the
/// [module docs](self#balanced-channels)).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns: Option<String>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    dns_refresh: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    services: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    breaker: Option<String>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    connect_timeout: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    tcp_keepalive: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    http2_keep_alive_interval: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    keep_alive_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrent_per_endpoint: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint_breaker: Option<BreakerSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outlier: Option<OutlierSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    health: Option<HealthSettings>,
}

impl ChannelSettings {
    /// A channel with nothing set; its endpoint may come from code
    /// ([`ResilientChannels::builder`](crate::ResilientChannels::builder)).
    pub fn new() -> Self {
        Self::default()
    }

    /// The URI to connect to, e.g. `http://127.0.0.1:50051`.
    pub fn with_endpoint(mut self, uri: impl Into<String>) -> Self {
        self.endpoint = Some(uri.into());
        self
    }

    /// The URI, if set.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// A balanced channel over these URIs (`endpoints = [...]`), each with
    /// its own circuit breaker named `<channel>@<host:port>`.
    pub fn with_endpoints<I, T>(mut self, uris: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.endpoints = Some(uris.into_iter().map(Into::into).collect());
        self
    }

    /// The balanced channel's URIs, if set.
    pub fn endpoints(&self) -> Option<&[String]> {
        self.endpoints.as_deref()
    }

    /// A balanced channel over the addresses of `host_port` (e.g.
    /// `query.internal:50051`), resolved again every `dns_refresh`.
    /// Endpoints found by DNS get the channel's connect options.
    pub fn with_dns(mut self, host_port: impl Into<String>) -> Self {
        self.dns = Some(host_port.into());
        self
    }

    /// The DNS name, if set.
    pub fn dns(&self) -> Option<&str> {
        self.dns.as_deref()
    }

    option_field!(
        /// How often `dns` is resolved again (default 30 s).
        dns_refresh, with_dns_refresh, Duration);
    option_field!(
        /// A bulkhead per endpoint of a balanced channel: at most this many
        /// calls in flight to each; a full endpoint is skipped.
        max_concurrent_per_endpoint, with_max_concurrent_per_endpoint, usize);
    option_field!(
        /// The config of each endpoint's breaker in a balanced channel
        /// (`[channels.<name>.endpoint_breaker]`, as a `[circuit_breakers]`
        /// entry without `timeout`, `success_threshold` and
        /// `half_open_max_calls`, which the outlier settings decide).
        endpoint_breaker, with_endpoint_breaker, BreakerSettings);
    option_field!(
        /// Ejection settings of a balanced channel.
        outlier, with_outlier, OutlierSettings);
    option_field!(
        /// Health checks of a balanced channel's endpoints.
        health, with_health, HealthSettings);

    /// Whether `other` names the same endpoints.
    pub(crate) fn same_endpoints(&self, other: &ChannelSettings) -> bool {
        self.endpoint == other.endpoint
            && self.endpoints == other.endpoints
            && self.dns == other.dns
    }

    /// Whether `other` connects as this does: the same endpoints and
    /// balanced-channel settings (what a reload cannot change).
    pub(crate) fn same_connection(&self, other: &ChannelSettings) -> bool {
        self.same_endpoints(other)
            && self.dns_refresh == other.dns_refresh
            && self.max_concurrent_per_endpoint == other.max_concurrent_per_endpoint
            && self.endpoint_breaker == other.endpoint_breaker
            && self.outlier == other.outlier
            && self.health == other.health
    }

    /// Adds a fully qualified gRPC service this channel serves.
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.services.push(service.into());
        self
    }

    /// The services it serves (documentation for readers of the file, and
    /// [`ResilientChannels::for_service`](crate::ResilientChannels::for_service)).
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Names the breaker of this channel (default: the channel's name).
    pub fn with_breaker(mut self, name: impl Into<String>) -> Self {
        self.breaker = Some(name.into());
        self
    }

    /// The breaker named, if set.
    pub fn breaker(&self) -> Option<&str> {
        self.breaker.as_deref()
    }

    option_field!(
        /// How long connecting may take.
        connect_timeout, with_connect_timeout, Duration);
    option_field!(
        /// TCP keepalive interval.
        tcp_keepalive, with_tcp_keepalive, Duration);
    option_field!(
        /// HTTP/2 PING interval.
        http2_keep_alive_interval, with_http2_keep_alive_interval, Duration);
    option_field!(
        /// How long to wait for a PING's answer.
        keep_alive_timeout, with_keep_alive_timeout, Duration);

    /// Applies the connect options to `endpoint`.
    pub fn configure_endpoint(&self, mut endpoint: Endpoint) -> Endpoint {
        if let Some(d) = self.connect_timeout {
            endpoint = endpoint.connect_timeout(d);
        }
        if let Some(d) = self.tcp_keepalive {
            endpoint = endpoint.tcp_keepalive(Some(d));
        }
        if let Some(d) = self.http2_keep_alive_interval {
            endpoint = endpoint.http2_keep_alive_interval(d);
        }
        if let Some(d) = self.keep_alive_timeout {
            endpoint = endpoint.keep_alive_timeout(d);
        }
        endpoint
    }
}

/// A config turned into the layers' own policies, every value checked.
#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub(crate) timeouts: TimeoutPolicy,
    pub(crate) per_attempt: Option<TimeoutPolicy>,
    pub(crate) retry: RetryVariants,
    pub(crate) throttle: Option<ThrottleSettings>,
    pub(crate) budget: Option<BudgetSettings>,
    pub(crate) bulkhead: Option<BulkheadSpec>,
    /// Every breaker a channel uses or the file names, with its config.
    pub(crate) breakers: BTreeMap<String, BreakerConfig>,
    /// Channel name to its breaker's name.
    pub(crate) channel_breakers: BTreeMap<String, String>,
    /// Channel name to the services it serves.
    pub(crate) channel_services: BTreeMap<String, Vec<String>>,
}

/// The retry policies of a config, and two per-call variants: `keyed`
/// for calls that carry their own idempotency key or are marked idempotent
/// (a write may be retried: the key lets the server deduplicate), `strict`
/// for calls marked non-idempotent (retried only when provably
/// unprocessed).
#[derive(Clone, Debug, Default)]
pub(crate) struct RetryVariants {
    pub(crate) normal: RetryPolicies,
    pub(crate) keyed: RetryPolicies,
    pub(crate) strict: RetryPolicies,
}

impl RetryVariants {
    fn insert(
        &mut self,
        selector: &str,
        settings: Option<&RetrySettings>,
    ) -> Result<(), RetryConfigError> {
        fn add(
            map: &mut RetryPolicies,
            selector: &str,
            policy: Option<RetryPolicy>,
        ) -> Result<(), RetryConfigError> {
            let current = std::mem::take(map);
            *map = match policy {
                Some(p) => current.with_operation(selector, p)?,
                None => current.without_retry(selector)?,
            };
            Ok(())
        }
        let keyed = settings.map(|s| RetrySettings {
            idempotency_keys: Some(true),
            ..s.clone()
        });
        let strict = settings.map(|s| RetrySettings {
            idempotent: Some(false),
            idempotency_keys: Some(false),
            ..s.clone()
        });
        add(
            &mut self.normal,
            selector,
            settings.map(RetrySettings::to_policy),
        )?;
        add(
            &mut self.keyed,
            selector,
            keyed.as_ref().map(RetrySettings::to_policy),
        )?;
        add(
            &mut self.strict,
            selector,
            strict.as_ref().map(RetrySettings::to_policy),
        )?;
        Ok(())
    }
}

impl RetryVariants {
    /// Hedges `selector`'s methods: with keys for calls that carry their
    /// own key or are marked idempotent, and not at all (sent once) for
    /// calls marked non-idempotent.
    fn insert_hedge(
        &mut self,
        selector: &str,
        settings: &HedgingSettings,
    ) -> Result<(), RetryConfigError> {
        let policy = settings.to_policy();
        self.normal = std::mem::take(&mut self.normal).with_hedging(selector, policy)?;
        self.keyed = std::mem::take(&mut self.keyed)
            .with_hedging(selector, policy.with_idempotency_keys())?;
        self.strict = std::mem::take(&mut self.strict).without_retry(selector)?;
        Ok(())
    }
}

fn hedging_error(prefix: &[&str], e: &RetryConfigError) -> ConfigError {
    let mut path: Vec<&str> = prefix.to_vec();
    let field = e.field();
    path.extend(field.strip_prefix("hedging.").unwrap_or(field).split('.'));
    ConfigError::new(
        key_path(path),
        Some(e.value().to_owned()),
        reason_after(&e.to_string(), e.value()),
    )
}

/// Maps a layer error's `Display` (`... \`field\` = value: reason`) to its
/// reason.
fn reason_after(display: &str, value: &str) -> String {
    let marker = format!(" = {value}: ");
    match display.find(&marker) {
        Some(i) => display[i + marker.len()..].to_owned(),
        None => display.to_owned(),
    }
}

fn retry_error(prefix: &[&str], e: &RetryConfigError) -> ConfigError {
    let mut path: Vec<&str> = prefix.to_vec();
    path.extend(e.field().split('.'));
    ConfigError::new(
        key_path(path),
        Some(e.value().to_owned()),
        reason_after(&e.to_string(), e.value()),
    )
}

fn breaker_error(name: &str, e: &BreakerConfigError) -> ConfigError {
    breaker_error_at(&["circuit_breakers", name], e)
}

fn breaker_error_at(prefix: &[&str], e: &BreakerConfigError) -> ConfigError {
    let mut path = prefix.to_vec();
    path.extend(e.field().split('.'));
    ConfigError::new(
        key_path(path),
        Some(e.value().to_owned()),
        reason_after(&e.to_string(), e.value()),
    )
}

fn timeout_error(path: &[&str], e: &TimeoutConfigError) -> ConfigError {
    let display = e.to_string();
    let marker = format!("(value {}): ", e.value());
    let reason = match display.find(&marker) {
        Some(i) => display[i + marker.len()..].to_owned(),
        None => display,
    };
    ConfigError::new(
        key_path(path.iter().copied()),
        Some(e.value().to_owned()),
        reason,
    )
}

impl ResilienceConfig {
    /// An empty config: no retry, no deadline, breakers at their defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads a config file.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, line, key, value and why.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::from_file_with_methods(path, std::iter::empty::<&str>())
    }

    /// Reads a config file, checking selectors against the methods the
    /// application calls (`/package.Service/Method`); see the
    /// [module docs](self#operation-selectors).
    ///
    /// # Errors
    ///
    /// As [`ResilienceConfig::from_file`].
    pub fn from_file_with_methods<I, T>(
        path: impl AsRef<Path>,
        methods: I,
    ) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("", None, format!("cannot read the file: {e}")).in_file(Some(path))
        })?;
        Self::parse(&text, Some(path), methods)
    }

    /// Parses TOML text.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the line, key, value and why.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, None, std::iter::empty::<&str>())
    }

    /// Parses TOML text, checking selectors against the methods the
    /// application calls.
    ///
    /// # Errors
    ///
    /// As [`ResilienceConfig::from_toml`].
    pub fn from_toml_with_methods<I, T>(text: &str, methods: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        Self::parse(text, None, methods)
    }

    fn parse<I, T>(text: &str, file: Option<&Path>, methods: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let spans = SpanIndex::new(text);
        let mut config: ResilienceConfig = toml::from_str(text).map_err(|e| {
            let (line, key, value) = match e.span() {
                Some(span) => {
                    let mut path = spans.path_at(&span);
                    let token = spans.text_of(&span).unwrap_or("");
                    // An unknown key: the span is the key itself.
                    let is_key = e.message().starts_with("unknown field");
                    let key_name = token.trim_matches('"');
                    if is_key && path.last().map(String::as_str) != Some(key_name) {
                        path.push(key_name.to_owned());
                    }
                    let value = (!is_key && !token.is_empty()).then(|| token.to_owned());
                    (
                        Some(spans.line_of(span.start)),
                        key_path(path.iter().map(String::as_str)),
                        value,
                    )
                }
                None => (None, String::new(), None),
            };
            ConfigError::new(key, value, e.message().trim().to_owned())
                .at_line(line)
                .in_file(file)
        })?;
        config.known = KnownMethods::new(methods)
            .map_err(|e| ConfigError::new("", None, format!("a known method is invalid: {e}")))?;
        config.compile().map_err(|e| {
            let segments = split_key_path(e.key());
            let refs: Vec<&str> = segments.iter().map(String::as_str).collect();
            e.at_line(spans.line_of_path(&refs)).in_file(file)
        })?;
        Ok(config)
    }

    /// The config as TOML, in the file format; reading it back gives an
    /// equal config.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a config always serializes to TOML")
    }

    /// Checks selectors against the methods the application calls
    /// (`/package.Service/Method`); see the [module docs](self#operation-selectors).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if a method path is malformed.
    pub fn with_known_methods<I, T>(mut self, methods: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        self.known = KnownMethods::new(methods)
            .map_err(|e| ConfigError::new("", None, format!("a known method is invalid: {e}")))?;
        Ok(self)
    }

    /// The method paths given to check selectors against, if any.
    pub fn known_methods(&self) -> Vec<String> {
        self.known.paths().collect()
    }

    /// Sets `[retry.default]`.
    pub fn with_retry_default(mut self, settings: RetrySettings) -> Self {
        self.retry.default = Some(settings);
        self
    }

    /// Sets `[retry.operations."<selector>"]`.
    pub fn with_retry_operation(
        mut self,
        selector: impl Into<String>,
        settings: RetrySettings,
    ) -> Self {
        self.retry.operations.insert(selector.into(), settings);
        self
    }

    /// Sets `[retry.throttle]`.
    pub fn with_retry_throttle(mut self, throttle: ThrottleSettings) -> Self {
        self.retry.throttle = Some(throttle);
        self
    }

    /// Sets `[hedging.default]`.
    pub fn with_hedging_default(mut self, settings: HedgingSettings) -> Self {
        self.hedging.default = Some(settings);
        self
    }

    /// Sets `[hedging.operations."<selector>"]`.
    pub fn with_hedging_operation(
        mut self,
        selector: impl Into<String>,
        settings: HedgingSettings,
    ) -> Self {
        self.hedging.operations.insert(selector.into(), settings);
        self
    }

    /// `[hedging]`.
    pub fn hedging(&self) -> &HedgingConfig {
        &self.hedging
    }

    /// Sets `[bulkhead.default]`: a partition per gRPC service.
    pub fn with_bulkhead_default(mut self, settings: BulkheadSettings) -> Self {
        self.bulkhead.default = Some(settings);
        self
    }

    /// Sets `[bulkhead.operations."<selector>"]`: one partition for the
    /// methods `selector` names.
    pub fn with_bulkhead_operation(
        mut self,
        selector: impl Into<String>,
        settings: BulkheadSettings,
    ) -> Self {
        self.bulkhead.operations.insert(selector.into(), settings);
        self
    }

    /// `[bulkhead]`.
    pub fn bulkhead(&self) -> &BulkheadSection {
        &self.bulkhead
    }

    /// Sets `[retry.budget]`.
    pub fn with_retry_budget(mut self, budget: BudgetSettings) -> Self {
        self.retry.budget = Some(budget);
        self
    }

    /// Sets `[circuit_breakers.<name>]`.
    pub fn with_breaker(mut self, name: impl Into<String>, settings: BreakerSettings) -> Self {
        self.circuit_breakers.insert(name.into(), settings);
        self
    }

    /// Sets `[timeouts] default`.
    pub fn with_timeout_default(mut self, timeout: Duration) -> Self {
        self.timeouts.default = Some(timeout);
        self
    }

    /// Sets `[timeouts] per_attempt`: each attempt, below the retry layer,
    /// ends with `DEADLINE_EXCEEDED` after `timeout`, and the retry policy
    /// decides whether to try again within the call's deadline. Each
    /// attempt then costs two small allocations (its timer state is boxed,
    /// so that calls without a per-attempt timeout carry none).
    pub fn with_per_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timeouts.per_attempt = Some(timeout);
        self
    }

    /// Sets `[timeouts.operations] "<selector>" = timeout`.
    pub fn with_timeout_operation(
        mut self,
        selector: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        self.timeouts
            .operations
            .insert(selector.into(), MaybeTimeout(Some(timeout)));
        self
    }

    /// Sets `[timeouts.operations] "<selector>" = "none"`: no deadline for
    /// those methods (one the caller sets still applies).
    pub fn without_timeout(mut self, selector: impl Into<String>) -> Self {
        self.timeouts
            .operations
            .insert(selector.into(), MaybeTimeout(None));
        self
    }

    /// Sets `[channels.<name>]`.
    pub fn with_channel(mut self, name: impl Into<String>, settings: ChannelSettings) -> Self {
        self.channels.insert(name.into(), settings);
        self
    }

    /// `[retry]`.
    pub fn retry(&self) -> &RetryConfig {
        &self.retry
    }

    /// `[timeouts]`.
    pub fn timeouts(&self) -> &TimeoutConfig {
        &self.timeouts
    }

    /// `[circuit_breakers]`, by name.
    pub fn breakers(&self) -> &BTreeMap<String, BreakerSettings> {
        &self.circuit_breakers
    }

    /// `[channels]`, by name.
    pub fn channels(&self) -> &BTreeMap<String, ChannelSettings> {
        &self.channels
    }

    /// Checks everything, with each layer's own validation.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the key path, value and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.compile().map(|_| ())
    }

    /// The retry layer's policies this config describes.
    ///
    /// # Errors
    ///
    /// As [`ResilienceConfig::validate`].
    pub fn retry_policies(&self) -> Result<RetryPolicies, ConfigError> {
        self.compile().map(|c| c.retry.normal)
    }

    /// The timeout layer's policy (per call) this config describes.
    ///
    /// # Errors
    ///
    /// As [`ResilienceConfig::validate`].
    pub fn timeout_policy(&self) -> Result<TimeoutPolicy, ConfigError> {
        self.compile().map(|c| c.timeouts)
    }

    /// The breaker configs, by name: every `[circuit_breakers]` entry and
    /// every channel's breaker.
    ///
    /// # Errors
    ///
    /// As [`ResilienceConfig::validate`].
    pub fn breaker_configs(&self) -> Result<BTreeMap<String, BreakerConfig>, ConfigError> {
        self.compile().map(|c| c.breakers)
    }

    pub(crate) fn compile(&self) -> Result<Compiled, ConfigError> {
        // Retry.
        let retry_default = self.retry.default.clone();
        let mut retry = RetryVariants::default();
        if let Some(settings) = &retry_default {
            settings
                .to_policy()
                .validate()
                .map_err(|e| retry_error(&["retry", "default"], &e))?;
            if settings.enabled != Some(false) {
                retry
                    .insert("*", Some(settings))
                    .map_err(|e| retry_error(&["retry", "default"], &e))?;
            }
        }
        let inherited = retry_default.unwrap_or_default();
        let mut resolved_ops: BTreeMap<String, String> = BTreeMap::new();
        for (selector, settings) in &self.retry.operations {
            let path = ["retry", "operations", selector.as_str()];
            let resolved = self.resolve(selector, &path)?;
            if let Some(other) = resolved_ops.insert(resolved.clone(), selector.clone()) {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    format!("names the same methods as `{other}` ({resolved})"),
                ));
            }
            let merged = settings.over(&inherited);
            if merged.enabled != Some(false) {
                merged
                    .to_policy()
                    .validate()
                    .map_err(|e| retry_error(&path, &e))?;
            }
            let enabled = (merged.enabled != Some(false)).then_some(&merged);
            retry.insert(&resolved, enabled).map_err(|e| {
                ConfigError::new(
                    key_path(path),
                    None,
                    reason_after(&e.to_string(), e.value()),
                )
            })?;
        }
        // Hedging: a method is retried or hedged, never both.
        let hedge_default = self.hedging.default.clone();
        if let Some(settings) = &hedge_default {
            let path = ["hedging", "default"];
            if self.retry.default.is_some() {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    "a method is either retried or hedged (gRFC A6): [retry.default] is set too",
                ));
            }
            settings
                .to_policy()
                .validate()
                .map_err(|e| hedging_error(&path, &e))?;
            retry
                .insert_hedge("*", settings)
                .map_err(|e| hedging_error(&path, &e))?;
        }
        let hedge_inherited = hedge_default.unwrap_or_default();
        let mut resolved_hedges: BTreeMap<String, String> = BTreeMap::new();
        for (selector, settings) in &self.hedging.operations {
            let path = ["hedging", "operations", selector.as_str()];
            let resolved = self.resolve(selector, &path)?;
            if let Some(other) = resolved_hedges.insert(resolved.clone(), selector.clone()) {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    format!("names the same methods as `{other}` ({resolved})"),
                ));
            }
            if let Some(other) = resolved_ops.get(&resolved) {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    format!(
                        "a method is either retried or hedged (gRFC A6): \
                         [retry.operations.\"{other}\"] names the same methods ({resolved})"
                    ),
                ));
            }
            let merged = settings.over(&hedge_inherited);
            merged
                .to_policy()
                .validate()
                .map_err(|e| hedging_error(&path, &e))?;
            retry.insert_hedge(&resolved, &merged).map_err(|e| {
                ConfigError::new(
                    key_path(path),
                    None,
                    reason_after(&e.to_string(), e.value()),
                )
            })?;
        }
        // Bulkheads.
        let bulkhead = if self.bulkhead.is_empty() {
            None
        } else {
            let base = self.bulkhead.default.clone().unwrap_or_default();
            let per_service = match &self.bulkhead.default {
                Some(settings) => Some(settings.to_config(&["bulkhead", "default"])?),
                None => None,
            };
            let mut partitions = Vec::new();
            let mut resolved_parts: BTreeMap<String, String> = BTreeMap::new();
            for (selector, settings) in &self.bulkhead.operations {
                let path = ["bulkhead", "operations", selector.as_str()];
                let resolved = self.resolve(selector, &path)?;
                if let Some(other) = resolved_parts.insert(resolved.clone(), selector.clone()) {
                    return Err(ConfigError::new(
                        key_path(path),
                        None,
                        format!("names the same methods as `{other}` ({resolved})"),
                    ));
                }
                let config = settings.over(&base).to_config(&path)?;
                partitions.push((resolved, config));
            }
            let spec = BulkheadSpec {
                per_service,
                partitions,
            };
            spec.to_layer().map_err(|e| {
                ConfigError::new(
                    "bulkhead.operations",
                    Some(e.value().to_owned()),
                    reason_after(&e.to_string(), e.value()),
                )
            })?;
            Some(spec)
        };
        if let Some(throttle) = &self.retry.throttle {
            throttle.to_throttle()?;
        }
        if let Some(budget) = &self.retry.budget {
            budget.to_budget()?;
        }

        // Timeouts.
        let mut timeouts = match self.timeouts.default {
            Some(d) => {
                TimeoutPolicy::new(d).map_err(|e| timeout_error(&["timeouts", "default"], &e))?
            }
            None => TimeoutPolicy::empty(),
        };
        let mut resolved_timeouts: BTreeMap<String, String> = BTreeMap::new();
        for (selector, value) in &self.timeouts.operations {
            let path = ["timeouts", "operations", selector.as_str()];
            let resolved = self.resolve(selector, &path)?;
            if let Some(other) = resolved_timeouts.insert(resolved.clone(), selector.clone()) {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    format!("names the same methods as `{other}` ({resolved})"),
                ));
            }
            if resolved == "*" {
                return Err(ConfigError::new(
                    key_path(path),
                    None,
                    "write the default deadline as `[timeouts] default`",
                ));
            }
            timeouts = match value.0 {
                Some(d) => timeouts.with_operation(&resolved, d),
                None => timeouts.without_timeout(&resolved),
            }
            .map_err(|e| timeout_error(&path, &e))?;
        }
        let per_attempt = match self.timeouts.per_attempt {
            Some(d) => Some(
                TimeoutPolicy::new(d)
                    .map_err(|e| timeout_error(&["timeouts", "per_attempt"], &e))?,
            ),
            None => None,
        };

        // Breakers.
        let mut breakers = BTreeMap::new();
        for (name, settings) in &self.circuit_breakers {
            let config = settings.to_breaker_config();
            config.validate().map_err(|e| breaker_error(name, &e))?;
            breakers.insert(name.clone(), config);
        }

        // Channels.
        let mut channel_breakers = BTreeMap::new();
        for (name, channel) in &self.channels {
            let breaker = match &channel.breaker {
                Some(b) if !self.circuit_breakers.contains_key(b) => {
                    return Err(ConfigError::new(
                        key_path(["channels", name.as_str(), "breaker"]),
                        Some(format!("{b:?}")),
                        format!("there is no [circuit_breakers.{b}] section"),
                    ));
                }
                Some(b) => b.clone(),
                None => name.clone(),
            };
            breakers
                .entry(breaker.clone())
                .or_insert_with(BreakerConfig::default);
            channel_breakers.insert(name.clone(), breaker);
            channel.check_endpoints(name)?;
            for (i, service) in channel.services.iter().enumerate() {
                let selector = format!("{service}/*");
                if service.contains('/')
                    || selector.parse::<grpc_resilience_core::Selector>().is_err()
                {
                    let index = i.to_string();
                    return Err(ConfigError::new(
                        key_path(["channels", name.as_str(), "services", index.as_str()]),
                        Some(format!("{service:?}")),
                        "a service is written fully qualified, as `package.Service`",
                    ));
                }
            }
        }

        Ok(Compiled {
            timeouts,
            per_attempt,
            retry,
            throttle: self.retry.throttle,
            budget: self.retry.budget,
            bulkhead,
            breakers,
            channel_breakers,
            channel_services: self
                .channels
                .iter()
                .map(|(name, c)| (name.clone(), c.services.clone()))
                .collect(),
        })
    }

    fn resolve(&self, selector: &str, path: &[&str]) -> Result<String, ConfigError> {
        selector::resolve(selector, &self.known)
            .map_err(|reason| ConfigError::new(key_path(path.iter().copied()), None, reason))
    }
}

/// Splits a key path made by [`key_path`] back into its segments.
fn split_key_path(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = path.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '.' if !quoted => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    out.push(current);
    out
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_balance;
#[cfg(test)]
mod tests_policies;
