//! Per-method gRPC deadlines for tonic channels.
//!
//! [`TimeoutLayer`] wraps a tonic `Channel` (or any
//! `Service<http::Request<B>>` that speaks gRPC) so that every call of every
//! generated stub method runs under a deadline:
//!
//! * the deadline is the method's configured timeout ([`TimeoutPolicy`]: a
//!   default plus per-operation values), or the caller's own deadline when
//!   that is earlier: a [`CallDeadline`] already on the request (recorded
//!   by a layer above), else the caller's `grpc-timeout`
//!   (`tonic::Request::set_timeout`);
//! * the result is recorded on the request as its [`CallDeadline`]
//!   extension, one absolute instant that every layer below reads instead
//!   of re-deriving it from the rounded header;
//! * the request carries `grpc-timeout` written from that instant when the
//!   inner service is called, so the server knows the time really left;
//!   the value is rounded down, never above it;
//! * a call whose deadline has already passed (a caller's `grpc-timeout`
//!   of `0n`, a spent budget) fails at once with `DEADLINE_EXCEEDED` and
//!   is not sent;
//! * the deadline is enforced locally: no response in time and the stub's
//!   caller gets `Code::DeadlineExceeded`;
//! * it also bounds a streaming response: a server stream that runs past
//!   the deadline ends with `DEADLINE_EXCEEDED`, and the stream is reset so
//!   the server sees the call cancelled. The deadline is checked on every
//!   message read from the body (one clock read), so it holds even when
//!   the next message is always already there;
//! * a malformed `grpc-timeout` from the caller is dropped, with a WARN,
//!   rather than forwarded; a transport failure keeps the code of its
//!   HTTP/2 reason ([`grpc_resilience_core::error::transport_code`]); a
//!   `grpc-status-details-bin` that is not valid base64 is removed from
//!   response headers and trailers, since tonic panics on one.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let policy = TimeoutPolicy::new(Duration::from_secs(5))?
//!     .with_operation("ListProducts", Duration::from_secs(10))?
//!     .with_operation("GetProduct", Duration::from_secs(3))?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(policy))
//!     .service(channel);
//!
//! // The stub is unchanged; every method now has its deadline.
//! let mut client = QueryServiceClient::new(channel);
//! # let _ = &mut client;
//! # Ok(())
//! # }
//! ```
//!
//! # Per attempt
//!
//! Below a retry layer, [`TimeoutLayer::per_attempt`] bounds each attempt
//! (as Envoy's per-try timeout) while the outer deadline bounds the call:
//! an attempt's deadline is the earlier of the call's [`CallDeadline`] and
//! now plus the per-try timeout, and it is recorded on the attempt's
//! request.
//!
//! # One timer with a tonic `Channel`
//!
//! A tonic `Channel` enforces the `grpc-timeout` it is sent with a timer
//! of its own, failing the call when the response head has not come in
//! time (this layer reports that as `DEADLINE_EXCEEDED`, as if its own
//! timer had fired). [`TimeoutLayer::rely_on_channel_for_head`] drops this
//! layer's head timer and keeps only the body's, which the channel does
//! not have (it bounds the head only), saving a timer per call.
//!
//! It is off by default, and the `grpc-resilience` facade leaves it off,
//! because the channel's timer does not cover everything: it starts only
//! once the channel has a connection (it sits below the channel's buffer,
//! per connection), so a call that waits for a connection that never
//! completes (a host that drops every packet, with no
//! `Endpoint::connect_timeout`) would outlive its deadline. Turn it on only
//! where connecting is bounded well below your deadlines
//! (`Endpoint::connect_timeout`), over nothing that can wait past the
//! deadline before the request reaches the channel (a balancer waiting for
//! a ready endpoint; a `grpc_bulkhead` queue ends at the call's deadline),
//! and over a service that does enforce `grpc-timeout`.
//!
//! A head timer is made only once the inner service's future has to wait:
//! a response that is there at once costs no timer.
//!
//! # Telemetry
//!
//! Each expiry increments the counter `grpc.timeout.count` (labels
//! `service`, `method`, `scope` = `call` or `attempt`) and logs a `tracing`
//! event: WARN for a call, DEBUG for an attempt. The success path records
//! nothing and allocates nothing.
//!
//! To record each call's outcome (its own metrics, a span's status) around
//! this layer, call it with [`Timeout::call_observed`]: the observer rides
//! in this layer's future and body, so the call has no extra level to
//! move and poll.
//!
//! # Fused into another service
//!
//! A service that does more per call than this layer (retries, say) can
//! do this layer's work in its own future instead of wrapping this layer's:
//! [`Timeout::prepare`] starts a call (the deadline worked out, the header
//! written, the [`CallDeadline`] recorded), a [`future::Watch`] in its
//! future holds the call to the deadline, and the answer's body is bounded
//! by a [`future::TimeoutBody`], its own or one a layer below made
//! ([`TimeoutBody::bound_by`](future::TimeoutBody::bound_by)). The
//! `grpc-resilience` facade runs its deadline, retries and call telemetry
//! as one future and one body wrapper this way.
//!
//! # Cost
//!
//! A method's timeout is worked out once per layer (its path parsed, its
//! policy looked up): every service the layer makes shares what it found
//! for each method, and each remembers its last method by the address of
//! the stub's static path.

