//! The per-attempt guards as one service ([`Guard`](crate::guard::Guard)):
//! the bulkhead, then the breaker, then the call, and every slot and permit
//! given back on every path.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use grpc_resilience_core::BoxError;
use grpc_resilience_core::error::{LocalRejection, error_code, find_error};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tonic::Code;
use tower::ServiceExt;
use tower_service::Service;

use crate::{ResilienceConfig, ResilienceLayer, ResilientChannel, State};

const GET: &str = "http://backend/catalog.v1.QueryService/GetProduct";

/// Each call the backend saw: its `x-call` and its `grpc-timeout`.
type Seen = Vec<(String, Option<Duration>)>;

/// Records each call's `x-call` and `grpc-timeout`, waits for a permit of
/// its gate, then answers OK with one message, its trailers held until a
/// permit of `trailers` (none by default: the body never ends). A call
/// named `fail` is answered `UNAVAILABLE` (Trailers-Only) instead.
#[derive(Clone)]
struct Backend {
    seen: Arc<Mutex<Seen>>,
    gate: Arc<Semaphore>,
    trailers: Arc<Semaphore>,
}

impl Backend {
    fn new(permits: usize) -> Self {
        Backend {
            seen: Arc::default(),
            gate: Arc::new(Semaphore::new(permits)),
            trailers: Arc::new(Semaphore::new(0)),
        }
    }

    fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

/// A response body fed by the backend's task.
struct Held {
    rx: tokio::sync::mpsc::Receiver<http_body::Frame<Bytes>>,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        self.rx.poll_recv(cx).map(|frame| frame.map(Ok))
    }
}

impl Service<http::Request<tonic::body::Body>> for Backend {
    type Response = http::Response<Held>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (call, timeout) = crate::tests::seen_as(&request);
        let fail = call == "fail";
        self.seen.lock().unwrap().push((call, timeout));
        let (gate, trailers) = (self.gate.clone(), self.trailers.clone());
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            if fail {
                return Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "14")
                    .body(Held { rx })
                    .unwrap());
            }
            let message = http_body::Frame::data(Bytes::from_static(b"\0\0\0\0\0"));
            tx.send(message).await.unwrap();
            tokio::spawn(async move {
                trailers.acquire().await.unwrap().forget();
                let mut map = http::HeaderMap::new();
                map.insert("grpc-status", "0".parse().unwrap());
                let _ = tx.send(http_body::Frame::trailers(map)).await;
            });
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .body(Held { rx })
                .unwrap())
        })
    }
}

fn request(call: &str) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri(GET)
        .header("x-call", call)
        .body(tonic::body::Body::empty())
        .unwrap()
}

/// One slot for the Query service, a queue of one, no retries, a 5 s
/// deadline.
fn layer() -> ResilienceLayer {
    let config = ResilienceConfig::from_toml(
        "[timeouts]\ndefault = 5000\n\
         [circuit_breakers.query]\nfailure_threshold = 1000\n\
         [bulkhead.default]\nmax_concurrent = 1\nmax_queue = 1\nmax_wait = 60000\n",
    )
    .unwrap();
    ResilienceLayer::new(&config).unwrap()
}

fn in_flight(layer: &ResilienceLayer) -> (u32, usize) {
    let p = &layer.bulkhead_partitions()[0];
    (p.in_flight, p.queued)
}

