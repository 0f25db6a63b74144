//! The per-attempt timeout's place in the stack: a
//! [`grpc_timeout::Timeout`]'s state (its policy and each method's
//! timeout) when `[timeouts] per_attempt` is set, and nothing at all (no
//! header parse, no timer) when it is not.
//!
//! Its work is done in the [`Guard`](crate::future::Guard)'s future and
//! body, not in a future and body of its own: an attempt with a deadline
//! keeps the deadline's [`Watch`] (its head timer) in one box, the only
//! allocation the timeout adds, and its body's deadline rides in the one
//! body wrapper of the call. A box, not an inline state: the stack's
//! future is a type fixed at compile time, so an inline timer would make
//! every call's future larger, and every move of it dearer, whether the
//! timeout is configured or not.

use std::pin::Pin;
use std::task::{Context, Poll};

use grpc_resilience_core::{BoxError, Unobserved};
use grpc_timeout::Timeout;
use grpc_timeout::future::Watch;
use tower_service::Service;

/// The per-attempt timeout of a [`ResilientChannel`](crate::ResilientChannel)
/// stack, on or off, with the service each attempt is sent to.
#[derive(Clone, Debug)]
pub enum Attempt<S> {
    /// No per-attempt timeout: calls go straight to the service.
    Off(S),
    /// Each attempt bounded by the per-attempt policy.
    On(Timeout<S>),
}

/// The head timer of an attempt sent with a deadline of its own.
pub(crate) type AttemptWatch = Pin<Box<Watch<Unobserved>>>;

impl<S> Attempt<S> {
    /// Readiness of the service each attempt is sent to.
    pub(crate) fn poll_ready<B>(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>
    where
        S: Service<http::Request<B>>,
        S::Error: Into<BoxError>,
    {
        match self {
            Attempt::Off(s) => s.poll_ready(cx).map_err(Into::into),
            Attempt::On(t) => t.get_mut().poll_ready(cx).map_err(Into::into),
        }
    }

    /// Sends one attempt: with a per-attempt timeout, its deadline is the
    /// earlier of the call's and the per-try one, written to
    /// `grpc-timeout` and recorded on the request, and watched by the
    /// [`AttemptWatch`] returned with the future.
    ///
    /// # Errors
    ///
    /// The attempt's `DEADLINE_EXCEEDED` when no time is left to send it
    /// (it is not sent).
    pub(crate) fn send<B>(
        &mut self,
        request: http::Request<B>,
    ) -> Result<(S::Future, Option<AttemptWatch>), BoxError>
    where
        S: Service<http::Request<B>>,
    {
        // Below retry and breaker, inside the attempt's span: each attempt
        // carries its own span as the server span's parent.
        #[cfg(feature = "opentelemetry")]
        let request = {
            let mut request = request;
            grpc_otel::inject_context(
                &grpc_otel::TraceContextPropagator::new(),
                request.headers_mut(),
            );
            request
        };
        match self {
            Attempt::Off(s) => Ok((s.call(request), None)),
            Attempt::On(t) => {
                let mut request = request;
                match t.prepare(&mut request) {
                    Ok(None) => Ok((t.get_mut().call(request), None)),
                    Ok(Some(deadline)) => {
                        let watch = Watch::new(Some(deadline), t.times_the_head(), None);
                        Ok((t.get_mut().call(request), Some(Box::pin(watch))))
                    }
                    Err(expired) => {
                        let watch = std::pin::pin!(Watch::<Unobserved>::expired(expired, None));
                        Err(watch.unsent())
                    }
                }
            }
        }
    }
}
