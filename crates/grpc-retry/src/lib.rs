//! Transparent gRPC retries for tonic channels.
//!
//! [`RetryLayer`] wraps a tonic `Channel` so that every generated stub
//! method is retried as gRPC's own retry design (gRFC A6) says, although
//! tonic request bodies are not `Clone` (tonic issue #733):
//!
//! * **Body replay.** The request body is recorded lazily as the first
//!   attempt sends it (zero-copy `Bytes`, trailers included) and replayed
//!   byte for byte. Limits: 256 KiB per call and 16 MiB per layer by
//!   default; a call over either is still sent, just not retried.
//!   Client-streaming calls are retried while they fit; a retry that starts
//!   before the first attempt's body is done goes on reading the original.
//! * **Commit rule.** Once non-Trailers-Only response headers arrive, the
//!   call is committed and returned; it is never retried after that. A
//!   Trailers-Only response with a retryable code is retried.
//! * **Which failures.** The policy's retryable codes (the seed's:
//!   `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`,
//!   `INTERNAL`); transport errors count as `UNAVAILABLE`. A call the server
//!   provably never processed (connection refused, `REFUSED_STREAM`, above a
//!   graceful `GOAWAY`) is retried even for non-idempotent methods. A call a
//!   layer below refused ([`LocalRejection`](grpc_resilience_core::error::LocalRejection),
//!   an open breaker) is not retried.
//! * **Writes.** A method marked [`RetryPolicy::non_idempotent`] is only
//!   retried transparently, unless [`RetryPolicy::with_idempotency_keys`]
//!   sends one random `idempotency-key` per logical call, the same on every
//!   attempt.
//! * **Backoff.** `min(initial * multiplier^(n-1), max_delay)` with
//!   [`Jitter`]; a delay never exceeds `max_delay`. Server pushback
//!   (`grpc-retry-pushback-ms`) is waited exactly and resets the backoff;
//!   a negative, malformed or repeated value stops retrying and the caller
//!   gets the server's status.
//! * **Deadline.** With a `grpc-timeout` on the request (the caller's or the
//!   timeout layer's above), no backoff sleeps past it, no attempt starts
//!   after it, and each attempt's `grpc-timeout` carries the time left.
//!   Attempts after the first carry `grpc-previous-rpc-attempts`.
//! * **Throttling.** An optional [`RetryThrottle`] (A6's token bucket).
//! * **Cost.** Methods without a policy pass straight through: no
//!   buffering, no allocation. Dropping the call future stops everything.
//!
//! # Example
//!
//! ```
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_retry::{RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policies = RetryPolicies::new(RetryPolicy::default())?
//!     .with_operation("CreateProduct", RetryPolicy::default().non_idempotent())?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(RetryLayer::new(policies).with_throttle(RetryThrottle::new(10.0, 0.1)?))
//!     .service(channel);
//! let mut client = QueryServiceClient::new(channel);
//! # let _ = &mut client;
//! # Ok(())
//! # }
//! ```
//!
//! A single call can change its policy with a [`RetryOverride`] in the
//! request's extensions, as the seed's `ResilientClient.call(fn, %{retry:
//! ...})` does.
//!
//! # Telemetry
//!
//! `grpc.retry.count` (labels `service`, `method`, `code`) per retry,
//! `grpc.retry.duration` (seconds a retried call spent after its first
//! attempt), `grpc.retry.throttled` and `grpc.retry.buffer_exceeded`
//! (calls not retried for those reasons). Each retry logs a WARN worded as
//! the seed's, `gRPC call failed with unavailable, retrying in 200ms
//! (attempt 1/3)`, with the fields `service`, `method`, `code`, `attempt`,
//! `delay_ms`; each attempt runs in a `grpc_attempt` span with its number.

mod backoff;
mod decide;
pub mod future;
mod layer;
mod policy;
mod replay;
mod throttle;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use grpc_resilience_core::{BoxError, CodeSet, MethodId, timeout_header};
use http::Request;
use tokio::time::Instant;
use tower_service::Service;

pub use backoff::{Jitter, base_delay, jittered};
pub use layer::{DEFAULT_PER_CALL_BUFFER, DEFAULT_TOTAL_BUFFER, RetryLayer};
pub use policy::{DEFAULT_RETRYABLE_CODES, RetryConfigError, RetryPolicies, RetryPolicy};
pub use replay::{ReplayBody, ReplayableBody};
pub use throttle::RetryThrottle;

use future::{Ctx, Head, ResponseFuture};
use replay::{Limits, ReplayBody as Replay};

/// The header that carries the idempotency key.
pub const IDEMPOTENCY_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-key");

#[derive(Debug)]
pub(crate) struct Shared {
    policies: RetryPolicies,
    throttle: Option<Arc<RetryThrottle>>,
    limits: Arc<Limits>,
}

/// Changes the retry policy of one call: put it in the request's
/// extensions (`tonic::Request::extensions_mut().insert(...)`). Unset
/// fields keep the method's policy (or the default policy, for a method
/// that has none).
///
/// ```
/// use std::time::Duration;
/// use grpc_retry::RetryOverride;
///
/// let mut request = tonic::Request::new(());
/// request
///     .extensions_mut()
///     .insert(RetryOverride::new().with_max_attempts(3).with_initial_delay(Duration::from_millis(200)));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RetryOverride {
    max_attempts: Option<u32>,
    initial_delay: Option<Duration>,
    max_delay: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<Jitter>,
    retryable_codes: Option<CodeSet>,
    disabled: bool,
}

