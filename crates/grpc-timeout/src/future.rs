//! The response future and body of [`Timeout`](crate::Timeout).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_resilience_core::error::error_code;
use grpc_resilience_core::error::{
    LocalRejection, find_error, set_transport_status, with_transport_status,
};
use grpc_resilience_core::{
    BoxError, MethodId, OnOutcome, Outcome, Unobserved, headers, observe_head, outcome_of_frame,
};
use http::uri::PathAndQuery;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::Scope;
use crate::error::{Elapsed, When};

/// The deadline a call runs under, as [`Timeout::prepare`](crate::Timeout::prepare)
/// works it out: the instant, when the call was sent, whether it bounds
/// the call or an attempt, and the method (for the expiry's error, log and
/// metric). Hand it to a [`Watch`] or a [`TimeoutBody`].
#[derive(Clone, Debug)]
pub struct Deadline {
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
    /// The instant the deadline passes.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Whether it bounds the whole call or one attempt.
    pub fn scope(&self) -> Scope {
        self.scope
    }

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
    /// What [`ResponseFuture`] adds to the future it wraps, for a future
    /// that polls its inner call itself: the deadline's timer for the
    /// response head, the expiry's error, and the observer (told the
    /// outcome of a call that fails before its response, or `CANCELLED`
    /// if dropped first).
    ///
    /// A service that fuses this layer's work with its own (one future
    /// instead of two, one body wrapper instead of two) starts a call with
    /// [`Timeout::prepare`](crate::Timeout::prepare), keeps a `Watch` in
    /// its future, and polls its inner call through [`Watch::poll`], or
    /// through [`Watch::poll_deadline`] and [`Watch::settle`] to keep the
    /// response in one place while it adds its own work to it. The
    /// `grpc-resilience` facade runs its deadline, retries and telemetry
    /// in one future this way.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use std::pin::pin;
    /// use std::task::Poll;
    /// use std::time::Duration;
    /// use grpc_resilience_core::{BoxError, Unobserved};
    /// use grpc_timeout::future::{TimeoutBody, Watch};
    /// use grpc_timeout::{Timeout, TimeoutPolicy};
    /// use tower::{Service, ServiceExt};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut server = tower::service_fn(|_: http::Request<String>| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::from("hello")))
    /// });
    /// // The layer's state (its policy, each method's timeout) without a
    /// // service of its own: this future sends the call itself.
    /// let mut deadlines = Timeout::new((), TimeoutPolicy::new(Duration::from_secs(1)).unwrap());
    ///
    /// let mut request = http::Request::builder()
    ///     .uri("http://catalog/catalog.v1.QueryService/GetProduct")
    ///     .body(String::new())
    ///     .unwrap();
    /// // Works out the deadline, writes `grpc-timeout`, records it.
    /// let Ok(deadline) = deadlines.prepare(&mut request) else {
    ///     unreachable!("a second is left");
    /// };
    /// assert_eq!(request.headers()["grpc-timeout"], "1000000u");
    /// let head_timer = deadline.is_some() && deadlines.times_the_head();
    /// let mut watch = pin!(Watch::<Unobserved>::new(deadline, head_timer, None));
    /// let mut call = pin!(server.ready().await.unwrap().call(request));
    /// let response = std::future::poll_fn(|cx| {
    ///     watch.as_mut().poll(cx, |cx| call.as_mut().poll(cx), TimeoutBody::wrap_response)
    /// })
    /// .await
    /// .unwrap();
    /// // The body, bounded by the same deadline.
    /// let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
    /// assert_eq!(body.to_bytes(), "hello");
    /// # }
    /// ```
    #[derive(Debug)]
    pub struct Watch<O: OnOutcome = Unobserved> {
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
        // `CANCELLED` if the caller drops it first; else handed on with the
        // response.
        observer: Option<O>,
    }

    impl<O: OnOutcome> PinnedDrop for Watch<O> {
        fn drop(this: Pin<&mut Self>) {
            tell(this.project().observer, Outcome::Cancelled);
        }
    }
}

