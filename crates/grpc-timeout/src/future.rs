//! The response future and body of [`Timeout`](crate::Timeout).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_resilience_core::error::error_code;
use grpc_resilience_core::error::{LocalRejection, find_error, with_transport_status};
use grpc_resilience_core::{
    BoxError, MethodId, OnOutcome, Outcome, Unobserved, headers, observe_head, outcome_of_frame,
};
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
    /// The response future of [`Timeout`](crate::Timeout). With an
    /// observer `O` (see [`Timeout::call_observed`](crate::Timeout::call_observed))
    /// it also reports the call's outcome, and its body carries the
    /// observer on.
    #[derive(Debug)]
    pub struct ResponseFuture<F, O: OnOutcome = Unobserved> {
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
        // Told the outcome of a call that fails before its response, or
        // `CANCELLED` if the caller drops it first; else handed to the
        // response's body.
        observer: Option<O>,
    }

    impl<F, O: OnOutcome> PinnedDrop for ResponseFuture<F, O> {
        fn drop(this: Pin<&mut Self>) {
            tell(this.project().observer, Outcome::Cancelled);
        }
    }
}

impl<F, O: OnOutcome> ResponseFuture<F, O> {
    pub(crate) fn new(
        inner: F,
        deadline: Option<Deadline>,
        head_timer: bool,
        observer: Option<O>,
    ) -> Self {
        ResponseFuture {
            inner: Some(inner),
            sleep: None,
            deadline,
            head_timer,
            observer,
        }
    }

    /// A call that fails with `DEADLINE_EXCEEDED` when first polled, never
    /// sent.
    pub(crate) fn expired(deadline: Deadline, observer: Option<O>) -> Self {
        ResponseFuture {
            inner: None,
            sleep: None,
            deadline: Some(deadline),
            head_timer: false,
            observer,
        }
    }
}

impl<F, B, E, O> Future for ResponseFuture<F, O>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    O: OnOutcome,
{
    type Output = Result<http::Response<TimeoutBody<B, O>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut sleep, deadline, observer) = (this.sleep, this.deadline, this.observer);
        // The observer's span (the call's) is the current span while the
        // layers below are polled and while an expiry is logged.
        let entered = observer
            .as_ref()
            .and_then(OnOutcome::span)
            .map(tracing::Span::enter);
        let elapsed = |deadline: &mut Option<Deadline>, when| match deadline.take() {
            Some(d) => d.expire(when),
            None => "deadline exceeded".into(),
        };
        let fired = |sleep: &Pin<&mut Option<Sleep>>| {
            sleep
                .as_ref()
                .get_ref()
                .as_ref()
                .is_some_and(Sleep::is_elapsed)
        };
        let Some(inner) = this.inner.as_pin_mut() else {
            let err = match deadline.take() {
                Some(d) => d.expire(When::BeforeSending),
                None => "response future polled after completion".into(),
            };
            drop(entered);
            return Poll::Ready(Err(report(observer, err)));
        };
        let err = match inner.poll(cx) {
            Poll::Ready(Ok(mut response)) => {
                // A response that lands after the timer fired does not win
                // the race: the caller is told its deadline passed, whatever
                // the server said (tonic servers answer CANCELLED then).
                if fired(&sleep) {
                    elapsed(deadline, When::BeforeResponse)
                } else {
                    // tonic panics on undecodable status details.
                    headers::sanitize_status_details(response.headers_mut());
                    drop(entered);
                    let observer = observer.take().and_then(|o| observe_head(&response, o));
                    let deadline = deadline.take();
                    return Poll::Ready(Ok(
                        response.map(|body| TimeoutBody::new(body, deadline, observer))
                    ));
                }
            }
            Poll::Ready(Err(err)) => {
                let err: BoxError = err.into();
                // tonic's channel enforces the grpc-timeout this layer sent,
                // with its own timer, and fails the call as CANCELLED
                // (`TimeoutExpired`); it may fire a moment before ours.
                let channel_timed_out = find_error::<tonic::TimeoutExpired>(&*err).is_some();
                if deadline.is_some() && (channel_timed_out || fired(&sleep)) {
                    // A layer below that refused the call (a bulkhead whose
                    // queue reached the same deadline) never sent it.
                    let when = if find_error::<LocalRejection>(&*err).is_some() {
                        When::BeforeSending
                    } else {
                        When::BeforeResponse
                    };
                    elapsed(deadline, when)
                } else {
                    with_transport_status(err)
                }
            }
            Poll::Pending => {
                let Some(at) = deadline.as_ref().filter(|_| *this.head_timer).map(|d| d.at) else {
                    return Poll::Pending;
                };
                if sleep.is_none() {
                    sleep.set(Some(sleep_until(at)));
                }
                let Some(timer) = sleep.as_mut().as_pin_mut() else {
                    return Poll::Pending;
                };
                ready!(timer.poll(cx));
                elapsed(deadline, When::BeforeResponse)
            }
        };
        drop(entered);
        Poll::Ready(Err(report(observer, err)))
    }
}