impl RetryOverride {
    /// Changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// No retry for this call.
    pub fn disabled() -> Self {
        RetryOverride {
            disabled: true,
            ..Self::default()
        }
    }

    /// See [`RetryPolicy::with_max_attempts`].
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    /// See [`RetryPolicy::with_initial_delay`].
    pub fn with_initial_delay(mut self, d: Duration) -> Self {
        self.initial_delay = Some(d);
        self
    }

    /// See [`RetryPolicy::with_max_delay`].
    pub fn with_max_delay(mut self, d: Duration) -> Self {
        self.max_delay = Some(d);
        self
    }

    /// See [`RetryPolicy::with_multiplier`].
    pub fn with_multiplier(mut self, m: f64) -> Self {
        self.multiplier = Some(m);
        self
    }

    /// See [`RetryPolicy::with_jitter`].
    pub fn with_jitter(mut self, j: Jitter) -> Self {
        self.jitter = Some(j);
        self
    }

    /// See [`RetryPolicy::with_retryable_codes`].
    pub fn with_retryable_codes(mut self, c: CodeSet) -> Self {
        self.retryable_codes = Some(c);
        self
    }

    fn apply(&self, base: RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            initial_delay: self.initial_delay.unwrap_or(base.initial_delay),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            multiplier: self.multiplier.unwrap_or(base.multiplier),
            jitter: self.jitter.unwrap_or(base.jitter),
            retryable_codes: self.retryable_codes.unwrap_or(base.retryable_codes),
            ..base
        }
    }
}

/// Retries gRPC calls; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Retry<S> {
    /// Wraps `inner`, retrying as `policies` say.
    pub fn new(inner: S, policies: RetryPolicies) -> Self {
        tower_layer::Layer::layer(&RetryLayer::new(policies), inner)
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

fn idempotency_key() -> http::HeaderValue {
    let n: u128 = rand::random();
    http::HeaderValue::from_str(&format!("{n:032x}")).expect("hex digits are a valid header value")
}

impl<S, B, R> Service<Request<B>> for Retry<S>
where
    S: Service<Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let configured = match MethodId::from_request(&request) {
            Ok(method) => self.shared.policies.get(&method).copied(),
            Err(_) => None,
        };
        let policy = match request.extensions().get::<RetryOverride>() {
            None => configured,
            Some(o) if o.disabled => None,
            Some(o) => {
                let policy = o.apply(configured.unwrap_or_default());
                if let Err(err) = policy.validate() {
                    return ResponseFuture::failed(Box::new(tonic::Status::invalid_argument(
                        format!("invalid RetryOverride: {err}"),
                    )));
                }
                Some(policy)
            }
        };
        let Some(policy) = policy.filter(|p| p.max_attempts > 1) else {
            return ResponseFuture::passthrough(self.inner.call(request));
        };

        let deadline = match timeout_header::from_headers(request.headers()) {
            Ok(Some(timeout)) => Instant::now().checked_add(timeout),
            _ => None,
        };
        let (mut parts, body) = request.into_parts();
        if policy.idempotency_keys && !parts.headers.contains_key(IDEMPOTENCY_KEY) {
            parts.headers.insert(IDEMPOTENCY_KEY, idempotency_key());
        }
        let head = Head::of(&parts);
        let (body, recording) = Replay::first(body, self.shared.limits.clone(), head);
        let request = Request::from_parts(parts, B::from_replay(body));

        // Call the service that was made ready; keep a clone for retries.
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        let fut = service.call(request);
        let ctx = Ctx {
            service,
            recording,
            policy,
            shared: self.shared.clone(),
            attempts: 1,
            backoff_n: 0,
            deadline,
            first_ended: None,
        };
        ResponseFuture::first(fut, ctx)
    }
}

#[cfg(test)]
mod tests;
