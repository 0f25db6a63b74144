//! Resilient tonic gRPC clients from one config file.
//!
//! `grpc-resilience` puts deadlines, retries (or hedging), bulkheads and
//! circuit breakers in front of a tonic `Channel` in the right order, from
//! one TOML file (or a gRPC service config, or the same settings in code),
//! with call-level telemetry, named channels and live reload. It composes
//! the layer crates ([`grpc_timeout`], [`grpc_retry`], [`grpc_bulkhead`],
//! [`grpc_circuit_breaker`]) and re-exports what a user needs, so it is
//! the one dependency to add.
//!
//! # Quick start
//!
//! ```no_run
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_resilience::{ResilienceConfig, ResilientChannel};
//! use tonic::transport::Channel;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ResilienceConfig::from_file("config/resilience.toml")?;
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let mut client = QueryServiceClient::new(ResilientChannel::new(channel, &config)?);
//! # let _ = &mut client;
//! # Ok(())
//! # }
//! ```
//!
//! Every method of the generated client now has its deadline, its retry
//! policy and its breaker; the stub is unchanged. For one channel per
//! downstream service, as the file's `[channels]` describe, see
//! [`ResilientChannels`]; for a `ServiceBuilder`, [`ResilienceLayer`].
//!
//! # The order of the layers, and why
//!
//! A [`ResilientChannel`] is, from the caller inwards:
//!
//! 1. **Call telemetry**: `grpc.client.call.count` and
//!    `grpc.client.call.duration` per *logical* call, and its `grpc_call`
//!    span. Outermost so that a call retried three times counts once, its
//!    duration includes the backoff, and the attempts' spans are its
//!    children. Below the retry layer it would count attempts, and the
//!    caller's view (one call, one status, one latency) would be lost.
//! 2. **Deadline** ([`grpc_timeout::TimeoutLayer`]): the method's budget
//!    for the whole call, retries included (the shorter of the configured
//!    one and the caller's own). Above the retry layer so that the retry
//!    layer sees the deadline, never sleeps or starts an attempt past it,
//!    and sends each attempt with the time actually left in
//!    `grpc-timeout`. Below it, each attempt would get the full budget and
//!    a call could take `max_attempts` times its deadline plus the backoff.
//!    It keeps its own timer for the response head even over a tonic
//!    `Channel`, which enforces the `grpc-timeout` each attempt is sent
//!    with, because the channel's timer starts only once a connection is
//!    up (see
//!    [`TimeoutLayer::rely_on_channel_for_head`](grpc_timeout::TimeoutLayer::rely_on_channel_for_head)
//!    for the option of one timer, and when it is safe).
//! 3. **Retry** ([`grpc_retry::RetryLayer`]): attempts (or gRFC A6
//!    hedges, `[hedging]`), backoff, body replay, throttling and the retry
//!    budget (`[retry.throttle]`, `[retry.budget]`: with both, a retry goes
//!    only when both allow it). Above the breaker so that every attempt is judged
//!    by the breaker on its own, and a call the breaker refuses (a local
//!    rejection, not a server failure) is not retried. With the breaker
//!    outside, it would see one outcome per logical call: a dead server
//!    would take `failure_threshold × max_attempts` attempts to trip it, a
//!    call that failed twice and then succeeded would hide two failures,
//!    and an open breaker would not stop the retries already under way.
//! 4. **Bulkhead** ([`grpc_bulkhead::BulkheadLayer`], only with a
//!    `[bulkhead]` section; without one it is not in the stack at all):
//!    a concurrency partition per gRPC service (or per selector). Below the
//!    retry layer so that it counts attempts in flight at the server (a
//!    call sleeping in its backoff holds no slot, and an adaptive limit
//!    samples each attempt), and its refusal (`RESOURCE_EXHAUSTED`, or
//!    `DEADLINE_EXCEEDED` when the call's deadline passes in its queue) is
//!    local, so it is not retried. Above the breaker so that its refusals never
//!    reach the breaker: a full local queue says nothing of the server's
//!    health and must not open it. Above the retry layer it would hold a
//!    slot through the backoff sleeps; below the breaker its refusals
//!    would open the breaker of a healthy server.
//! 5. **Circuit breaker** ([`grpc_circuit_breaker::CircuitBreakerLayer`]):
//!    per attempt, one breaker per gRPC service (or per channel, for
//!    [`ResilientChannels`]), judged by the gRPC status in headers or
//!    trailers.
//! 6. **Per-attempt timeout** (`[timeouts] per_attempt`, Envoy's per-try
//!    timeout): below the breaker (and the bulkhead, whose slot it frees) so that a hung attempt counts as a
//!    `DEADLINE_EXCEEDED` failure for the breaker and can be retried while
//!    the call's deadline still has time. Above the retry layer it would be
//!    just another call deadline.
//! 7. The tonic `Channel` (or any `Service<http::Request<B>>`); for a
//!    [`ResilientChannels`] entry with `endpoints` or `dns`, a
//!    [`BalancedChannel`] over the replicas, each with its own breaker,
//!    outlier ejection and health checks (see the
//!    [config docs](config#balanced-channels)). Below the retry layer, so
//!    each attempt is balanced anew and a retry goes to another replica;
//!    below the channel's breaker, which then opens only when the replicas
//!    fail together.
//!
//! The order is the layers'; the facade builds them with fewer levels.
//! Layers 1 to 3 are one future: the deadline layer's work through its
//! halves ([`grpc_timeout::Timeout::prepare`], [`grpc_timeout::future::Watch`])
//! around the retry layer's future, whose answer is taken unwrapped
//! ([`grpc_retry::future::ResponseFuture::poll_answer`]). Layers 4 to 6 are
//! one service per attempt, with one future: the bulkhead and the breaker
//! through their admission halves ([`grpc_bulkhead::Gate`],
//! [`grpc_circuit_breaker::Gate`]) and their permits, the per-attempt
//! timeout through the deadline layer's halves, the same code the layers
//! run on their own. The answering attempt's body wrapper is the
//! caller's: the call's deadline, the retry throttle's refill and the
//! call's telemetry are added to it, not wrapped around it, so a response
//! has one body wrapper where the layers make four or five. A call moves
//! fewer values through fewer polls; the layer crates, used alone, work
//! as before.
//!
//! # Telemetry
//!
//! Through the `metrics` facade (install the recorder before the first
//! call): `grpc.client.call.count` and `grpc.client.call.duration`
//! (seconds), labels `service`, `method`, `code`, for every logical call;
//! plus the layers' own metrics (`grpc.retry.count`,
//! `grpc.retry.duration`, `circuit_breaker.call.count`,
//! `circuit_breaker.call.latency`, `circuit_breaker.state`, ...). With a
//! `[bulkhead]` section, every partition (label `partition`: the service,
//! method or selector) reports `bulkhead.in_flight` and `bulkhead.limit`
//! (gauges; the limit moves when it is adaptive), `bulkhead.wait.duration`
//! (seconds a queued call waited) and `bulkhead.rejected.count` (label
//! `reason`: `queue_full`, `max_wait` or `deadline`), and each refusal logs a WARN
//! `Bulkhead full, call rejected` naming the partition. Through
//! `tracing`: an INFO span `grpc_call` per logical call with
//! OpenTelemetry's RPC fields (`rpc.system = "grpc"`, `rpc.service`,
//! `rpc.method`, `rpc.grpc.status_code`, and for a named channel
//! `server.address`, `server.port`), each attempt a `grpc_attempt`
//! child span, and the layers' WARN lines (`gRPC call failed with
//! unavailable, retrying in 200ms (attempt 1/3)`, `Circuit breaker opening
//! after 5 failures`).
//!
//! # Distributed tracing
//!
//! With the `opentelemetry` feature, each attempt writes the OpenTelemetry
//! context of its span into its metadata (W3C Trace Context:
//! `traceparent`, `tracestate`), from the bottom of the stack, so the
//! server's span is the child of the attempt that reached it; a server
//! reads it with `ServerTraceLayer` of the `grpc-otel` crate. The spans become
//! OpenTelemetry spans through a `tracing-opentelemetry` layer in the
//! process's subscriber (let DEBUG spans of `grpc_retry` through it for
//! the attempts); without one nothing is written. The attempt span
//! `grpc_attempt` carries `otel.kind = "client"`, `rpc.system`,
//! `rpc.service`, `rpc.method`, `rpc.grpc.status_code` (when its response
//! head or error gives it), `attempt`, `hedge`, `transparent`,
//! `backoff_ms` or `pushback_ms` (the wait before it),
//! `deadline_remaining_ms` and `breaker.state` (at admission); breaker
//! transitions and throttled retries are events inside the spans.
//!
//! Without the feature, no OpenTelemetry crate is compiled and the stack
//! is as without tracing: the `tracing` spans only.
//!
//! # Per-call control
//!
//! A call can change its retry policy, mark itself idempotent or not, and
//! carry its own idempotency key, through its request ([`CallOptions`]):
//!
//! ```
//! use grpc_resilience::{CallOptions, RetryOverride};
//! # let request = catalog_proto::CreateProductRequest { product: None };
//! let mut request = tonic::Request::new(request);
//! // The caller's key: the server can deduplicate, so this write may be retried.
//! request.idempotency_key("order-42-create")?;
//! // And at most two attempts for this call.
//! request.retry(RetryOverride::new().with_max_attempts(2));
//! # Ok::<(), tonic::metadata::errors::InvalidMetadataValue>(())
//! ```
//!
//! A call marked idempotent (or carrying its own key) goes through a
//! variant of the configured retry policies in which writes are retried
//! with an idempotency key; a call marked non-idempotent through one in
//! which nothing is retried once the server saw it. Each variant has the
//! retry layer's replay limits of its own (256 KiB per call, 16 MiB in all).
//!
//! # Live reload
//!
//! [`ResilientChannel::reload`] (and [`ResilientChannels::reload`]) checks
//! a new config whole and swaps the timeouts, retry policies and throttle
//! of every clone atomically for new calls; calls under way finish under
//! the policies they started with; breakers keep their state. An invalid
//! config is rejected with the reason and the old one stays.

