//! The bulkhead's place in the stack: a [`grpc_bulkhead::Bulkhead`] when
//! the config has a `[bulkhead]` section, and nothing at all (no partition
//! lookup, no counter) when it has none.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use grpc_bulkhead::Bulkhead;
use grpc_bulkhead::future::{ResponseBody, ResponseFuture};
use grpc_resilience_core::BoxError;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_service::Service;

/// The bulkhead of a [`ResilientChannel`](crate::ResilientChannel) stack,
/// on or off.
#[derive(Clone, Debug)]
pub enum Bulk<S> {
    /// No bulkhead: calls go straight to the service.
    Off(S),
    /// Calls take a slot of their partition first.
    On(Bulkhead<S>),
}

impl<S, B, R> Service<http::Request<B>> for Bulk<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<BulkBody<R>>;
    type Error = BoxError;
    type Future = BulkFuture<S::Future, ResponseFuture<S, B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Bulk::Off(s) => s.poll_ready(cx).map_err(Into::into),
            Bulk::On(b) => b.poll_ready(cx),
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self {
            Bulk::Off(s) => BulkFuture::Off {
                inner: s.call(request),
            },
            Bulk::On(b) => BulkFuture::On {
                inner: b.call(request),
            },
        }
    }
}

pin_project! {
    /// The response future of [`Bulk`].
    #[project = BulkFutureProj]
    #[allow(missing_docs)] // the fields: the inner future of each variant
    pub enum BulkFuture<F, G> {
        /// Without a bulkhead.
        Off { #[pin] inner: F },
        /// With one.
        On { #[pin] inner: G },
    }
}

impl<F, G> fmt::Debug for BulkFuture<F, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BulkFuture::Off { .. } => "BulkFuture::Off",
            BulkFuture::On { .. } => "BulkFuture::On",
        })
    }
}

impl<F, G, R, E> Future for BulkFuture<F, G>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    E: Into<BoxError>,
    G: Future<Output = Result<http::Response<ResponseBody<R>>, BoxError>>,
{
    type Output = Result<http::Response<BulkBody<R>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BulkFutureProj::Off { inner } => inner.poll(cx).map(|r| match r {
                Ok(response) => Ok(response.map(|body| BulkBody::Off { body })),
                Err(e) => Err(e.into()),
            }),
            BulkFutureProj::On { inner } => inner
                .poll(cx)
                .map(|r| r.map(|response| response.map(|body| BulkBody::On { body }))),
        }
    }
}

pin_project! {
    /// The response body of [`Bulk`].
    #[project = BulkBodyProj]
    #[allow(missing_docs)] // the fields: the inner body of each variant
    pub enum BulkBody<R> {
        /// Without a bulkhead.
        Off { #[pin] body: R },
        /// With one: the body holds the call's slot until it ends.
        On { #[pin] body: ResponseBody<R> },
    }
}

impl<R> fmt::Debug for BulkBody<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BulkBody::Off { .. } => "BulkBody::Off",
            BulkBody::On { .. } => "BulkBody::On",
        })
    }
}

impl<R> Body for BulkBody<R>
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
            BulkBodyProj::Off { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
            BulkBodyProj::On { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BulkBody::Off { body } => body.is_end_stream(),
            BulkBody::On { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BulkBody::Off { body } => body.size_hint(),
            BulkBody::On { body } => body.size_hint(),
        }
    }
}
