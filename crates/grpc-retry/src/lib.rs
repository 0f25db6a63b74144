//! Transparent gRPC retries for tonic channels.
//!
//! [`RetryLayer`] wraps a tonic `Channel` so that every generated stub
//! method is retried as gRPC's own retry design (gRFC A6) says, although
//! tonic request bodies are not `Clone` (tonic issue #733):
//!
//! * **Body replay.** A body that is one frame ready when the call starts
//!   (a unary call's encoded message) is read then and kept as it is
//!   (zero-copy `Bytes`); any other body is recorded lazily as the first
//!   attempt sends it (zero-copy `Bytes`, trailers included). Either is
//!   replayed byte for byte. Limits: 256 KiB per call and 16 MiB per layer by
//!   default; a call over either is still sent, just not retried.
//!   Client-streaming calls are retried while they fit; a retry that starts
//!   before the first attempt's body is done goes on reading the original.
//!   A retry never sends a body the first attempt did not send: if the body
//!   outgrows a limit once the retry has started (a server answered early
//!   and keeps reading), the retry is not sent, or its body fails with
//!   [`ReplayUnavailable`] (its stream is reset), and the caller gets the
//!   previous attempt's outcome. Once a call is committed or answered its
//!   recording is released, so long-lived streams hold no replay memory.
//! * **Commit rule.** Once non-Trailers-Only response headers arrive, the
//!   call is committed and returned; it is never retried after that. A
//!   Trailers-Only response with a retryable code is retried.
//! * **Which failures.** The policy's retryable codes (by default:
//!   `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`,
//!   `INTERNAL`); transport errors count as `UNAVAILABLE`. A call the server
//!   provably never processed (connection refused, `REFUSED_STREAM`, above a
//!   graceful `GOAWAY`) is retried even for non-idempotent methods. A call a
//!   layer below refused ([`LocalRejection`](grpc_resilience_core::error::LocalRejection),
//!   an open breaker) is not retried.
//! * **Writes.** A method marked [`RetryPolicy::non_idempotent`] is only
//!   retried transparently, unless [`RetryPolicy::with_idempotency_keys`]
//!   sends one random `idempotency-key` per logical call, the same on every
//!   attempt.
//! * **Backoff.** [`Jitter`] applied to `min(initial * multiplier^(n-1),
//!   max_delay)`; a delay never exceeds `max_delay`, and delays at the cap
//!   stay spread below it. The arithmetic saturates: every policy that
//!   validates computes every delay. Server pushback
//!   (`grpc-retry-pushback-ms`) is waited exactly and resets the backoff,
//!   up to [`RetryPolicy::max_pushback`] (by default the larger of
//!   `max_delay` and 10 s); a longer pushback, or a negative, malformed or
//!   repeated value, stops retrying and the caller gets the server's status.
//! * **Deadline.** The call has one deadline: the [`CallDeadline`] a layer
//!   above recorded on the request, or else the one its `grpc-timeout`
//!   gives, recorded then for the layers below. A call whose deadline has
//!   passed is not sent: it fails at once with `DEADLINE_EXCEEDED`. No
//!   backoff sleeps past the deadline, no attempt starts at or after it
//!   (waiting for the service to be ready included), and each attempt's
//!   `grpc-timeout` is written when the attempt is sent, from the time
//!   left then. When the wait before the next attempt does not fit in what
//!   is left, the call ends at once with the last attempt's code, and its
//!   message says so: `...; retrying stopped: the deadline leaves no time
//!   (150ms left, next backoff 200ms)`. Attempts after the first carry
//!   `grpc-previous-rpc-attempts`.
//! * **Throttling.** An optional [`RetryThrottle`], counted as gRFC A6
//!   says: an attempt that fails with a retryable code or with server
//!   pushback takes a token, a call that ends with OK gives `token_ratio`
//!   back, and any other outcome (`NOT_FOUND`, a call refused below) leaves
//!   the bucket alone. A committed call's status is in its trailers, so
//!   with a throttle its [`ResponseBody`] gives the token back when the
//!   trailers say OK (not when a call that fails later commits); without
//!   one, nothing is counted.
//! * **Retry budget.** An optional [`RetryBudget`] (Finagle / Linkerd
//!   style): retries at most a share of the calls of a recent window, plus
//!   a minimum rate. Each call that may be retried deposits, each retry
//!   withdraws; a retry the budget cannot pay for is not sent. With a
//!   throttle as well, both must allow a retry. [`RetryBudget`] says when
//!   to choose which: the budget keeps retrying random faults that drain
//!   the A6 bucket, and still bounds the load under overload.
//! * **Hostile headers.** A `grpc-status-details-bin` that is not valid
//!   base64 (tonic 0.14 panics on one) is dropped from every response head
//!   and trailers this layer returns.
//! * **Cost.** A method's policy is worked out once per layer (its path
//!   parsed, its policy looked up), shared by every service the layer
//!   makes, however a client alternates between methods. Methods without
//!   a policy pass straight through: no buffering, no allocation. A
//!   retried unary call that succeeds at once copies neither its header map nor its extension map: the head a retry
//!   needs is kept inline (a few header values, and the extensions a
//!   generated stub adds; a request with other extensions keeps a clone of
//!   its map, so every attempt carries every extension). Nor does it clone
//!   the inner service (over a tonic `Channel`, a clone allocates, and so
//!   does the next readiness check of the clone): the first attempt goes
//!   through the service made ready, and retries and hedges through a
//!   clone of the service as the layer wrapped it, made only when one is
//!   due. The request the server sees is the one the caller sent: a
//!   replayed body states an exact size only if the caller's did, so no
//!   `content-length` is added to a stub's call. Dropping the call future
//!   stops everything.
//!
//! [`CallDeadline`]: grpc_resilience_core::CallDeadline
//!
//! # Hedging
//!
//! A method may be hedged instead of retried (gRFC A6's `hedgingPolicy`,
//! [`RetryPolicies::with_hedging`]): the first attempt is sent at once and
//! each further one [`hedging_delay`](HedgingPolicy::with_hedging_delay)
//! later, up to `max_attempts`, until a response commits the call. The
//! first response that is not a non-fatal failure (response headers, OK,
//! or a Trailers-Only status outside
//! [`non_fatal_codes`](HedgingPolicy::with_non_fatal_codes)) is returned and
//! every other attempt is dropped, which resets its stream: the server sees
//! the cancel. A non-fatal failure sends the next hedge at once; its server
//! pushback, if valid, delays the next hedge instead, and an invalid one
//! (or one above [`HedgingPolicy::with_max_pushback`]) stops new hedges.
//! When every attempt failed non-fatally, the caller gets the last failure.
//!
//! * Hedges replay the recorded body like retries: several attempts read
//!   the one recording at once, each at its own position, within the same
//!   buffer limits and never with a gap. A body over a limit is sent once
//!   and not hedged.
//! * Hedges carry `grpc-previous-rpc-attempts` and the time left in
//!   `grpc-timeout`; none starts at or after the call's deadline.
//! * A [`RetryThrottle`] counts hedges like retries (a non-fatal failure or
//!   pushback takes a token, OK gives `token_ratio` back) and, while it
//!   does not allow retries, no further hedge is sent; a [`RetryBudget`]
//!   pays for each hedge as for a retry.
//! * Only idempotent methods may be hedged, or writes with idempotency keys
//!   (the same key on every attempt): validation rejects the rest.
//! * A [`RetryOverride`] on a hedged call makes it a retried one
//!   ([`RetryOverride::disabled`]: sent once).
//!
//! ```
//! use std::time::Duration;
//! use grpc_retry::{HedgingPolicy, RetryLayer, RetryPolicies, RetryPolicy};
//!
//! // Reads are hedged after 20 ms (p95 latency, say); writes are retried.
//! let policies = RetryPolicies::new(RetryPolicy::default())?.with_hedging(
//!     "catalog.v1.QueryService/*",
//!     HedgingPolicy::default()
//!         .with_max_attempts(2)
//!         .with_hedging_delay(Duration::from_millis(20)),
//! )?;
//! assert!(policies.hedging_policy_for("/catalog.v1.QueryService/GetProduct").is_some());
//! let layer = RetryLayer::new(policies);
//! # let _ = layer;
//! # Ok::<(), grpc_retry::RetryConfigError>(())
//! ```
//!
//! # Example
//!
//! ```
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_retry::{RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policies = RetryPolicies::new(RetryPolicy::default())?
//!     .with_operation("CreateProduct", RetryPolicy::default().non_idempotent())?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policies).with_throttle(RetryThrottle::new(10.0, 0.1)?))
//!     .service(channel);
//! let mut client = QueryServiceClient::new(channel);
//! # let _ = &mut client;
//! # Ok(())
//! # }
//! ```
//!
//! A single call can change its policy with a [`RetryOverride`] in the
//! request's extensions.
//!
//! # Telemetry
//!
//! `grpc.retry.count` (labels `service`, `method`, `code`) per retry,
//! `grpc.retry.duration` (seconds a retried call spent after its first
//! attempt), `grpc.retry.throttled`, `grpc.retry.budget_exhausted`,
//! `grpc.retry.buffer_exceeded` and
//! `grpc.retry.deadline_exhausted` (labels `service`, `method`: calls not
//! retried for those reasons; the last one counts retries abandoned because
//! the deadline left less than the backoff or pushback), `grpc.retry.hedges`
//! (hedges sent) and `grpc.retry.hedges_cancelled` (attempts cancelled when
//! another committed the call). Each retry logs a WARN,
//! `gRPC call failed with unavailable, retrying in 200ms
//! (attempt 1/3)`, with the fields `service`, `method`, `code`, `attempt`,
//! `delay_ms`; each attempt runs in a DEBUG `grpc_attempt` span, entered
//! while the service is called (so a layer below, such as trace-context
//! propagation, sees it as the current span) and while its future is
//! polled. Its fields: `otel.kind = "client"`, OpenTelemetry's
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code` (when
//! the attempt's response head or error gives it), and `attempt`, `hedge`,
//! `transparent`, `backoff_ms` or `pushback_ms` (the wait before it),
//! `deadline_remaining_ms`, and `breaker.state`, left for a breaker below
//! to record.

mod backoff;
mod body;
mod budget;
mod decide;
pub mod future;
mod head;
mod hedge;
mod hedging;
mod layer;
mod policy;
mod replay;
mod retry_override;
mod service;
mod spare;
mod sync;
mod throttle;

pub use backoff::{Jitter, base_delay, jittered};
pub use body::ResponseBody;
pub use budget::{MAX_MIN_RETRIES_PER_SECOND, RetryBudget};
pub use hedging::HedgingPolicy;
pub use layer::{DEFAULT_PER_CALL_BUFFER, DEFAULT_TOTAL_BUFFER, RetryLayer};
pub use policy::{
    DEFAULT_MAX_PUSHBACK, DEFAULT_RETRYABLE_CODES, RetryConfigError, RetryPolicies, RetryPolicy,
};
pub use replay::{ReplayBody, ReplayUnavailable, ReplayableBody};
pub use retry_override::RetryOverride;
pub use service::{IDEMPOTENCY_KEY, Retry};
pub use throttle::RetryThrottle;

pub(crate) use service::Shared;

#[cfg(test)]
mod test_h2;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_deadline;
#[cfg(test)]
mod tests_ready;
