//! Unit tests of every rule, on paused time, against a counting handler.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use grpc_resilience_core::CodeSet;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tonic::Code;
use tower::{Service, ServiceExt};
use tower_layer::Layer;

use crate::store::{Claim, ClaimToken, Entry};
use crate::*;

const CREATE: &str = "/shop.v1.Orders/Create";
/// The handler's response body: messages, then trailers.
type TestBody = UnsyncBoxBody<Bytes, Infallible>;

const GET: &str = "/shop.v1.Orders/Get";

/// What the test handler does with a call.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    // The `grpc-timeout` each run was called with.
    timeouts: Arc<std::sync::Mutex<Vec<Option<String>>>>,
    delay: Duration,
    code: Code,
    trailers_only: bool,
    body_len: usize,
}

impl Handler {
    fn ok() -> Self {
        Handler {
            runs: Arc::default(),
            timeouts: Arc::default(),
            delay: Duration::ZERO,
            code: Code::Ok,
            trailers_only: false,
            body_len: 0,
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn slow(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Fails with `code` as tonic servers do: a Trailers-Only response.
    fn failing(mut self, code: Code) -> Self {
        self.code = code;
        self.trailers_only = true;
        self
    }

    fn with_body_len(mut self, len: usize) -> Self {
        self.body_len = len;
        self
    }

    /// A service answering each call with the run number and the request
    /// body it read, in a body followed by trailers.
    fn service(&self) -> TestService {
        make_service(self.clone())
    }
}

type TestService = tower::util::BoxCloneSyncService<
    Request<RequestBody<Full<Bytes>>>,
    Response<TestBody>,
    Infallible,
>;

fn make_service(handler: Handler) -> TestService {
    tower::util::BoxCloneSyncService::new(make_service_fn(handler))
}

fn make_service_fn(
    handler: Handler,
) -> impl Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<TestBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let handler = handler.clone();
        async move {
            let timeout = request.headers().get("grpc-timeout");
            handler
                .timeouts
                .lock()
                .unwrap()
                .push(timeout.map(|v| v.to_str().unwrap().to_owned()));
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let run = handler.runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(handler.delay).await;
            if handler.trailers_only {
                let response = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", (handler.code as i32).to_string())
                    .header("grpc-message", format!("run {run}"))
                    .body(Full::new(Bytes::new()).boxed_unsync())
                    .unwrap();
                return Ok::<_, Infallible>(response);
            }
            let mut payload = format!("run {run}: ").into_bytes();
            payload.extend_from_slice(&body);
            payload.resize(payload.len().max(handler.body_len), b'.');
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(handler.code as i32));
            let body = Full::new(Bytes::from(payload))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed_unsync();
            let mut response = Response::new(body);
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok(response)
        }
    })
}

fn request(path: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .uri(format!("http://server{path}"))
        .header("content-type", "application/grpc");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// What a caller saw.
#[derive(Debug, PartialEq)]
struct Seen {
    code: Code,
    body: Bytes,
    replayed: bool,
    message: String,
    pushback: Option<String>,
}

async fn call<S>(service: &mut S, request: Request<Full<Bytes>>) -> Seen
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<ResponseBody<TestBody>>,
            Error = Infallible,
        >,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    seen(response).await
}

