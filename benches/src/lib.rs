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
    /// Requests to `uri` instead of [`PATH`] (a static URI, as a stub's
    /// path is).
    pub fn with_uri(uri: &'static str) -> Self {
        RequestFactory {
            uri: Uri::from_static(uri),
        }
    }

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

/// A 1 KiB gRPC request body: a 5-byte message prefix and a payload.
pub fn payload_1k() -> Bytes {
    let mut body = vec![0u8; 1024];
    body[1..5].copy_from_slice(&(1019u32).to_be_bytes());
    Bytes::from(body)
}

impl RequestFactory {
    /// A request as a tonic stub sends it through a `Channel`: a
    /// `tonic::body::Body` holding `payload` (a clone of shared `Bytes`).
    pub fn grpc_request(&self, payload: &Bytes) -> Request<tonic::body::Body> {
        let (parts, _) = self.request().into_parts();
        Request::from_parts(
            parts,
            tonic::body::Body::new(http_body_util::Full::new(payload.clone())),
        )
    }
}

/// A service that reads the whole request body, as a transport would, and
/// then answers like [`Bare`]. Attempts that carry
/// `grpc-previous-rpc-attempts` succeed; with `fail_first` the first
/// attempt of each call fails with a Trailers-Only `UNAVAILABLE`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reading {
    /// Fail each call's first attempt.
    pub fail_first: bool,
}

impl<B> Service<Request<B>> for Reading
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    type Response = Response<OkBody>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let fail = self.fail_first && !request.headers().contains_key("grpc-previous-rpc-attempts");
        Box::pin(async move {
            use http_body_util::BodyExt;
            let _ = request.into_body().collect().await.expect("a request body");
            if fail {
                let mut response = Response::new(OkBody { sent: true });
                response
                    .headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("14"));
                return Ok(response);
            }
            Ok(Response::new(OkBody { sent: false }))
        })
    }
}

/// A service that answers every request at once with a successful gRPC
/// response: headers, then trailers holding `grpc-status: 0` (the floor
/// every benchmark compares against).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bare;

impl<B> Service<Request<B>> for Bare {
    type Response = Response<OkBody>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        ready(Ok(Response::new(OkBody { sent: false })))
    }
}

/// A response body holding only the trailers of a successful call.
#[derive(Debug)]
pub struct OkBody {
    sent: bool,
}

impl Body for OkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Ready(None);
        }
        let mut trailers = http::HeaderMap::with_capacity(1);
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent
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

/// Runs `iters` calls through `service` on a current-thread runtime,
/// awaiting each (readiness, response, body); returns the time they took.
/// For layers whose futures may wait (locks, timers), where
/// [`call_once`] cannot be used.
pub fn drive<S, B>(
    rt: &tokio::runtime::Runtime,
    service: &mut S,
    requests: &RequestFactory,
    iters: u64,
) -> std::time::Duration
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    drive_with(rt, service, || requests.request(), iters)
}

/// Like [`drive`], with requests from `make`.
// Wall-clock time, also under a paused tokio clock.
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
pub fn drive_with<S, R, B>(
    rt: &tokio::runtime::Runtime,
    service: &mut S,
    mut make: impl FnMut() -> Request<R>,
    iters: u64,
) -> std::time::Duration
where
    S: Service<Request<R>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    rt.block_on(async {
        let start = std::time::Instant::now();
        for _ in 0..iters {
            let ready = service.ready().await.expect("ready");
            let response = ready.call(make()).await.expect("a response");
            let mut body = pin!(response.into_body());
            while let Some(frame) = body.frame().await {
                frame.expect("a frame");
            }
        }
        start.elapsed()
    })
}

/// Like [`drive`], on `threads` threads at once, each with its own clone of
/// `service` and its own runtime; returns the mean time per thread.
pub fn drive_parallel<S, B>(
    service: &S,
    requests: &RequestFactory,
    iters: u64,
    threads: usize,
) -> std::time::Duration
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone + Send,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    drive_parallel_with(service, || || requests.request(), iters, threads)
}

/// Like [`drive_with`], on `threads` threads at once, each with its own
/// clone of `service`, its own runtime and its own request maker from
/// `per_thread` (so that threads share no request data, such as one
/// payload's reference count, that a real caller's threads would not);
/// returns the mean time per thread.
pub fn drive_parallel_with<S, R, B, M>(
    service: &S,
    per_thread: impl Fn() -> M + Sync,
    iters: u64,
    threads: usize,
) -> std::time::Duration
where
    S: Service<Request<R>, Response = Response<B>> + Clone + Send,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
    M: FnMut() -> Request<R>,
{
    let barrier = std::sync::Barrier::new(threads);
    let per_thread = &per_thread;
    let total: std::time::Duration = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let mut service = service.clone();
                let barrier = &barrier;
                s.spawn(move || {
                    let rt = runtime();
                    let make = per_thread();
                    barrier.wait();
                    drive_with(&rt, &mut service, make, iters)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread"))
            .sum()
    });
    total / threads as u32
}

