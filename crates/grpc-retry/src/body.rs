//! The response body of [`Retry`](crate::Retry).

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_resilience_core::classify_trailers;
use grpc_resilience_core::headers::sanitize_status_details;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::RetryThrottle;

pin_project! {
    /// The response body of a call through [`Retry`](crate::Retry): the
    /// inner body, frame for frame, with two duties at its trailers.
    ///
    /// * A `grpc-status-details-bin` trailer that is not valid base64 is
    ///   dropped before tonic reads it (tonic 0.14 panics on one).
    /// * With a [`RetryThrottle`], a committed call (one whose response
    ///   headers arrived) gives its `token_ratio` back only when its
    ///   trailers say OK, as gRFC A6 counts: a call that fails in its
    ///   trailers, breaks, or is dropped before its end gives nothing back.
    ///   Without a throttle nothing is counted and nothing is held.
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        inner: B,
        // The throttle to refill if the trailers say OK; taken at the end.
        throttle: Option<RetryThrottle>,
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn new(inner: B, throttle: Option<RetryThrottle>) -> Self {
        ResponseBody { inner, throttle }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Unwraps the body; the throttle no longer learns how the call ends.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut frame = ready!(this.inner.poll_frame(cx));
        match &mut frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_mut() {
                    sanitize_status_details(trailers);
                    if let Some(throttle) = this.throttle.take()
                        && classify_trailers(trailers).is_ok()
                    {
                        throttle.on_success();
                    }
                }
            }
            // An error or an end without trailers: not a success.
            Some(Err(_)) | None => {
                this.throttle.take();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
