//! The response future and body of [`Bulkhead`](crate::Bulkhead).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use grpc_resilience_core::error::{LocalRejection, error_code, find_error};
use grpc_resilience_core::{BoxError, CallDeadline, OnOutcome, Outcome, OutcomeBody};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use crate::error::BulkheadFull;
use crate::limit::{Sample, is_overload};
use crate::partition::{Partition, Rejection};
use crate::sync::oneshot;

/// A call's slot in its partition, held until the call ends: the end of
/// the response body, a failed call, or a dropped future or body.
#[derive(Debug)]
#[must_use = "dropping a permit frees the slot at once, as a cancelled call"]
pub struct Permit {
    partition: Arc<Partition>,
    // For an adaptive limit: when the call was admitted, and how long its
    // response headers took.
    start: Option<Instant>,
    rtt: Option<Duration>,
    in_flight: u32,
    done: bool,
}

impl Permit {
    pub(crate) fn new(partition: Arc<Partition>, in_flight: u32) -> Self {
        partition.on_admitted();
        let start = partition.is_adaptive().then(Instant::now);
        Permit {
            partition,
            start,
            rtt: None,
            in_flight,
            done: false,
        }
    }

    /// The call's response headers came: an adaptive limit takes the
    /// time until now as the call's round trip.
    pub fn on_response_head(&mut self) {
        if let Some(start) = self.start {
            self.rtt = Some(Instant::now().saturating_duration_since(start));
        }
    }

    /// The call failed with `err` before a response: frees the slot. A call
    /// refused below (a [`LocalRejection`], such as an open breaker) never
    /// reached the server, so an adaptive limit learns nothing from it.
    pub fn on_error(mut self, err: &BoxError) {
        let outcome = if find_error::<LocalRejection>(&**err).is_some() {
            Outcome::Cancelled
        } else {
            Outcome::Error(error_code(&**err))
        };
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(start) = self.start
            && outcome != Outcome::Cancelled
        {
            let rtt = self
                .rtt
                .unwrap_or_else(|| Instant::now().saturating_duration_since(start));
            self.partition.on_sample(Sample {
                start,
                rtt,
                in_flight: self.in_flight,
                dropped: is_overload(outcome.code()),
            });
        }
        self.partition.on_finished();
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

/// The response body: holds the call's slot until the body ends or is
/// dropped.
pub type ResponseBody<B> = OutcomeBody<B, Permit>;

/// Rejects a call: counts it, logs it, and builds the error.
pub(crate) fn reject(partition: &Partition, reason: Rejection) -> BulkheadFull {
    partition.on_rejected(reason);
    let limit = partition.limit();
    tracing::warn!(
        partition = %partition.name(),
        reason = reason.as_str(),
        limit,
        in_flight = partition.in_flight(),
        max_queue = partition.config().max_queue(),
        "Bulkhead full, call rejected"
    );
    BulkheadFull::new(partition.name().clone(), reason, limit)
}

/// A place in a partition's wait queue.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) rx: oneshot::Receiver<()>,
    pub(crate) partition: Arc<Partition>,
    // The call took the slot it was granted (or passed it on itself).
    pub(crate) claimed: bool,
}

impl Ticket {
    /// Leaves the queue; true if a slot was granted meanwhile (the call
    /// then holds it).
    pub(crate) fn give_up(&mut self) -> bool {
        self.rx.close();
        self.rx.try_recv().is_ok()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.claimed && self.give_up() {
            // Granted, never used: pass it on.
            self.partition.release();
        }
    }
}

pin_project! {
    /// A call's wait for a slot in a full partition (see
    /// [`Admission::Queued`](crate::Admission::Queued)): resolves to the
    /// slot, or to the refusal when `max_wait` or the call's deadline comes
    /// first. Dropping it leaves the queue (a slot granted meanwhile goes
    /// to the next call).
    #[derive(Debug)]
    #[must_use = "a wait does nothing unless polled"]
    pub struct SlotWait {
        #[pin]
        sleep: Sleep,
        ticket: Ticket,
        since: Instant,
        // The call's deadline: the wait ends there too.
        deadline: Option<CallDeadline>,
        done: bool,
    }
}

impl SlotWait {
    /// A call queued at `since` for a slot; the wait ends at `max_wait` or
    /// at the call's `deadline`, whichever comes first.
    pub(crate) fn new(
        partition: Arc<Partition>,
        rx: oneshot::Receiver<()>,
        deadline: Option<CallDeadline>,
        since: Instant,
    ) -> Self {
        let max_wait = partition.config().max_wait();
        // A wait too long to add to the clock is a wait without end: a
        // year is as good.
        let until = since
            .checked_add(max_wait)
            .unwrap_or_else(|| since + Duration::from_secs(365 * 24 * 3600));
        let until = deadline.map_or(until, |d| until.min(d.instant()));
        SlotWait {
            sleep: tokio::time::sleep_until(until),
            ticket: Ticket {
                rx,
                partition,
                claimed: false,
            },
            since,
            deadline,
            done: false,
        }
    }

