//! Fault injection for tonic servers: a chaos toolkit.
//!
//! [`FaultInjectionLayer`] wraps a tonic server (any
//! `Service<http::Request<_>>` that answers gRPC) and makes chosen calls
//! fail the ways real services fail, or answer the way a broken or hostile
//! server would:
//!
//! | fault | what the client sees | handler runs |
//! |---|---|---|
//! | [`Fault::status`] | a Trailers-Only error, optionally with `grpc-retry-pushback-ms` | no |
//! | [`Fault::status_after_messages`] | headers, some messages, then an error in the trailers (a *committed* failure) | yes |
//! | [`Fault::with_delay`] | the fault (or the normal answer) after a delay | after the delay |
//! | [`Fault::slow_stream`] | a delay between response messages | yes |
//! | [`Fault::lose_response`] | `UNAVAILABLE`, though the handler ran to the end (the write happened) | yes |
//! | [`Fault::reset`] | the HTTP/2 stream reset with any [`ResetReason`] (`CANCEL`, `REFUSED_STREAM`, `ENHANCE_YOUR_CALM`, ... or any code) | no |
//! | [`Fault::reset_after_messages`] | headers, some messages, then the stream reset | yes |
//! | [`Fault::drop_connection`] | the whole connection gone | no |
//! | [`Fault::raw_status`], [`Fault::raw_status_after_messages`] | a `grpc-status` exactly as given: `abc`, `99999`, empty | no / yes |
//! | [`Fault::early_status`] | a Trailers-Only error at once, while the server reads the request body on (no reset) | no |
//!
//! and on any status fault (Trailers-Only or in the trailers):
//!
//! | method | what is sent |
//! |---|---|
//! | [`Fault::with_message`] | `grpc-message`, percent-encoded as the protocol says; any length (an oversized header) |
//! | [`Fault::with_raw_message`] | `grpc-message` as given, not encoded (`%zz`, bytes that are not UTF-8) |
//! | [`Fault::with_raw_details`] | `grpc-status-details-bin` as given, e.g. not base64 |
//! | [`Fault::with_pushback`], [`Fault::with_raw_pushback`] | `grpc-retry-pushback-ms`, valid or not (`-1`, `ten`) |
//! | [`Fault::with_header`] | any header, added after the others: repeated `grpc-status` or pushback values |
//!
//! Faults follow a script per method (call 1 fails with X, call 2
//! succeeds, ...) or a seeded probability (reproducible), set and changed
//! at run time through a [`FaultInjector`], which also counts what the
//! server saw: calls per method, handler runs, request bytes, cancelled
//! calls, and a bounded log of calls with their headers and a digest of
//! their bodies.
//!
//! It is made for tests and benchmarks of gRPC clients, and for chaos tests
//! of your own services: put it in front of a staging server and watch how
//! its clients behave.
//!
//! # Example
//!
//! ```no_run
//! use grpc_fault::{Fault, FaultInjector};
//! use tonic::{Code, transport::Server};
//! # use catalog_proto::query_service_server::{QueryService, QueryServiceServer};
//! # #[derive(Default)] struct Catalog;
//! # #[tonic::async_trait] impl QueryService for Catalog {
//! #   async fn get_product(&self, _: tonic::Request<catalog_proto::GetProductRequest>) -> Result<tonic::Response<catalog_proto::Product>, tonic::Status> { unimplemented!() }
//! #   type ListProductsStream = tokio_stream::Empty<Result<catalog_proto::Product, tonic::Status>>;
//! #   async fn list_products(&self, _: tonic::Request<catalog_proto::ListProductsRequest>) -> Result<tonic::Response<Self::ListProductsStream>, tonic::Status> { unimplemented!() }
//! # }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let faults = FaultInjector::new();
//! faults.script("GetProduct", [Fault::status(Code::Unavailable), Fault::status(Code::Unavailable)])?;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! tokio::spawn(
//!     Server::builder()
//!         .layer(faults.layer())
//!         .add_service(QueryServiceServer::new(Catalog))
//!         .serve_with_incoming(grpc_fault::incoming(listener)),
//! );
//!
//! // ... drive a client, then:
//! let stats = faults.stats("GetProduct")?;
//! println!("{} calls, {} handler runs", stats.calls, stats.handler_runs);
//! # Ok(()) }
//! ```
//!
//! Serving through [`incoming`] is needed only for
//! [`Fault::drop_connection`]; every other fault works with any listener.
//!
//! # Playing a hostile server
//!
//! A client library should survive whatever a server (or a proxy on the
//! way) sends. Script the bad answers, then check that the client reports
//! a status instead of panicking or hanging:
//!
//! ```
//! use grpc_fault::{Fault, FaultInjector, ResetReason};
//! use tonic::Code;
//!
//! let faults = FaultInjector::new();
//! faults.script(
//!     "GetProduct",
//!     [
//!         // A status code no gRPC version defines, then one that is not a number.
//!         Fault::raw_status("99999"),
//!         Fault::raw_status("abc"),
//!         // Status details that are not base64 (tonic 0.14 panics on these).
//!         Fault::status(Code::NotFound).with_raw_details("not base64!"),
//!         // Two grpc-status values that disagree.
//!         Fault::status(Code::Unavailable).with_header("grpc-status", "0"),
//!         // A 64 KiB grpc-message.
//!         Fault::status(Code::Internal).with_message("x".repeat(64 * 1024)),
//!         // A stream reset the client must read as RESOURCE_EXHAUSTED.
//!         Fault::reset(ResetReason::EnhanceYourCalm),
//!     ],
//! )?;
//! // On a server stream: two messages, then trailers with undecodable
//! // details; or two messages and a CANCEL reset.
//! faults.script(
//!     "ListProducts",
//!     [
//!         Fault::status_after_messages(2, Code::DataLoss).with_raw_details("%%%"),
//!         Fault::reset_after_messages(2, ResetReason::Cancel),
//!     ],
//! )?;
//! # Ok::<(), grpc_fault::FaultConfigError>(())
//! ```
//!
//! The layer boxes its response future and takes a short lock per call to
//! pick the fault: fine for test and staging traffic, not meant for the hot
//! path of a production server.