mod error;
pub mod future;
mod layer;
mod policy;

use std::sync::Arc;
use std::task::{Context, Poll};

use grpc_resilience_core::{BoxError, LastMethod, MethodTable, OnOutcome, timeout_header};
pub use grpc_resilience_core::{CallDeadline, Scope};
use tokio::time::Instant;
use tower_service::Service;

pub use error::Elapsed;
pub use layer::TimeoutLayer;
use policy::Entry;
pub use policy::{MAX_TIMEOUT, TimeoutConfigError, TimeoutPolicy};

use future::{Deadline, ResponseFuture, TimeoutBody};

/// A layer's policy and each method's timeout, worked out once per method
/// and shared by every service the layer makes.
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) policy: TimeoutPolicy,
    pub(crate) methods: MethodTable<Option<Entry>>,
}

impl Resolved {
    pub(crate) fn new(policy: TimeoutPolicy) -> Self {
        Resolved {
            policy,
            methods: MethodTable::default(),
        }
    }
}

/// Enforces per-method gRPC deadlines; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    policy: Arc<Resolved>,
    scope: Scope,
    head_timer: bool,
    // The last method called and its configured timeout.
    last: LastMethod<Option<Entry>>,
}

impl<S> Timeout<S> {
    /// Wraps `inner`, enforcing `policy` per call.
    pub fn new(inner: S, policy: TimeoutPolicy) -> Self {
        Self::from_parts(inner, Arc::new(Resolved::new(policy)), Scope::Call, true)
    }

    pub(crate) fn from_parts(
        inner: S,
        policy: Arc<Resolved>,
        scope: Scope,
        head_timer: bool,
    ) -> Self {
        Timeout {
            inner,
            policy,
            scope,
            head_timer,
            last: LastMethod::default(),
        }
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

impl<S, B, ResBody> Service<http::Request<B>> for Timeout<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<TimeoutBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.call_observed(request, None)
    }
}

impl<S> Timeout<S> {
    /// Calls the service like [`Service::call`], with `observer` told the
    /// call's outcome once: from the response head, the body's trailers or
    /// error, the deadline, or `CANCELLED` when the caller drops the call
    /// before its response or the body before its end (as
    /// [`OutcomeBody`](grpc_resilience_core::OutcomeBody) reports it).
    /// While the call is made and its future polled, the observer's
    /// [`span`](OnOutcome::span) is entered.
    ///
    /// It is what a wrapper that records each call (metrics, a span's
    /// status) would otherwise do with one more future and one more body
    /// around this layer's: carried here, a call's future and its body are
    /// each one level shallower, so less is moved and polled per call. (A
    /// service that fuses this layer's work into its own future goes one
    /// step further: see [`Watch`](future::Watch).)
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use grpc_resilience_core::Outcome;
    /// use grpc_timeout::{Timeout, TimeoutPolicy};
    /// use http_body_util::BodyExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let server = tower::service_fn(|_: http::Request<String>| async {
    ///     let mut trailers = http::HeaderMap::new();
    ///     trailers.insert("grpc-status", "5".parse().unwrap());
    ///     let body = http_body_util::Full::new(bytes::Bytes::new())
    ///         .with_trailers(async { Some(Ok(trailers)) });
    ///     Ok::<_, std::convert::Infallible>(http::Response::new(body))
    /// });
    /// let policy = TimeoutPolicy::new(Duration::from_secs(1)).unwrap();
    /// let mut timeout = Timeout::new(server, policy);
    ///
    /// let seen = Arc::new(Mutex::new(None));
    /// let record = { let seen = seen.clone(); move |o: Outcome| *seen.lock().unwrap() = Some(o) };
    /// let request = http::Request::builder()
    ///     .uri("http://catalog/catalog.v1.QueryService/GetProduct")
    ///     .body(String::new())
    ///     .unwrap();
    /// tower::ServiceExt::<http::Request<String>>::ready(&mut timeout).await.unwrap();
    /// let response = timeout.call_observed(request, Some(record)).await.unwrap();
    /// response.into_body().collect().await.unwrap();
    /// assert_eq!(*seen.lock().unwrap(), Some(Outcome::Status(tonic::Code::NotFound)));
    /// # }
    /// ```
    #[inline(always)]
    pub fn call_observed<B, ResBody, O>(
        &mut self,
        mut request: http::Request<B>,
        observer: Option<O>,
    ) -> ResponseFuture<S::Future, O>
    where
        S: Service<http::Request<B>, Response = http::Response<ResBody>>,
        S::Error: Into<BoxError>,
        O: OnOutcome,
    {
        // In the observer's span, left as the inner service returns its
        // future, so that the observer can move into this layer's.
        let entered = future::enter(&observer);
        match self.prepare(&mut request) {
            Ok(deadline) => {
                let head_timer = self.head_timer && deadline.is_some();
                let sent = send(&mut self.inner, request, entered);
                ResponseFuture::new(sent, deadline, head_timer, observer)
            }
            Err(expired) => {
                // No time left: fail now, without sending anything.
                drop(entered);
                ResponseFuture::expired(expired, observer)
            }
        }
    }

