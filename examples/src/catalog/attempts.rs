//! Counting the attempts of a call.
//!
//! [`CountAttempts`] sits right above the tonic channel, under the facade's
//! retry layer and circuit breaker, so it sees every attempt that reaches
//! the channel (the first one included). A caller that puts an
//! [`AttemptCounter`] in a request's extensions reads afterwards how many
//! attempts its call sent: the retry layer copies the request's extensions
//! onto every attempt, and the counter is a shared atomic. An attempt an
//! open breaker refused never reaches the channel; the retry layer does not
//! retry such a refusal, so it is always the last attempt of its call, and
//! the gateway adds it (see `Gateway::call`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

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
    /// The channel and breaker name of the service: `command` or `query`.
    pub fn name(self) -> &'static str {
        match self {
            Downstream::Command => "command",
            Downstream::Query => "query",
        }
    }
}

/// Applies [`CountAttempts`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CountAttemptsLayer;

impl<S> Layer<S> for CountAttemptsLayer {
    type Service = CountAttempts<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountAttempts { inner }
    }
}

/// Counts attempts (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct CountAttempts<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for CountAttempts<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(counter) = request.extensions().get::<AttemptCounter>() {
            counter.0.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Empty;
    use tower::ServiceExt;
    use tower_test::mock;

    type Mock = mock::Mock<http::Request<()>, http::Response<Empty<Bytes>>>;

    fn request(counter: Option<&AttemptCounter>) -> http::Request<()> {
        let mut request = http::Request::builder()
            .uri("http://x/catalog.v1.QueryService/GetProduct")
            .body(())
            .unwrap();
        if let Some(counter) = counter {
            request.extensions_mut().insert(counter.clone());
        }
        request
    }

    #[tokio::test]
    async fn every_attempt_of_a_call_counts_on_its_counter() {
        let (service, mut handle): (Mock, _) = mock::pair();
        let mut service = CountAttemptsLayer.layer(service);
        let counter = AttemptCounter::new();
        let other = AttemptCounter::new();
        for counter in [Some(&counter), Some(&counter), None, Some(&counter)] {
            handle.allow(1);
            let call = service.ready().await.unwrap().call(request(counter));
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(http::Response::new(Empty::new()));
            call.await.unwrap();
        }
        assert_eq!(counter.get(), 3);
        assert_eq!(other.get(), 0);
    }
}
