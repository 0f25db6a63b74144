//! The gRPC-over-HTTP/2 facts that every `grpc-resilience` layer shares.
//!
//! * [`MethodId`]: the `/package.Service/Method` a request calls, parsed
//!   once from its path without allocating.
//! * [`MethodMap`]: values per method, matched as gRPC's service config
//!   does (method, then service, then default; a bare method name, this
//!   library's extension, ranks between service and default), with
//!   allocation-free lookup.
//! * [`LastMethod`] and [`MethodTable`]: what a layer worked out for a
//!   method (its policy, its metric handles), remembered per clone for the
//!   last method and per layer for every method, so that a call neither
//!   parses its path nor looks its policy up again.
//! * [`Outcome`] and [`OutcomeBody`]: a call's final status, read from
//!   Trailers-Only headers or from the trailers at the end of the body,
//!   reported exactly once, or [`Outcome::Cancelled`] when the caller drops
//!   the response early. A layer that already wraps a call's future and
//!   body can carry the observer itself ([`observe_head`],
//!   [`outcome_of_frame`]) instead of adding a level.
//! * [`timeout_header`]: the `grpc-timeout` header, encoded and decoded per
//!   the gRPC HTTP/2 protocol.
//! * [`CallDeadline`]: a call's absolute deadline, worked out once by the
//!   outermost layer that knows it and read by every layer below from the
//!   request's extensions; `grpc-timeout` is written from it when a request
//!   is sent.
//! * [`error`]: the rejection convention. A layer fails a call from the
//!   call's future with an error whose source chain holds a
//!   [`tonic::Status`], so a generated stub's caller sees the right code;
//!   [`error::LocalRejection`] marks calls a layer refused to send (not to
//!   be retried), [`error::TransportError`] gives transport failures the
//!   `UNAVAILABLE` status gRPC prescribes.
//! * [`CodeSet`]: sets of status codes (retryable, failure), parsed from
//!   names such as `UNAVAILABLE` with typed errors.
//! * [`headers`]: header lookups tuned for the small maps gRPC calls carry.
//! * [`Striped`]: a shared value with a handle per thread, so calls on
//!   different cores that each keep a handle do not bounce one reference
//!   count between them.
//!
//! Time, wherever a layer needs it, is `tokio::time::Instant`, so tests run
//! on paused time.
//!
//! # Example
//!
//! A layer reads the method and the caller's deadline from a request built
//! by a tonic stub for a `Channel`:
//!
//! ```
//! use std::time::Duration;
//! use grpc_resilience_core::{timeout_header, MethodId, MethodMap};
//!
//! let mut timeouts = MethodMap::new();
//! timeouts.insert("*".parse()?, Duration::from_secs(5))?;
//! timeouts.insert("GetProduct".parse()?, Duration::from_secs(3))?;
//!
//! let request = http::Request::builder()
//!     .uri("http://catalog/catalog.v1.QueryService/GetProduct")
//!     .header("grpc-timeout", "1S")
//!     .body(())?;
//! let method = MethodId::from_request(&request).expect("a gRPC method path");
//! let configured = timeouts.get(&method).copied();
//! let caller = timeout_header::from_headers(request.headers())?;
//! assert_eq!(configured.min(caller), Some(Duration::from_secs(1)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod codes;
mod deadline;
pub mod error;
pub mod headers;
mod method;
mod method_table;
mod outcome;
mod policy;
mod ready;
pub mod striped;
pub mod timeout_header;

pub use codes::CodeSet;
pub use deadline::{CallDeadline, Scope};
pub use error::BoxError;
pub use method::{InvalidMethodPath, LastMethod, MethodId, same_path};
pub use method_table::MethodTable;
pub use outcome::{
    OnOutcome, Outcome, OutcomeBody, Unobserved, classify_head, classify_trailers, observe_head,
    outcome_of_frame,
};
pub use policy::{DuplicateSelector, InvalidSelector, MatchedBy, MethodMap, Selector};
pub use ready::take_ready;
pub use striped::{Stripe, Striped};
