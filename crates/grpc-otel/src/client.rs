//! The client side: [`TraceContextLayer`].

use std::task::{Context, Poll};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tower_layer::Layer;
use tower_service::Service;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metadata::HeaderInjector;

/// Writes the OpenTelemetry context of the current `tracing` span into
/// `headers` with `propagator` (for W3C Trace Context: `traceparent` and,
/// when there is one, `tracestate`), replacing any value already there.
///
/// Returns whether anything was written: nothing is when the current span
/// is disabled or has no valid OpenTelemetry context (no
/// `tracing-opentelemetry` layer is installed, or the span is filtered
/// out of it).
///
/// ```
/// use grpc_otel::{TraceContextPropagator, inject_context};
///
/// let mut headers = http::HeaderMap::new();
/// // No OpenTelemetry layer in this process: nothing to propagate.
/// assert!(!inject_context(&TraceContextPropagator::new(), &mut headers));
/// assert!(headers.is_empty());
/// ```
pub fn inject_context<P>(propagator: &P, headers: &mut HeaderMap) -> bool
where
    P: TextMapPropagator + ?Sized,
{
    let span = tracing::Span::current();
    if span.is_disabled() {
        return false;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    propagator.inject_context(&cx, &mut HeaderInjector(headers));
    true
}

/// Propagates the current span's OpenTelemetry context in the metadata of
/// every request; see [`TraceContext`].
///
/// ```
/// use grpc_otel::TraceContextLayer;
/// use tonic::transport::Channel;
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
/// let channel = ServiceBuilder::new()
///     .layer(TraceContextLayer::new())
///     .service(channel);
/// # drop(channel);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct TraceContextLayer<P = TraceContextPropagator> {
    propagator: P,
}

impl TraceContextLayer {
    /// W3C Trace Context (`traceparent`, `tracestate`).
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P> TraceContextLayer<P> {
    /// Another propagator (a composite one with baggage, B3, ...).
    pub fn with_propagator<Q>(self, propagator: Q) -> TraceContextLayer<Q> {
        TraceContextLayer { propagator }
    }
}

impl<S, P: Clone> Layer<S> for TraceContextLayer<P> {
    type Service = TraceContext<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContext {
            inner,
            propagator: self.propagator.clone(),
        }
    }
}

/// Writes the OpenTelemetry context of the span current at `call` into
/// the request's metadata ([`inject_context`]), then calls the inner
/// service.
///
/// Below a retry layer it runs once per attempt, inside the attempt's
/// span, so each attempt carries its own parent id.
#[derive(Clone, Debug)]
pub struct TraceContext<S, P = TraceContextPropagator> {
    inner: S,
    propagator: P,
}

impl<S> TraceContext<S> {
    /// `inner` with W3C Trace Context propagation.
    pub fn new(inner: S) -> Self {
        TraceContextLayer::new().layer(inner)
    }
}

impl<S, P> TraceContext<S, P> {
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

impl<S, P, B> Service<http::Request<B>> for TraceContext<S, P>
where
    S: Service<http::Request<B>>,
    P: TextMapPropagator,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        inject_context(&self.propagator, request.headers_mut());
        self.inner.call(request)
    }
}