/// Waits (bounded) until the backend has seen `n` calls.
async fn until_seen(backend: &Backend, n: usize) {
    for _ in 0..1000 {
        if backend.seen().len() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the backend saw {:?}, not {n} calls", backend.seen());
}

/// A call through the facade, as a task.
type Call =
    tokio::task::JoinHandle<Result<http::Response<crate::future::ResilientBody<Held>>, BoxError>>;

/// A call in flight at a backend that holds it, and a second call queued
/// behind it for the only slot.
async fn one_in_flight_one_queued() -> (Backend, ResilienceLayer, Call, Call) {
    let backend = Backend::new(0);
    let layer = layer();
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    let first = tokio::spawn(channel.clone().oneshot(request("first")));
    until_seen(&backend, 1).await;
    let second = tokio::spawn(channel.clone().oneshot(request("second")));
    for _ in 0..1000 {
        if in_flight(&layer) == (1, 1) {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(in_flight(&layer), (1, 1), "one in flight, one queued");
    (backend, layer, first, second)
}

fn assert_refused_by_the_breaker(err: &BoxError) {
    assert_eq!(error_code(&**err), Code::Unavailable, "{err}");
    assert!(
        find_error::<LocalRejection>(&**err).is_some(),
        "a local refusal: {err}"
    );
}

#[tokio::test]
async fn a_call_the_breaker_refuses_gives_its_slot_back_and_is_never_sent() {
    let backend = Backend::new(100);
    let layer = layer();
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    layer.registry().get_or_create("query");
    layer.registry().force_open("query").unwrap();
    for call in ["a", "b", "c"] {
        let err = channel.clone().oneshot(request(call)).await.unwrap_err();
        assert_refused_by_the_breaker(&err);
    }
    assert!(
        backend.seen().is_empty(),
        "never sent: {:?}",
        backend.seen()
    );
    // Each refusal gave its slot back (the limit is one).
    assert_eq!(in_flight(&layer), (0, 0));
    layer.registry().reset("query").unwrap();
    let response = channel.clone().oneshot(request("d")).await.unwrap();
    assert_eq!(in_flight(&layer), (1, 0), "the body holds the slot");
    drop(response);
    assert_eq!(in_flight(&layer), (0, 0), "a dropped body frees it");
    assert_eq!(backend.seen().len(), 1);
}

#[tokio::test]
async fn a_queued_call_meets_the_breaker_when_its_slot_comes() {
    let (backend, layer, first, second) = one_in_flight_one_queued().await;
    // The breaker opens while the second call waits for its slot.
    layer.registry().force_open("query").unwrap();
    backend.gate.add_permits(1);
    let first = first.await.unwrap().unwrap();
    drop(first);
    let err = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("bounded")
        .unwrap()
        .unwrap_err();
    assert_refused_by_the_breaker(&err);
    let seen: Vec<String> = backend.seen().into_iter().map(|(c, _)| c).collect();
    assert_eq!(seen, ["first"], "the queued call was never sent");
    assert_eq!(in_flight(&layer), (0, 0), "its slot was given back");
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_is_sent_with_the_time_it_has_left() {
    let (backend, layer, first, second) = one_in_flight_one_queued().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    backend.gate.add_permits(2);
    drop(first.await.unwrap().unwrap());
    let second = second.await.unwrap().unwrap();
    let seen = backend.seen();
    assert_eq!(seen[0].0, "first");
    assert_eq!(seen[0].1, Some(Duration::from_secs(5)));
    assert_eq!(seen[1].0, "second");
    let told = seen[1].1.expect("a deadline");
    assert!(
        told <= Duration::from_secs(3),
        "the server is told the time left after 2 s in the queue, not {told:?}"
    );
    drop(second);
    assert_eq!(in_flight(&layer), (0, 0));
}

#[tokio::test]
async fn the_slot_and_the_breaker_permit_last_until_the_body_ends() {
    let backend = Backend::new(100);
    let layer = layer();
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    let response = channel.clone().oneshot(request("a")).await.unwrap();
    let mut body = response.into_body();
    let message = body.frame().await.unwrap().unwrap();
    assert!(message.is_data());
    assert_eq!(in_flight(&layer), (1, 0), "streaming: the slot is held");
    backend.trailers.add_permits(1);
    let trailers = body.frame().await.unwrap().unwrap();
    assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], "0");
    assert_eq!(in_flight(&layer), (0, 0), "the trailers free it");
    assert_eq!(layer.circuit_breaker_status()["query"], State::Closed);
    let snapshot = &layer.registry().snapshot()["query"];
    assert_eq!(snapshot.failures(), 0);
}

/// A half-open breaker with one probe, behind a bulkhead with room to
/// spare: the probe's permit is held until its body ends.
#[tokio::test(start_paused = true)]
async fn a_probe_holds_its_breaker_permit_until_its_body_ends() {
    let backend = Backend::new(100);
    let config = ResilienceConfig::from_toml(
        "[timeouts]\ndefault = 60000\n\
         [circuit_breakers.query]\nfailure_threshold = 1\ntimeout = 1000\n\
         half_open_max_calls = 1\nsuccess_threshold = 1\n\
         [bulkhead.default]\nmax_concurrent = 10\n",
    )
    .unwrap();
    let layer = ResilienceLayer::new(&config).unwrap();
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    // One failure opens the breaker; a second later it lets one probe by.
    drop(channel.clone().oneshot(request("fail")).await.unwrap());
    assert_eq!(layer.circuit_breaker_status()["query"], State::Open);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The probe: admitted, its body streaming.
    let probe = channel.clone().oneshot(request("probe")).await.unwrap();
    let mut body = probe.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    // While it streams, its permit is the only one: the next call is
    // refused, and never sent.
    let err = channel
        .clone()
        .oneshot(request("second"))
        .await
        .unwrap_err();
    assert_refused_by_the_breaker(&err);
    assert_eq!(backend.seen().len(), 2);
    // The probe ends OK: the breaker closes and lets calls through.
    backend.trailers.add_permits(1);
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert_eq!(layer.circuit_breaker_status()["query"], State::Closed);
    drop(body);
    drop(channel.clone().oneshot(request("third")).await.unwrap());
    let seen: Vec<String> = backend.seen().into_iter().map(|(c, _)| c).collect();
    assert_eq!(seen, ["fail", "probe", "third"]);
}

type Limited = tower::limit::ConcurrencyLimit<Backend>;

/// Makes `refused` ready and sends a call that is refused; then another
/// clone of the channel must become ready: the refused call gave back
/// what its readiness reserved (a permit of the `ConcurrencyLimit` below,
/// as a `Buffer` reserves a slot), though `refused` itself lives on.
async fn refusal_releases_readiness(
    mut refused: ResilientChannel<Limited>,
    mut other: ResilientChannel<Limited>,
    code: Code,
) {
    ServiceExt::<http::Request<tonic::body::Body>>::ready(&mut refused)
        .await
        .unwrap();
    let err = refused.call(request("refused")).await.unwrap_err();
    assert_eq!(error_code(&*err), code, "{err}");
    assert!(find_error::<LocalRejection>(&*err).is_some(), "{err}");
    becomes_ready(&mut other, "the refused call").await;
    drop(refused);
}

/// Fails unless `other` becomes ready: what `who` made ready below (a
/// permit of the `ConcurrencyLimit`) was given back.
async fn becomes_ready<S>(other: &mut S, who: &str)
where
    S: Service<http::Request<tonic::body::Body>>,
    S::Error: std::fmt::Debug,
{
    let ready = tokio::time::timeout(
        Duration::from_secs(5),
        ServiceExt::<http::Request<tonic::body::Body>>::ready(other),
    )
    .await;
    assert!(
        ready.is_ok(),
        "{who} kept the permit its readiness reserved"
    );
}

#[tokio::test]
async fn a_call_the_breaker_refuses_releases_what_readiness_reserved() {
    let backend = Backend::new(100);
    let config =
        ResilienceConfig::from_toml("[circuit_breakers.query]\nfailure_threshold = 1000\n")
            .unwrap();
    let layer = ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, Limited::new(backend.clone(), 1));
    layer.registry().get_or_create("query");
    layer.registry().force_open("query").unwrap();
    refusal_releases_readiness(channel.clone(), channel.clone(), Code::Unavailable).await;
    layer.registry().reset("query").unwrap();
    drop(channel.oneshot(request("sent")).await.unwrap());
    let seen: Vec<String> = backend.seen().into_iter().map(|(c, _)| c).collect();
    assert_eq!(seen, ["sent"]);
}

#[tokio::test]
async fn a_call_the_bulkhead_refuses_releases_what_readiness_reserved() {
    // One slot, no queue; two permits below: the call in flight holds one.
    let backend = Backend::new(0);
    let config = ResilienceConfig::from_toml(
        "[circuit_breakers.query]\nfailure_threshold = 1000\n\
         [bulkhead.default]\nmax_concurrent = 1\nmax_queue = 0\n",
    )
    .unwrap();
    let layer = ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, Limited::new(backend.clone(), 2));
    let first = tokio::spawn(channel.clone().oneshot(request("first")));
    until_seen(&backend, 1).await;
    refusal_releases_readiness(channel.clone(), channel.clone(), Code::ResourceExhausted).await;
    backend.gate.add_permits(1);
    drop(first.await.unwrap().unwrap());
}

