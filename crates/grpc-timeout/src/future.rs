//! The response future and body of [`Timeout`](crate::Timeout).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_resilience_core::error::{find_error, with_transport_status};
use grpc_resilience_core::{BoxError, MethodId, headers};
use http::uri::PathAndQuery;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::Scope;
use crate::error::{Elapsed, When};

/// The deadline a call runs under.
#[derive(Clone, Debug)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    // When the call was sent: the timeout it was given is `at` minus this,
    // worked out only if it expires.
    pub(crate) sent: Instant,
    pub(crate) scope: Scope,
    // For the error message and metric labels; a clone of tonic's static
    // path, so it costs no allocation.
    pub(crate) path: Option<PathAndQuery>,
}

impl Deadline {
    /// Records the expiry (metric and log) and builds the error.
    fn expire(&self, when: When) -> BoxError {
        let path = self.path.as_ref().map_or("", PathAndQuery::path);
        let (service, method) =
            MethodId::from_path(path).map_or(("", ""), |m| (m.service(), m.method()));
        let timeout = self.at.saturating_duration_since(self.sent);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let scope = self.scope.as_str();
        metrics::counter!(
            "grpc.timeout.count",
            "service" => service.to_owned(),
            "method" => method.to_owned(),
            "scope" => scope,
        )
        .increment(1);
        match self.scope {
            Scope::Call => tracing::warn!(
                service,
                method,
                timeout_ms,
                scope,
                during_body = when == When::DuringBody,
                sent = when != When::BeforeSending,
                "gRPC call to {service}/{method} exceeded its deadline of {timeout_ms}ms"
            ),
            Scope::Attempt => tracing::debug!(
                service,
                method,
                timeout_ms,
                scope,
                during_body = when == When::DuringBody,
                sent = when != When::BeforeSending,
                "gRPC attempt to {service}/{method} exceeded its deadline of {timeout_ms}ms"
            ),
        }
        let name = if path.is_empty() {
            "<unknown method>"
        } else {
            path
        };
        Box::new(Elapsed::new(timeout, self.scope, when, name))
    }
}

pin_project! {
    /// The response future of [`Timeout`](crate::Timeout).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        // `None` for a call whose deadline had passed before it was sent.
        #[pin]
        inner: Option<F>,
        // Armed only once the inner future has to wait, so a response that
        // is there at once costs no timer; kept in place (not boxed), so
        // arming it allocates nothing.
        #[pin]
        sleep: Option<Sleep>,
        deadline: Option<Deadline>,
        // Whether this layer times the response head itself; off when the
        // inner service enforces the `grpc-timeout` it is sent (a tonic
        // `Channel`, see `TimeoutLayer::rely_on_channel_for_head`).
        head_timer: bool,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, deadline: Option<Deadline>, head_timer: bool) -> Self {
        ResponseFuture {
            inner: Some(inner),
            sleep: None,
            deadline,
            head_timer,
        }
    }

    /// A call that fails with `DEADLINE_EXCEEDED` when first polled, never
    /// sent.
    pub(crate) fn expired(deadline: Deadline) -> Self {
        ResponseFuture {
            inner: None,
            sleep: None,
            deadline: Some(deadline),
            head_timer: false,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<TimeoutBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let elapsed = |deadline: &mut Option<Deadline>| match deadline.take() {
            Some(d) => Err(d.expire(When::BeforeResponse)),
            None => Err("deadline exceeded".into()),
        };
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(match this.deadline.take() {
                Some(d) => Err(d.expire(When::BeforeSending)),
                None => Err("response future polled after completion".into()),
            });
        };
        match inner.poll(cx) {
            Poll::Ready(Ok(mut response)) => {
                // A response that lands after the timer fired does not win
                // the race: the caller is told its deadline passed, whatever
                // the server said (tonic servers answer CANCELLED then).
                if this
                    .sleep
                    .as_ref()
                    .get_ref()
                    .as_ref()
                    .is_some_and(Sleep::is_elapsed)
                {
                    return Poll::Ready(elapsed(this.deadline));
                }
                // tonic panics on undecodable status details.
                headers::sanitize_status_details(response.headers_mut());
                let deadline = this.deadline.take();
                Poll::Ready(Ok(response.map(|body| TimeoutBody::new(body, deadline))))
            }
            Poll::Ready(Err(err)) => {
                let err: BoxError = err.into();
                // tonic's channel enforces the grpc-timeout this layer sent,
                // with its own timer, and fails the call as CANCELLED
                // (`TimeoutExpired`); it may fire a moment before ours.
                let channel_timed_out = find_error::<tonic::TimeoutExpired>(&*err).is_some();
                let fired = this
                    .sleep
                    .as_ref()
                    .get_ref()
                    .as_ref()
                    .is_some_and(Sleep::is_elapsed);
                if this.deadline.is_some() && (channel_timed_out || fired) {
                    return Poll::Ready(elapsed(this.deadline));
                }
                Poll::Ready(Err(with_transport_status(err)))
            }
            Poll::Pending => {
                let Some(deadline) = this.deadline.as_ref().filter(|_| *this.head_timer) else {
                    return Poll::Pending;
                };
                if this.sleep.is_none() {
                    this.sleep.set(Some(sleep_until(deadline.at)));
                }
                let Some(sleep) = this.sleep.as_mut().as_pin_mut() else {
                    return Poll::Pending;
                };
                ready!(sleep.poll(cx));
                Poll::Ready(elapsed(this.deadline))
            }
        }
    }
}