mod body;
mod conn;
mod fault;
mod injector;
mod stats;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use grpc_resilience_core::BoxError;
use http_body::Body;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;

pub use body::{FaultBody, RequestBody};
pub use conn::{ConnectionHandle, FaultyIo, incoming};
pub use fault::{Fault, ResetReason};
pub use injector::{DEFAULT_LOG_CAPACITY, FaultConfigError, FaultInjector};
pub use stats::{MethodStats, RecordedCall, body_digest};

use body::{End, status_headers};
use fault::{Action, HeaderEdit, apply_edits};
use stats::CallGuard;

/// Applies [`FaultInjection`] to a tonic server.
#[derive(Clone, Debug)]
pub struct FaultInjectionLayer {
    injector: FaultInjector,
}

impl FaultInjectionLayer {
    /// A layer injecting `injector`'s faults.
    pub fn new(injector: FaultInjector) -> Self {
        FaultInjectionLayer { injector }
    }
}

impl<S> Layer<S> for FaultInjectionLayer {
    type Service = FaultInjection<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultInjection {
            inner,
            injector: self.injector.clone(),
        }
    }
}

/// Injects faults into the calls a gRPC server handles; see the
/// [crate docs](crate).
#[derive(Clone, Debug)]
pub struct FaultInjection<S> {
    inner: S,
    injector: FaultInjector,
}

impl<S> FaultInjection<S> {
    /// The injector holding this service's plans and counters.
    pub fn injector(&self) -> &FaultInjector {
        &self.injector
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The error that makes the server reset a call's HTTP/2 stream.
///
/// tonic's server turns an error holding a `tonic::Status` or a bare
/// `h2::Error` into a status response; this one holds the `h2::Error` as its
/// source, so it reaches hyper, which resets the stream with its reason.
#[derive(Debug)]
pub struct ResetStream {
    reason: ResetReason,
    h2: h2::Error,
}

impl ResetStream {
    pub(crate) fn new(reason: ResetReason) -> Self {
        ResetStream {
            reason,
            h2: h2::Error::from(reason.to_h2()),
        }
    }

    /// The reset's reason.
    pub fn reason(&self) -> ResetReason {
        self.reason
    }
}

impl fmt::Display for ResetStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "injected stream reset ({:?})", self.reason)
    }
}

impl std::error::Error for ResetStream {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.h2)
    }
}

/// Reads a request body to its end (or its first error).
async fn read_to_end<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            break;
        }
    }
}

