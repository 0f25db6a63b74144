//! Counting attempts and failures below the retry layer.
//!
//! [`CountAttempts`] sits between the retry layer and the circuit breaker,
//! so it sees every attempt the retry layer makes (the first one included,
//! and attempts an open breaker then refuses). A caller that puts an
//! [`AttemptCounter`] in a request's extensions reads afterwards how many
//! attempts its call took: the retry layer copies the request's extensions
//! onto every attempt, and the counter is a shared atomic.
//!
//! It also counts, per breaker, the attempts that ended with a code the
//! breakers count as a failure (and that a breaker did not refuse): the
//! `failureCount` of the operations API. The breaker registry does not
//! expose its own counters, so this is the gateway's view of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};

use grpc_circuit_breaker::DEFAULT_FAILURE_CODES;
use grpc_resilience_core::error::{LocalRejection, error_code, find_error};
use grpc_resilience_core::{BoxError, OnOutcome, Outcome, OutcomeBody};
use tower_layer::Layer;
use tower_service::Service;

/// How many attempts one call took; put a clone in the request's
/// extensions before the call, read it after.
#[derive(Clone, Debug, Default)]
pub struct AttemptCounter(Arc<AtomicU32>);

impl AttemptCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attempts counted so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Which downstream service a call went to, by gRPC service name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Downstream {
    /// `catalog.v1.CommandService`.
    Command,
    /// `catalog.v1.QueryService`.
    Query,
}

impl Downstream {
    /// The breaker name of the service: `command` or `query`.
    pub fn name(self) -> &'static str {
        match self {
            Downstream::Command => "command",
            Downstream::Query => "query",
        }
    }

    fn of_path(path: &str) -> Option<Self> {
        if path.starts_with("/catalog.v1.CommandService/") {
            Some(Downstream::Command)
        } else if path.starts_with("/catalog.v1.QueryService/") {
            Some(Downstream::Query)
        } else {
            None
        }
    }
}

/// Failed attempts per downstream service since its breaker last closed.
#[derive(Debug, Default)]
pub struct FailureCounts {
    command: AtomicU64,
    query: AtomicU64,
}

impl FailureCounts {
    fn slot(&self, service: Downstream) -> &AtomicU64 {
        match service {
            Downstream::Command => &self.command,
            Downstream::Query => &self.query,
        }
    }

    /// Failed attempts counted for `service`.
    pub fn get(&self, service: Downstream) -> u64 {
        self.slot(service).load(Ordering::Relaxed)
    }

    /// Forgets the failures of `service` (its breaker closed).
    pub fn clear(&self, service: Downstream) {
        self.slot(service).store(0, Ordering::Relaxed);
    }

    fn bump(&self, service: Downstream) {
        self.slot(service).fetch_add(1, Ordering::Relaxed);
    }
}

/// Applies [`CountAttempts`].
#[derive(Clone, Debug)]
pub struct CountAttemptsLayer {
    failures: Arc<FailureCounts>,
}

impl CountAttemptsLayer {
    /// A layer counting failures into `failures`.
    pub fn new(failures: Arc<FailureCounts>) -> Self {
        CountAttemptsLayer { failures }
    }
}

impl<S> Layer<S> for CountAttemptsLayer {
    type Service = CountAttempts<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountAttempts {
            inner,
            failures: self.failures.clone(),
        }
    }
}

/// Counts attempts (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct CountAttempts<S> {
    inner: S,
    failures: Arc<FailureCounts>,
}

/// Records a failed attempt when the response's outcome is known.
#[derive(Debug)]
pub struct RecordOutcome {
    failures: Arc<FailureCounts>,
    service: Option<Downstream>,
}

impl OnOutcome for RecordOutcome {
    fn on_outcome(self, outcome: Outcome) {
        if let (Some(service), Outcome::Status(code) | Outcome::Error(code)) =
            (self.service, outcome)
            && DEFAULT_FAILURE_CODES.contains(code)
        {
            self.failures.bump(service);
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for CountAttempts<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = http::Response<OutcomeBody<RB, RecordOutcome>>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(counter) = request.extensions().get::<AttemptCounter>() {
            counter.0.fetch_add(1, Ordering::Relaxed);
        }
        let service = Downstream::of_path(request.uri().path());
        let failures = self.failures.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(response) => Ok(OutcomeBody::wrap_response(
                    response,
                    RecordOutcome { failures, service },
                )),
                Err(err) => {
                    let err: BoxError = err.into();
                    let refused = find_error::<LocalRejection>(&*err).is_some();
                    if let (Some(service), false) = (service, refused)
                        && DEFAULT_FAILURE_CODES.contains(error_code(&*err))
                    {
                        failures.bump(service);
                    }
                    Err(err)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Empty;
    use tonic::Status;
    use tower::ServiceExt;
    use tower_test::mock;

    type Mock = mock::Mock<http::Request<()>, http::Response<Empty<Bytes>>>;

    fn request(path: &str, counter: &AttemptCounter) -> http::Request<()> {
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        request.extensions_mut().insert(counter.clone());
        request
    }

    fn trailers_only(code: u8) -> http::Response<Empty<Bytes>> {
        http::Response::builder()
            .header("grpc-status", code.to_string())
            .body(Empty::new())
            .unwrap()
    }

    const GET: &str = "http://x/catalog.v1.QueryService/GetProduct";
    const CREATE: &str = "http://x/catalog.v1.CommandService/CreateProduct";

    #[tokio::test]
    async fn every_attempt_of_a_call_counts_on_its_counter() {
        let failures = Arc::new(FailureCounts::default());
        let (service, mut handle): (Mock, _) = mock::pair();
        let mut service = CountAttemptsLayer::new(failures.clone()).layer(service);
        let counter = AttemptCounter::new();
        for _ in 0..3 {
            handle.allow(1);
            let call = service.ready().await.unwrap().call(request(GET, &counter));
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(trailers_only(0));
            call.await.unwrap();
        }
        assert_eq!(counter.get(), 3);
        assert_eq!(failures.get(Downstream::Query), 0, "OK is no failure");
    }

    #[tokio::test]
    async fn failure_codes_count_per_service_client_errors_and_rejections_do_not() {
        let failures = Arc::new(FailureCounts::default());
        let (service, mut handle): (Mock, _) = mock::pair();
        let mut service = CountAttemptsLayer::new(failures.clone()).layer(service);
        let counter = AttemptCounter::new();

        // UNAVAILABLE (14) and NOT_FOUND (5) from the server.
        for (path, code) in [(GET, 14), (GET, 5), (CREATE, 14)] {
            handle.allow(1);
            let call = service.ready().await.unwrap().call(request(path, &counter));
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(trailers_only(code));
            call.await.unwrap();
        }
        assert_eq!(failures.get(Downstream::Query), 1);
        assert_eq!(failures.get(Downstream::Command), 1);

        // A breaker's rejection below is not a failure of the service; a
        // transport error is.
        handle.allow(1);
        let call = service.ready().await.unwrap().call(request(GET, &counter));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_error(LocalRejection::new(Status::unavailable("open")));
        assert!(call.await.is_err());
        assert_eq!(failures.get(Downstream::Query), 1);

        handle.allow(1);
        let call = service.ready().await.unwrap().call(request(GET, &counter));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_error(std::io::Error::other("connection reset"));
        assert!(call.await.is_err());
        assert_eq!(failures.get(Downstream::Query), 2);

        failures.clear(Downstream::Query);
        assert_eq!(failures.get(Downstream::Query), 0);
        assert_eq!(failures.get(Downstream::Command), 1);
    }
}