/// A 100 ms per-attempt timeout under a 5 s deadline, `attempts` attempts
/// with DEADLINE_EXCEEDED retried after 10 ms, one slot.
fn per_attempt_layer(attempts: u32) -> ResilienceLayer {
    let config = ResilienceConfig::from_toml(&format!(
        "[timeouts]\ndefault = 5000\nper_attempt = 100\n\
         [retry.default]\nmax_attempts = {attempts}\ninitial_delay = 10\nmax_delay = 10\n\
         jitter = false\nretryable_codes = [\"DEADLINE_EXCEEDED\"]\n\
         [circuit_breakers.query]\nfailure_threshold = 1000\n\
         [bulkhead.default]\nmax_concurrent = 1\n"
    ))
    .unwrap();
    ResilienceLayer::new(&config).unwrap()
}

// The per-attempt timeout is done in the Guard's own future and body (its
// head timer boxed beside the attempt), no longer by a timeout layer's
// future and body of its own: these pin what it does through the facade.
#[tokio::test(start_paused = true)]
async fn a_per_attempt_timeout_cuts_a_stalled_attempt_and_the_retry_answers() {
    let backend = Backend::new(0);
    let layer = per_attempt_layer(2);
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    let start = tokio::time::Instant::now();
    let call = tokio::spawn(channel.clone().oneshot(request("a")));
    until_seen(&backend, 1).await;
    // The first attempt is cut at 100 ms and retried 10 ms later; the
    // backend answers from 105 ms on.
    tokio::time::sleep(Duration::from_millis(105)).await;
    backend.gate.add_permits(1);
    let response = call.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(110));
    let seen = backend.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].1,
        Some(Duration::from_millis(100)),
        "the per-try bound is sent"
    );
    assert_eq!(seen[1].1, Some(Duration::from_millis(100)));
    // The cut attempt counted against the breaker and gave its slot back;
    // the answer's body holds the slot until it ends.
    assert_eq!(layer.registry().snapshot()["query"].failures(), 1);
    assert_eq!(in_flight(&layer), (1, 0));
    let mut body = response.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    backend.trailers.add_permits(1);
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert_eq!(in_flight(&layer), (0, 0));
    assert_eq!(layer.registry().snapshot()["query"].failures(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_per_attempt_timeout_bounds_the_answers_body_too() {
    // The trailers never come: the attempt's 100 ms, not the call's 5 s,
    // ends the body.
    let start = tokio::time::Instant::now();
    let (layer, _, err) = a_body_cut_by_a_deadline(
        "[timeouts]\ndefault = 5000\nper_attempt = 100\n\
         [circuit_breakers.query]\nfailure_threshold = 1000\n\
         [bulkhead.default]\nmax_concurrent = 1\n",
    )
    .await;
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let elapsed = err
        .downcast_ref::<grpc_timeout::Elapsed>()
        .expect("the timeout's error");
    assert_eq!(elapsed.scope(), grpc_timeout::Scope::Attempt);
    assert!(elapsed.during_body());
    assert_eq!(in_flight(&layer), (0, 0), "the slot is given back");
    assert_eq!(layer.registry().snapshot()["query"].failures(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_calls_deadline_ends_a_body_when_it_comes_before_the_attempts() {
    // A 50 ms call deadline under a 100 ms per-try bound: the attempt's
    // deadline is the call's, and it ends the body.
    let (_, backend, err) = a_body_cut_by_a_deadline(
        "[timeouts]\ndefault = 50\nper_attempt = 100\n\
         [circuit_breakers.query]\nfailure_threshold = 1000\n",
    )
    .await;
    assert_eq!(backend.seen()[0].1, Some(Duration::from_millis(50)));
    let elapsed = err.downcast_ref::<grpc_timeout::Elapsed>().unwrap();
    assert_eq!(elapsed.timeout(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_with_no_time_left_is_not_sent_and_releases_what_readiness_reserved() {
    use grpc_resilience_core::CallDeadline;
    use grpc_timeout::{TimeoutLayer, TimeoutPolicy};

    let backend = Backend::new(100);
    let limited = Limited::new(backend.clone(), 1);
    let per_try = TimeoutLayer::new(TimeoutPolicy::new(Duration::from_millis(100)).unwrap());
    let attempt = crate::attempt::Attempt::On(tower_layer::Layer::layer(
        &per_try.per_attempt(),
        limited.clone(),
    ));
    let breaker = grpc_circuit_breaker::CircuitBreakerLayer::new(Default::default()).gate();
    let mut guard = crate::guard::Guard::new(attempt, None, breaker);
    ServiceExt::<http::Request<tonic::body::Body>>::ready(&mut guard)
        .await
        .unwrap();
    // The call's deadline passed on the way down (a layer above that let
    // it through a moment before): the attempt has no time to be sent.
    let mut late = request("late");
    CallDeadline::at(tokio::time::Instant::now()).insert_into(&mut late);
    let err = guard.call(late).await.unwrap_err();
    assert_eq!(error_code(&*err), Code::DeadlineExceeded, "{err}");
    let elapsed = err.downcast_ref::<grpc_timeout::Elapsed>().unwrap();
    assert!(!elapsed.was_sent());
    assert!(backend.seen().is_empty(), "never sent");
    // The permit the guard's readiness took below is free again.
    becomes_ready(&mut { limited }, "the late attempt").await;
}

/// One call through a facade made of `config`, to a backend that sends
/// one message and never its trailers, read until a deadline cuts the
/// body; returns the layer, the backend and the body's error.
async fn a_body_cut_by_a_deadline(config: &str) -> (ResilienceLayer, Backend, BoxError) {
    let backend = Backend::new(100);
    let layer = ResilienceLayer::new(&ResilienceConfig::from_toml(config).unwrap()).unwrap();
    let channel: ResilientChannel<Backend> = tower_layer::Layer::layer(&layer, backend.clone());
    let response = channel.clone().oneshot(request("a")).await.unwrap();
    let mut body = response.into_body();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(error_code(&*err), Code::DeadlineExceeded);
    assert!(body.frame().await.is_none(), "the body ends with its error");
    (layer, backend, err)
}

/// A 50 ms call deadline that cuts the answer's body (no per-attempt
/// timeout), through a facade with `limits` for its bulkhead and breaker;
/// returns the layer to read them.
async fn call_deadline_cuts_the_body(limits: &str) -> ResilienceLayer {
    let config = format!("[timeouts]\ndefault = 50\n{limits}");
    a_body_cut_by_a_deadline(&config).await.0
}

// The call's deadline ends the answer's body in the attempt's own body
// wrapper now (one wrapper, not one per layer). To the attempt's guards it
// must stay what it was, and what it is before the response: the caller
// giving up (the attempt cancelled), not the server failing.
#[tokio::test(start_paused = true)]
async fn the_calls_deadline_in_the_body_is_a_cancellation_to_an_adaptive_bulkhead() {
    let layer = call_deadline_cuts_the_body(
        "[circuit_breakers.query]\nfailure_threshold = 1000\n\
         [bulkhead.default.aimd]\ninitial_limit = 10\nbackoff_ratio = 0.5\n",
    )
    .await;
    let partition = &layer.bulkhead_partitions()[0];
    assert_eq!(partition.in_flight, 0);
    assert_eq!(partition.limit, 10, "no overload sample: the limit stays");
}

#[tokio::test(start_paused = true)]
async fn the_calls_deadline_in_the_body_is_a_cancellation_to_the_breaker() {
    // A breaker that counts only UNAVAILABLE as a failure ignores a
    // cancelled call, and would count a DEADLINE_EXCEEDED one a success.
    let layer = call_deadline_cuts_the_body(
        "[circuit_breakers.query]\nfailure_codes = [\"UNAVAILABLE\"]\n\
         [circuit_breakers.query.failure_rate]\nwindow = 10\nminimum_calls = 5\n",
    )
    .await;
    let snapshot = &layer.registry().snapshot()["query"];
    assert_eq!(
        snapshot.calls_in_window(),
        Some(0),
        "ignored, as a cancellation"
    );
}

#[tokio::test]
async fn a_call_with_no_time_left_releases_what_readiness_reserved() {
    // One permit below: a call that expires before it is sent must not
    // keep it.
    let backend = Backend::new(100);
    let config = ResilienceConfig::from_toml("[timeouts]\ndefault = 5000\n").unwrap();
    let layer = ResilienceLayer::new(&config).unwrap();
    let limited = Limited::new(backend.clone(), 1);
    let mut late: ResilientChannel<Limited> = tower_layer::Layer::layer(&layer, limited.clone());
    let mut other: ResilientChannel<Limited> = tower_layer::Layer::layer(&layer, limited);
    ServiceExt::<http::Request<tonic::body::Body>>::ready(&mut late)
        .await
        .unwrap();
    let mut request = request("late");
    request
        .headers_mut()
        .insert("grpc-timeout", "0n".parse().unwrap());
    let err = late.call(request).await.unwrap_err();
    assert_eq!(error_code(&*err), Code::DeadlineExceeded, "{err}");
    assert!(
        !err.downcast_ref::<grpc_timeout::Elapsed>()
            .unwrap()
            .was_sent()
    );
    becomes_ready(&mut other, "the expired call").await;
    assert!(backend.seen().is_empty());
    drop(late);
}
