//! One endpoint of a balanced channel: readiness follows its ejection
//! state, and every call's outcome is recorded. These types appear in the
//! [`BalancedChannel`](crate::BalancedChannel)'s service signature; they are
//! made by it, not by users.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use grpc_circuit_breaker::DEFAULT_FAILURE_CODES;
use grpc_resilience_core::error::error_code;
use grpc_resilience_core::{BoxError, Outcome, OutcomeBody};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use crate::outlier::{Controller, Reason};

pub(crate) const ACTIVE: u8 = 0;
pub(crate) const EJECTED: u8 = 1;
pub(crate) const PROBING: u8 = 2;

/// What the slow paths (ejection, health) keep under a lock.
#[derive(Debug)]
pub(crate) struct Slow {
    /// Ejections in a row (reset after a long enough healthy spell).
    pub(crate) consecutive: u32,
    /// Why the endpoint is out, while it is.
    pub(crate) reason: Option<Reason>,
    /// Bumped on every ejection, so a stale timer changes nothing.
    pub(crate) epoch: u64,
    /// When the endpoint last came back (or was added).
    pub(crate) active_since: Instant,
    /// The last health status reported was not SERVING.
    pub(crate) unhealthy: bool,
    /// The endpoint's breaker is open but the ejection cap kept it in.
    pub(crate) wants_ejection: bool,
}

/// The state one endpoint shares between its service in the balancer, the
/// outlier controller, its timers and its health watcher.
pub(crate) struct EndpointState {
    pub(crate) key: Arc<str>,
    pub(crate) breaker: Arc<str>,
    pub(crate) mode: AtomicU8,
    pub(crate) probes_in_flight: AtomicU32,
    pub(crate) probe_successes: AtomicU32,
    /// Set by a failure: the next pick skips this endpoint once.
    pub(crate) skip_next: AtomicBool,
    /// Set while the controller itself resets the breaker.
    pub(crate) resetting: AtomicBool,
    pub(crate) ok: AtomicU64,
    pub(crate) failed: AtomicU64,
    /// Ejections since the endpoint was added.
    pub(crate) ejections: AtomicU64,
    pub(crate) waker: AtomicWaker,
    pub(crate) slow: Mutex<Slow>,
    pub(crate) controller: Weak<Controller>,
    pub(crate) max_probes: u32,
    pub(crate) tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointState")
            .field("key", &self.key)
            .field("breaker", &self.breaker)
            .field("mode", &self.mode.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

impl EndpointState {
    pub(crate) fn new(
        key: Arc<str>,
        breaker: Arc<str>,
        controller: Weak<Controller>,
        max_probes: u32,
    ) -> Self {
        EndpointState {
            key,
            breaker,
            mode: AtomicU8::new(ACTIVE),
            probes_in_flight: AtomicU32::new(0),
            probe_successes: AtomicU32::new(0),
            skip_next: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            slow: Mutex::new(Slow {
                consecutive: 0,
                reason: None,
                epoch: 0,
                active_since: Instant::now(),
                unhealthy: false,
                wants_ejection: false,
            }),
            controller,
            max_probes,
            tasks: Mutex::default(),
        }
    }

    pub(crate) fn slow(&self) -> MutexGuard<'_, Slow> {
        self.slow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn add_task(&self, task: tokio::task::AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    pub(crate) fn abort_tasks(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }

    pub(crate) fn mode(&self) -> u8 {
        self.mode.load(Ordering::Acquire)
    }

    /// Records an outcome; `probe` says whether the call was a probe.
    fn record(self: &Arc<Self>, failed: bool, probe: bool) {
        if failed {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.skip_next.store(true, Ordering::Relaxed);
        } else {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
        if probe {
            self.release_probe();
            if let Some(controller) = self.controller.upgrade() {
                controller.on_probe_outcome(self, !failed);
            }
        }
    }

    fn release_probe(&self) {
        self.probes_in_flight.fetch_sub(1, Ordering::AcqRel);
        self.waker.wake();
    }
}

fn is_failure(outcome: Outcome) -> Option<bool> {
    match outcome {
        Outcome::Cancelled => None,
        Outcome::Status(code) | Outcome::Error(code) => Some(DEFAULT_FAILURE_CODES.contains(code)),
    }
}

/// Reports a call's outcome to its endpoint.
#[derive(Debug)]
pub(crate) struct Recorder {
    state: Arc<EndpointState>,
    probe: bool,
}

impl grpc_resilience_core::OnOutcome for Recorder {
    fn on_outcome(self, outcome: Outcome) {
        match is_failure(outcome) {
            Some(failed) => self.state.record(failed, self.probe),
            None if self.probe => {
                self.state.release_probe();
                if let Some(controller) = self.state.controller.upgrade() {
                    controller.on_probe_cancelled(&self.state);
                }
            }
            None => {}
        }
    }
}

/// An endpoint's service inside the balancer: not ready while ejected, at
/// most `max_probes` calls at once while coming back, and not ready for
/// one pick after a failed call. Made by the [`BalancedChannel`](crate::BalancedChannel).
pub struct EndpointService<S> {
    inner: S,
    state: Arc<EndpointState>,
}

impl<S> fmt::Debug for EndpointService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EndpointService")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl<S> EndpointService<S> {
    pub(crate) fn new(inner: S, state: Arc<EndpointState>) -> Self {
        EndpointService { inner, state }
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for EndpointService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>, Error = BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let state = &self.state;
        loop {
            match state.mode() {
                ACTIVE => {
                    if state.skip_next.load(Ordering::Relaxed)
                        && state.skip_next.swap(false, Ordering::Relaxed)
                    {
                        // Step aside for one pick: the balancer tries
                        // another endpoint and polls this one again.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    return self.inner.poll_ready(cx);
                }
                mode => {
                    state.waker.register(cx.waker());
                    if state.mode() != mode {
                        continue;
                    }
                    if mode == PROBING
                        && state.probes_in_flight.load(Ordering::Acquire) < state.max_probes
                    {
                        return self.inner.poll_ready(cx);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let probe = self.state.mode() == PROBING;
        if probe {
            self.state.probes_in_flight.fetch_add(1, Ordering::AcqRel);
        }
        ResponseFuture {
            inner: self.inner.call(request),
            recorder: Some(Recorder {
                state: self.state.clone(),
                probe,
            }),
        }
    }
}

pin_project! {
    /// The future of a call through a balanced channel's endpoint.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        recorder: Option<Recorder>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(recorder) = this.project().recorder.take() {
                grpc_resilience_core::OnOutcome::on_outcome(recorder, Outcome::Cancelled);
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResBody> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, BoxError>>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<http::Response<ResponseBody<ResBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let recorder = this.recorder.take();
        Poll::Ready(match result {
            Ok(response) => Ok(match recorder {
                Some(recorder) => OutcomeBody::wrap_response(response, recorder)
                    .map(|inner| ResponseBody { inner }),
                None => response.map(|body| ResponseBody {
                    inner: OutcomeBody::reported(body),
                }),
            }),
            Err(err) => {
                if let Some(recorder) = recorder {
                    let code = error_code(&*err);
                    grpc_resilience_core::OnOutcome::on_outcome(recorder, Outcome::Error(code));
                }
                Err(err)
            }
        })
    }
}

pin_project! {
    /// The response body of a call through a balanced channel; it reports
    /// the call's outcome to the endpoint that served it.
    pub struct ResponseBody<B> {
        #[pin]
        inner: OutcomeBody<B, Recorder>,
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

impl<B> Body for ResponseBody<B>
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
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
