//! One attempt's guards in one service: the bulkhead, then the circuit
//! breaker, then the per-attempt timeout, with one future and one body
//! wrapper for all three. The body wrapper is the one a caller reads: the
//! call level (see `stack.rs`) adds the call's deadline, the retry
//! throttle's refill and the call's telemetry to the answering attempt's
//! body instead of wrapping it again.
//!
//! The layers exist on their own (`grpc_bulkhead::Bulkhead`,
//! `grpc_circuit_breaker::CircuitBreaker`, `grpc_timeout::Timeout`); as
//! separate layers each adds its own future and body around the next, and
//! each level is moved into the one above. Here the bulkhead and breaker
//! run through their admission halves (their `Gate`s) and report to their
//! `Permit`s, and the per-attempt timeout through its own halves
//! (`Timeout::prepare` and a `Watch`, see [`Attempt`]): the same code the
//! layers run.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use grpc_bulkhead::{Admission, SlotWait};
use grpc_resilience_core::{BoxError, OnOutcome, Outcome, Scope, take_ready};
use grpc_retry::RetryThrottle;
use grpc_timeout::future::TimeoutBody;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::attempt::{Attempt, AttemptWatch};
use crate::telemetry::CallRecorder;

/// The bulkhead, circuit breaker and per-attempt timeout of a
/// [`ResilientChannel`](crate::ResilientChannel) stack, in that order, as
/// one service.
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: Attempt<S>,
    bulkhead: Option<grpc_bulkhead::Gate>,
    breaker: grpc_circuit_breaker::Gate,
}

impl<S> Guard<S> {
    pub(crate) fn new(
        inner: Attempt<S>,
        bulkhead: Option<grpc_bulkhead::Gate>,
        breaker: grpc_circuit_breaker::Gate,
    ) -> Self {
        Guard {
            inner,
            bulkhead,
            breaker,
        }
    }
}

/// What a call holds while it runs: its bulkhead slot and its breaker
/// permit, each told the call's outcome once (as cancelled if dropped).
#[derive(Debug, Default)]
pub struct Guards {
    breaker: Option<grpc_circuit_breaker::Permit>,
    bulkhead: Option<grpc_bulkhead::Permit>,
}

/// Who hears how an attempt's response ends: the attempt's [`Guards`],
/// and, once the response is the call's answer, the retry throttle
/// (refilled if the call ends OK) and the call's telemetry. Each is told
/// the outcome once (as cancelled if the body is dropped first).
#[derive(Debug)]
pub struct Reports {
    guards: Guards,
    refill: Option<RetryThrottle>,
    call: Option<CallRecorder>,
}

impl Reports {
    fn new(guards: Guards) -> Self {
        Reports {
            guards,
            refill: None,
            call: None,
        }
    }

    /// Makes this attempt's response the call's answer: its outcome also
    /// refills `refill` (if OK) and is recorded by `call`.
    pub(crate) fn answer(&mut self, refill: Option<RetryThrottle>, call: Option<CallRecorder>) {
        self.refill = refill;
        self.call = call;
    }

    /// Tells the guards `guards` and the call's own reports `call`.
    fn tell(self, guards: Outcome, call: Outcome) {
        self.guards.on_outcome(guards);
        // Then the call's own. (From a frame, the layers' bodies told them
        // in this order too, inner first; a dropped body, the other way
        // round. Nothing depends on it.)
        if let Some(throttle) = self.refill
            && call.is_ok()
        {
            throttle.on_success();
        }
        if let Some(recorder) = self.call {
            recorder.on_outcome(call);
        }
    }
}

impl OnOutcome for Reports {
    fn on_outcome(self, outcome: Outcome) {
        self.tell(outcome, outcome);
    }

