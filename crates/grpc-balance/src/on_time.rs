//! What the balancer's buffer hands on: a call that waited in the buffer
//! for a ready endpoint is sent with the time it has left, or not at all.

use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use grpc_resilience_core::error::LocalRejection;
use grpc_resilience_core::{BoxError, CallDeadline};
use tokio::time::Instant;
use tower_service::Service;

/// Sends each request the buffer's worker hands it: with `grpc-timeout`
/// rewritten to the time left now (the call may have waited in the buffer
/// while no endpoint was ready), or, when its deadline has passed, not at
/// all (`DEADLINE_EXCEEDED`, a local refusal).
///
/// The deadline is the [`CallDeadline`] the request carries:
/// [`BalancedChannel`](crate::BalancedChannel) records it from the
/// caller's `grpc-timeout` as the call enters the buffer, if no layer
/// above did.
#[derive(Clone, Debug)]
pub(crate) struct OnTime<S> {
    inner: S,
}

impl<S> OnTime<S> {
    pub(crate) fn new(inner: S) -> Self {
        OnTime { inner }
    }
}

/// The error of a call whose deadline passed while it waited for an
/// endpoint.
fn too_late() -> BoxError {
    Box::new(LocalRejection::new(tonic::Status::deadline_exceeded(
        "deadline exceeded while waiting for a ready endpoint; the call was not sent",
    )))
}

impl<S, B, R> Service<http::Request<B>> for OnTime<S>
where
    S: Service<http::Request<B>, Response = R, Error = BoxError>,
{
    type Response = R;
    type Error = BoxError;
    type Future = Either<S::Future, Ready<Result<R, BoxError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(deadline) = request.extensions().get::<CallDeadline>().copied() {
            let now = Instant::now();
            if deadline.has_passed_at(now) {
                // The endpoint made ready for this call stays ready for
                // the next one.
                return Either::Right(ready(Err(too_late())));
            }
            deadline.write_header(request.headers_mut(), now);
        }
        Either::Left(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use grpc_resilience_core::error::find_error;
    use tokio::time::advance;
    use tower_test::mock;

    use super::*;

    type Req = http::Request<()>;

    fn request(deadline: Option<CallDeadline>) -> Req {
        let mut request = http::Request::builder()
            .uri("http://catalog/catalog.v1.QueryService/GetProduct")
            .header("grpc-timeout", "300m")
            .body(())
            .unwrap();
        if let Some(deadline) = deadline {
            deadline.insert_into(&mut request);
        }
        request
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_waited_is_sent_with_the_time_it_has_left() {
        let (inner, mut handle) = mock::pair::<Req, ()>();
        let mut service = OnTime::new(inner);
        let deadline = CallDeadline::after(Duration::from_millis(300)).unwrap();
        let queued = request(Some(deadline));
        advance(Duration::from_millis(200)).await;
        handle.allow(1);
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let call = service.call(queued);
        let (sent, respond) = handle.next_request().await.expect("sent");
        assert_eq!(sent.headers()["grpc-timeout"], "100000u");
        respond.send_response(());
        call.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_deadline_passed_while_it_waited_is_not_sent() {
        let (inner, mut handle) = mock::pair::<Req, ()>();
        let mut service = OnTime::new(inner);
        let queued = request(CallDeadline::after(Duration::from_millis(300)));
        advance(Duration::from_millis(300)).await;
        handle.allow(1);
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let err = service.call(queued).await.unwrap_err();
        assert!(find_error::<LocalRejection>(&*err).is_some(), "{err}");
        assert_eq!(
            tonic::Status::from_error(err).code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(handle.poll_request().is_pending(), "never sent");
        // The next call is sent as usual (the buffer's worker makes the
        // service ready before each call).
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let call = service.call(request(None));
        let (sent, respond) = handle.next_request().await.expect("the next call is sent");
        assert_eq!(
            sent.headers()["grpc-timeout"],
            "300m",
            "no deadline recorded: left as it is"
        );
        respond.send_response(());
        call.await.unwrap();
    }
}
