//! Per-call control: a call's own retry policy, idempotency and key.

use std::task::{Context, Poll};

use grpc_resilience_core::{BoxError, headers};
use grpc_retry::{IDEMPOTENCY_KEY, ReplayableBody, Retry, RetryOverride};
use tower_service::Service;

/// Marks one call idempotent (`Idempotent(true)`: it may be retried like
/// a read, and it is sent with an `idempotency-key`, one per call and the
/// same on every attempt, so a server can deduplicate) or not
/// (`Idempotent(false)`: retried only when the server provably never saw
/// it), whatever its method's policy says. Put it in the request's
/// extensions, or use [`CallOptions::idempotent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idempotent(pub bool);

/// Per-call options for a request to a [`ResilientChannel`](crate::ResilientChannel).
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience::{CallOptions, RetryOverride};
///
/// // A write the caller knows is safe to repeat: its own key lets the
/// // server deduplicate, and is the permission to retry it.
/// let mut create = tonic::Request::new(());
/// create.idempotency_key("order-42-create")?;
///
/// // A read that must not wait: at most 2 attempts, 50 ms apart, 300 ms in all.
/// let mut get = tonic::Request::new(());
/// get.retry(RetryOverride::new().with_max_attempts(2).with_initial_delay(Duration::from_millis(50)))
///     .set_timeout(Duration::from_millis(300));
///
/// // A call that must never be repeated after the server saw it.
/// let mut charge = tonic::Request::new(());
/// charge.idempotent(false);
/// # Ok::<(), tonic::metadata::errors::InvalidMetadataValue>(())
/// ```
pub trait CallOptions {
    /// Changes this call's retry policy (see [`RetryOverride`]);
    /// `RetryOverride::disabled()` turns retries off for it.
    fn retry(&mut self, changes: RetryOverride) -> &mut Self;

    /// Marks the call idempotent or not; see [`Idempotent`].
    fn idempotent(&mut self, idempotent: bool) -> &mut Self;

    /// Sends `key` as the call's `idempotency-key`, the same on every
    /// attempt: the server can deduplicate, so a write with a key is
    /// retried like an idempotent call.
    ///
    /// # Errors
    ///
    /// If `key` is not a valid header value (visible ASCII).
    fn idempotency_key(
        &mut self,
        key: &str,
    ) -> Result<&mut Self, tonic::metadata::errors::InvalidMetadataValue>;
}

impl<T> CallOptions for tonic::Request<T> {
    fn retry(&mut self, changes: RetryOverride) -> &mut Self {
        self.extensions_mut().insert(changes);
        self
    }

    fn idempotent(&mut self, idempotent: bool) -> &mut Self {
        self.extensions_mut().insert(Idempotent(idempotent));
        self
    }

    fn idempotency_key(
        &mut self,
        key: &str,
    ) -> Result<&mut Self, tonic::metadata::errors::InvalidMetadataValue> {
        let value = key.parse()?;
        self.metadata_mut().insert("idempotency-key", value);
        Ok(self)
    }
}

/// The retry layer, in three variants of the config's policies: as
/// configured, for calls with their own key or marked idempotent (their
/// writes retried with a key), and for calls marked non-idempotent. Each
/// call goes to one; the ready inner service moves to it.
#[derive(Clone, Debug)]
pub(crate) struct PerCall<S> {
    pub(crate) normal: Retry<S>,
    pub(crate) keyed: Retry<S>,
    pub(crate) strict: Retry<S>,
}

impl<S, B, R> Service<http::Request<B>> for PerCall<S>
where
    Retry<S>: Service<http::Request<B>, Response = http::Response<R>, Error = BoxError>,
    B: ReplayableBody,
{
    type Response = http::Response<R>;
    type Error = BoxError;
    type Future = <Retry<S> as Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.normal.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let chosen = match request.extensions().get::<Idempotent>() {
            Some(Idempotent(true)) => &mut self.keyed,
            Some(Idempotent(false)) => &mut self.strict,
            None if headers::get(request.headers(), &IDEMPOTENCY_KEY).is_some() => &mut self.keyed,
            None => return self.normal.call(request),
        };
        // The service made ready is the normal variant's: hand it over.
        std::mem::swap(self.normal.get_mut(), chosen.get_mut());
        chosen.call(request)
    }
}