    /// The call's deadline, if it has one: a call granted its slot is to
    /// be sent with `grpc-timeout` rewritten to the time left then
    /// ([`CallDeadline::write_header`]), since the header said the time
    /// left when the call was queued.
    pub fn deadline(&self) -> Option<CallDeadline> {
        self.deadline
    }
}

impl Future for SlotWait {
    /// The slot, or the refusal: a [`BulkheadFull`] (counted and logged),
    /// or an error saying the wait was polled again after it resolved.
    type Output = Result<Permit, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let w = self.project();
        if *w.done {
            // The slot (or the refusal) was handed out once.
            return Poll::Ready(Err("bulkhead wait polled after completion".into()));
        }
        let granted = match Pin::new(&mut w.ticket.rx).poll(cx) {
            Poll::Ready(result) => result.is_ok(),
            Poll::Pending => {
                ready!(w.sleep.poll(cx));
                w.ticket.give_up()
            }
        };
        *w.done = true;
        let partition = w.ticket.partition.clone();
        let now = Instant::now();
        partition.on_waited(now.saturating_duration_since(*w.since));
        let expired = w.deadline.is_some_and(|d| d.has_passed_at(now));
        if expired && granted {
            // A slot that came as the deadline passed goes to the next
            // call in the queue.
            w.ticket.claimed = true;
            partition.release();
        }
        Poll::Ready(if expired {
            Err(Box::new(reject(&partition, Rejection::Deadline)))
        } else if !granted {
            Err(Box::new(reject(&partition, Rejection::WaitTimedOut)))
        } else {
            w.ticket.claimed = true;
            let in_flight = partition.in_flight();
            Ok(Permit::new(partition, in_flight))
        })
    }
}

pin_project! {
    /// A call waiting for a slot, with the ready service it will be sent to.
    struct Waiting<S, R> {
        #[pin]
        wait: SlotWait,
        service: Option<S>,
        request: Option<R>,
    }
}

pin_project! {
    /// The response future of [`Bulkhead`](crate::Bulkhead).
    pub struct ResponseFuture<S, B>
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
        // Sent; no permit when no partition applies.
        Called {
            #[pin]
            inner: S::Future,
            permit: Option<Permit>,
        },
        // Queued for a slot (boxed: a rare path, and a request is large).
        Waiting {
            waiting: Pin<Box<Waiting<S, http::Request<B>>>>,
        },
        // Refused (a `BulkheadFull`), or over.
        Rejected {
            error: Option<BoxError>,
        },
    }
}

impl<S, B> std::fmt::Debug for ResponseFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Waiting { .. } => "waiting",
            Kind::Rejected { .. } => "rejected",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<http::Request<B>>,
{
    pub(crate) fn called(inner: S::Future, permit: Option<Permit>) -> Self {
        ResponseFuture {
            kind: Kind::Called { inner, permit },
        }
    }

    pub(crate) fn rejected(error: BulkheadFull) -> Self {
        ResponseFuture {
            kind: Kind::Rejected {
                error: Some(Box::new(error)),
            },
        }
    }

    /// A call waiting for a slot, to be sent to `service` once it has one.
    pub(crate) fn waiting(wait: SlotWait, service: S, request: http::Request<B>) -> Self {
        let waiting = Waiting {
            wait,
            service: Some(service),
            request: Some(request),
        };
        ResponseFuture {
            kind: Kind::Waiting {
                waiting: Box::pin(waiting),
            },
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().kind.project() {
                KindProj::Called { inner, permit } => {
                    return match ready!(inner.poll(cx)) {
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
                    };
                }
                KindProj::Rejected { error } => {
                    return Poll::Ready(Err(error
                        .take()
                        .unwrap_or_else(|| "bulkhead future polled after completion".into())));
                }
                KindProj::Waiting { waiting } => {
                    let w = waiting.as_mut().project();
                    let deadline = w.wait.deadline();
                    match ready!(w.wait.poll(cx)) {
                        Err(error) => Kind::Rejected { error: Some(error) },
                        Ok(permit) => {
                            let (Some(mut service), Some(mut request)) =
                                (w.service.take(), w.request.take())
                            else {
                                return Poll::Ready(Err(
                                    "bulkhead future polled after completion".into()
                                ));
                            };
                            // The header said the time left when the call
                            // was queued; the server is told the time left
                            // now.
                            if let Some(deadline) = deadline {
                                deadline.write_header(request.headers_mut(), Instant::now());
                            }
                            Kind::Called {
                                inner: service.call(request),
                                permit: Some(permit),
                            }
                        }
                    }
                }
            };
            self.as_mut().project().kind.set(next);
        }
    }
}
