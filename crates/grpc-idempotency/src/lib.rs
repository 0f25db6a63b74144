//! Server-side idempotency for tonic: a keyed write executes once.
//!
//! A client that retries a write sends the same `idempotency-key` header
//! on every attempt (`grpc-retry`'s `RetryPolicy::with_idempotency_keys`
//! does). That makes a retried write safe only if the server deduplicates.
//! [`IdempotencyLayer`] wraps a tonic server (a generated server, a
//! `Router`, any `Service<http::Request<_>>` answering gRPC) and does it for
//! the methods you name, with any handler:
//!
//! * **First call with a key**: the layer claims the key in its [`Store`],
//!   runs the handler, and records its response (HTTP status, headers, body,
//!   trailers; up to [`with_max_response_bytes`](IdempotencyLayer::with_max_response_bytes))
//!   before the caller sees it.
//! * **Repeat within the retention window**: the recorded response, with
//!   an `idempotent-replayed: true` header; the handler does not run.
//! * **Repeat while the first is still running**: waits for it (bounded),
//!   or `ABORTED` with `grpc-retry-pushback-ms`, as
//!   [`OnInProgress`] says. A repeat never waits past its own deadline
//!   (its `grpc-timeout`): then it gets `DEADLINE_EXCEEDED`.
//! * **The handler's deadline**: a keyed call reaches the handler with
//!   `grpc-timeout` rewritten to the time it has left after reading its
//!   body, claiming its key and any wait; a call whose deadline passed
//!   meanwhile is not run (`DEADLINE_EXCEEDED`, its key released with
//!   `reason` = `deadline`).
//! * **Key reused with another request** (another body or another method;
//!   compared by a 128-bit [`Fingerprint`]): `FAILED_PRECONDITION` naming
//!   the key.
//! * **What is recorded**: successes and failures alike, except the
//!   retryable ones (`UNAVAILABLE`, `CANCELLED` by default; see
//!   [`with_release_on`](IdempotencyLayer::with_release_on)), a handler
//!   that was cancelled (the caller went away, its future was dropped),
//!   or a broken response body: those release the key so a retry runs the
//!   handler again. A response too large to record is released or rejected
//!   ([`OnOversize`]).
//! * **No key**: the call passes through, or is refused with
//!   `INVALID_ARGUMENT` after [`require_key`](IdempotencyLayer::require_key).
//!   A key is 1 to 255 visible ASCII characters.
//! * **Store failure** (unreachable, slow, full): fail closed with
//!   `UNAVAILABLE`, or run the handler without deduplication and count it
//!   ([`OnStoreError`]).
//! * Methods not named, and calls whose path is not a gRPC method, pass
//!   through untouched: no lock, no allocation, no boxing.
//!
//! The request body of a keyed call is read whole (up to
//! [`with_max_request_bytes`](IdempotencyLayer::with_max_request_bytes))
//! to fingerprint it, then handed to the handler; the response is read
//! whole before it is sent. Name unary and client-streaming methods: a
//! server-streaming response would be held back until its end.
//!
//! # Stores
//!
//! [`MemoryStore`] (the default) keeps keys in this process, bounded in
//! entries and bytes. With the `redis` feature, `RedisStore` keeps them in
//! Redis, so a retry that lands on another replica of a fleet finds the
//! first replica's record. Implement [`Store`] for your own database.
//!
//! # Telemetry
//!
//! Counters through `metrics`, labelled `service` and `method`:
//! `idempotency.hits`, `idempotency.misses`, `idempotency.in_progress`,
//! `idempotency.conflicts`, `idempotency.released` (and `reason`),
//! `idempotency.store_errors`, `idempotency.unprotected`,
//! `idempotency.rejected` (and `reason`); `idempotency.evictions` from the
//! in-memory store. The same counts are in [`IdempotencyLayer::stats`].
//! Logs through `tracing`: WARN when the store fails or a key cannot be
//! recorded, INFO on a conflict, DEBUG for hits and records.
//!
//! # Example
//!
//! Wrap a generated server: `CreateProduct` runs once per key, everything
//! else passes through.
//!
//! ```no_run
//! use std::time::Duration;
//! use grpc_idempotency::{IdempotencyLayer, OnInProgress};
//! use tonic::transport::Server;
//! use tower_layer::Layer;
//! # use catalog_proto::command_service_server::{CommandService, CommandServiceServer};
//! # use catalog_proto::{CreateProductRequest, CreateProductResponse, ImportProductsResponse, Product};
//! # #[derive(Default)] struct Catalog;
//! # #[tonic::async_trait] impl CommandService for Catalog {
//! #   async fn create_product(&self, _: tonic::Request<CreateProductRequest>) -> Result<tonic::Response<CreateProductResponse>, tonic::Status> { unimplemented!() }
//! #   async fn import_products(&self, _: tonic::Request<tonic::Streaming<Product>>) -> Result<tonic::Response<ImportProductsResponse>, tonic::Status> { unimplemented!() }
//! # }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let idempotency = IdempotencyLayer::new(["catalog.v1.CommandService/CreateProduct"])?
//!     .with_retention(Duration::from_secs(3600))?
//!     .with_in_progress(OnInProgress::Wait(Duration::from_secs(2)));
//!
//! Server::builder()
//!     .add_service(idempotency.layer(CommandServiceServer::new(Catalog)))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Or for every service of a server at once, with
//! `Server::builder().layer(idempotency)`.
//!
//! Pair it on the client with `grpc-retry`: mark the method
//! `non_idempotent().with_idempotency_keys()` so a write whose response was
//! lost is retried with its key, and the server runs it once.

mod body;
mod config;
mod error;
mod future;
mod layer;
mod record;
mod service;
mod stats;
pub mod store;

pub use body::{RequestBody, ResponseBody};
pub use config::{OnInProgress, OnOversize, OnStoreError};
pub use error::{ConfigError, DecodeError, StoreError};
pub use future::{REPLAYED, ResponseFuture};
pub use layer::IdempotencyLayer;
pub use record::{Fingerprint, Record};
pub use service::Idempotency;
pub use stats::IdempotencyStats;
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{Claim, ClaimToken, Entry, MemoryStore, Store};

/// The header that carries the key by default: `idempotency-key`, the
/// header `grpc-retry` sends (its `IDEMPOTENCY_KEY`; the same value, kept
/// here so a server need not depend on the client's crate). Change it with
/// [`IdempotencyLayer::with_key_header`].
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

#[cfg(test)]
mod tests;