pin_project! {
    /// A response body that ends with `DEADLINE_EXCEEDED` when the call's
    /// deadline passes before the body's end.
    ///
    /// The deadline is checked on every message read (one clock read), so
    /// it also cuts a body whose next frame is always ready (a consumer
    /// slower than the server), and a timer, made only once the body has to
    /// wait, wakes a reader waiting for data. Trailers and the end of the
    /// body that are already there pass without a clock read: the server
    /// has finished the call. When the deadline passes,
    /// the inner body is dropped at once, which resets the HTTP/2 stream:
    /// the server sees the call cancelled.
    ///
    /// A `grpc-status-details-bin` trailer that is not valid base64 is
    /// removed, since tonic panics on one.
    #[derive(Debug)]
    pub struct TimeoutBody<B> {
        #[pin]
        inner: Option<B>,
        // Made only once the body has to wait, so a response read without
        // waiting costs no timer; boxed so the body stays small while it is
        // moved through the response path.
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Option<Deadline>,
    }
}

impl<B> TimeoutBody<B> {
    fn new(inner: B, deadline: Option<Deadline>) -> Self {
        TimeoutBody {
            inner: Some(inner),
            sleep: None,
            deadline,
        }
    }

    /// The wrapped body; `None` once the deadline has ended it.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = inner.poll_frame(cx) {
            return Poll::Ready(match frame {
                // One clock read per message: a message that is ready does
                // not outrun the deadline. The trailers and the end of the
                // body are the call's completion, which the server reached
                // already: they pass without a clock read.
                Some(Ok(frame)) if frame.is_data() => {
                    if let Some(deadline) = this.deadline.as_ref()
                        && Instant::now() >= deadline.at
                    {
                        return Poll::Ready(Some(Err(cut(this.inner, this.deadline))));
                    }
                    Some(Ok(frame))
                }
                Some(Ok(mut frame)) => {
                    if let Some(trailers) = frame.trailers_mut() {
                        headers::sanitize_status_details(trailers);
                    }
                    Some(Ok(frame))
                }
                Some(Err(err)) => Some(Err(with_transport_status(err.into()))),
                None => None,
            });
        }
        let Some(deadline) = this.deadline.as_ref() else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(sleep_until(deadline.at)));
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(cut(this.inner, this.deadline))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Ends a body at its deadline: drops the inner body (resetting the
/// stream) and builds the error.
fn cut<B>(mut inner: Pin<&mut Option<B>>, deadline: &mut Option<Deadline>) -> BoxError {
    inner.set(None);
    match deadline.take() {
        Some(deadline) => deadline.expire(When::DuringBody),
        None => "deadline exceeded".into(),
    }
}