    /// The first half of a call, for a service that fuses this layer's work
    /// with its own (see [`Watch`](future::Watch)): works out the call's
    /// deadline as [`Service::call`] does, writes `grpc-timeout` and records
    /// the [`CallDeadline`] on `request`, which is then to be sent.
    ///
    /// `Ok(None)`: the call has no deadline. `Ok(Some(deadline))`: send it
    /// and watch it with a [`Watch`](future::Watch) made of `deadline` and
    /// [`times_the_head`](Self::times_the_head). `Err(deadline)`: no time
    /// is left, so the call must not be sent; a watch made with
    /// [`Watch::expired`](future::Watch::expired) fails it with
    /// `DEADLINE_EXCEEDED`.
    ///
    /// # Errors
    ///
    /// The call's deadline, when it has already passed.
    #[inline(always)]
    pub fn prepare<B>(
        &mut self,
        request: &mut http::Request<B>,
    ) -> Result<Option<future::Deadline>, future::Deadline> {
        let Resolved { policy, methods } = &*self.policy;
        let configured = self
            .last
            .get_or_insert_from(request.uri(), methods, |id| {
                policy.entry(id.as_ref()).cloned()
            })
            .as_ref();
        // One clock read per call: the deadlines below and the grpc-timeout
        // written are all from this instant, taken as the inner service is
        // called.
        let now = Instant::now();
        let recorded = request.extensions().get::<CallDeadline>().copied();
        // The caller's deadline: the recorded instant, else the header.
        let (caller, from_header) = match recorded {
            Some(deadline) => (Some(deadline), false),
            None => match timeout_header::from_headers(request.headers()) {
                // A timeout too long to represent is no deadline.
                Ok(Some(timeout)) => (now.checked_add(timeout).map(CallDeadline::at), true),
                Ok(None) => (None, false),
                Err(err) => {
                    tracing::warn!(
                        %err,
                        value = ?request.headers().get(timeout_header::GRPC_TIMEOUT),
                        "dropping the caller's malformed grpc-timeout"
                    );
                    request.headers_mut().remove(timeout_header::GRPC_TIMEOUT);
                    (None, false)
                }
            },
        };
        let ours = configured.and_then(|entry| Some((now.checked_add(entry.timeout)?, entry)));
        let deadline = match (caller, ours) {
            (_, Some((at, entry))) if caller.is_none_or(|c| at < c.instant()) => {
                // The policy's deadline is the earlier one: its header,
                // encoded once, says exactly the time left.
                request
                    .headers_mut()
                    .insert(timeout_header::GRPC_TIMEOUT, entry.header.clone());
                CallDeadline::at(at)
            }
            (Some(caller), _) => {
                // The caller's header was read at `now`, so it already says
                // exactly the time left; a recorded instant is written out.
                if !from_header {
                    caller.write_header(request.headers_mut(), now);
                }
                caller
            }
            (None, _) => return Ok(None),
        };
        let info = Deadline {
            at: deadline.instant(),
            sent: now,
            scope: self.scope,
            path: request.uri().path_and_query().cloned(),
        };
        if deadline.has_passed_at(now) {
            return Err(info);
        }
        if recorded != Some(deadline) {
            deadline.insert_into(request);
        }
        Ok(Some(info))
    }

    /// Whether this service times the response head itself (see
    /// [`TimeoutLayer::rely_on_channel_for_head`]).
    pub fn times_the_head(&self) -> bool {
        self.head_timer
    }
}

/// Calls `inner`, then leaves the span `entered` (if any).
#[inline(always)]
fn send<S: Service<R>, R>(
    inner: &mut S,
    request: R,
    entered: Option<tracing::span::Entered<'_>>,
) -> S::Future {
    let future = inner.call(request);
    drop(entered);
    future
}

#[cfg(test)]
mod tests;
