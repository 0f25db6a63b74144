//! The service under a named channel's stack: one tonic channel, or a
//! balanced channel over several endpoints.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use grpc_balance::{BalancedBody, BalancedChannel};
use grpc_resilience_core::BoxError;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::transport::Channel;
use tower_service::Service;

type Request = http::Request<tonic::body::Body>;

/// What a [`ResilientChannels`](crate::ResilientChannels) channel's stack
/// sits on: one tonic [`Channel`] (`endpoint`), or a [`BalancedChannel`]
/// over several endpoints (`endpoints` or `dns`) with a breaker per
/// endpoint, outlier ejection and health checks.
///
/// The stack's retry is above it, so each attempt is balanced anew and a
/// retry goes to another endpoint when one is ready.
#[derive(Clone, Debug)]
pub enum NamedChannel {
    /// One endpoint.
    Single(Channel),
    /// Several endpoints, balanced.
    Balanced(BalancedChannel),
}

impl NamedChannel {
    /// The balanced channel, if this is one.
    pub fn balanced(&self) -> Option<&BalancedChannel> {
        match self {
            NamedChannel::Balanced(b) => Some(b),
            NamedChannel::Single(_) => None,
        }
    }
}

impl Service<Request> for NamedChannel {
    type Response = http::Response<NamedBody>;
    type Error = BoxError;
    type Future = NamedFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            NamedChannel::Single(c) => c.poll_ready(cx).map_err(Into::into),
            NamedChannel::Balanced(b) => b.poll_ready(cx),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self {
            NamedChannel::Single(c) => NamedFuture::Single {
                inner: c.call(request),
            },
            NamedChannel::Balanced(b) => NamedFuture::Balanced {
                inner: b.call(request),
            },
        }
    }
}

type BalancedFuture = <BalancedChannel as Service<Request>>::Future;

pin_project! {
    /// The response future of a [`NamedChannel`] call.
    #[project = NamedFutureProj]
    #[allow(missing_docs)] // the fields: the inner future of each variant
    pub enum NamedFuture {
        /// Through one tonic channel.
        Single { #[pin] inner: tonic::transport::channel::ResponseFuture },
        /// Through a balanced channel.
        Balanced { #[pin] inner: BalancedFuture },
    }
}

impl fmt::Debug for NamedFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NamedFuture::Single { .. } => "NamedFuture::Single",
            NamedFuture::Balanced { .. } => "NamedFuture::Balanced",
        })
    }
}

impl Future for NamedFuture {
    type Output = Result<http::Response<NamedBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project() {
            NamedFutureProj::Single { inner } => match ready!(inner.poll(cx)) {
                Ok(response) => Ok(response.map(|inner| NamedBody::Single { inner })),
                Err(err) => Err(err.into()),
            },
            NamedFutureProj::Balanced { inner } => match ready!(inner.poll(cx)) {
                Ok(response) => Ok(response.map(|inner| NamedBody::Balanced { inner })),
                Err(err) => Err(err),
            },
        })
    }
}

pin_project! {
    /// The response body of a [`NamedChannel`] call.
    #[project = NamedBodyProj]
    #[allow(missing_docs)] // the fields: the inner body of each variant
    pub enum NamedBody {
        /// From one tonic channel.
        Single { #[pin] inner: tonic::body::Body },
        /// From a balanced channel.
        Balanced { #[pin] inner: BalancedBody },
    }
}

impl fmt::Debug for NamedBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NamedBody::Single { .. } => "NamedBody::Single",
            NamedBody::Balanced { .. } => "NamedBody::Balanced",
        })
    }
}

impl Body for NamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project() {
            NamedBodyProj::Single { inner } => inner.poll_frame(cx).map_err(Into::into),
            NamedBodyProj::Balanced { inner } => inner.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            NamedBody::Single { inner } => inner.is_end_stream(),
            NamedBody::Balanced { inner } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            NamedBody::Single { inner } => inner.size_hint(),
            NamedBody::Balanced { inner } => inner.size_hint(),
        }
    }
}
