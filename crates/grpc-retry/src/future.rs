//! The response future of [`Retry`](crate::Retry).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use grpc_resilience_core::codes::code_name;
use grpc_resilience_core::error::{
    error_code, find_status, replace_error, set_transport_status, with_transport_status,
};
use grpc_resilience_core::headers::sanitize_status_details;
use grpc_resilience_core::{BoxError, CallDeadline, MethodId, classify_head};
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::ResponseBody;
use crate::decide::{Ended, Pushback, answered, ended};
use crate::replay::{Recording, ReplayableBody};
use crate::spare::Handle;
use crate::{RetryPolicy, RetryThrottle, backoff};

/// The header that tells the server how many attempts came before.
pub(crate) const PREVIOUS_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("grpc-previous-rpc-attempts");

/// Everything the retries of one call need.
#[derive(Debug)]
pub(crate) struct Ctx<S, B> {
    // The request head (inline, see `Head`) and the body's recording.
    // Dropping it (the call is over) releases what no attempt still needs.
    pub(crate) recording: Recording<B>,
    pub(crate) policy: RetryPolicy,
    // The layer's shared state, and the prototype a retry's service is
    // cloned from (only then).
    pub(crate) shared: Handle<S>,
    pub(crate) attempts: u32,
    // Retries since the backoff was last reset (by a pushback).
    pub(crate) backoff_n: u32,
    // The call's one deadline, from the request's `CallDeadline` (or its
    // `grpc-timeout`), read once.
    pub(crate) deadline: Option<CallDeadline>,
    // When the first attempt ended; retried calls report the time since.
    pub(crate) first_ended: Option<Instant>,
    // Why the latest retry was decided, for the next attempt's span.
    pub(crate) last_retry: LastRetry,
}

/// Milliseconds for logs, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds for span fields: signed, as OpenTelemetry's integers are
/// (a `u64` field would reach it as text).
fn span_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Why the latest retry was decided: for the next attempt's span.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LastRetry {
    /// The wait was the server's pushback, not a backoff.
    pub(crate) pushback: bool,
    /// A transparent retry: the server never processed the attempt.
    pub(crate) transparent: bool,
}

/// The DEBUG span `grpc_attempt` of attempt `attempt`, with OpenTelemetry's
/// RPC fields and ours; the fields known later are empty.
pub(crate) fn attempt_span(attempt: u32, hedge: bool) -> tracing::Span {
    tracing::debug_span!(
        "grpc_attempt",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = tracing::field::Empty,
        rpc.method = tracing::field::Empty,
        rpc.grpc.status_code = tracing::field::Empty,
        attempt = i64::from(attempt),
        hedge,
        transparent = tracing::field::Empty,
        backoff_ms = tracing::field::Empty,
        pushback_ms = tracing::field::Empty,
        deadline_remaining_ms = tracing::field::Empty,
        breaker.state = tracing::field::Empty,
    )
}

/// Records what is known when an attempt is sent on its (enabled) span.
pub(crate) fn record_attempt(
    span: &tracing::Span,
    service: &str,
    method: &str,
    deadline: Option<CallDeadline>,
    now: Instant,
) {
    span.record("rpc.service", service);
    span.record("rpc.method", method);
    if let Some(deadline) = deadline {
        span.record(
            "deadline_remaining_ms",
            span_millis(deadline.remaining_at(now)),
        );
    }
}

/// Records on an attempt's span the status its response head or error
/// gives (a committed response's status comes later, in its trailers, and
/// is the call's).
pub(crate) fn record_result<R>(span: &tracing::Span, result: &Result<Response<R>, BoxError>) {
    if span.is_disabled() {
        return;
    }
    let code = match result {
        Ok(response) => match classify_head(response.status(), response.headers()) {
            Some(outcome) => outcome.code(),
            None => return,
        },
        Err(err) => error_code(&**err),
    };
    span.record("rpc.grpc.status_code", code as i32);
    if code != tonic::Code::Ok {
        span.record("otel.status_code", "error");
    }
}

