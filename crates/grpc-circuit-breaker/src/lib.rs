//! gRPC-aware circuit breakers for tonic channels.
//!
//! [`CircuitBreakerLayer`] wraps a tonic `Channel` (or any
//! `Service<http::Request<B>>` that speaks gRPC) with one breaker per
//! downstream gRPC service, so a channel that carries the Command and the
//! Query service has two independent breakers, `command` and `query`:
//!
//! * **CLOSED → OPEN** after `failure_threshold` failures within
//!   `reset_timeout` (older failures are forgotten), or, in the
//!   failure-rate mode, when the failure or slow-call rate over a sliding
//!   window of calls reaches its threshold (as resilience4j);
//! * **OPEN → HALF_OPEN** after `timeout`; **HALF_OPEN** admits at most
//!   `half_open_max_calls` probes (default `success_threshold`). In count
//!   mode `success_threshold` successes close it and any failure opens it
//!   again; in the failure-rate mode the probes are a sample, judged on
//!   their failure and slow-call rates once they have all finished (see
//!   [`FailureRate`]). No valid configuration can stay HALF_OPEN forever.
//!
//! What a failure is comes from the gRPC status, read from Trailers-Only
//! headers or from the trailers at the end of a streamed body, not from
//! `Result::is_err`: over a tonic channel most failures are HTTP 200
//! responses. By default `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`,
//! `UNKNOWN`, `RESOURCE_EXHAUSTED`, `DATA_LOSS` and transport errors are
//! failures; client errors are successes (the service answered); a caller's
//! cancellation counts as nothing, unless the call's deadline had passed
//! (a deadline set above the breaker ended a slow call): then it counts as
//! `DEADLINE_EXCEEDED`. The deadline is the [`CallDeadline`] an upper layer
//! recorded on the request, or else the caller's `grpc-timeout` from when
//! the call reached the breaker.
//!
//! A call's latency, for the slow-call rate and the latency histogram, is
//! its time to the response headers (to the first byte of the answer, or
//! to the error when none came), not to the end of the body: a long server
//! stream is not a slow call.
//!
//! While open, calls are rejected at once from the call's future (not from
//! `poll_ready`) with [`BreakerOpen`], which a stub's caller sees as
//! `Code::Unavailable` naming the breaker. A rejected call gives back what
//! the inner service reserved when it became ready (a `Buffer` slot of a
//! tonic `Channel`): the breaker swaps in a fresh clone of it.
//!
//! Every outcome carries the generation of the state that admitted it: a
//! late result from an earlier state changes nothing. A probe whose future
//! or body is dropped gives its slot back. The closed-state path is
//! lock-free: atomics only, no allocation. Each thread remembers the
//! breakers of its last eight (layer, method) pairs; past those, a call
//! finds its breaker in the layer's table of methods, where each method's
//! path is parsed and its breaker looked up once (for the first 64 paths
//! a layer sees; others are looked up on each miss, without waiting).
//!
//! # Example
//!
//! ```
//! use catalog_proto::command_service_client::CommandServiceClient;
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = BreakerRegistry::new();
//! registry.configure("query", BreakerConfig::default().with_failure_threshold(3))?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(registry.clone()))
//!     .service(channel);
//!
//! // Both stubs share the channel; each service has its own breaker.
//! let commands = CommandServiceClient::new(channel.clone());
//! let queries = QueryServiceClient::new(channel);
//! # let _ = (commands, queries);
//!
//! // Later, for an admin endpoint or an alert:
//! for (name, breaker) in registry.snapshot() {
//!     println!("{name}: {} ({} failures)", breaker.state(), breaker.failures());
//! }
//! registry.subscribe(|change| eprintln!("{} went {} -> {}", change.breaker, change.from, change.to));
//! # Ok(())
//! # }
//! ```
//!
//! # Telemetry
//!
//! Per breaker, through the `metrics` facade, whenever the recorder is
//! installed (before or after the breaker is made: the handles follow the
//! current recorder):
//! `circuit_breaker.call.count` (labels `breaker`, `state`, `outcome` =
//! success, failure or ignored), `circuit_breaker.call.latency` (seconds;
//! off with [`BreakerConfig::with_latency_metric`]`(false)`, which also
//! spares each call its two clock reads unless a slow-call threshold needs
//! them),
//! `circuit_breaker.rejected.count` (`breaker`, `state`),
//! `circuit_breaker.state` (a gauge per state: 1 for the current one, 0 for
//! the others) and `circuit_breaker.transitions.count` (`breaker`, `from`,
//! `to`). Transitions are logged through `tracing`: WARN `Circuit breaker
//! opening after 5 failures`, INFO on half-open and on close. State changes
//! (gauge, counter, logs, [`BreakerRegistry::subscribe`] callbacks and
//! [`BreakerRegistry::watch`]) are published in the order they happened,
//! so the gauge always ends on the breaker's current state.
//!
//! [`CallDeadline`]: grpc_resilience_core::CallDeadline

mod config;
mod error;
mod events;
pub mod future;
mod keying;
mod layer;
mod metrics;
mod registry;
mod service;
mod state;
mod sync;
mod window;

pub use config::{
    BreakerConfig, BreakerConfigError, DEFAULT_FAILURE_CODES, FailureRate, MAX_PROBES, MAX_WINDOW,
};
pub use error::BreakerOpen;
pub use events::{StateChange, Trigger};
pub use future::Permit;
pub use keying::{KeyFn, Keying, service_breaker_name};
pub use layer::CircuitBreakerLayer;
pub use registry::{BreakerRegistry, BreakerSnapshot, UnknownBreaker};
pub use service::{CircuitBreaker, Gate};
pub use state::State;

#[cfg(all(test, not(grpc_resilience_loom)))]
mod tests;