/// A response that came in time, as [`Watch::settle`] leaves it: the
/// deadline that still bounds its body, and the observer still waiting for
/// its outcome (it has not seen the head: see [`observe_head`]).
pub type Answered<O> = (Option<Deadline>, Option<O>);

impl<O: OnOutcome> Watch<O> {
    /// Watches a call sent under `deadline` (`None`: no deadline; with one,
    /// `head_timer` says whether to time the response head, see
    /// [`TimeoutLayer::rely_on_channel_for_head`](crate::TimeoutLayer::rely_on_channel_for_head)),
    /// reporting to `observer`.
    #[inline(always)]
    pub fn new(deadline: Option<Deadline>, head_timer: bool, observer: Option<O>) -> Self {
        Watch {
            sleep: None,
            deadline,
            head_timer,
            observer,
        }
    }

    /// Watches a call whose deadline passed before it could be sent: see
    /// [`Watch::unsent`].
    #[inline(always)]
    pub fn expired(deadline: Deadline, observer: Option<O>) -> Self {
        Self::new(Some(deadline), false, observer)
    }

    /// The observer's span, if it has one.
    pub fn span(&self) -> Option<&tracing::Span> {
        self.observer.as_ref().and_then(OnOutcome::span)
    }

    /// Runs `f`, which polls the inner call, in the observer's span (the
    /// call's), so that the layers below log and trace inside it.
    #[inline(always)]
    pub fn in_span<T>(&self, f: impl FnOnce() -> T) -> T {
        let _entered = enter(&self.observer);
        f()
    }

    /// The error of a call that was never sent, its deadline passed (one
    /// made with [`Watch::expired`]); the observer is told.
    pub fn unsent(self: Pin<&mut Self>) -> BoxError {
        let this = self.project();
        let (deadline, observer) = (this.deadline, this.observer);
        let entered = enter(observer);
        let (scope, err) = match deadline.take() {
            Some(d) => (d.scope, d.expire(When::BeforeSending)),
            None => (
                Scope::Call,
                "response future polled after completion".into(),
            ),
        };
        drop(entered);
        expired(observer, scope, err)
    }

