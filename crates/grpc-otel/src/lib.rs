//! W3C Trace Context for tonic gRPC, through `tracing` and
//! [`tracing-opentelemetry`](tracing_opentelemetry): one trace from the
//! caller's request to the server's handler, across processes.
//!
//! - [`TraceContextLayer`] (client): writes the OpenTelemetry context of the
//!   current `tracing` span into each request's metadata (`traceparent`,
//!   `tracestate`) with an OpenTelemetry
//!   [`TextMapPropagator`](opentelemetry::propagation::TextMapPropagator),
//!   W3C Trace Context by default. Put it *below* a retry layer, so that it
//!   runs once per attempt, inside the attempt's span: the server's span is
//!   then the child of the attempt that reached it. The facade
//!   `grpc-resilience` does this itself with its `opentelemetry` feature.
//! - [`ServerTraceLayer`] (server): reads that context from the incoming
//!   metadata and opens a `grpc_server` span as its child, with
//!   OpenTelemetry's RPC fields (`rpc.system`, `rpc.service`, `rpc.method`,
//!   `rpc.grpc.status_code`); the handler runs in it, and the span ends when
//!   the call's status is sent.
//!
//! Both only act when a `tracing-opentelemetry` layer is installed in the
//! process's subscriber; without one they cost a check of the current span
//! and nothing is written.
//!
//! ```
//! use catalog_proto::InMemoryCatalog;
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_otel::{ServerTraceLayer, TraceContextLayer};
//! use tonic::transport::{Channel, Server};
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // The server: each call in a span that is the child of the caller's.
//! let catalog = InMemoryCatalog::with_products(3);
//! let server = Server::builder()
//!     .layer(ServerTraceLayer::new())
//!     .add_service(catalog.query_service());
//! # drop(server);
//!
//! // The client: each request carries the current span's context.
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(TraceContextLayer::new())
//!     .service(channel);
//! let client = QueryServiceClient::new(channel);
//! # drop(client);
//! # }
//! ```

mod client;
mod metadata;
mod server;

pub use client::{TraceContext, TraceContextLayer, inject_context};
pub use metadata::{HeaderExtractor, HeaderInjector};
pub use opentelemetry_sdk::propagation::TraceContextPropagator;
pub use server::{
    ServerTrace, ServerTraceBody, ServerTraceFuture, ServerTraceLayer, extract_context,
};