/// What to do after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Return the attempt's result as it is.
    Return,
    /// Return the committed response; its trailers tell the throttle
    /// whether the call succeeded.
    ReturnCounted,
    /// Retry after this delay.
    Retry(Duration),
    /// A retry was due, but the deadline leaves less than its wait.
    OutOfTime {
        left: Duration,
        wait: Duration,
        pushback: bool,
    },
}

impl<S, B> Ctx<S, B> {
    fn labels(&self) -> (&str, &str) {
        MethodId::from_path(self.recording.head().uri.path())
            .map_or(("", ""), |m| (m.service(), m.method()))
    }

    /// What to do with an attempt's result.
    fn next_delay<R>(&mut self, result: &Result<Response<R>, BoxError>) -> Next {
        let throttle = self.shared.throttle.as_ref();
        let (code, pushback, never_processed) = match ended(result) {
            // The status comes in the trailers: the response body counts it.
            Ended::Committed if throttle.is_some() => return Next::ReturnCounted,
            Ended::Committed => return Next::Return,
            Ended::Succeeded => {
                if let Some(t) = throttle {
                    t.on_success();
                }
                return Next::Return;
            }
            // Refused below (an open breaker): the call never reached the
            // server, so it says nothing about it and leaves the bucket alone.
            Ended::Rejected => return Next::Return,
            Ended::Failed {
                code,
                pushback,
                never_processed,
            } => (code, pushback, never_processed),
        };
        let now = Instant::now();
        self.first_ended.get_or_insert(now);
        let retryable = self.policy.retryable_codes.contains(code);
        // gRFC A6: a failure with a retryable code or with server pushback
        // takes a token; any other failure neither takes nor gives.
        if let Some(t) = throttle
            && (retryable || pushback != Pushback::None)
        {
            t.on_failure();
        }
        let allowed = never_processed || (retryable && self.policy.retries_statuses());
        if !allowed || self.attempts >= self.policy.max_attempts {
            return Next::Return;
        }
        let delay = match pushback {
            Pushback::DoNotRetry => {
                let (service, method) = self.labels();
                tracing::debug!(service, method, "server pushback says do not retry");
                return Next::Return;
            }
            Pushback::After(delay) if delay > self.policy.max_pushback() => {
                let (service, method) = self.labels();
                tracing::debug!(
                    service,
                    method,
                    pushback_ms = millis(delay),
                    max_pushback_ms = millis(self.policy.max_pushback()),
                    "not retried: the server's pushback is above max_pushback"
                );
                return Next::Return;
            }
            Pushback::After(delay) => {
                self.backoff_n = 0;
                delay
            }
            Pushback::None => {
                self.backoff_n = self.backoff_n.saturating_add(1);
                backoff::delay(&self.policy, self.backoff_n)
            }
        };
        self.last_retry = LastRetry {
            pushback: matches!(pushback, Pushback::After(_)),
            transparent: never_processed,
        };
        let (service, method) = self.labels();
        if !never_processed && throttle.is_some_and(|t| !t.allows_retry()) {
            metrics::counter!("grpc.retry.throttled", "service" => service.to_owned(), "method" => method.to_owned())
                .increment(1);
            tracing::debug!(service, method, "retry throttled: too many recent failures");
            return Next::Return;
        }
        if !self.recording.replayable() {
            metrics::counter!(
                "grpc.retry.buffer_exceeded",
                "service" => service.to_owned(),
                "method" => method.to_owned(),
            )
            .increment(1);
            tracing::debug!(
                service,
                method,
                "not retried: the request body is over the replay limit"
            );
            return Next::Return;
        }
        if let Some(deadline) = self.deadline {
            let left = deadline.remaining_at(now);
            if delay >= left {
                metrics::counter!(
                    "grpc.retry.deadline_exhausted",
                    "service" => service.to_owned(),
                    "method" => method.to_owned(),
                )
                .increment(1);
                tracing::debug!(
                    service,
                    method,
                    left_ms = millis(left),
                    delay_ms = millis(delay),
                    "not retried: the deadline leaves no time"
                );
                return Next::OutOfTime {
                    left,
                    wait: delay,
                    pushback: matches!(pushback, Pushback::After(_)),
                };
            }
        }
        // The budget is asked last: it is charged only for a retry sent.
        if !never_processed
            && let Some(budget) = &self.shared.budget
            && !budget.withdraw()
        {
            metrics::counter!(
                "grpc.retry.budget_exhausted",
                "service" => service.to_owned(),
                "method" => method.to_owned(),
            )
            .increment(1);
            tracing::debug!(service, method, "not retried: the retry budget is spent");
            return Next::Return;
        }
        let code_text = code_name(code).to_lowercase();
        metrics::counter!(
            "grpc.retry.count",
            "service" => service.to_owned(),
            "method" => method.to_owned(),
            "code" => code_name(code),
        )
        .increment(1);
        let delay_ms = millis(delay);
        tracing::warn!(
            service,
            method,
            code = code_name(code),
            attempt = self.attempts,
            max_attempts = self.policy.max_attempts,
            delay_ms,
            transparent = never_processed,
            "gRPC call failed with {code_text}, retrying in {delay_ms}ms (attempt {}/{})",
            self.attempts,
            self.policy.max_attempts,
        );
        Next::Retry(delay)
    }