    /// For an inner call that is still pending: arms the head timer (once;
    /// kept in place, so it allocates nothing) and polls it. `Ready` with
    /// the expiry's `DEADLINE_EXCEEDED` once the deadline passes (the
    /// observer is told, and the inner call is to be dropped); `Pending`
    /// otherwise, and always without a deadline or a head timer.
    #[inline(always)]
    pub fn poll_deadline(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BoxError> {
        let this = self.project();
        let (mut sleep, deadline, observer) = (this.sleep, this.deadline, this.observer);
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
        let entered = enter(observer);
        let (scope, err) = elapsed(deadline, When::BeforeResponse);
        drop(entered);
        Poll::Ready(expired(observer, scope, err))
    }

    /// Settles the inner call's `result`, in place, against the deadline.
    ///
    /// A response that came in time has its head cleaned of undecodable
    /// status details, and the deadline that still bounds its body and the
    /// observer still waiting for its outcome are handed back (the observer
    /// has not seen the head: see [`observe_head`];
    /// [`TimeoutBody::wrap_response`] makes of them what
    /// [`Timeout`](crate::Timeout) returns). Otherwise `None`, and `result`
    /// is the call's error: the expiry's `DEADLINE_EXCEEDED` for a response
    /// that lost the race with the timer or an error the deadline caused
    /// (this timer, or a tonic channel's own `grpc-timeout` timer), else
    /// the inner error with its transport status; the observer is told.
    #[inline(always)]
    pub fn settle<B>(
        self: Pin<&mut Self>,
        result: &mut Result<http::Response<B>, BoxError>,
    ) -> Option<Answered<O>> {
        let this = self.project();
        let (sleep, deadline, observer) = (this.sleep, this.deadline, this.observer);
        let fired = sleep
            .as_ref()
            .get_ref()
            .as_ref()
            .is_some_and(Sleep::is_elapsed);
        // The observer's span (the call's) is current while an expiry is
        // logged.
        let entered = enter(observer);
        let (scope, err) = match result {
            // A response that lands after the timer fired does not win
            // the race: the caller is told its deadline passed, whatever
            // the server said (tonic servers answer CANCELLED then).
            Ok(_) if fired => elapsed(deadline, When::BeforeResponse),
            Ok(response) => {
                // tonic panics on undecodable status details.
                headers::sanitize_status_details(response.headers_mut());
                drop(entered);
                return Some((deadline.take(), observer.take()));
            }
            Err(err) => {
                // tonic's channel enforces the grpc-timeout this layer sent,
                // with its own timer, and fails the call as CANCELLED
                // (`TimeoutExpired`); it may fire a moment before ours.
                let channel_timed_out = find_error::<tonic::TimeoutExpired>(&**err).is_some();
                if deadline.is_some() && (channel_timed_out || fired) {
                    // A layer below that refused the call (a bulkhead whose
                    // queue reached the same deadline) never sent it.
                    let when = if find_error::<LocalRejection>(&**err).is_some() {
                        When::BeforeSending
                    } else {
                        When::BeforeResponse
                    };
                    elapsed(deadline, when)
                } else {
                    set_transport_status(err);
                    drop(entered);
                    if observer.is_some() {
                        tell(observer, Outcome::Error(error_code(&**err)));
                    }
                    return None;
                }
            }
        };
        drop(entered);
        // Every error left here is the deadline's.
        *result = Err(expired(observer, scope, err));
        None
    }

    /// Polls the inner call with `poll_inner` in the observer's span, and
    /// holds it to the deadline: [`Watch::poll_deadline`] while it is
    /// pending, then [`Watch::settle`]; a response that came in time goes
    /// to `answered` with what `settle` hands back
    /// ([`TimeoutBody::wrap_response`] makes of them what
    /// [`Timeout`](crate::Timeout) returns).
    #[inline(always)]
    pub fn poll<B, E, T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        poll_inner: impl FnOnce(&mut Context<'_>) -> Poll<Result<http::Response<B>, E>>,
        answered: impl FnOnce(http::Response<B>, Option<Deadline>, Option<O>) -> T,
    ) -> Poll<Result<T, BoxError>>
    where
        E: Into<BoxError>,
    {
        let Poll::Ready(result) = self.as_ref().get_ref().in_span(|| poll_inner(cx)) else {
            return self.poll_deadline(cx).map(Err);
        };
        let mut result = result.map_err(Into::into);
        let Some((deadline, observer)) = self.settle(&mut result) else {
            // `settle` left the call's error there.
            return Poll::Ready(match result {
                Err(err) => Err(err),
                Ok(_) => Err("deadline not settled".into()),
            });
        };
        Poll::Ready(result.map(|response| answered(response, deadline, observer)))
    }
}

/// Enters the observer's span (the call's), if it has one: the layers
/// below are polled, and an expiry is logged, inside it.
pub(crate) fn enter<O: OnOutcome>(observer: &Option<O>) -> Option<tracing::span::Entered<'_>> {
    observer
        .as_ref()
        .and_then(OnOutcome::span)
        .map(tracing::Span::enter)
}

/// The expiry of `deadline` (taken: the call's deadline is reported once),
/// and its scope.
fn elapsed(deadline: &mut Option<Deadline>, when: When) -> (Scope, BoxError) {
    match deadline.take() {
        Some(d) => (d.scope, d.expire(when)),
        None => (Scope::Call, "deadline exceeded".into()),
    }
}

pin_project! {
    /// The response future of [`Timeout`](crate::Timeout). With an
    /// observer `O` (see [`Timeout::call_observed`](crate::Timeout::call_observed))
    /// it also reports the call's outcome, and its body carries the
    /// observer on.
    #[derive(Debug)]
    pub struct ResponseFuture<F, O: OnOutcome = Unobserved> {
        // Before `inner`, so that a dropped call's observer hears of it
        // before the layers below do.
        #[pin]
        watch: Watch<O>,
        // `None` for a call whose deadline had passed before it was sent.
        #[pin]
        inner: Option<F>,
    }
}

