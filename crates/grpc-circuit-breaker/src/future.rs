//! The response future of [`CircuitBreaker`](crate::CircuitBreaker).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use grpc_resilience_core::error::error_code;
use grpc_resilience_core::{BoxError, CallDeadline, OnOutcome, Outcome, OutcomeBody};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::Code;

use crate::error::BreakerOpen;
use crate::state::{Admission, Core, Hot, Verdict};

/// One of a breaker's reference-counted handles; calls on different threads
/// use different handles, so they do not bounce one counter between cores.
pub(crate) type Stripe = grpc_resilience_core::Stripe<Core>;

/// How a call that ended with `outcome` counts. A cancelled call counts
/// as `DEADLINE_EXCEEDED` when its deadline had passed (`now()` is read
/// only then).
pub(crate) fn verdict(
    outcome: Outcome,
    failures: Hot,
    deadline: Option<CallDeadline>,
    now: impl Fn() -> Instant,
) -> Verdict {
    let code = match outcome {
        Outcome::Status(code) | Outcome::Error(code) => code,
        Outcome::Cancelled => Code::Cancelled,
    };
    if code == Code::Cancelled {
        // A caller that went away says nothing about the service, unless it
        // went away because the call's deadline passed: then the service was
        // too slow.
        let timed_out = deadline.is_some_and(|d| d.has_passed_at(now()));
        return if timed_out && failures.is_failure(Code::DeadlineExceeded) {
            Verdict::Failure
        } else {
            Verdict::Ignored
        };
    }
    if failures.is_failure(code) {
        Verdict::Failure
    } else {
        Verdict::Success
    }
}

/// An admitted call; records its outcome once, as cancelled if dropped.
#[derive(Debug)]
#[must_use = "dropping a permit records the call as cancelled at once"]
pub struct Permit {
    stripe: Arc<Stripe>,
    admission: Admission,
    // When the call was sent; `None` when nobody reads its latency.
    start: Option<Instant>,
    // The time to the response headers, once they came.
    latency: Option<Duration>,
    deadline: Option<CallDeadline>,
    done: bool,
}

impl Permit {
    pub(crate) fn new(
        stripe: Arc<Stripe>,
        admission: Admission,
        start: Option<Instant>,
        deadline: Option<CallDeadline>,
    ) -> Self {
        Permit {
            stripe,
            admission,
            start,
            latency: None,
            deadline,
            done: false,
        }
    }

    /// The call's response headers came: its latency is the time until
    /// now.
    pub fn on_response_head(&mut self) {
        if let Some(start) = self.start {
            self.latency = Some(Instant::now().saturating_duration_since(start));
        }
    }

    /// The call failed with `err` before a response.
    pub fn on_error(mut self, err: &BoxError) {
        self.finish(Outcome::Error(error_code(&**err)));
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let core: &Core = &self.stripe;
        let hot = core.hot();
        let verdict = verdict(outcome, hot, self.deadline, Instant::now);
        // Without headers (an error, a cancellation), the time until then.
        let latency = self.latency.or_else(|| {
            self.start
                .map(|start| Instant::now().saturating_duration_since(start))
        });
        core.record(hot, self.admission, verdict, latency, Instant::now);
    }
}

impl OnOutcome for Permit {
    fn on_outcome(mut self, outcome: Outcome) {
        self.finish(outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.finish(Outcome::Cancelled);
    }
}

/// The response body: reports the call's outcome to the breaker.
pub type ResponseBody<B> = OutcomeBody<B, Permit>;

pin_project! {
    /// The response future of [`CircuitBreaker`](crate::CircuitBreaker).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F> {
        // Sent to the inner service; no permit when no breaker applies.
        Called {
            #[pin]
            inner: F,
            permit: Option<Permit>,
        },
        // Rejected by an open breaker.
        Rejected {
            error: Option<BreakerOpen>,
        },
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn called(inner: F, permit: Option<Permit>) -> Self {
        ResponseFuture {
            kind: Kind::Called { inner, permit },
        }
    }

    pub(crate) fn rejected(error: BreakerOpen) -> Self {
        ResponseFuture {
            kind: Kind::Rejected { error: Some(error) },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Called { inner, permit } => match ready!(inner.poll(cx)) {
                Ok(response) => Poll::Ready(Ok(match permit.take() {
                    Some(mut permit) => {
                        permit.on_response_head();
                        OutcomeBody::wrap_response(response, permit)
                    }
                    None => response.map(OutcomeBody::reported),
                })),
                Err(err) => {
                    let err: BoxError = err.into();
                    if let Some(permit) = permit.take() {
                        permit.on_error(&err);
                    }
                    Poll::Ready(Err(err))
                }
            },
            KindProj::Rejected { error } => match error.take() {
                Some(error) => Poll::Ready(Err(Box::new(error))),
                None => Poll::Ready(Err("circuit breaker future polled after completion".into())),
            },
        }
    }
}
