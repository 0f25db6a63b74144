//! The server side: [`ServerTraceLayer`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_resilience_core::{BoxError, MethodId, OnOutcome, Outcome, OutcomeBody};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pin_project_lite::pin_project;
use tonic::Code;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metadata::HeaderExtractor;

/// The OpenTelemetry context a caller sent in `headers`, read with
/// `propagator`; `None` when there is none (or it is invalid).
///
/// ```
/// use grpc_otel::{TraceContextPropagator, extract_context};
/// use opentelemetry::trace::TraceContextExt;
///
/// let mut headers = http::HeaderMap::new();
/// headers.insert(
///     "traceparent",
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap(),
/// );
/// let cx = extract_context(&TraceContextPropagator::new(), &headers).unwrap();
/// assert_eq!(
///     cx.span().span_context().span_id().to_string(),
///     "00f067aa0ba902b7"
/// );
/// let garbage: http::HeaderMap = [(
///     http::header::HeaderName::from_static("traceparent"),
///     "00-zz-yy-01".parse().unwrap(),
/// )]
/// .into_iter()
/// .collect();
/// assert!(extract_context(&TraceContextPropagator::new(), &garbage).is_none());
/// ```
pub fn extract_context<P>(
    propagator: &P,
    headers: &http::HeaderMap,
) -> Option<opentelemetry::Context>
where
    P: TextMapPropagator + ?Sized,
{
    let cx = propagator.extract(&HeaderExtractor(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Opens a server span per call, the child of the context the caller
/// propagated; see [`ServerTrace`].
///
/// ```
/// use catalog_proto::InMemoryCatalog;
/// use grpc_otel::ServerTraceLayer;
/// use tonic::transport::Server;
///
/// let catalog = InMemoryCatalog::with_products(3);
/// let router = Server::builder()
///     .layer(ServerTraceLayer::new())
///     .add_service(catalog.query_service());
/// # drop(router);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ServerTraceLayer<P = TraceContextPropagator> {
    propagator: P,
}

impl ServerTraceLayer {
    /// Reads W3C Trace Context (`traceparent`, `tracestate`).
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P> ServerTraceLayer<P> {
    /// Reads with another propagator.
    pub fn with_propagator<Q>(self, propagator: Q) -> ServerTraceLayer<Q> {
        ServerTraceLayer { propagator }
    }
}

impl<S, P: Clone> Layer<S> for ServerTraceLayer<P> {
    type Service = ServerTrace<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace {
            inner,
            propagator: self.propagator.clone(),
        }
    }
}

/// Runs each call in an INFO span `grpc_server` (`otel.kind = "server"`,
/// `rpc.system`, `rpc.service`, `rpc.method`, and `rpc.grpc.status_code`
/// once the status is sent), whose parent is the context in the request's
/// metadata ([`extract_context`]), or the current span when there is
/// none. The span lasts until the response's status is sent (or the
/// response is dropped).
///
/// Put it outermost, above fault injection or auth layers, so that calls
/// those refuse have their span too.
#[derive(Clone, Debug)]
pub struct ServerTrace<S, P = TraceContextPropagator> {
    inner: S,
    propagator: P,
}

impl<S> ServerTrace<S> {
    /// `inner` with a span per call, reading W3C Trace Context.
    pub fn new(inner: S) -> Self {
        ServerTraceLayer::new().layer(inner)
    }
}

impl<S, P> ServerTrace<S, P> {
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

/// Whether a server that ends a call with `code` failed, as OpenTelemetry's
/// RPC conventions say for gRPC servers (a client error such as
/// `NOT_FOUND` is not the server's failure).
fn server_error(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn server_span<P: TextMapPropagator, B>(propagator: &P, request: &http::Request<B>) -> Span {
    let path = request.uri().path();
    let (service, method) =
        MethodId::from_path(path).map_or(("", ""), |id| (id.service(), id.method()));
    let span = tracing::info_span!(
        "grpc_server",
        otel.name = path.strip_prefix('/').unwrap_or(path),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(parent) = extract_context(propagator, request.headers())
    {
        // Only fails when the span has already started, which it has not.
        let _ = span.set_parent(parent);
    }
    span
}

impl<S, P, B, R> Service<http::Request<B>> for ServerTrace<S, P>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    P: TextMapPropagator,
{
    type Response = http::Response<ServerTraceBody<R>>;
    type Error = S::Error;
    type Future = ServerTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = server_span(&self.propagator, &request);
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ServerTraceFuture {
            inner,
            span: Some(span),
        }
    }
}

pin_project! {
    /// The response future of [`ServerTrace`]: the inner future, polled in
    /// the call's span.
    pub struct ServerTraceFuture<F> {
        #[pin]
        inner: F,
        span: Option<Span>,
    }
}

impl<F> fmt::Debug for ServerTraceFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTraceFuture").finish_non_exhaustive()
    }
}

impl<F, R, E> Future for ServerTraceFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = Result<http::Response<ServerTraceBody<R>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = match this.span.as_ref() {
            Some(span) => {
                let _entered = span.enter();
                ready!(this.inner.poll(cx))
            }
            None => ready!(this.inner.poll(cx)),
        };
        let span = this.span.take().filter(|s| !s.is_disabled());
        Poll::Ready(result.map(|response| {
            let response = match span {
                Some(span) => OutcomeBody::wrap_response(response, SpanStatus(span)),
                None => response.map(OutcomeBody::reported),
            };
            response.map(|inner| ServerTraceBody { inner })
        }))
    }
}

/// Records the status a call ended with on its span, which ends with it.
#[derive(Debug)]
struct SpanStatus(Span);

impl OnOutcome for SpanStatus {
    fn on_outcome(self, outcome: Outcome) {
        let code = outcome.code();
        self.0.record("rpc.grpc.status_code", code as i32);
        if server_error(code) {
            self.0.record("otel.status_code", "error");
        }
    }
}

pin_project! {
    /// The response body of [`ServerTrace`]: the inner body, which ends the
    /// call's span with its status.
    pub struct ServerTraceBody<R> {
        #[pin]
        inner: OutcomeBody<R, SpanStatus>,
    }
}

impl<R> fmt::Debug for ServerTraceBody<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTraceBody").finish_non_exhaustive()
    }
}

impl<R> Body for ServerTraceBody<R>
where
    R: Body,
    R::Error: Into<BoxError>,
{
    type Data = R::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
