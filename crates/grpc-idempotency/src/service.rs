//! The service: picks the calls the layer covers and reads their key.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use grpc_resilience_core::{MethodId, headers};
use http::{Request, Response};
use http_body::Body;
use tonic::Status;
use tonic::server::NamedService;
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::config::MAX_KEY_LEN;
use crate::future::{self, ResponseFuture};
use crate::layer::Shared;
use crate::stats::Event;
use crate::store::Store;

/// A tonic server (or any gRPC `Service`) whose named methods run once per
/// idempotency key. Made by [`IdempotencyLayer`](crate::IdempotencyLayer).
pub struct Idempotency<S, St> {
    inner: S,
    shared: Arc<Shared<St>>,
}

impl<S, St> Idempotency<S, St> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<St>>) -> Self {
        Idempotency { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, St> Clone for Idempotency<S, St> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, St> fmt::Debug for Idempotency<S, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// Served under the wrapped server's name, so a wrapped generated server
/// goes to `Server::add_service` as the server itself would.
impl<S: NamedService, St> NamedService for Idempotency<S, St> {
    const NAME: &'static str = S::NAME;
}

impl<S, St, B, RB> Service<Request<B>> for Idempotency<S, St>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    St: Store,
    B: Body<Data = Bytes> + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Send + 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let settings = &self.shared.settings;
        let covered = match MethodId::from_request(&request) {
            Ok(id) => settings.methods.get(&id).is_some(),
            Err(_) => false,
        };
        if !covered {
            return ResponseFuture::passthrough(
                self.inner.call(request.map(RequestBody::passthrough)),
            );
        }
        let key = match headers::get(request.headers(), &settings.key_header) {
            None if !settings.require_key => {
                return ResponseFuture::passthrough(
                    self.inner.call(request.map(RequestBody::passthrough)),
                );
            }
            None => Err("is required for this method"),
            Some(value) => match value.to_str() {
                Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_LEN => Ok(key.to_owned()),
                Ok("") => Err("is empty"),
                Ok(_) => Err("is longer than 255 bytes"),
                Err(_) => Err("holds bytes that are not visible ASCII"),
            },
        };
        let key = match key {
            Ok(key) => key,
            Err(problem) => {
                let (service, method) = labels(request.uri().path());
                let reason = if problem.starts_with("is required") {
                    "missing_key"
                } else {
                    "invalid_key"
                };
                self.shared
                    .counters
                    .count(Event::Rejected(reason), service, method);
                let message = format!("the `{}` header {problem}", settings.key_header);
                tracing::debug!(service, method, "{message}");
                return ResponseFuture::ready(future::status_response(Status::invalid_argument(
                    message,
                )));
            }
        };
        // The ready service goes into the future; this one is a fresh clone.
        let inner = grpc_resilience_core::take_ready(&mut self.inner);
        ResponseFuture::keyed(Box::pin(future::keyed(
            self.shared.clone(),
            inner,
            request,
            key,
        )))
    }
}

/// Service and method names for labels; the whole path as the method when
/// it is not a gRPC path.
pub(crate) fn labels(path: &str) -> (&str, &str) {
    match MethodId::from_path(path) {
        Ok(id) => (id.service(), id.method()),
        Err(_) => ("", path),
    }
}
