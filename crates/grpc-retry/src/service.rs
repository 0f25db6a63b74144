//! The [`Retry`] service.

use std::sync::Arc;
use std::task::{Context, Poll};

use grpc_resilience_core::error::LocalRejection;
use grpc_resilience_core::{BoxError, CallDeadline, LastMethod, MethodTable, Striped, headers};
use http::Request;
use tokio::time::Instant;
use tower_service::Service;

use crate::future::{Ctx, LastRetry, ResponseFuture};
use crate::head::Head;
use crate::hedge::{Hedge, hedge};
use crate::layer::RetryLayer;
use crate::policy::MethodPolicy;
use crate::replay::{Limits, Recording, ReplayBody as Replay, ReplayableBody};
use crate::spare::PerService;
use crate::{ResponseBody, RetryBudget, RetryOverride, RetryPolicies, RetryPolicy, RetryThrottle};

/// The header that carries the idempotency key.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) policies: RetryPolicies,
    // Each method's policy, worked out once per method for every service
    // of the layer.
    pub(crate) methods: MethodTable<Option<MethodPolicy>>,
    pub(crate) throttle: Option<RetryThrottle>,
    pub(crate) budget: Option<RetryBudget>,
    pub(crate) limits: Arc<Striped<Limits>>,
}

/// Retries gRPC calls; see the [crate docs](crate).
///
/// A call is sent through the wrapped service itself; its retries and
/// hedges go through clones of the service as it was when the layer
/// wrapped it, made only when one is due (see
/// [`RetryLayer`](crate::RetryLayer)).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    pub(crate) inner: S,
    // The layer's shared state and the prototype retries are cloned from;
    // each call keeps a handle of its thread's stripe (see `Striped`).
    pub(crate) shared: Arc<Striped<PerService<S>>>,
    // The last method called and its policy.
    pub(crate) last: LastMethod<Option<MethodPolicy>>,
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying as `policies` say.
    pub fn new(inner: S, policies: RetryPolicies) -> Self
    where
        S: Clone,
    {
        tower_layer::Layer::layer(&RetryLayer::new(policies), inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably. A change made here is seen by the
    /// first attempts of later calls; retries and hedges go through clones
    /// of the service as the layer wrapped it.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The error of a call whose deadline passed before it was sent: a
/// [`LocalRejection`] (the call never left the client, so a layer above
/// neither retries it nor counts it against the server) that the caller
/// sees as `DEADLINE_EXCEEDED`.
fn deadline_passed() -> BoxError {
    Box::new(LocalRejection::new(tonic::Status::deadline_exceeded(
        "deadline exceeded before the call was sent",
    )))
}

fn idempotency_key() -> http::HeaderValue {
    let n: u128 = rand::random();
    http::HeaderValue::from_str(&format!("{n:032x}")).expect("hex digits are a valid header value")
}

/// The first attempt's request: the call's head and body, with the call's
/// deadline recorded for the layers below unless it already was.
#[inline]
fn first_request<B: ReplayableBody>(
    mut parts: http::request::Parts,
    body: Replay<B>,
    recorded: Option<CallDeadline>,
    deadline: Option<CallDeadline>,
) -> Request<B> {
    if recorded.is_none()
        && let Some(deadline) = deadline
    {
        parts.extensions.insert(deadline);
    }
    Request::from_parts(parts, B::from_replay(body))
}

impl<S, B, R> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Send + 'static,
{
    type Response = http::Response<ResponseBody<R>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let shared: &Shared = &self.shared;
        let Shared {
            policies, methods, ..
        } = shared;
        let configured = *self.last.get_or_insert_from(request.uri(), methods, |id| {
            id.and_then(|m| policies.get(&m).copied())
        });
        let policy = match request.extensions().get::<RetryOverride>() {
            None => configured,
            Some(o) if o.disabled => None,
            Some(o) => {
                // An override makes the call a retried one, hedged method
                // or not.
                let base = match configured {
                    Some(MethodPolicy::Retry(p)) => p,
                    _ => RetryPolicy::default(),
                };
                let policy = o.apply(base);
                if let Err(err) = policy.validate() {
                    return ResponseFuture::failed(Box::new(tonic::Status::invalid_argument(
                        format!("invalid RetryOverride: {err}"),
                    )));
                }
                Some(MethodPolicy::Retry(policy))
            }
        };
        // A caller that sends its own idempotency key says a repeat is
        // safe: a non-idempotent method is then retried (with that key),
        // unless this call's override said it is not idempotent.
        let policy = policy.map(|p| match p {
            MethodPolicy::Retry(mut p)
                if !p.retries_statuses()
                    && headers::get(request.headers(), &IDEMPOTENCY_KEY).is_some()
                    && request
                        .extensions()
                        .get::<RetryOverride>()
                        .is_none_or(|o| o.idempotent.is_none()) =>
            {
                p.idempotency_keys = true;
                MethodPolicy::Retry(p)
            }
            p => p,
        });
        let policy = policy.filter(|p| match p {
            MethodPolicy::Retry(p) => p.max_attempts > 1,
            MethodPolicy::Hedge(_) => true,
        });
        let Some(policy) = policy else {
            // Not retried: only an expired deadline is looked at (no
            // allocation, no header written).
            if CallDeadline::of_request(&request).is_some_and(|d| d.has_passed_at(Instant::now())) {
                return ResponseFuture::failed(deadline_passed());
            }
            return ResponseFuture::passthrough(self.inner.call(request));
        };

        if let Some(budget) = &self.shared.budget {
            budget.deposit();
        }
        // The call's one deadline: the one recorded above, or else the
        // caller's `grpc-timeout` read now (`CallDeadline::get_or_insert`,
        // with the recording done below, after the head is kept).
        let recorded = request.extensions().get::<CallDeadline>().copied();
        let deadline = recorded.or_else(|| CallDeadline::of_request(&request));
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if deadline.has_passed_at(now) {
                return ResponseFuture::failed(deadline_passed());
            }
            // The first attempt is sent now, with the time left now. A
            // header read just now already says so: no need to rewrite it.
            if recorded.is_some() {
                deadline.write_header(request.headers_mut(), now);
            }
        }
        let (mut parts, body) = request.into_parts();
        let idempotency_keys = match &policy {
            MethodPolicy::Retry(p) => p.idempotency_keys,
            MethodPolicy::Hedge(p) => p.idempotency_keys,
        };
        if idempotency_keys && headers::get(&parts.headers, &IDEMPOTENCY_KEY).is_none() {
            parts.headers.insert(IDEMPOTENCY_KEY, idempotency_key());
        }
        let (body, captured) = Replay::capture(body, self.shared.limits.handle().clone());
        // The head is kept before the deadline is recorded (retries record
        // it on each attempt themselves), and built where it is stored:
        // in the context's literal, not moved in from elsewhere.
        let has_deadline = deadline.is_some();
        let policy = match policy {
            MethodPolicy::Retry(policy) => policy,
            MethodPolicy::Hedge(policy) => {
                let h = Hedge {
                    recording: Recording::new(Head::of(&parts, has_deadline), captured),
                    policy,
                    shared: self.shared.handle().clone(),
                    deadline,
                };
                let request = first_request(parts, body, recorded, deadline);
                let span = h.span(1);
                let fut = {
                    let _entered = span.enter();
                    self.inner.call(request)
                };
                return ResponseFuture::boxed(Box::pin(hedge(h, fut, span)));
            }
        };
        let ctx = Ctx {
            recording: Recording::new(Head::of(&parts, has_deadline), captured),
            policy,
            shared: self.shared.handle().clone(),
            attempts: 1,
            backoff_n: 0,
            deadline,
            first_ended: None,
            last_retry: LastRetry::default(),
        };
        let request = first_request(parts, body, recorded, deadline);
        // The attempt's span is entered while the service is called, so a
        // layer below sees it as the current span.
        let span = ctx.span(None, None);
        // The first attempt goes through the service that was made ready;
        // a retry, if one is due, through a clone made then.
        let fut = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        ResponseFuture::first(fut, span, ctx)
    }
}