/// A current-thread runtime whose clock is paused: timers fire as soon as
/// the runtime is idle, so a backoff costs its bookkeeping, not its wait.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

/// A current-thread runtime with timers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime")
}

/// The facade's config for the same stack as the bare layers' rows: a 5 s
/// deadline, the design's retry policy, a default breaker per service.
pub fn facade_config() -> grpc_resilience::ResilienceConfig {
    grpc_resilience::ResilienceConfig::new()
        .with_timeout_default(std::time::Duration::from_secs(5))
        .with_retry_default(grpc_resilience::RetrySettings::new())
}

/// [`facade_config`] with every per-attempt guard on: a bulkhead (64 calls
/// per service, far above what a row keeps in flight) and a per-attempt
/// timeout of 2 s.
pub fn guarded_facade_config() -> grpc_resilience::ResilienceConfig {
    facade_config()
        .with_per_attempt_timeout(std::time::Duration::from_secs(2))
        .with_bulkhead_default(grpc_resilience::BulkheadSettings::new().with_max_concurrent(64))
}

/// The `tonic::GrpcMethod` a generated stub inserts for [`PATH`].
pub fn stub_method() -> tonic::GrpcMethod<'static> {
    tonic::GrpcMethod::new("catalog.v1.QueryService", "GetProduct")
}

impl RequestFactory {
    /// A request exactly as a generated stub sends it: [`request`](Self::request)
    /// plus the `tonic::GrpcMethod` extension the stub inserts.
    pub fn stub_request(&self) -> Request<Empty<Bytes>> {
        let mut request = self.request();
        request.extensions_mut().insert(stub_method());
        request
    }

    /// [`grpc_request`](Self::grpc_request) with the `tonic::GrpcMethod`
    /// extension a generated stub inserts.
    pub fn stub_grpc_request(&self, payload: &Bytes) -> Request<tonic::body::Body> {
        let mut request = self.grpc_request(payload);
        request.extensions_mut().insert(stub_method());
        request
    }
}

/// A request with a body tower's `Retry` can clone, for its rows.
pub type FullRequest = Request<http_body_util::Full<Bytes>>;

/// tower's retry over stub-shaped requests: the request is rebuilt for
/// every call (tonic's body cannot be cloned), from a 1 KiB `Full` body and
/// a clone of the head, extensions included, as a tower user must.
#[derive(Clone, Copy, Debug)]
pub struct CloneStubRequest;

impl<Res, E> tower::retry::Policy<FullRequest, Res, E> for CloneStubRequest {
    type Future = Ready<()>;

    fn retry(&mut self, _: &mut FullRequest, result: &mut Result<Res, E>) -> Option<Self::Future> {
        result.is_err().then(|| ready(()))
    }

    fn clone_request(&mut self, req: &FullRequest) -> Option<FullRequest> {
        let mut clone = Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

/// The retry layer of the retry rows: the design's policy with a 1 ms
/// backoff and no jitter.
pub fn seed_retry() -> grpc_retry::RetryLayer {
    use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};
    let policy = RetryPolicy::default()
        .with_initial_delay(std::time::Duration::from_millis(1))
        .with_max_delay(std::time::Duration::from_millis(1))
        .with_jitter(Jitter::None);
    RetryLayer::new(RetryPolicies::new(policy).expect("a valid policy"))
}

/// Methods of the catalog's query service (some made up), for the rows of
/// a client that calls several in turn.
const QUERY_METHODS: [(&str, &str); 6] = [
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/GetProduct",
        "GetProduct",
    ),
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/ListProducts",
        "ListProducts",
    ),
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/SearchProducts",
        "SearchProducts",
    ),
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/GetStock",
        "GetStock",
    ),
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/GetPrice",
        "GetPrice",
    ),
    (
        "http://127.0.0.1:50051/catalog.v1.QueryService/GetReviews",
        "GetReviews",
    ),
];

/// Stub-shaped requests (1 KiB body, the `tonic::GrpcMethod` extension)
/// that alternate between two methods of one service, as a client calling
/// more than one method does: a layer that remembers only the last method
/// works each call out again.
pub fn alternating() -> impl FnMut() -> Request<tonic::body::Body> {
    in_turn(2)
}

/// Like [`alternating`], with `methods` methods (at most 6) called in
/// turn: more than a memory of the last few methods holds.
pub fn in_turn(methods: usize) -> impl FnMut() -> Request<tonic::body::Body> {
    let factories: Vec<_> = QUERY_METHODS
        .iter()
        .take(methods.clamp(1, QUERY_METHODS.len()))
        .map(|&(uri, method)| (RequestFactory::with_uri(uri), method))
        .collect();
    let payload = payload_1k();
    let mut next = 0;
    move || {
        let (factory, method) = &factories[next];
        next = (next + 1) % factories.len();
        let mut request = factory.grpc_request(&payload);
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new("catalog.v1.QueryService", method));
        request
    }
}