mod attempt;
mod channels;
pub mod config;
mod error;
pub mod future;
mod guard;
mod named;
mod per_call;
mod reload;
mod stack;
pub mod telemetry;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_guard;
#[cfg(test)]
mod tests_outcome;

pub use channels::{ResilientChannels, ResilientChannelsBuilder, UnknownChannel};
pub use config::{
    AimdSettings, BreakerSettings, BudgetSettings, BulkheadSection, BulkheadSettings,
    ChannelSettings, FailureRateSettings, GradientSettings, HealthSettings, HedgingConfig,
    HedgingSettings, ImportWarning, OutlierSettings, ResilienceConfig, RetryConfig, RetrySettings,
    SuccessRateSettings, ThrottleSettings, TimeoutConfig,
};
pub use error::ConfigError;
pub use named::{NamedBody, NamedChannel, NamedFuture};
pub use per_call::{CallOptions, Idempotent};
#[cfg(feature = "watch")]
pub use reload::ConfigWatcher;
pub use stack::{ReloadReport, ResilienceLayer, ResilientChannel};

// What a user needs, so that this crate is the one dependency.
pub use grpc_balance::{BalancedChannel, EndpointDetails, EndpointStatus, Reason};
pub use grpc_bulkhead::{BulkheadConfig, BulkheadFull, PartitionStatus};
pub use grpc_circuit_breaker::{
    BreakerConfig, BreakerOpen, BreakerRegistry, BreakerSnapshot, FailureRate, State, StateChange,
    UnknownBreaker,
};
pub use grpc_resilience_core::{CodeSet, codes::UnknownCode};
pub use grpc_retry::{
    HedgingPolicy, IDEMPOTENCY_KEY, Jitter, RetryBudget, RetryConfigError, RetryOverride,
    RetryPolicies, RetryPolicy, RetryThrottle,
};
pub use grpc_timeout::{Elapsed, TimeoutConfigError, TimeoutPolicy};
pub use tonic::Code;

/// The README's Rust blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

/// The layer crates, for what the re-exports above do not cover.
pub mod layers {
    pub use grpc_balance as balance;
    pub use grpc_bulkhead as bulkhead;
    pub use grpc_circuit_breaker as circuit_breaker;
    pub use grpc_resilience_core as core;
    pub use grpc_retry as retry;
    pub use grpc_timeout as timeout;
}
