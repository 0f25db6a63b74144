//! The hedged call: several attempts in flight, the first answer wins.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use grpc_resilience_core::error::with_transport_status;
use grpc_resilience_core::{BoxError, CallDeadline, MethodId};
use http::{Request, Response};
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::HedgingPolicy;
use crate::decide::{Ended, Pushback, answered, ended};
use crate::future::Unwrapped;
use crate::future::{attempt_span, record_attempt, record_result, replay_request, sanitize};
use crate::replay::{Recording, ReplayableBody};
use crate::spare::Handle;

/// Everything a hedged call needs.
#[derive(Debug)]
pub(crate) struct Hedge<S, B> {
    pub(crate) recording: Recording<B>,
    pub(crate) policy: HedgingPolicy,
    pub(crate) shared: Handle<S>,
    pub(crate) deadline: Option<CallDeadline>,
}

type Attempt<F> = (u32, Pin<Box<tracing::instrument::Instrumented<F>>>);

impl<S, B> Hedge<S, B> {
    fn labels(&self) -> (&str, &str) {
        MethodId::from_path(self.recording.head().uri.path())
            .map_or(("", ""), |m| (m.service(), m.method()))
    }

    fn count(&self, name: &'static str, n: u64) {
        let (service, method) = self.labels();
        metrics::counter!(name, "service" => service.to_owned(), "method" => method.to_owned())
            .increment(n);
    }

    /// The span of hedge `attempt`; the service is called with it entered.
    pub(crate) fn span(&self, attempt: u32) -> tracing::Span {
        let span = attempt_span(attempt, true);
        if !span.is_disabled() {
            let (service, method) = self.labels();
            record_attempt(&span, service, method, self.deadline, Instant::now());
        }
        span
    }

    /// Whether another hedge may be sent now; counts and logs why not.
    fn may_send(&self, now: Instant) -> bool {
        if self.deadline.is_some_and(|d| d.has_passed_at(now)) {
            return false;
        }
        if self
            .shared
            .throttle
            .as_ref()
            .is_some_and(|t| !t.allows_retry())
        {
            self.count("grpc.retry.throttled", 1);
            tracing::debug!("no further hedge: retries are throttled");
            return false;
        }
        if !self.recording.replayable() {
            self.count("grpc.retry.buffer_exceeded", 1);
            tracing::debug!("no further hedge: the request body is over the replay limit");
            return false;
        }
        true
    }
}