async fn seen(response: Response<ResponseBody<TestBody>>) -> Seen {
    let (head, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    let status_in = |map: &HeaderMap| {
        map.get("grpc-status")
            .map(|v| Code::from_bytes(v.as_bytes()))
    };
    let code = status_in(&head.headers)
        .or_else(|| trailers.as_ref().and_then(status_in))
        .unwrap_or(Code::Ok);
    Seen {
        code,
        body,
        replayed: head.headers.get(REPLAYED).is_some(),
        // Our own headers: safe to hand to tonic's parser.
        message: tonic::Status::from_header_map(&head.headers)
            .map(|s| s.message().to_owned())
            .unwrap_or_default(),
        pushback: head
            .headers
            .get("grpc-retry-pushback-ms")
            .map(|v| v.to_str().unwrap().to_owned()),
    }
}

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(["shop.v1.Orders/Create"]).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_first_call_runs_and_a_repeat_gets_the_recorded_response() {
    let handler = Handler::ok();
    let layer = layer();
    let mut service = layer.layer(handler.service());
    let first = call(&mut service, request(CREATE, Some("k1"), "order")).await;
    assert_eq!(first.code, Code::Ok);
    assert_eq!(first.body, "run 1: order");
    assert!(!first.replayed);
    let again = call(&mut service, request(CREATE, Some("k1"), "order")).await;
    assert_eq!(handler.runs(), 1, "the handler did not run again");
    assert_eq!(again.body, first.body);
    assert!(again.replayed);
    // Another key runs the handler.
    let other = call(&mut service, request(CREATE, Some("k2"), "order")).await;
    assert_eq!(other.body, "run 2: order");
    let stats = layer.stats();
    assert_eq!((stats.hits, stats.misses), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn methods_not_named_and_calls_without_a_key_pass_through() {
    let handler = Handler::ok();
    let mut service = layer().layer(handler.service());
    call(&mut service, request(GET, Some("k"), "a")).await;
    call(&mut service, request(GET, Some("k"), "a")).await;
    call(&mut service, request(CREATE, None, "a")).await;
    let last = call(&mut service, request(CREATE, None, "a")).await;
    assert_eq!(handler.runs(), 4);
    assert!(!last.replayed);
    // A path that is not a gRPC method passes through too.
    call(&mut service, request("/healthz", Some("k"), "a")).await;
    assert_eq!(handler.runs(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_required_key_that_is_missing_or_malformed_is_invalid_argument() {
    let handler = Handler::ok();
    let layer = layer().require_key();
    let mut service = layer.layer(handler.service());
    let missing = call(&mut service, request(CREATE, None, "a")).await;
    assert_eq!(missing.code, Code::InvalidArgument);
    assert!(
        missing.message.contains("idempotency-key"),
        "{}",
        missing.message
    );
    let long = "x".repeat(256);
    let mut too_long = request(CREATE, None, "a");
    too_long
        .headers_mut()
        .insert("idempotency-key", HeaderValue::from_str(&long).unwrap());
    assert_eq!(
        call(&mut service, too_long).await.code,
        Code::InvalidArgument
    );
    let mut empty = request(CREATE, None, "a");
    empty
        .headers_mut()
        .insert("idempotency-key", HeaderValue::from_static(""));
    assert_eq!(call(&mut service, empty).await.code, Code::InvalidArgument);
    let mut binary = request(CREATE, None, "a");
    binary.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes(b"\xffkey").unwrap(),
    );
    assert_eq!(call(&mut service, binary).await.code, Code::InvalidArgument);
    assert_eq!(handler.runs(), 0);
    assert_eq!(layer.stats().rejected, 4);
    // Unnamed methods still need no key.
    call(&mut service, request(GET, None, "a")).await;
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_custom_key_header_is_read_instead() {
    let handler = Handler::ok();
    let layer = layer().with_key_header("x-request-id").unwrap();
    let mut service = layer.layer(handler.service());
    for _ in 0..2 {
        let mut req = request(CREATE, None, "a");
        req.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r1"));
        call(&mut service, req).await;
    }
    assert_eq!(handler.runs(), 1);
    // The default header means nothing now.
    call(&mut service, request(CREATE, Some("r1"), "a")).await;
    call(&mut service, request(CREATE, Some("r1"), "a")).await;
    assert_eq!(handler.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_key_reused_with_another_body_or_method_is_failed_precondition() {
    let handler = Handler::ok();
    let layer = IdempotencyLayer::new(["shop.v1.Orders/*"]).unwrap();
    let mut service = layer.layer(handler.service());
    call(&mut service, request(CREATE, Some("k1"), "order A")).await;
    let reused = call(&mut service, request(CREATE, Some("k1"), "order B")).await;
    assert_eq!(reused.code, Code::FailedPrecondition);
    assert!(reused.message.contains("k1"), "{}", reused.message);
    let other_method = call(&mut service, request(GET, Some("k1"), "order A")).await;
    assert_eq!(other_method.code, Code::FailedPrecondition);
    assert_eq!(handler.runs(), 1);
    assert_eq!(layer.stats().conflicts, 2);
}

#[tokio::test(start_paused = true)]
async fn a_repeat_while_the_first_runs_waits_for_its_response() {
    let handler = Handler::ok().slow(Duration::from_millis(300));
    let layer = layer().with_in_progress(OnInProgress::Wait(Duration::from_secs(1)));
    let service = layer.layer(handler.service());
    let first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    let second = call_owned(service.clone(), request(CREATE, Some("k"), "a")).await;
    let waited = started.elapsed();
    let first = first.await.unwrap();
    assert_eq!(handler.runs(), 1);
    assert_eq!(second.body, first.body);
    assert!(second.replayed);
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_millis(400),
        "{waited:?}"
    );
    assert_eq!(layer.stats().in_progress, 1);
}

async fn call_owned<S>(mut service: S, request: Request<Full<Bytes>>) -> Seen
where
    S: Service<
            Request<Full<Bytes>>,
            Response = Response<ResponseBody<TestBody>>,
            Error = Infallible,
        >,
{
    call(&mut service, request).await
}

/// `request` with a `grpc-timeout` of `value`.
fn with_timeout(mut request: Request<Full<Bytes>>, value: &'static str) -> Request<Full<Bytes>> {
    request
        .headers_mut()
        .insert("grpc-timeout", HeaderValue::from_static(value));
    request
}

#[tokio::test(start_paused = true)]
async fn a_repeat_waits_no_longer_than_its_own_deadline() {
    let handler = Handler::ok().slow(Duration::from_secs(10));
    let layer = layer().with_in_progress(OnInProgress::Wait(Duration::from_secs(5)));
    let service = layer.layer(handler.service());
    let _first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    let second = call_owned(
        service.clone(),
        with_timeout(request(CREATE, Some("k"), "a"), "200m"),
    )
    .await;
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(200),
        "answered at its deadline, not after the 5 s wait"
    );
    assert_eq!(second.code, Code::DeadlineExceeded);
    assert!(
        second.message.contains("`k` was still in progress"),
        "{}",
        second.message
    );
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_repeat_that_runs_after_waiting_tells_the_handler_the_time_it_has_left() {
    let handler = Handler::ok()
        .failing(Code::Unavailable)
        .slow(Duration::from_millis(150));
    let layer = layer().with_in_progress(OnInProgress::Wait(Duration::from_secs(5)));
    let service = layer.layer(handler.service());
    let first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    // Arrives at 10 ms with 1 s; the first releases the key at 150 ms.
    let second = call_owned(
        service.clone(),
        with_timeout(request(CREATE, Some("k"), "a"), "1000000u"),
    )
    .await;
    first.await.unwrap();
    assert_eq!(second.message, "run 2");
    let timeouts = handler.timeouts.lock().unwrap().clone();
    let left = grpc_resilience_core::timeout_header::decode(
        timeouts[1].as_deref().expect("a grpc-timeout").as_bytes(),
    )
    .unwrap();
    assert!(
        left <= Duration::from_millis(860),
        "the handler is told the time left after the wait, not the 1 s the call came with: {left:?}"
    );
    assert!(left >= Duration::from_millis(700), "{left:?}");
}

#[tokio::test(start_paused = true)]
async fn a_repeat_waits_a_bounded_time_then_gets_aborted_with_pushback() {
    let handler = Handler::ok().slow(Duration::from_secs(10));
    let layer = layer()
        .with_in_progress(OnInProgress::Wait(Duration::from_millis(200)))
        .with_pushback(Duration::from_millis(750));
    let service = layer.layer(handler.service());
    let _first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    let second = call_owned(service.clone(), request(CREATE, Some("k"), "a")).await;
    assert_eq!(started.elapsed(), Duration::from_millis(200));
    assert_eq!(second.code, Code::Aborted);
    assert_eq!(second.pushback.as_deref(), Some("750"));
    assert!(second.message.contains("`k`"), "{}", second.message);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn abort_answers_a_running_key_at_once_and_a_different_body_conflicts() {
    let handler = Handler::ok().slow(Duration::from_secs(10));
    let layer = layer().with_in_progress(OnInProgress::Abort);
    let service = layer.layer(handler.service());
    let _first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = tokio::time::Instant::now();
    let second = call_owned(service.clone(), request(CREATE, Some("k"), "a")).await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(second.code, Code::Aborted);
    assert_eq!(second.pushback.as_deref(), Some("500"));
    let other = call_owned(service.clone(), request(CREATE, Some("k"), "b")).await;
    assert_eq!(other.code, Code::FailedPrecondition);
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn retryable_failures_release_the_key_and_others_are_recorded() {
    let unavailable = Handler::ok().failing(Code::Unavailable);
    let mut service = layer().layer(unavailable.service());
    for _ in 0..3 {
        let seen = call(&mut service, request(CREATE, Some("k"), "a")).await;
        assert_eq!(seen.code, Code::Unavailable);
        assert!(!seen.replayed);
    }
    assert_eq!(unavailable.runs(), 3, "each retry ran the handler");

    let exists = Handler::ok().failing(Code::AlreadyExists);
    let layer = layer();
    let mut service = layer.layer(exists.service());
    let first = call(&mut service, request(CREATE, Some("k"), "a")).await;
    let again = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(
        (first.code, again.code),
        (Code::AlreadyExists, Code::AlreadyExists)
    );
    assert_eq!(again.message, "run 1", "the recorded failure is replayed");
    assert!(again.replayed);
    assert_eq!(exists.runs(), 1);

    // The set is configurable.
    let layer = layer
        .with_release_on(CodeSet::of(&[Code::AlreadyExists]))
        .unwrap();
    let mut service = layer.layer(exists.service());
    call(&mut service, request(CREATE, Some("k2"), "a")).await;
    call(&mut service, request(CREATE, Some("k2"), "a")).await;
    assert_eq!(exists.runs(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_handler_releases_the_key() {
    let handler = Handler::ok().slow(Duration::from_secs(1));
    let layer = layer();
    let mut service = layer.layer(handler.service());
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        call(&mut service, request(CREATE, Some("k"), "a")),
    )
    .await;
    assert!(cancelled.is_err(), "the caller gave up");
    assert_eq!(handler.runs(), 1);
    // The release runs on a spawned task.
    tokio::task::yield_now().await;
    let retried = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(retried.body, "run 2: a");
    assert_eq!(handler.runs(), 2);
    assert_eq!(layer.stats().released, 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_repeat_runs_the_handler_when_the_first_releases() {
    let handler = Handler::ok()
        .failing(Code::Unavailable)
        .slow(Duration::from_millis(100));
    let layer = layer();
    let service = layer.layer(handler.service());
    let first = tokio::spawn(call_owned(service.clone(), request(CREATE, Some("k"), "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = call_owned(service.clone(), request(CREATE, Some("k"), "a")).await;
    assert_eq!(first.await.unwrap().message, "run 1");
    assert_eq!(second.message, "run 2");
    assert_eq!(handler.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_record_expires_after_the_retention_window() {
    let handler = Handler::ok();
    let layer = layer().with_retention(Duration::from_secs(60)).unwrap();
    let mut service = layer.layer(handler.service());
    call(&mut service, request(CREATE, Some("k"), "a")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        call(&mut service, request(CREATE, Some("k"), "a"))
            .await
            .replayed
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let after = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert!(!after.replayed);
    assert_eq!(handler.runs(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_response_too_large_to_record_is_released_or_rejected() {
    let handler = Handler::ok().with_body_len(2_000);
    let layer = layer().with_max_response_bytes(1_000);
    let mut service = layer.layer(handler.service());
    let first = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(
        (first.code, first.body.len()),
        (Code::Ok, 2_000),
        "the whole response"
    );
    call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(handler.runs(), 2, "released: the repeat ran the handler");

    let handler = Handler::ok().with_body_len(2_000);
    let layer = layer.with_oversize(OnOversize::Reject);
    let mut service = layer.layer(handler.service());
    let first = call(&mut service, request(CREATE, Some("k9"), "a")).await;
    assert_eq!(first.code, Code::ResourceExhausted);
    assert!(
        first.message.contains("k9") && first.message.contains("1000"),
        "{}",
        first.message
    );
    let again = call(&mut service, request(CREATE, Some("k9"), "a")).await;
    assert_eq!(
        (again.code, again.replayed),
        (Code::ResourceExhausted, true)
    );
    assert_eq!(handler.runs(), 1, "rejected: recorded, not run again");
}

#[tokio::test(start_paused = true)]
async fn a_request_too_large_to_fingerprint_is_resource_exhausted() {
    let handler = Handler::ok();
    let mut service = layer().with_max_request_bytes(4).layer(handler.service());
    let seen = call(&mut service, request(CREATE, Some("k"), "12345")).await;
    assert_eq!(seen.code, Code::ResourceExhausted);
    assert_eq!(handler.runs(), 0);
    // Without a key it is not read and passes.
    call(&mut service, request(CREATE, None, "12345")).await;
    assert_eq!(handler.runs(), 1);
}

/// A store that fails every call, or never answers.
#[derive(Clone, Debug)]
struct BrokenStore {
    hang: bool,
}

impl BrokenStore {
    async fn fail<T>(&self) -> Result<T, StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(StoreError::new("connection refused"))
    }
}

impl Store for BrokenStore {
    async fn claim(&self, _: &str, _: Fingerprint, _: Duration) -> Result<Claim, StoreError> {
        self.fail().await
    }
    async fn complete(
        &self,
        _: &str,
        _: ClaimToken,
        _: Record,
        _: Duration,
    ) -> Result<bool, StoreError> {
        self.fail().await
    }
    async fn release(&self, _: &str, _: ClaimToken) -> Result<(), StoreError> {
        self.fail().await
    }
    async fn fetch(&self, _: &str) -> Result<Option<Entry>, StoreError> {
        self.fail().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_store_fails_closed_by_default_or_runs_unprotected() {
    for hang in [false, true] {
        let handler = Handler::ok();
        let layer = layer()
            .with_store(BrokenStore { hang })
            .with_store_timeout(Duration::from_millis(50))
            .unwrap();
        let mut service = layer.layer(handler.service());
        let started = tokio::time::Instant::now();
        let seen = call(&mut service, request(CREATE, Some("k"), "a")).await;
        assert_eq!(seen.code, Code::Unavailable, "hang: {hang}");
        assert!(started.elapsed() <= Duration::from_millis(50));
        assert_eq!(handler.runs(), 0);
        assert_eq!(layer.stats().store_errors, 1);

        let layer = layer.with_store_failure(OnStoreError::RunUnprotected);
        let mut service = layer.layer(handler.service());
        let seen = call(&mut service, request(CREATE, Some("k"), "a")).await;
        assert_eq!(seen.code, Code::Ok);
        call(&mut service, request(CREATE, Some("k"), "a")).await;
        assert_eq!(handler.runs(), 2, "no deduplication without a store");
        let stats = layer.stats();
        assert_eq!((stats.unprotected, stats.store_errors), (2, 3));
    }
}

#[tokio::test(start_paused = true)]
async fn a_hundred_concurrent_duplicates_run_the_handler_once() {
    let handler = Handler::ok().slow(Duration::from_millis(200));
    let layer = layer();
    let service = layer.layer(handler.service());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(call_owned(
                service.clone(),
                request(CREATE, Some("dup"), "a"),
            ))
        })
        .collect();
    let mut seen = Vec::new();
    for call in calls {
        seen.push(call.await.unwrap());
    }
    assert_eq!(handler.runs(), 1);
    assert!(
        seen.iter()
            .all(|s| s.code == Code::Ok && s.body == "run 1: a")
    );
    assert_eq!(seen.iter().filter(|s| !s.replayed).count(), 1);
    let stats = layer.stats();
    assert_eq!((stats.misses, stats.hits, stats.in_progress), (1, 99, 99));
}

#[tokio::test(start_paused = true)]
async fn counters_reach_metrics_with_service_and_method_labels() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let handler = Handler::ok();
    let mut service = layer().layer(handler.service());
    let _guard = metrics::set_default_local_recorder(&recorder);
    call(&mut service, request(CREATE, Some("k"), "a")).await;
    call(&mut service, request(CREATE, Some("k"), "a")).await;
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |name: &str| {
        snapshot
            .iter()
            .find(|(key, _, _, _)| {
                key.key().name() == name
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "service" && l.value() == "shop.v1.Orders")
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "method" && l.value() == "Create")
            })
            .map(|(_, _, _, value)| match value {
                DebugValue::Counter(n) => *n,
                other => panic!("{other:?}"),
            })
    };
    assert_eq!(count("idempotency.misses"), Some(1));
    assert_eq!(count("idempotency.hits"), Some(1));
}

#[test]
fn options_with_bad_values_are_typed_errors() {
    let err = |r: Result<IdempotencyLayer, ConfigError>| r.unwrap_err().to_string();
    assert!(err(IdempotencyLayer::new(["a/b/c"])).contains("a/b/c"));
    assert!(err(IdempotencyLayer::new(["Create", "Create"])).contains("more than once"));
    assert!(err(IdempotencyLayer::new(Vec::<String>::new())).contains("at least one"));
    assert!(err(layer().with_key_header("Bad Header")).contains("Bad Header"));
    assert!(err(layer().with_key_header("Upper")).contains("lowercase"));
    assert!(err(layer().with_key_header("grpc-key")).contains("reserved"));
    assert!(err(layer().with_retention(Duration::ZERO)).contains("retention"));
    assert!(err(layer().with_lease(Duration::ZERO)).contains("lease"));
    assert!(err(layer().with_store_timeout(Duration::ZERO)).contains("store timeout"));
    assert!(err(layer().with_poll_interval(Duration::ZERO)).contains("poll interval"));
    assert!(err(layer().with_release_on(CodeSet::of(&[Code::Ok]))).contains("success"));
}

#[tokio::test(start_paused = true)]
async fn a_shared_store_serves_two_layers_like_two_replicas() {
    let store = MemoryStore::new();
    let handler = Handler::ok();
    let mut one = layer().with_store(store.clone()).layer(handler.service());
    let mut two = layer().with_store(store).layer(handler.service());
    call(&mut one, request(CREATE, Some("k"), "a")).await;
    let seen = call(&mut two, request(CREATE, Some("k"), "a")).await;
    assert!(seen.replayed);
    assert_eq!(handler.runs(), 1);
}

/// A response body that sends some bytes, then fails.
struct Broken {
    sent: bool,
}

impl http_body::Body for Broken {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if std::mem::replace(&mut self.sent, true) {
            return std::task::Poll::Ready(Some(Err(std::io::Error::other("handler broke"))));
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
            b"part",
        )))))
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_breaks_releases_the_key_and_reaches_the_caller() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let handler = tower::service_fn(move |_: Request<RequestBody<Full<Bytes>>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Broken { sent: false })) }
    });
    let layer = layer();
    let mut service = layer.layer(handler);
    for _ in 0..2 {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(CREATE, Some("k"), "a"))
            .await
            .unwrap();
        let mut body = std::pin::pin!(response.into_body());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "handler broke");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "released: the repeat ran");
    assert_eq!(layer.stats().released, 2);
}

/// The memory store, with a slow `claim` or a `complete` that never
/// answers (a call dropped while its response is being recorded).
#[derive(Clone, Debug, Default)]
struct OddStore {
    inner: MemoryStore,
    claim_delay: Duration,
    complete_hangs: bool,
}

impl Store for OddStore {
    async fn claim(
        &self,
        key: &str,
        fp: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        tokio::time::sleep(self.claim_delay).await;
        self.inner.claim(key, fp, lease).await
    }
    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        record: Record,
        keep: Duration,
    ) -> Result<bool, StoreError> {
        if self.complete_hangs {
            std::future::pending::<()>().await;
        }
        self.inner.complete(key, token, record, keep).await
    }
    async fn release(&self, key: &str, token: ClaimToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
    async fn fetch(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.inner.fetch(key).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_its_response_is_recorded_releases_the_key() {
    // The handler has answered; the call is dropped (its deadline, the
    // caller gone) while the store records the response.
    let handler = Handler::ok();
    let layer = layer()
        .with_store(OddStore {
            complete_hangs: true,
            ..OddStore::default()
        })
        .with_store_timeout(Duration::from_secs(5))
        .unwrap();
    let mut service = layer.layer(handler.service());
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        call(&mut service, request(CREATE, Some("k"), "a")),
    )
    .await;
    assert!(dropped.is_err(), "dropped while recording");
    assert_eq!(handler.runs(), 1);
    // The release runs on a spawned task.
    tokio::task::yield_now().await;
    // (Its own recording hangs too, until the store timeout; what counts
    // is that its handler runs instead of waiting for the claim.)
    let retried = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(
        retried.body, "run 2: a",
        "the key was released, not left claimed until its lease ends"
    );
    assert_eq!(layer.stats().released, 2, "each claim released once");
}

#[tokio::test(start_paused = true)]
async fn a_call_out_of_time_is_not_run_and_its_key_is_freed() {
    let handler = Handler::ok();
    let layer = layer().with_store(OddStore {
        claim_delay: Duration::from_millis(300),
        ..OddStore::default()
    });
    let mut service = layer.layer(handler.service());
    // Out of time on arrival: answered at once, no claim.
    let late = call(
        &mut service,
        with_timeout(request(CREATE, Some("k"), "a"), "0n"),
    )
    .await;
    assert_eq!(late.code, Code::DeadlineExceeded);
    assert!(
        late.message.contains("before it could run"),
        "{}",
        late.message
    );
    assert_eq!(layer.stats().misses, 0, "no claim was made");
    // Out of time once the slow store has given it the key: not run, and
    // the key is released for a retry.
    let claimed_late = call(
        &mut service,
        with_timeout(request(CREATE, Some("k"), "a"), "200m"),
    )
    .await;
    assert_eq!(claimed_late.code, Code::DeadlineExceeded);
    assert_eq!(handler.runs(), 0);
    assert_eq!(layer.stats().released, 1);
    let retried = call(&mut service, request(CREATE, Some("k"), "a")).await;
    assert_eq!(retried.body, "run 1: a");
}