    fn on_deadline(self, scope: Scope) {
        let outcome = Outcome::Error(tonic::Code::DeadlineExceeded);
        // The call's deadline ending the body (the one the call level
        // bound it by) is the caller giving up: to the attempt's breaker
        // and bulkhead the attempt was cancelled, as when that deadline
        // passes before the response (the attempt is dropped). The
        // attempt's own deadline is its failure.
        let guards = match scope {
            Scope::Call => Outcome::Cancelled,
            Scope::Attempt => outcome,
        };
        self.tell(guards, outcome);
    }
}

impl Guards {
    fn on_response_head(&mut self) {
        if let Some(permit) = &mut self.breaker {
            permit.on_response_head();
        }
        if let Some(permit) = &mut self.bulkhead {
            permit.on_response_head();
        }
    }

    fn on_error(self, err: &BoxError) {
        if let Some(permit) = self.breaker {
            permit.on_error(err);
        }
        if let Some(permit) = self.bulkhead {
            permit.on_error(err);
        }
    }
}

impl OnOutcome for Guards {
    fn on_outcome(self, outcome: Outcome) {
        // The breaker first, then the slot: a queued call woken by the
        // freed slot finds the breaker's count (a half-open probe given
        // back) already done. (As separate layers, the breaker heard first
        // of an outcome read from the body, and second of a dropped body.)
        if let Some(permit) = self.breaker {
            permit.on_outcome(outcome);
        }
        if let Some(permit) = self.bulkhead {
            permit.on_outcome(outcome);
        }
    }
}

/// The response body of [`Guard`]: the channel's body (bounded by the
/// per-attempt timeout when one is set), reporting the call's outcome to
/// its bulkhead slot and breaker permit; the call's deadline and the rest
/// of its [`Reports`] are added once it is the call's answer.
pub type GuardBody<R> = TimeoutBody<R, Reports>;

