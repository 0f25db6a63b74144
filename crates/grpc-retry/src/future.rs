//! The response future of [`Retry`](crate::Retry).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use grpc_resilience_core::codes::code_name;
use grpc_resilience_core::error::with_transport_status;
use grpc_resilience_core::{BoxError, MethodId, timeout_header};
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::decide::{Ended, Pushback, ended};
use crate::replay::{Recording, ReplayableBody};
use crate::{RetryPolicy, Shared, backoff};

/// The header that tells the server how many attempts came before.
pub(crate) const PREVIOUS_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("grpc-previous-rpc-attempts");

/// Everything the retries of one call need.
#[derive(Debug)]
pub(crate) struct Ctx<S, B> {
    pub(crate) service: S,
    // The request head lives in the recording, shared with the bodies, so
    // this context (and the future holding it) stays small. Dropping it
    // (the call is over) releases what no attempt still needs.
    pub(crate) recording: Recording<B>,
    pub(crate) policy: RetryPolicy,
    pub(crate) shared: Arc<Shared>,
    pub(crate) attempts: u32,
    // Retries since the backoff was last reset (by a pushback).
    pub(crate) backoff_n: u32,
    pub(crate) deadline: Option<Instant>,
    // When the first attempt ended; retried calls report the time since.
    pub(crate) first_ended: Option<Instant>,
}

impl<S, B> Ctx<S, B> {
    fn labels(&self) -> (&str, &str) {
        MethodId::from_path(self.recording.head().uri.path())
            .map_or(("", ""), |m| (m.service(), m.method()))
    }

    /// The delay before the next attempt, or `None` to return `result`.
    fn next_delay<R>(&mut self, result: &Result<Response<R>, BoxError>) -> Option<Duration> {
        let throttle = self.shared.throttle.as_ref();
        let (code, pushback, never_processed) = match ended(result) {
            Ended::Committed => {
                if let Some(t) = throttle {
                    t.on_success();
                }
                return None;
            }
            // Refused below (an open breaker): the call never reached the
            // server, so it says nothing about it and leaves the bucket alone.
            Ended::Rejected => return None,
            Ended::Failed {
                code,
                pushback,
                never_processed,
            } => (code, pushback, never_processed),
        };
        let now = Instant::now();
        self.first_ended.get_or_insert(now);
        let retryable = self.policy.retryable_codes.contains(code);
        if let Some(t) = throttle {
            if retryable {
                t.on_failure();
            } else {
                t.on_success();
            }
        }
        let allowed = never_processed || (retryable && self.policy.retries_statuses());
        if !allowed || self.attempts >= self.policy.max_attempts {
            return None;
        }
        let delay = match pushback {
            Pushback::DoNotRetry => {
                let (service, method) = self.labels();
                tracing::debug!(service, method, "server pushback says do not retry");
                return None;
            }
            Pushback::After(delay) => {
                self.backoff_n = 0;
                delay
            }
            Pushback::None => {
                self.backoff_n += 1;
                backoff::delay(&self.policy, self.backoff_n)
            }
        };
        let (service, method) = self.labels();
        if !never_processed && throttle.is_some_and(|t| !t.allows_retry()) {
            metrics::counter!("grpc.retry.throttled", "service" => service.to_owned(), "method" => method.to_owned())
                .increment(1);
            tracing::debug!(service, method, "retry throttled: too many recent failures");
            return None;
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
            return None;
        }
        if self.deadline.is_some_and(|d| now + delay >= d) {
            tracing::debug!(
                service,
                method,
                delay_ms = delay.as_millis() as u64,
                "not retried: the deadline comes first"
            );
            return None;
        }
        let code_text = code_name(code).to_lowercase();
        metrics::counter!(
            "grpc.retry.count",
            "service" => service.to_owned(),
            "method" => method.to_owned(),
            "code" => code_name(code),
        )
        .increment(1);
        let delay_ms = delay.as_millis() as u64;
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
        Some(delay)
    }

    /// The request for the next attempt, or `None` if the deadline passed.
    fn next_request(&self) -> Option<Request<B>>
    where
        B: ReplayableBody,
    {
        let mut request = Request::new(B::from_replay(self.recording.replay()));
        let head = self.recording.head();
        *request.method_mut() = head.method.clone();
        *request.uri_mut() = head.uri.clone();
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers.clone();
        *request.extensions_mut() = head.extensions.clone();
        let headers = request.headers_mut();
        headers.insert(PREVIOUS_ATTEMPTS, HeaderValue::from(self.attempts));
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            headers.insert(timeout_header::GRPC_TIMEOUT, timeout_header::encode(left));
        }
        Some(request)
    }

    fn span(&self) -> tracing::Span {
        let span = tracing::debug_span!(
            "grpc_attempt",
            attempt = self.attempts,
            service = tracing::field::Empty,
            method = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let (service, method) = self.labels();
            span.record("service", service);
            span.record("method", method);
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
        self.finish();
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

type Boxed<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

async fn retry_loop<S, B, R>(
    mut ctx: Ctx<S, B>,
    mut delay: Duration,
    first: Result<Response<R>, BoxError>,
) -> Result<Response<R>, BoxError>
where
    S: Service<Request<B>, Response = Response<R>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
{
    let mut last = first;
    loop {
        tokio::time::sleep(delay).await;
        // The body may have outgrown the replay limit during the backoff:
        // a replay would lack bytes, so the caller gets the last outcome.
        if !ctx.recording.replayable() {
            ctx.replay_lost();
            return last;
        }
        let Some(request) = ctx.next_request() else {
            ctx.finish();
            return last;
        };
        ctx.attempts += 1;
        let span = ctx.span();
        let result = async {
            std::future::poll_fn(|cx| ctx.service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            ctx.service.call(request).await.map_err(Into::into)
        }
        .instrument(span)
        .await;
        // The attempt's body could not be replayed byte for byte (it failed
        // rather than send a different body): its outcome says nothing about
        // the call, so the caller gets the previous attempt's.
        if ctx.recording.latest_refused() {
            ctx.replay_lost();
            return last;
        }
        drop(last);
        match ctx.next_delay(&result) {
            Some(next) => {
                delay = next;
                last = result;
            }
            None => {
                ctx.finish();
                return result;
            }
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
        // Being retried: boxed, as the rare path.
        Retrying { fut: Boxed<Response<R>> },
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

    pub(crate) fn first(fut: S::Future, ctx: Ctx<S, B>) -> Self {
        let span = ctx.span();
        ResponseFuture {
            kind: Kind::First {
                fut: fut.instrument(span),
                ctx: Some(ctx),
            },
        }
    }

    pub(crate) fn failed(error: BoxError) -> Self {
        ResponseFuture {
            kind: Kind::Failed { error: Some(error) },
        }
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<Request<B>, Response = Response<R>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Send + 'static,
{
    type Output = Result<Response<R>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut kind = self.project().kind;
        loop {
            match kind.as_mut().project() {
                KindProj::Passthrough { fut } => {
                    return fut.poll(cx).map_err(|e| with_transport_status(e.into()));
                }
                KindProj::First { fut, ctx } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    let Some(mut ctx) = ctx.take() else {
                        return Poll::Ready(result.map_err(with_transport_status));
                    };
                    match ctx.next_delay(&result) {
                        None => return Poll::Ready(result.map_err(with_transport_status)),
                        Some(delay) => {
                            let fut = Box::pin(retry_loop(ctx, delay, result));
                            kind.set(Kind::Retrying { fut });
                        }
                    }
                }
                KindProj::Retrying { fut } => {
                    return fut.as_mut().poll(cx).map_err(with_transport_status);
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
