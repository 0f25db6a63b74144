//! The per-attempt timeout's place in the stack: a
//! [`grpc_timeout::Timeout`] when `[timeouts] per_attempt` is set, and
//! nothing at all (no header parse, no timer) when it is not.
//!
//! When it is on, its future and body are boxed (two allocations per
//! attempt): the stack's future and response are types fixed at compile
//! time, so an inline timeout state would make every call's future and
//! response larger, and every move of them dearer, whether the timeout is
//! configured or not (about 530 instructions per call in the facade's
//! default stack, measured with the `instructions` bench under callgrind).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use grpc_resilience_core::BoxError;
use grpc_timeout::Timeout;
use grpc_timeout::future::{ResponseFuture as TimeoutFuture, TimeoutBody};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_service::Service;

/// The per-attempt timeout of a [`ResilientChannel`](crate::ResilientChannel)
/// stack, on or off.
#[derive(Clone, Debug)]
pub enum Attempt<S> {
    /// No per-attempt timeout: calls go straight to the service.
    Off(S),
    /// Each attempt bounded by the per-attempt policy.
    On(Timeout<S>),
}

impl<S, B, R> Service<http::Request<B>> for Attempt<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<AttemptBody<R>>;
    type Error = BoxError;
    type Future = AttemptFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Attempt::Off(s) => s.poll_ready(cx).map_err(Into::into),
            Attempt::On(t) => t.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Below retry and breaker, inside the attempt's span: each attempt
        // carries its own span as the server span's parent.
        #[cfg(feature = "opentelemetry")]
        let request = {
            let mut request = request;
            grpc_otel::inject_context(
                &grpc_otel::TraceContextPropagator::new(),
                request.headers_mut(),
            );
            request
        };
        match self {
            Attempt::Off(s) => AttemptFuture::Off {
                inner: s.call(request),
            },
            Attempt::On(t) => AttemptFuture::On {
                inner: Box::pin(t.call(request)),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Attempt`].
    #[project = AttemptFutureProj]
    #[allow(missing_docs)] // the fields: the inner future of each variant
    pub enum AttemptFuture<F> {
        /// Without a per-attempt timeout.
        Off { #[pin] inner: F },
        /// With one.
        On { inner: Pin<Box<TimeoutFuture<F>>> },
    }
}

impl<F> fmt::Debug for AttemptFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttemptFuture::Off { .. } => "AttemptFuture::Off",
            AttemptFuture::On { .. } => "AttemptFuture::On",
        })
    }
}

impl<F, R, E> Future for AttemptFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<AttemptBody<R>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AttemptFutureProj::Off { inner } => inner.poll(cx).map(|r| match r {
                Ok(response) => Ok(response.map(|body| AttemptBody::Off { body })),
                Err(e) => Err(e.into()),
            }),
            AttemptFutureProj::On { inner } => inner.as_mut().poll(cx).map(|r| {
                r.map(|response| {
                    response.map(|body| AttemptBody::On {
                        body: Box::pin(body),
                    })
                })
            }),
        }
    }
}

pin_project! {
    /// The response body of [`Attempt`].
    #[project = AttemptBodyProj]
    #[allow(missing_docs)] // the fields: the inner body of each variant
    pub enum AttemptBody<R> {
        /// Without a per-attempt timeout.
        Off { #[pin] body: R },
        /// With one.
        On { body: Pin<Box<TimeoutBody<R>>> },
    }
}

impl<R> fmt::Debug for AttemptBody<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttemptBody::Off { .. } => "AttemptBody::Off",
            AttemptBody::On { .. } => "AttemptBody::On",
        })
    }
}

impl<R> Body for AttemptBody<R>
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
        match self.project() {
            AttemptBodyProj::Off { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
            AttemptBodyProj::On { body } => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Off { body } => body.is_end_stream(),
            AttemptBody::On { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Off { body } => body.size_hint(),
            AttemptBody::On { body } => body.size_hint(),
        }
    }
}