/// Tells the observer, if any, that the call failed with `err`.
fn report<O: OnOutcome>(observer: &mut Option<O>, err: BoxError) -> BoxError {
    if observer.is_some() {
        tell(observer, Outcome::Error(error_code(&*err)));
    }
    err
}

/// Tells the observer, if it is still there, the call's outcome.
fn tell<O: OnOutcome>(observer: &mut Option<O>, outcome: Outcome) {
    if let Some(observer) = observer.take() {
        observer.on_outcome(outcome);
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
    ///
    /// With an observer `O` (a call made with
    /// [`Timeout::call_observed`](crate::Timeout::call_observed)), the body
    /// reports the call's outcome once, as
    /// [`OutcomeBody`](grpc_resilience_core::OutcomeBody) would: from the
    /// trailers, an error (the deadline's among them), the body's end, or
    /// `CANCELLED` when it is dropped before its end.
    #[derive(Debug)]
    pub struct TimeoutBody<B, O: OnOutcome = Unobserved> {
        #[pin]
        inner: Option<B>,
        // Made only once the body has to wait, so a response read without
        // waiting costs no timer; boxed so the body stays small while it is
        // moved through the response path.
        sleep: Option<Pin<Box<Sleep>>>,
        deadline: Option<Deadline>,
        observer: Option<O>,
    }

    impl<B, O: OnOutcome> PinnedDrop for TimeoutBody<B, O> {
        fn drop(this: Pin<&mut Self>) {
            tell(this.project().observer, Outcome::Cancelled);
        }
    }
}

impl<B, O: OnOutcome> TimeoutBody<B, O> {
    fn new(inner: B, deadline: Option<Deadline>, observer: Option<O>) -> Self {
        TimeoutBody {
            inner: Some(inner),
            sleep: None,
            deadline,
            observer,
        }
    }

    /// The wrapped body; `None` once the deadline has ended it.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.as_ref()
    }
}

impl<B, O> Body for TimeoutBody<B, O>
where
    B: Body,
    B::Error: Into<BoxError>,
    O: OnOutcome,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(poll_body(this.inner, this.sleep, this.deadline, cx));
        if this.observer.is_some()
            && let Some(outcome) = outcome_of_frame(&frame)
        {
            tell(this.observer, outcome);
        }
        Poll::Ready(frame)
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

/// The body's next frame, cut at the deadline.
#[inline(always)]
fn poll_body<B>(
    mut inner: Pin<&mut Option<B>>,
    sleep: &mut Option<Pin<Box<Sleep>>>,
    deadline: &mut Option<Deadline>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<B::Data>, BoxError>>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let Some(body) = inner.as_mut().as_pin_mut() else {
        return Poll::Ready(None);
    };
    if let Poll::Ready(frame) = body.poll_frame(cx) {
        return Poll::Ready(match frame {
            // One clock read per message: a message that is ready does not
            // outrun the deadline. The trailers and the end of the body are
            // the call's completion, which the server reached already: they
            // pass without a clock read.
            Some(Ok(frame)) if frame.is_data() => {
                if let Some(d) = deadline.as_ref()
                    && Instant::now() >= d.at
                {
                    return Poll::Ready(Some(Err(cut(inner, deadline))));
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
    let Some(at) = deadline.as_ref().map(|d| d.at) else {
        return Poll::Pending;
    };
    let timer = sleep.get_or_insert_with(|| Box::pin(sleep_until(at)));
    ready!(timer.as_mut().poll(cx));
    Poll::Ready(Some(Err(cut(inner, deadline))))
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
