//! The [`CircuitBreaker`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use grpc_resilience_core::{BoxError, CallDeadline, take_ready};
use tokio::time::Instant;
use tower_service::Service;

use crate::error::BreakerOpen;
use crate::future::{Permit, ResponseBody, ResponseFuture, Stripe};
use crate::keying::{Keying, Shared};
use crate::layer::CircuitBreakerLayer;
use crate::registry::BreakerRegistry;
use crate::state::{Core, State};

/// The breakers' admission, without a service: what [`CircuitBreaker`]
/// does before it calls the service it wraps, for a service that runs the
/// breaker inside its own future beside other layers (the
/// `grpc-resilience` facade does, to keep one future per attempt).
///
/// Get one from [`CircuitBreakerLayer::gate`]; it shares the layer's
/// breakers.
///
/// ```
/// use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
/// use grpc_resilience_core::{OnOutcome, Outcome};
///
/// let gate = CircuitBreakerLayer::new(BreakerRegistry::new()).gate();
/// let request = http::Request::builder()
///     .uri("/catalog.v1.QueryService/GetItem")
///     .body(())
///     .unwrap();
/// // Admitted: the permit is told how the call ended. Dropped untold, it
/// // counts as cancelled: neither a success nor a failure, unless the
/// // call's deadline had passed (then it counts as DEADLINE_EXCEEDED).
/// let permit = gate.admit(&request)?.expect("a gRPC call has a breaker");
/// permit.on_outcome(Outcome::Status(tonic::Code::Ok));
/// # Ok::<(), grpc_circuit_breaker::BreakerOpen>(())
/// ```
#[derive(Clone, Debug)]
pub struct Gate {
    shared: Arc<Shared>,
}

impl Gate {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Gate { shared }
    }

    /// The handle of the breaker for this request, if one applies.
    #[inline]
    fn stripe<B>(&self, request: &http::Request<B>) -> Option<Arc<Stripe>> {
        match &self.shared.keying {
            Keying::Single(_) => self.shared.single.as_ref().map(|e| e.stripe().clone()),
            Keying::PerService => self.shared.service_stripe(request.uri()),
            Keying::Custom(f) => Some(
                self.shared
                    .lookup_stripe(f(request.uri(), request.headers())?),
            ),
        }
    }

    /// Asks the request's breaker to admit the call: a [`Permit`] that
    /// records the call's outcome (`None` when no breaker applies, such as
    /// a path that is not gRPC), or [`BreakerOpen`] when the breaker
    /// refuses it. The breaker's state is recorded on the current span as
    /// `breaker.state`.
    ///
    /// # Errors
    ///
    /// [`BreakerOpen`] (a `LocalRejection`, `UNAVAILABLE` to the caller)
    /// while the breaker is open, or half-open with its probes taken.
    #[inline]
    pub fn admit<B>(&self, request: &http::Request<B>) -> Result<Option<Permit>, BreakerOpen> {
        let Some(stripe) = self.stripe(request) else {
            return Ok(None);
        };
        let core: &Core = &stripe;
        let admitted = core.admit(Instant::now);
        record_admission(match &admitted {
            Ok(admission) => admission.state,
            Err(state) => *state,
        });
        match admitted {
            Err(state) => Err(BreakerOpen::new(core.name().clone(), state)),
            Ok(admission) => {
                // Timed only when the latency histogram or a slow-call
                // threshold reads it.
                let start = core.hot().timed().then(Instant::now);
                // The deadline an upper layer recorded, or the caller's
                // grpc-timeout from now.
                let deadline = CallDeadline::of_request(request);
                Ok(Some(Permit::new(stripe, admission, start, deadline)))
            }
        }
    }
}

/// Circuit breakers for gRPC calls; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    gate: Gate,
}

impl<S> CircuitBreaker<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        CircuitBreaker {
            inner,
            gate: Gate::new(shared),
        }
    }

    /// How many method paths the layer's table keeps.
    #[cfg(test)]
    pub(crate) fn methods_kept(&self) -> usize {
        self.gate.shared.methods_kept()
    }

    /// Wraps `inner` with one breaker per gRPC service from `registry`.
    pub fn new(inner: S, registry: BreakerRegistry) -> Self {
        tower_layer::Layer::layer(&CircuitBreakerLayer::new(registry), inner)
    }

    /// The registry of this service's breakers.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.gate.shared.registry
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// `S: Clone` so that a rejected call can give back what the inner
/// service's `poll_ready` reserved (a `Buffer` slot, a concurrency permit):
/// the ready service is dropped and a fresh clone takes its place.
impl<S, B, ResBody> Service<http::Request<B>> for CircuitBreaker<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never rejects here: tonic stubs would report UNKNOWN. Rejections
        // come from the call's future.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&request) {
            Ok(permit) => ResponseFuture::called(self.inner.call(request), permit),
            Err(open) => {
                // Release the reservation the ready inner service holds.
                drop(take_ready(&mut self.inner));
                ResponseFuture::rejected(open)
            }
        }
    }
}

/// Records the breaker's state at admission as `breaker.state` on the
/// current span: the retry layer's attempt span declares that field (a
/// span without it ignores the value). Nothing at all is done unless DEBUG
/// spans can be enabled, which the attempt span needs.
fn record_admission(state: State) {
    if tracing::level_enabled!(tracing::Level::DEBUG) {
        tracing::Span::current().record("breaker.state", state.as_str());
    }
}
