//! Shared pieces of the benchmarks: a bare gRPC-like service that answers
//! at once, requests shaped as a tonic stub builds them, and a driver that
//! runs one call to its end without a scheduler in the way.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use http_body_util::Empty;
use tower::{Service, ServiceExt};

/// The path every benchmark calls.
pub const PATH: &str = "/catalog.v1.QueryService/GetProduct";

/// Builds requests as a tonic stub does: a URI with a static path and the
/// gRPC headers.
#[derive(Clone, Debug)]
pub struct RequestFactory {
    uri: Uri,
}

impl Default for RequestFactory {
    fn default() -> Self {
        let uri = Uri::from_static("http://127.0.0.1:50051/catalog.v1.QueryService/GetProduct");
        RequestFactory { uri }
    }
}

impl RequestFactory {
    /// A fresh request.
    pub fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        request
    }
}

/// A service that answers every request at once with an empty 200 response
/// (the floor every benchmark compares against).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bare;

impl<B> Service<Request<B>> for Bare {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        ready(Ok(Response::new(Empty::new())))
    }
}

/// Runs one call through `service` to its end: readiness, the call, the
/// response future, and the response body. Every future here is ready at
/// once, so it is polled with a no-op waker; the caller must be inside a
/// tokio runtime context for layers that make timers.
pub fn call_once<S, B>(service: &mut S, request: Request<Empty<Bytes>>) -> bool
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    B: Body,
{
    let mut cx = Context::from_waker(Waker::noop());
    let ready = pin!(service.ready());
    let Poll::Ready(Ok(service)) = ready.poll(&mut cx) else {
        return false;
    };
    let fut = pin!(service.call(request));
    let Poll::Ready(Ok(response)) = fut.poll(&mut cx) else {
        return false;
    };
    let mut body = pin!(response.into_body());
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(None) => return true,
            _ => return false,
        }
    }
}