    /// The request for the next attempt, sent at `now`: its `grpc-timeout`
    /// is the time left at that moment. `None`: the body can no longer be
    /// replayed.
    fn next_request(&self, now: Instant) -> Option<Request<B>>
    where
        B: ReplayableBody,
    {
        replay_request(&self.recording, self.attempts, self.deadline, now)
    }

    /// The error of a call whose deadline passed before attempt
    /// `self.attempts + 1` could be sent; it names the last attempt's
    /// status.
    fn deadline_passed<R>(&self, last: Result<Response<R>, BoxError>) -> BoxError {
        let (last, source) = match last {
            Ok(mut response) => {
                let code = classify_head(response.status(), response.headers())
                    .map_or(tonic::Code::Unknown, |o| o.code());
                // tonic's parser panics on undecodable status details; this
                // head comes from the peer, so clean it first whatever path
                // it took here.
                grpc_resilience_core::headers::sanitize_status_details(response.headers_mut());
                let message = tonic::Status::from_header_map(response.headers())
                    .map(|s| s.message().to_owned())
                    .unwrap_or_default();
                ((code, message), None)
            }
            Err(err) => {
                let err = with_transport_status(err);
                let code = error_code(&*err);
                let message =
                    find_status(&*err).map_or_else(|| err.to_string(), |s| s.message().to_owned());
                ((code, message), Some(err))
            }
        };
        let mut status = tonic::Status::deadline_exceeded(format!(
            "deadline exceeded before attempt {} could be sent; the last attempt failed with {}: {}",
            self.attempts + 1,
            code_name(last.0),
            last.1,
        ));
        if let Some(err) = source {
            status.set_source(Arc::from(err));
        }
        Box::new(status)
    }

    /// The span of attempt `self.attempts`, sent at `now` after waiting
    /// `waited` (none for the first). The service is called with it
    /// entered, so that a layer below (trace-context propagation) sees it.
    pub(crate) fn span(&self, waited: Option<Duration>, now: Option<Instant>) -> tracing::Span {
        let span = attempt_span(self.attempts, false);
        if !span.is_disabled() {
            let (service, method) = self.labels();
            let now = now.unwrap_or_else(Instant::now);
            record_attempt(&span, service, method, self.deadline, now);
            if let Some(waited) = waited {
                let field = if self.last_retry.pushback {
                    "pushback_ms"
                } else {
                    "backoff_ms"
                };
                span.record(field, span_millis(waited));
                span.record("transparent", self.last_retry.transparent);
            }
        }
        span
    }

    /// The body can no longer be replayed byte for byte (it outgrew the
    /// replay limit after the retry was decided): retrying stops.
    fn replay_lost(&self) {
        let (service, method) = self.labels();
        metrics::counter!(
            "grpc.retry.buffer_exceeded",
            "service" => service.to_owned(),
            "method" => method.to_owned(),
        )
        .increment(1);
        tracing::debug!(
            service,
            method,
            attempt = self.attempts,
            "retry abandoned: the request body outgrew the replay limit; returning the previous attempt's outcome"
        );
        // `deliver` records the call's retry duration.
    }