fn trailers_only<B>(
    code: Code,
    message: &str,
    pushback: Option<&str>,
    edits: &[HeaderEdit],
) -> http::Response<FaultBody<B>> {
    let mut response = http::Response::new(FaultBody::empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.extend(status_headers(code, message, &[]));
    if let Some(value) = pushback {
        match http::HeaderValue::from_str(value) {
            Ok(value) => {
                headers.insert("grpc-retry-pushback-ms", value);
            }
            Err(_) => tracing::warn!(
                value,
                "pushback value is not a valid header value; not sent"
            ),
        }
    }
    apply_edits(edits, headers);
    response
}

impl<S, B, ResBody> Service<http::Request<B>> for FaultInjection<S>
where
    S: Service<http::Request<RequestBody<B>>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data = Bytes> + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<FaultBody<ResBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Use the service that was made ready; leave a fresh clone behind.
        let mut inner = grpc_resilience_core::take_ready(&mut self.inner);
        let (fault, call) = self.injector.begin(&request);
        let edits = fault.edits;
        Box::pin(async move {
            let mut guard = CallGuard::new(call.clone());
            if !fault.delay.is_zero() {
                tokio::time::sleep(fault.delay).await;
            }
            let mut run_handler = |request: http::Request<B>| {
                call.handler_runs();
                inner.call(request.map(|body| RequestBody::new(body, call.clone())))
            };
            match fault.action {
                Action::Status {
                    code,
                    message,
                    pushback,
                } => {
                    guard.finish();
                    Ok(trailers_only(code, &message, pushback.as_deref(), &edits))
                }
                Action::Reset(reason) => {
                    guard.finish();
                    Err(ResetStream::new(reason).into())
                }
                Action::EarlyStatus { code, message } => {
                    guard.finish();
                    // Holding the request body keeps the stream open: read it
                    // to its end, recording what arrives.
                    let body = RequestBody::new(request.into_body(), call.clone());
                    tokio::spawn(read_to_end(body));
                    Ok(trailers_only(code, &message, None, &edits))
                }
                Action::DropConnection => {
                    guard.finish();
                    match request.extensions().get::<ConnectionHandle>() {
                        Some(conn) => conn.close(),
                        None => tracing::warn!(
                            "drop_connection needs a server serving grpc_fault::incoming; resetting the stream instead"
                        ),
                    }
                    Err(ResetStream::new(ResetReason::RefusedStream).into())
                }
                Action::Pass => {
                    let response = run_handler(request).await.map_err(Into::into)?;
                    Ok(response.map(|body| FaultBody::pass(body, guard)))
                }
                Action::SlowStream(gap) => {
                    let response = run_handler(request).await.map_err(Into::into)?;
                    Ok(response.map(|body| FaultBody::slow(body, guard, gap)))
                }
                Action::StatusAfterMessages {
                    messages,
                    code,
                    message,
                } => {
                    let response = run_handler(request).await.map_err(Into::into)?;
                    if response.headers().contains_key("grpc-status") {
                        // The handler failed on its own (Trailers-Only): keep it.
                        return Ok(response.map(|body| FaultBody::pass(body, guard)));
                    }
                    let trailers = status_headers(code, &message, &edits);
                    Ok(response.map(|body| {
                        FaultBody::truncate(body, guard, messages, End::Trailers(trailers))
                    }))
                }
                Action::ResetAfterMessages { messages, reason } => {
                    let response = run_handler(request).await.map_err(Into::into)?;
                    if response.headers().contains_key("grpc-status") {
                        // The handler failed on its own (Trailers-Only): keep it.
                        return Ok(response.map(|body| FaultBody::pass(body, guard)));
                    }
                    Ok(response
                        .map(|body| FaultBody::truncate(body, guard, messages, End::Reset(reason))))
                }
                Action::LoseResponse => {
                    let response = run_handler(request).await.map_err(Into::into)?;
                    // Let the handler finish its work: read its whole response.
                    let mut body = std::pin::pin!(response.into_body());
                    while let Some(frame) =
                        std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                    {
                        if frame.is_err() {
                            break;
                        }
                    }
                    guard.finish();
                    Ok(trailers_only(
                        Code::Unavailable,
                        "injected fault: the response was lost",
                        None,
                        &[],
                    ))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