impl<F, O: OnOutcome> ResponseFuture<F, O> {
    #[inline(always)]
    pub(crate) fn new(
        inner: F,
        deadline: Option<Deadline>,
        head_timer: bool,
        observer: Option<O>,
    ) -> Self {
        ResponseFuture {
            watch: Watch::new(deadline, head_timer, observer),
            inner: Some(inner),
        }
    }

    /// A call that fails with `DEADLINE_EXCEEDED` when first polled, never
    /// sent.
    pub(crate) fn expired(deadline: Deadline, observer: Option<O>) -> Self {
        ResponseFuture {
            watch: Watch::expired(deadline, observer),
            inner: None,
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
        match this.inner.as_pin_mut() {
            Some(inner) => this
                .watch
                .poll(cx, |cx| inner.poll(cx), TimeoutBody::wrap_response),
            None => Poll::Ready(Err(this.watch.unsent())),
        }
    }
}

/// Tells the observer, if any, that a deadline of `scope` ended the call
/// with `err`.
fn expired<O: OnOutcome>(observer: &mut Option<O>, scope: Scope, err: BoxError) -> BoxError {
    if let Some(observer) = observer.take() {
        observer.on_deadline(scope);
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
    /// trailers, an error, the body's end, or `CANCELLED` when it is
    /// dropped before its end; when the deadline cuts the body, through
    /// [`OnOutcome::on_deadline`].
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

// By hand: no `Debug` asked of the inner body or the observer, so that a
// response through a stack of layers can be printed (`unwrap_err`) whatever
// body the channel below returns.
impl<B, O: OnOutcome> std::fmt::Debug for TimeoutBody<B, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimeoutBody")
            .field("deadline", &self.deadline)
            .field("ended", &self.inner.is_none())
            .field("observed", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

impl<B, O: OnOutcome> TimeoutBody<B, O> {
    /// `inner`, ended with `DEADLINE_EXCEEDED` if `deadline` passes first,
    /// reporting its outcome to `observer`.
    #[inline(always)]
    pub fn new(inner: B, deadline: Option<Deadline>, observer: Option<O>) -> Self {
        TimeoutBody {
            inner: Some(inner),
            sleep: None,
            deadline,
            observer,
        }
    }

    /// `response` with its body wrapped as [`TimeoutBody::new`] does; the
    /// observer is told at once when the head holds the outcome (a
    /// Trailers-Only response, see [`observe_head`]).
    #[inline(always)]
    pub fn wrap_response(
        response: http::Response<B>,
        deadline: Option<Deadline>,
        observer: Option<O>,
    ) -> http::Response<Self> {
        let observer = observer.and_then(|o| observe_head(&response, o));
        response.map(|body| TimeoutBody::new(body, deadline, observer))
    }

    /// The observer still waiting for the body's outcome: `None` once told,
    /// or when there was none. A layer above that fuses its own reporting
    /// into this body (the `grpc-resilience` facade's call telemetry) adds
    /// to it here, before the body is read.
    pub fn observer_mut(&mut self) -> Option<&mut O> {
        self.observer.as_mut()
    }

    /// Bounds the rest of the body by `deadline` too: the earlier of the
    /// two ends it (on a tie, the one already there), and the error, and
    /// the observer's [`on_deadline`](OnOutcome::on_deadline), name that
    /// one's scope.
    pub fn bound_by(&mut self, deadline: Deadline) {
        if self.deadline.as_ref().is_none_or(|d| deadline.at < d.at) {
            self.deadline = Some(deadline);
            // A timer armed for the later deadline would wake too late.
            self.sleep = None;
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
        let mut this = self.project();
        let frame = ready!(poll_body(
            this.inner.as_mut(),
            this.sleep,
            this.deadline,
            cx
        ));
        if this.observer.is_some() {
            // An error with the inner body gone: the deadline cut it.
            if let Some(Err(err)) = &frame
                && this.inner.is_none()
            {
                let scope = err
                    .downcast_ref::<Elapsed>()
                    .map_or(Scope::Call, Elapsed::scope);
                if let Some(observer) = this.observer.take() {
                    observer.on_deadline(scope);
                }
            } else if let Some(outcome) = outcome_of_frame(&frame) {
                tell(this.observer, outcome);
            }
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