    fn finish(&self) {
        if self.attempts > 1
            && let Some(first) = self.first_ended
        {
            let (service, method) = self.labels();
            metrics::histogram!("grpc.retry.duration", "service" => service.to_owned(), "method" => method.to_owned())
                .record(first.elapsed().as_secs_f64());
        }
    }
}

/// The request of a further attempt (after `previous` attempts), sent at
/// `now`: the original head, a replay of the body, `grpc-previous-rpc-attempts`
/// and the time left in `grpc-timeout`. `None` if the body can no longer
/// be replayed byte for byte.
pub(crate) fn replay_request<B: ReplayableBody>(
    recording: &Recording<B>,
    previous: u32,
    deadline: Option<CallDeadline>,
    now: Instant,
) -> Option<Request<B>> {
    let mut request = Request::new(B::from_replay(recording.replay()?));
    let head = recording.head();
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers();
    *request.extensions_mut() = head.extensions();
    let headers = request.headers_mut();
    headers.insert(PREVIOUS_ATTEMPTS, HeaderValue::from(previous));
    if let Some(deadline) = deadline {
        deadline.write_header(headers, now);
        deadline.insert_into(&mut request);
    }
    Some(request)
}

/// Drops a hostile `grpc-status-details-bin` from a response head before
/// anything (this layer's own status reads, tonic) parses it.
pub(crate) fn sanitize<R>(result: &mut Result<Response<R>, BoxError>) {
    if let Ok(response) = result {
        sanitize_status_details(response.headers_mut());
    }
}

/// The status of a retry abandoned because the deadline leaves less than the
/// wait before the next attempt: the last attempt's code, metadata and
/// details, with a message that says so. A Trailers-Only response keeps
/// its form (its `grpc-message` is rewritten, percent-encoded); an error
/// becomes a [`tonic::Status`] whose source is the original error.
fn out_of_time<R>(
    result: &mut Result<Response<R>, BoxError>,
    left: Duration,
    wait: Duration,
    pushback: bool,
) {
    let waited = if pushback {
        "server pushback"
    } else {
        "next backoff"
    };
    let note =
        format!("retrying stopped: the deadline leaves no time ({left:?} left, {waited} {wait:?})");
    let extend = |message: &str| {
        if message.is_empty() {
            note.clone()
        } else {
            format!("{message}; {note}")
        }
    };
    match result {
        Ok(response) => {
            let code = classify_head(response.status(), response.headers())
                .map_or(tonic::Code::Unknown, |o| o.code());
            // tonic's parser panics on undecodable status details: clean the
            // peer's head here too, not only where the loop did.
            grpc_resilience_core::headers::sanitize_status_details(response.headers_mut());
            let message = tonic::Status::from_header_map(response.headers())
                .map(|s| s.message().to_owned())
                .unwrap_or_default();
            // Writes `grpc-status` (the same code) and `grpc-message`; every
            // other header (details, pushback, metadata) stays.
            let _ = tonic::Status::new(code, extend(&message)).add_header(response.headers_mut());
        }
        Err(err) => {
            set_transport_status(err);
            let code = error_code(&**err);
            let mut status = match find_status(&**err) {
                Some(s) => tonic::Status::with_details_and_metadata(
                    code,
                    extend(s.message()),
                    bytes::Bytes::copy_from_slice(s.details()),
                    s.metadata().clone(),
                ),
                None => tonic::Status::new(code, extend(&err.to_string())),
            };
            replace_error(err, |source| {
                status.set_source(Arc::from(source));
                Box::new(status)
            });
        }
    }
}

/// A call's final response, before [`ResponseFuture`] wraps its body:
/// the response of the attempt that ended the call, and the throttle its
/// trailers refill if they say OK (a committed call under a throttle; see
/// [`ResponseBody`]).
pub(crate) type Unwrapped<R> = (Response<R>, Option<RetryThrottle>);

