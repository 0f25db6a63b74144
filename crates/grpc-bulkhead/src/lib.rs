//! Bulkheads for tonic channels: concurrency partitions per downstream
//! gRPC service, with a fixed or an adaptive limit.
//!
//! [`BulkheadLayer`] wraps a tonic `Channel` (or any
//! `Service<http::Request<B>>` that speaks gRPC) and gives each gRPC
//! service its own partition, so one slow service cannot take the
//! client's whole capacity: when the Query service hangs, its partition
//! fills up and its excess calls are refused at once, while the Command
//! service's calls go on as before.
//!
//! Each partition admits at most its limit of calls at once. A call over
//! the limit waits in a bounded queue for at most `max_wait` (optional),
//! and is otherwise rejected with [`BulkheadFull`], whose source chain
//! holds a [`LocalRejection`](grpc_resilience_core::error::LocalRejection)
//! and a `RESOURCE_EXHAUSTED` status (`DEADLINE_EXCEEDED` when the call's
//! deadline came first, below): a tonic stub's caller sees that code, and
//! the retry layer does not retry it. Rejections come from the call's
//! future, never from `poll_ready`.
//!
//! Time in the queue is part of the call's deadline (the
//! [`CallDeadline`](grpc_resilience_core::CallDeadline) a layer above
//! recorded, else the caller's `grpc-timeout`, read as the call is
//! queued). A call whose deadline comes before a slot is refused then,
//! with `DEADLINE_EXCEEDED` and never sent, rather than sent late with a
//! deadline already spent; a call that gets its slot is sent with
//! `grpc-timeout` rewritten to the time it has left, so the server is not
//! told the time the caller had before the wait. Under a deadline layer
//! (`grpc_timeout`, as in the `grpc-resilience` stack), whose timer fires
//! at the same instant, the caller gets that layer's `DEADLINE_EXCEEDED`
//! (marked not sent) and its `grpc.timeout.count`; the bulkhead still
//! counts the refusal (`reason` = `deadline`), which says where the time
//! went. A call below the limit is sent at once whatever its deadline:
//! the layers above check that before they send.
//!
//! A call holds its slot until it ends: until the end of its response
//! body, so a streaming response occupies its slot while it streams, or
//! until the body or the future is dropped. A Trailers-Only answer (how
//! tonic servers send errors) frees the slot as it arrives.
//!
//! A call below the limit takes its slot with one compare-exchange and
//! frees it with one atomic subtraction; the wait queue's lock is taken
//! only when a partition is full. A freed slot goes to the oldest waiter
//! still waiting: a waiter that gives up (its deadline, `max_wait`, a
//! dropped call) as its slot is granted passes the slot on, so none is
//! lost and none is given twice. Model tests check these hand-offs, with
//! a limit of one, in every interleaving of releases, arrivals, give-ups
//! and dropped waiters up to loom's preemption bound
//! (`RUSTFLAGS="--cfg grpc_resilience_loom" cargo test --release -p
//! grpc-bulkhead --lib loom`); an adaptive limit's changes are not
//! modelled.
//!
//! Partitions are per gRPC service by default ([`Partitioning`]), per
//! method, or per method selector ([`BulkheadLayer::with_partition`]:
//! `*`, `package.Service/*`, `package.Service/Method` or `Method`, matched
//! as gRPC's service config matches).
//!
//! # Fixed or adaptive
//!
//! A fixed limit ([`BulkheadConfig::builder`]`.max_concurrent(n)`) is the
//! right choice when you know what the downstream service handles (its
//! worker pool, its connection pool), or when the point is isolation: a cap
//! on what one service may take from the client.
//!
//! An adaptive limit follows measured latency, so a client backs off from
//! an overloaded server before timeouts and errors pile up, without anyone
//! knowing the server's capacity (Netflix's concurrency-limits, Envoy's
//! adaptive concurrency filter):
//!
//! * [`Aimd`]: additive increase, multiplicative decrease on an overload
//!   signal (`RESOURCE_EXHAUSTED`, `UNAVAILABLE`, `DEADLINE_EXCEEDED`) or
//!   on latency above a threshold. For servers that shed load clearly, or
//!   when you know the latency that means trouble.
//! * [`Gradient`]: the limit follows the ratio of the no-load latency to
//!   the current latency, plus a small queue allowance. For servers that
//!   slow down under load rather than refuse: it needs no threshold.
//!
//! With an adaptive limit, prefer no queue (or a short one): the point is
//! to refuse the excess at once rather than to hold it.
//!
//! # Where it sits in the stack
//!
//! Outermost first: Timeout (the call's deadline) > Retry > **Bulkhead** >
//! CircuitBreaker > per-attempt timeout > Channel.
//!
//! * **Below the retry layer**, so it counts attempts in flight at the
//!   server: a call sleeping in its backoff holds no slot, and an adaptive
//!   limit samples the latency of each attempt. Its rejection is a local
//!   refusal, which the retry layer does not retry.
//! * **Above the circuit breaker**, so its rejections never reach the
//!   breaker: a full local queue says nothing about the server's health
//!   and must not open a breaker (`RESOURCE_EXHAUSTED` is a breaker failure
//!   by default). A call the breaker refuses frees its slot at once and
//!   gives an adaptive limit no sample.
//! * **Above a per-attempt timeout**, whose `DEADLINE_EXCEEDED` ends the
//!   attempt, frees the slot and tells an adaptive limit the server is
//!   slow.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use catalog_proto::command_service_client::CommandServiceClient;
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_bulkhead::{BulkheadConfig, BulkheadLayer, Gradient};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Every service: at most 32 calls in flight, 16 more may wait 50 ms.
//! let per_service = BulkheadConfig::builder()
//!     .max_concurrent(32)
//!     .max_queue(16)
//!     .max_wait(Duration::from_millis(50))
//!     .build()?;
//! // The Query service: a limit that follows its latency, no queue.
//! let adaptive = BulkheadConfig::builder()
//!     .gradient(Gradient::default())
//!     .build()?;
//! let bulkheads = BulkheadLayer::new(per_service)
//!     .with_partition("catalog.v1.QueryService/*", adaptive)?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(bulkheads.clone())
//!     .service(channel);
//!
//! // Both stubs share the channel; each service has its own partition.
//! let commands = CommandServiceClient::new(channel.clone());
//! let queries = QueryServiceClient::new(channel);
//! # let _ = (commands, queries);
//! for partition in bulkheads.partitions() {
//!     println!("{}: {}/{} in flight", partition.name, partition.in_flight, partition.limit);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Telemetry
//!
//! Registered once per partition when it is made (install the `metrics`
//! recorder first), label `partition` (the service, method or selector):
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `bulkhead.in_flight` | gauge | calls holding a slot |
//! | `bulkhead.limit` | gauge | the current limit (moves when adaptive) |
//! | `bulkhead.rejected.count` | counter, also `reason` = `queue_full`, `max_wait` or `deadline` | calls refused |
//! | `bulkhead.wait.duration` | histogram (s) | time in the queue, for calls that had to wait |
//!
//! Each rejection is logged at WARN, `Bulkhead full, call rejected`, with
//! the fields `partition`, `reason`, `limit`, `in_flight` and `max_queue`.
//!
//! # Cost
//!
//! Below the limit a call takes its slot with one compare-exchange on the
//! partition's counter and frees it with one atomic subtraction: no lock,
//! no allocation. The wait queue (a short lock, and one allocation per
//! queued call) is used only at the limit. An adaptive limit reads the
//! clock twice per call and takes its partition's lock once per completed
//! call to update the limit, and the queue's lock whenever the limit
//! rises (to hand the new room to calls waiting for it).

mod config;
mod error;
pub mod future;
mod layer;
pub mod limit;
mod partition;
mod service;
mod sync;

pub use config::{BulkheadConfig, BulkheadConfigBuilder, BulkheadConfigError};
pub use error::BulkheadFull;
pub use future::{Permit, SlotWait};
pub use layer::BulkheadLayer;
pub use limit::{Aimd, Gradient, Limit};
pub use partition::Rejection;
pub use service::{Admission, Bulkhead, Gate, PartitionStatus, Partitioning};

#[cfg(all(test, not(grpc_resilience_loom)))]
mod tests;
