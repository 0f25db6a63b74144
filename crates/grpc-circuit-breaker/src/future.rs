//! The response future of [`CircuitBreaker`](crate::CircuitBreaker).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use grpc_resilience_core::error::error_code;
use grpc_resilience_core::{BoxError, CodeSet, OnOutcome, Outcome, OutcomeBody};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::Code;

use crate::error::BreakerOpen;
use crate::state::{Admission, Core, Verdict};

/// One of a breaker's reference-counted handles; calls on different threads
/// use different handles, so they do not bounce one counter between cores.
/// Aligned so two handles' counters never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub(crate) struct Stripe(pub(crate) Arc<Core>);

// A call cancelled this close to its deadline was ended by the deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(1);

pub(crate) fn verdict(
    outcome: Outcome,
    failures: CodeSet,
    deadline: Option<Instant>,
    now: Instant,
) -> Verdict {
    let code = match outcome {
        Outcome::Status(code) | Outcome::Error(code) => code,
        Outcome::Cancelled => Code::Cancelled,
    };
    if code == Code::Cancelled {
        // A caller that went away says nothing about the service, unless it
        // went away because the call's deadline passed: then the service was
        // too slow.
        let timed_out = deadline.is_some_and(|d| now + DEADLINE_SLACK >= d);
        return if timed_out && failures.contains(Code::DeadlineExceeded) {
            Verdict::Failure
        } else {
            Verdict::Ignored
        };
    }
    if failures.contains(code) {
        Verdict::Failure
    } else {
        Verdict::Success
    }
}

/// An admitted call; records its outcome once, as cancelled if dropped.
#[derive(Debug)]
pub struct Permit {
    stripe: Arc<Stripe>,
    admission: Admission,
    start: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl Permit {
    pub(crate) fn new(
        stripe: Arc<Stripe>,
        admission: Admission,
        start: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        Permit {
            stripe,
            admission,
            start,
            deadline,
            done: false,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let core = &self.stripe.0;
        let now = Instant::now();
        let verdict = verdict(outcome, core.config().failure_codes, self.deadline, now);
        core.record(
            self.admission,
            verdict,
            now,
            now.saturating_duration_since(self.start),
        );
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
                    Some(permit) => OutcomeBody::wrap_response(response, permit),
                    None => response.map(OutcomeBody::reported),
                })),
                Err(err) => {
                    let err: BoxError = err.into();
                    if let Some(mut permit) = permit.take() {
                        permit.finish(Outcome::Error(error_code(&*err)));
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