/// What the caller gets once `next` says the call is done, made of
/// `result` in place; the throttle its trailers must refill, if any, goes
/// to `refill`.
fn deliver<S, B, R>(
    ctx: &Ctx<S, B>,
    result: &mut Result<Response<R>, BoxError>,
    next: Next,
    refill: &mut Option<RetryThrottle>,
) {
    ctx.finish();
    match next {
        Next::OutOfTime {
            left,
            wait,
            pushback,
        } => out_of_time(result, left, wait, pushback),
        Next::ReturnCounted => refill.clone_from(&ctx.shared.throttle),
        Next::Return | Next::Retry(_) => {}
    }
    if let Err(err) = result {
        set_transport_status(err);
    }
}

/// [`deliver`], for a future that hands the throttle on with the response.
fn deliver_unwrapped<S, B, R>(
    ctx: &Ctx<S, B>,
    mut result: Result<Response<R>, BoxError>,
    next: Next,
) -> Result<Unwrapped<R>, BoxError> {
    let mut refill = None;
    deliver(ctx, &mut result, next, &mut refill);
    result.map(|response| (response, refill))
}

pub(crate) type Boxed<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

async fn retry_loop<S, B, R>(
    mut ctx: Ctx<S, B>,
    mut delay: Duration,
    first: Result<Response<R>, BoxError>,
) -> Result<Unwrapped<R>, BoxError>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
{
    let mut last = first;
    // The service the retries go through: a clone, made now that one is
    // due, and made ready before each attempt.
    let mut service = ctx.shared.make();
    loop {
        tokio::time::sleep(delay).await;
        // The body may have outgrown the replay limit during the backoff:
        // a replay would lack bytes, so the caller gets the last outcome.
        if !ctx.recording.replayable() {
            ctx.replay_lost();
            return deliver_unwrapped(&ctx, last, Next::Return);
        }
        // Wait for the service, but never past the deadline.
        let ready = std::future::poll_fn(|cx| service.poll_ready(cx));
        let ready = match ctx.deadline {
            None => ready.await,
            Some(deadline) => match tokio::time::timeout_at(deadline.instant(), ready).await {
                Ok(ready) => ready,
                Err(_) => {
                    ctx.finish();
                    return Err(ctx.deadline_passed(last));
                }
            },
        };
        let ready: Result<(), BoxError> = ready.map_err(Into::into);
        let mut result = match ready {
            Err(err) => {
                // Nothing was sent: not an attempt (no token, no backoff,
                // no number taken). The service below failed; the caller
                // gets the last attempt's outcome.
                let (service, method) = ctx.labels();
                tracing::debug!(
                    service,
                    method,
                    error = %err,
                    "retry abandoned: the service failed before the attempt could be sent"
                );
                return deliver_unwrapped(&ctx, last, Next::Return);
            }
            Ok(()) => {
                // The attempt is sent now: never at or past the deadline, and
                // with the time left at this moment.
                let now = Instant::now();
                if ctx.deadline.is_some_and(|d| d.has_passed_at(now)) {
                    ctx.finish();
                    return Err(ctx.deadline_passed(last));
                }
                // The body may have outgrown the replay limit while the
                // service was busy.
                let Some(request) = ctx.next_request(now) else {
                    ctx.replay_lost();
                    return deliver_unwrapped(&ctx, last, Next::Return);
                };
                ctx.attempts += 1;
                let span = ctx.span(Some(delay), Some(now));
                let fut = {
                    let _entered = span.enter();
                    service.call(request)
                };
                let result = fut.instrument(span.clone()).await.map_err(Into::into);
                record_result(&span, &result);
                result
            }
        };
        sanitize(&mut result);
        // The attempt's body could not be replayed byte for byte (it failed
        // rather than send a different body): unless the server had already
        // answered completely (Trailers-Only), its outcome says nothing about
        // the call, so the caller gets the previous attempt's.
        if ctx.recording.latest_refused() && !answered(&result) {
            ctx.replay_lost();
            return deliver_unwrapped(&ctx, last, Next::Return);
        }
        drop(last);
        match ctx.next_delay(&result) {
            Next::Retry(next) => {
                delay = next;
                last = result;
            }
            next => return deliver_unwrapped(&ctx, result, next),
        }
    }
}