/// Runs a hedged call whose first attempt, `first`, was sent.
pub(crate) async fn hedge<S, B, R>(
    h: Hedge<S, B>,
    first: S::Future,
    first_span: tracing::Span,
) -> Result<Unwrapped<R>, BoxError>
where
    S: Service<Request<B>, Response = Response<R>> + Clone + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
{
    let mut inflight: Vec<Attempt<S::Future>> = vec![(1, Box::pin(first.instrument(first_span)))];
    let mut sent: u32 = 1;
    // When the next hedge is due; `None`: no more hedges.
    let mut next_at = Some(Instant::now() + h.policy.hedging_delay);
    // The latest non-fatal failure, returned if nothing commits.
    let mut last: Option<Result<Response<R>, BoxError>> = None;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    // The hedges' service: a clone of the prototype in `h.shared`, made
    // when the first hedge is due (most hedged calls answer before the
    // hedging delay).
    let mut service: Option<S> = None;

    let (winner, result) = std::future::poll_fn(|cx| {
        loop {
            // 1. The attempts in flight.
            let mut i = 0;
            while i < inflight.len() {
                let Poll::Ready(result) = inflight[i].1.as_mut().poll(cx) else {
                    i += 1;
                    continue;
                };
                let (n, fut) = inflight.swap_remove(i);
                let mut result = result.map_err(Into::into);
                record_result(fut.span(), &result);
                sanitize(&mut result);
                if h.recording.refused(n) && !answered(&result) {
                    // Its body could not be sent byte for byte: unless the
                    // server answered in full (Trailers-Only), its outcome
                    // says nothing about the call.
                    continue;
                }
                match ended(&result) {
                    Ended::Committed | Ended::Succeeded => return Poll::Ready((Some(n), result)),
                    Ended::Rejected => {
                        // Refused below (a breaker, a full bulkhead): no
                        // further hedge; the others go on.
                        next_at = None;
                        last.get_or_insert(result);
                    }
                    Ended::Failed {
                        code,
                        pushback,
                        never_processed,
                    } => {
                        let non_fatal = h.policy.non_fatal_codes.contains(code);
                        if !non_fatal && !never_processed {
                            return Poll::Ready((Some(n), result));
                        }
                        if let Some(t) = &h.shared.throttle
                            && (non_fatal || pushback != Pushback::None)
                        {
                            t.on_failure();
                        }
                        let now = Instant::now();
                        next_at = match pushback {
                            _ if next_at.is_none() => None,
                            // gRFC A6: a non-fatal failure sends the next
                            // hedge at once...
                            Pushback::None => Some(now),
                            // ...server pushback delays it...
                            Pushback::After(d) if d <= h.policy.max_pushback => Some(now + d),
                            // ...and an invalid (or too long) one stops hedging.
                            _ => {
                                tracing::debug!("no further hedge: server pushback");
                                None
                            }
                        };
                        last = Some(result);
                    }
                }
            }

            // 2. The next hedge, when due.
            if sent >= h.policy.max_attempts {
                next_at = None;
            }
            if let Some(at) = next_at {
                let now = Instant::now();
                if h.deadline.is_some_and(|d| at >= d.instant()) {
                    // Never started at or after the deadline.
                    next_at = None;
                } else if now >= at {
                    if !h.may_send(now) {
                        next_at = None;
                        continue;
                    }
                    let hedges = service.get_or_insert_with(|| h.shared.make());
                    match hedges.poll_ready(cx) {
                        Poll::Pending => {
                            // Woken by the service, or at the deadline.
                            if let Some(deadline) = h.deadline {
                                timer.as_mut().reset(deadline.instant());
                                if timer.as_mut().poll(cx).is_ready() {
                                    continue;
                                }
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(err)) => {
                            next_at = None;
                            last.get_or_insert(Err(err.into()));
                            continue;
                        }
                        Poll::Ready(Ok(())) => {}
                    }
                    let now = Instant::now();
                    if h.deadline.is_some_and(|d| d.has_passed_at(now)) {
                        next_at = None;
                        continue;
                    }
                    if let Some(budget) = &h.shared.budget
                        && !budget.withdraw()
                    {
                        h.count("grpc.retry.budget_exhausted", 1);
                        tracing::debug!("no further hedge: the retry budget is spent");
                        next_at = None;
                        continue;
                    }
                    let Some(request) = replay_request(&h.recording, sent, h.deadline, now) else {
                        // The body outgrew the replay limit: no more hedges.
                        next_at = None;
                        continue;
                    };
                    sent += 1;
                    h.count("grpc.retry.hedges", 1);
                    let (service, method) = h.labels();
                    tracing::debug!(service, method, attempt = sent, "hedging: attempt sent");
                    let span = h.span(sent);
                    let fut = {
                        let _entered = span.enter();
                        hedges.call(request)
                    };
                    let fut = fut.instrument(span);
                    inflight.push((sent, Box::pin(fut)));
                    next_at = Some(now + h.policy.hedging_delay);
                    continue;
                }
            }

            // 3. Done, or wait.
            if inflight.is_empty() && next_at.is_none() {
                let result = last.take().unwrap_or_else(|| {
                    Err("hedged call: no attempt could be sent byte for byte".into())
                });
                return Poll::Ready((None, result));
            }
            if let Some(at) = next_at {
                timer.as_mut().reset(at);
                if timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    })
    .await;

    // Every other attempt is cancelled: dropped, so its stream is reset.
    if !inflight.is_empty() {
        h.count("grpc.retry.hedges_cancelled", inflight.len() as u64);
    }
    drop(inflight);
    if let Some(n) = winner {
        h.recording.commit_to(n);
    }
    let throttle = h.shared.throttle.clone();
    let counted = match ended(&result) {
        Ended::Committed => throttle,
        Ended::Succeeded => {
            if let Some(t) = &throttle {
                t.on_success();
            }
            None
        }
        _ => None,
    };
    drop(h);
    result
        .map(|response| (response, counted))
        .map_err(with_transport_status)
}