/// Admits a call to its breaker and sends it, holding `bulkhead`'s slot.
#[inline]
fn admit_and_call<S, B, R>(
    inner: &mut Attempt<S>,
    breaker: &grpc_circuit_breaker::Gate,
    request: http::Request<B>,
    bulkhead: Option<grpc_bulkhead::Permit>,
) -> Kind<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
{
    match breaker.admit(&request) {
        Ok(permit) => {
            let guards = Guards {
                breaker: permit,
                bulkhead,
            };
            match inner.send(request) {
                Ok((inner, attempt)) => Kind::Called {
                    inner,
                    guards,
                    attempt,
                },
                Err(expired) => {
                    // No time left for this attempt: not sent, so the
                    // ready service's reservation is given back.
                    drop(take_ready(inner));
                    guards.on_error(&expired);
                    Kind::Failed {
                        error: Some(expired),
                    }
                }
            }
        }
        Err(open) => {
            // Release the reservation the ready inner service holds.
            drop(take_ready(inner));
            // Refused below the bulkhead: dropping its permit frees the
            // slot as a cancelled call's, so an adaptive limit learns
            // nothing (the call never left).
            drop(bulkhead);
            Kind::Failed {
                error: Some(Box::new(open)),
            }
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<GuardBody<R>>;
    type Error = BoxError;
    type Future = GuardFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never waits for a slot or refuses here (the partition and the
        // breaker depend on the request, and a tonic stub reports an error
        // from `poll_ready` as UNKNOWN): both happen in the call's future.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let slot = match &mut self.bulkhead {
            None => None,
            Some(gate) => match gate.admit(&mut request) {
                Admission::Unlimited => None,
                Admission::Admitted(permit) => Some(permit),
                Admission::Rejected(full) => {
                    // Release the reservation the ready inner service
                    // holds: a refused caller that backs off must not
                    // keep it.
                    drop(take_ready(&mut self.inner));
                    return GuardFuture::new(Kind::Failed {
                        error: Some(Box::new(full)),
                    });
                }
                Admission::Queued(wait) => {
                    // The ready service goes with the call; this clone
                    // must be made ready again before the next call.
                    return GuardFuture::new(Kind::Waiting {
                        waiting: Box::pin(Waiting {
                            wait,
                            inner: Some(take_ready(&mut self.inner)),
                            request: Some(request),
                            breaker: self.breaker.clone(),
                        }),
                    });
                }
            },
        };
        GuardFuture::new(admit_and_call(
            &mut self.inner,
            &self.breaker,
            request,
            slot,
        ))
    }
}

pin_project! {
    /// A call waiting for a bulkhead slot, with the ready service it will
    /// be sent to once its breaker admits it.
    struct Waiting<S, B> {
        #[pin]
        wait: SlotWait,
        inner: Option<Attempt<S>>,
        request: Option<http::Request<B>>,
        breaker: grpc_circuit_breaker::Gate,
    }
}

pin_project! {
    /// The response future of [`Guard`].
    pub struct GuardFuture<S, B>
    where
        S: Service<http::Request<B>>,
    {
        #[pin]
        kind: Kind<S, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B>
    where
        S: Service<http::Request<B>>,
    {
        // Sent.
        Called {
            #[pin]
            inner: S::Future,
            guards: Guards,
            // The head timer of an attempt with a deadline of its own.
            attempt: Option<AttemptWatch>,
        },
        // Queued for a bulkhead slot (boxed: a rare path, and a request is
        // large).
        Waiting {
            waiting: Pin<Box<Waiting<S, B>>>,
        },
        // Refused (bulkhead or breaker), or over.
        Failed {
            error: Option<BoxError>,
        },
    }
}

impl<S, B> GuardFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    #[inline]
    fn new(kind: Kind<S, B>) -> Self {
        GuardFuture { kind }
    }
}

impl<S, B> fmt::Debug for GuardFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Waiting { .. } => "waiting",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("GuardFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B, R> Future for GuardFuture<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone,
    S::Error: Into<BoxError>,
{
    type Output = Result<http::Response<GuardBody<R>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().kind.project() {
                KindProj::Called {
                    inner,
                    guards,
                    attempt,
                } => {
                    let (mut result, settle) = match inner.poll(cx) {
                        Poll::Ready(result) => (result.map_err(Into::into), true),
                        Poll::Pending => match attempt {
                            None => return Poll::Pending,
                            // The attempt's own deadline: its error is final.
                            Some(watch) => (Err(ready!(watch.as_mut().poll_deadline(cx))), false),
                        },
                    };
                    // An attempt with a deadline: held to it, and its
                    // body bounded by it.
                    let mut deadline = None;
                    if settle
                        && let Some(watch) = attempt
                        && let Some((d, _)) = watch.as_mut().settle(&mut result)
                    {
                        deadline = d;
                    }
                    let guards = std::mem::take(guards);
                    return Poll::Ready(match result {
                        // Observed even with no permit: the call level may
                        // add its own reports to this body.
                        Ok(response) => {
                            let mut guards = guards;
                            guards.on_response_head();
                            let reports = Reports::new(guards);
                            Ok(TimeoutBody::wrap_response(
                                response,
                                deadline,
                                Some(reports),
                            ))
                        }
                        Err(err) => {
                            guards.on_error(&err);
                            Err(err)
                        }
                    });
                }
                KindProj::Failed { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "attempt future polled after completion".into())));
                }
                KindProj::Waiting { waiting } => {
                    let w = waiting.as_mut().project();
                    let deadline = w.wait.deadline();
                    match ready!(w.wait.poll(cx)) {
                        Err(error) => Kind::Failed { error: Some(error) },
                        Ok(slot) => {
                            let (Some(mut inner), Some(mut request)) =
                                (w.inner.take(), w.request.take())
                            else {
                                return Poll::Ready(Err(
                                    "attempt future polled after completion".into()
                                ));
                            };
                            // The header said the time left when the call
                            // was queued; the server is told the time left
                            // now.
                            if let Some(deadline) = deadline {
                                deadline.write_header(request.headers_mut(), Instant::now());
                            }
                            admit_and_call(&mut inner, w.breaker, request, Some(slot))
                        }
                    }
                }
            };
            self.as_mut().project().kind.set(next);
        }
    }
}