pin_project! {
    /// The response future of [`Retry`](crate::Retry).
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        kind: Kind<S, B, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B, R>
    where
        S: Service<Request<B>>,
    {
        // No retry policy: the inner future, untouched.
        Passthrough { #[pin] fut: S::Future },
        // The first attempt of a call that may be retried.
        First { #[pin] fut: tracing::instrument::Instrumented<S::Future>, ctx: Option<Ctx<S, B>> },
        // Being retried or hedged: boxed, as the rare path.
        Retrying { fut: Boxed<Unwrapped<R>> },
        // A request the layer refused to send.
        Failed { error: Option<BoxError> },
    }
}

impl<S: Service<Request<B>>, B, R> std::fmt::Debug for ResponseFuture<S, B, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<B>>,
{
    pub(crate) fn passthrough(fut: S::Future) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { fut },
        }
    }

    /// The first attempt, `fut`, sent (the service called) in `span`.
    pub(crate) fn first(fut: S::Future, span: tracing::Span, ctx: Ctx<S, B>) -> Self {
        ResponseFuture {
            kind: Kind::First {
                fut: fut.instrument(span),
                ctx: Some(ctx),
            },
        }
    }

    pub(crate) fn boxed(fut: Boxed<Unwrapped<R>>) -> Self {
        ResponseFuture {
            kind: Kind::Retrying { fut },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<S, B, R> ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Send + 'static,
{
    /// Polls the call like [`Future::poll`], but hands back the final
    /// response with its body as the inner service returned it, instead of
    /// wrapping the body in a [`ResponseBody`]; the throttle that body's
    /// trailers must refill if they say OK (a committed call under a
    /// throttle) goes to `refill`.
    ///
    /// For a layer that wraps or observes the body anyway (a deadline,
    /// call telemetry) and can do the throttle's part itself: the response
    /// then has one body wrapper less. The caller must refill the throttle
    /// ([`RetryThrottle::on_success`]) once the trailers say OK, and must
    /// drop a `grpc-status-details-bin` trailer that is not valid base64
    /// before tonic reads it, as [`ResponseBody`] does.
    #[inline]
    pub fn poll_answer(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        refill: &mut Option<RetryThrottle>,
    ) -> Poll<Result<Response<R>, BoxError>> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Passthrough { fut } => {
                    let mut result = ready!(fut.poll(cx)).map_err(Into::into);
                    sanitize(&mut result);
                    if let Err(err) = &mut result {
                        set_transport_status(err);
                    }
                    return Poll::Ready(result);
                }
                KindProj::First { mut fut, ctx: slot } => {
                    let mut result = ready!(fut.as_mut().poll(cx)).map_err(Into::into);
                    record_result(fut.span(), &result);
                    sanitize(&mut result);
                    // The context is moved out only to be retried: a call
                    // that ends here drops it where it is.
                    let Some(ctx) = slot.as_mut() else {
                        return Poll::Ready(Err("retry future polled after completion".into()));
                    };
                    match ctx.next_delay(&result) {
                        Next::Retry(delay) => {
                            let Some(ctx) = slot.take() else {
                                return Poll::Ready(Err("retry context lost".into()));
                            };
                            let fut = Box::pin(retry_loop(ctx, delay, result));
                            kind.set(Kind::Retrying { fut });
                        }
                        next => {
                            deliver(ctx, &mut result, next, refill);
                            // The call is over: its recording is released now.
                            *slot = None;
                            return Poll::Ready(result);
                        }
                    }
                }
                KindProj::Retrying { fut } => {
                    let (response, throttle) = ready!(fut.as_mut().poll(cx))?;
                    *refill = throttle;
                    return Poll::Ready(Ok(response));
                }
                KindProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "retry future polled after completion".into())));
                }
            }
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Send + 'static,
{
    type Output = Result<Response<ResponseBody<R>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut throttle = None;
        let response = ready!(self.poll_answer(cx, &mut throttle))?;
        Poll::Ready(Ok(response.map(|body| ResponseBody::new(body, throttle))))
    }
}
