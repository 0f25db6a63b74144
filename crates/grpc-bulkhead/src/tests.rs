use std::time::Duration;

use bytes::Bytes;
use grpc_resilience_core::error::{LocalRejection, find_error};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::sync::mpsc;
use tokio::time::advance;
use tokio_test::task;
use tonic::Code;
use tower_test::mock;

use super::*;
use grpc_resilience_core::BoxError;

const GET: &str = "/catalog.v1.QueryService/GetProduct";
const LIST: &str = "/catalog.v1.QueryService/ListProducts";
const CREATE: &str = "/catalog.v1.CommandService/CreateProduct";
const QUERY: &str = "catalog.v1.QueryService";

type FrameResult = Result<Frame<Bytes>, BoxError>;
type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<FrameResult>>;
type Req = http::Request<Empty<Bytes>>;
type Res = http::Response<Body>;
type Svc = mock::Spawn<Bulkhead<mock::Mock<Req, Res>>>;
type Handle = mock::Handle<Req, Res>;

fn config(limit: u32, queue: u32, wait_ms: u64) -> BulkheadConfig {
    BulkheadConfig::builder()
        .max_concurrent(limit)
        .max_queue(queue)
        .max_wait(Duration::from_millis(wait_ms))
        .build()
        .unwrap()
}

fn setup(layer: &BulkheadLayer) -> (Svc, Handle) {
    mock::spawn_layer(layer.clone())
}

fn request(path: &str) -> Req {
    http::Request::builder()
        .uri(format!("http://catalog{path}"))
        .body(Empty::new())
        .unwrap()
}

/// A Trailers-Only response with `code`.
fn trailers_only(code: Code) -> Res {
    let (_tx, rx) = mpsc::channel(1);
    let mut response = http::Response::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    response
        .headers_mut()
        .insert("grpc-status", (code as i32).to_string().parse().unwrap());
    response
}

/// A response whose body the test feeds.
fn streaming() -> (Res, mpsc::Sender<FrameResult>) {
    let (tx, rx) = mpsc::channel(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    (http::Response::new(body), tx)
}

fn ok_trailers() -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    Frame::trailers(trailers)
}

type Fut = task::Spawn<future::ResponseFuture<mock::Mock<Req, Res>, Empty<Bytes>>>;

/// Starts a call; `poll_ready` must never refuse.
fn start(service: &mut Svc, path: &str) -> Fut {
    assert!(
        matches!(service.poll_ready(), std::task::Poll::Ready(Ok(()))),
        "poll_ready never waits for a slot or rejects"
    );
    task::spawn(service.call(request(path)))
}

/// Starts a call that must be admitted, and answers it with `response`.
async fn admitted(
    service: &mut Svc,
    handle: &mut Handle,
    path: &str,
) -> (Fut, mock::SendResponse<Res>) {
    let mut fut = start(service, path);
    assert!(fut.poll().is_pending());
    let (req, send) = handle.next_request().await.expect("sent to the service");
    assert_eq!(req.uri().path(), path);
    (fut, send)
}

/// Starts a call that must be rejected at once, without being sent.
fn rejected(service: &mut Svc, handle: &mut Handle, path: &str) -> BulkheadFull {
    let mut fut = start(service, path);
    let std::task::Poll::Ready(Err(err)) = fut.poll() else {
        panic!("should be rejected at once");
    };
    assert!(
        handle.poll_request().is_pending(),
        "a rejected call is not sent"
    );
    *err.downcast::<BulkheadFull>().expect("a BulkheadFull")
}

fn status_of(layer: &BulkheadLayer, name: &str) -> PartitionStatus {
    layer
        .partitions()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no partition {name}"))
}

#[tokio::test(start_paused = true)]
async fn at_most_the_limit_in_flight_then_resource_exhausted() {
    let layer = BulkheadLayer::new(config(2, 0, 0));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let (_b, _send_b) = admitted(&mut service, &mut handle, GET).await;
    assert_eq!(status_of(&layer, QUERY).in_flight, 2);

    let full = rejected(&mut service, &mut handle, GET);
    assert_eq!(full.partition(), QUERY);
    assert_eq!(full.reason(), Rejection::QueueFull);
    assert_eq!(full.status().code(), Code::ResourceExhausted);
    let err: BoxError = Box::new(full);
    assert!(
        find_error::<LocalRejection>(&*err).is_some(),
        "marked as a local refusal, so the retry layer leaves it"
    );
    let status = tonic::Status::from_error(err);
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "what a stub's caller sees"
    );
    assert!(
        status.message().contains("`catalog.v1.QueryService`"),
        "{status:?}"
    );

    // A Trailers-Only answer frees its slot as it arrives.
    send_a.send_response(trailers_only(Code::Ok));
    let response = a.await.unwrap();
    assert_eq!(status_of(&layer, QUERY).in_flight, 1);
    drop(response);
    let (_c, _send_c) = admitted(&mut service, &mut handle, GET).await;
}

#[tokio::test(start_paused = true)]
async fn a_streaming_response_holds_its_slot_until_the_body_ends() {
    let layer = BulkheadLayer::new(config(1, 0, 0));
    let (mut service, mut handle) = setup(&layer);
    let (fut, send) = admitted(&mut service, &mut handle, LIST).await;
    let (response, tx) = streaming();
    send.send_response(response);
    let mut body = fut.await.unwrap().into_body();

    tx.send(Ok(Frame::data(Bytes::from_static(b"msg"))))
        .await
        .unwrap();
    assert!(body.frame().await.unwrap().unwrap().is_data());
    rejected(&mut service, &mut handle, GET);

    tx.send(Ok(ok_trailers())).await.unwrap();
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert_eq!(status_of(&layer, QUERY).in_flight, 0, "freed at the end");
    let (_next, _send) = admitted(&mut service, &mut handle, GET).await;
}

#[tokio::test(start_paused = true)]
async fn a_dropped_body_or_future_frees_the_slot() {
    let layer = BulkheadLayer::new(config(1, 0, 0));
    let (mut service, mut handle) = setup(&layer);

    let (fut, send) = admitted(&mut service, &mut handle, LIST).await;
    let (response, tx) = streaming();
    send.send_response(response);
    let mut body = fut.await.unwrap().into_body();
    tx.send(Ok(Frame::data(Bytes::from_static(b"msg"))))
        .await
        .unwrap();
    body.frame().await.unwrap().unwrap();
    rejected(&mut service, &mut handle, GET);
    drop(body);
    assert_eq!(status_of(&layer, QUERY).in_flight, 0);

    let (fut, _send) = admitted(&mut service, &mut handle, GET).await;
    rejected(&mut service, &mut handle, GET);
    drop(fut);
    assert_eq!(status_of(&layer, QUERY).in_flight, 0);
    let (_fut, _send) = admitted(&mut service, &mut handle, GET).await;
}

#[tokio::test(start_paused = true)]
async fn an_error_from_the_service_frees_the_slot() {
    let layer = BulkheadLayer::new(config(1, 0, 0));
    let (mut service, mut handle) = setup(&layer);
    let (fut, send) = admitted(&mut service, &mut handle, GET).await;
    send.send_error(std::io::Error::other("connection reset"));
    let err = fut.await.unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    assert_eq!(status_of(&layer, QUERY).in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_is_sent_when_a_slot_frees() {
    let layer = BulkheadLayer::new(config(1, 1, 1_000));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;

    let mut b = start(&mut service, GET);
    assert!(b.poll().is_pending(), "queued");
    assert!(handle.poll_request().is_pending(), "not sent while queued");
    assert_eq!(status_of(&layer, QUERY).queued, 1);
    // The queue holds one: the next call is refused.
    assert_eq!(
        rejected(&mut service, &mut handle, GET).reason(),
        Rejection::QueueFull
    );

    advance(Duration::from_millis(300)).await;
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert!(b.is_woken(), "the freed slot wakes the waiter");
    assert!(b.poll().is_pending());
    let (req, send_b) = handle.next_request().await.expect("b is sent");
    assert_eq!(req.uri().path(), GET);
    assert_eq!(status_of(&layer, QUERY).in_flight, 1);
    send_b.send_response(trailers_only(Code::Ok));
    b.await.unwrap();
    assert_eq!(status_of(&layer, QUERY).in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_is_rejected_after_the_maximum_wait() {
    let layer = BulkheadLayer::new(config(1, 4, 100));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let mut b = start(&mut service, GET);
    assert!(b.poll().is_pending());
    advance(Duration::from_millis(99)).await;
    assert!(b.poll().is_pending(), "still within max_wait");
    advance(Duration::from_millis(2)).await;
    let std::task::Poll::Ready(Err(err)) = b.poll() else {
        panic!("rejected after max_wait");
    };
    assert!(handle.poll_request().is_pending(), "never sent");
    let full = err.downcast::<BulkheadFull>().unwrap();
    assert_eq!(full.reason(), Rejection::WaitTimedOut);
    assert_eq!(
        tonic::Status::from_error(full).code(),
        Code::ResourceExhausted
    );
    assert_eq!(status_of(&layer, QUERY).queued, 0);

    // Its place and no slot were kept: once `a` ends, a call goes at once.
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    let (_c, _send) = admitted(&mut service, &mut handle, GET).await;
}

/// A request with a `grpc-timeout` header of `ms` milliseconds.
fn with_timeout(path: &str, ms: u64) -> Req {
    let mut request = request(path);
    request
        .headers_mut()
        .insert("grpc-timeout", format!("{ms}m").parse().unwrap());
    request
}

fn timeout_sent(req: &Req) -> Duration {
    let value = req.headers().get("grpc-timeout").expect("a grpc-timeout");
    grpc_resilience_core::timeout_header::decode(value.as_bytes()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_is_sent_with_the_time_it_has_left() {
    let layer = BulkheadLayer::new(config(1, 2, 1_000));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;

    // One call with only the caller's header, one with the deadline an
    // upper layer recorded (and the header it wrote then).
    assert!(service.poll_ready().is_ready());
    let mut b = task::spawn(service.call(with_timeout(GET, 900)));
    let recorded = grpc_resilience_core::CallDeadline::after(Duration::from_millis(500)).unwrap();
    let mut c_request = with_timeout(GET, 500);
    recorded.insert_into(&mut c_request);
    assert!(service.poll_ready().is_ready());
    let mut c = task::spawn(service.call(c_request));
    assert!(b.poll().is_pending() && c.poll().is_pending(), "queued");

    advance(Duration::from_millis(300)).await;
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert!(b.poll().is_pending());
    let (req, send_b) = handle.next_request().await.expect("b is sent");
    assert_eq!(
        timeout_sent(&req),
        Duration::from_millis(600),
        "the server is told the time left after 300 ms in the queue, not the 900 ms the caller had"
    );
    send_b.send_response(trailers_only(Code::Ok));
    b.await.unwrap();

    assert!(c.poll().is_pending());
    let (req, send_c) = handle.next_request().await.expect("c is sent");
    assert_eq!(timeout_sent(&req), Duration::from_millis(200));
    assert_eq!(
        req.extensions().get::<grpc_resilience_core::CallDeadline>(),
        Some(&recorded),
        "the recorded deadline is kept"
    );
    send_c.send_response(trailers_only(Code::Ok));
    c.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_queued_call_whose_deadline_comes_first_is_not_sent() {
    let layer = BulkheadLayer::new(config(1, 4, 1_000));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    assert!(service.poll_ready().is_ready());
    let mut b = task::spawn(service.call(with_timeout(GET, 200)));
    assert!(b.poll().is_pending());
    advance(Duration::from_millis(199)).await;
    assert!(b.poll().is_pending(), "still within its deadline");
    advance(Duration::from_millis(2)).await;
    let std::task::Poll::Ready(Err(err)) = b.poll() else {
        panic!("refused at its deadline, not after the 1 s max_wait");
    };
    assert!(handle.poll_request().is_pending(), "never sent");
    assert!(find_error::<LocalRejection>(&*err).is_some(), "{err}");
    let full = err.downcast::<BulkheadFull>().unwrap();
    assert_eq!(full.reason(), Rejection::Deadline);
    assert_eq!(full.status().code(), Code::DeadlineExceeded);
    assert_eq!(
        tonic::Status::from_error(full).code(),
        Code::DeadlineExceeded
    );
    assert_eq!(status_of(&layer, QUERY).queued, 0);

    // A call whose deadline has passed when it reaches a full partition is
    // refused at once.
    let mut late = http::Request::builder()
        .uri(format!("http://catalog{GET}"))
        .body(Empty::new())
        .unwrap();
    grpc_resilience_core::CallDeadline::at(tokio::time::Instant::now()).insert_into(&mut late);
    assert!(service.poll_ready().is_ready());
    let mut late = task::spawn(service.call(late));
    let std::task::Poll::Ready(Err(err)) = late.poll() else {
        panic!("refused at once");
    };
    let full = err.downcast::<BulkheadFull>().unwrap();
    assert_eq!(full.reason(), Rejection::Deadline);
    assert_eq!(status_of(&layer, QUERY).queued, 0);

    // No slot was kept: once `a` ends, a call goes at once.
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    let (_c, _send) = admitted(&mut service, &mut handle, GET).await;
}

#[tokio::test(start_paused = true)]
async fn under_a_deadline_layer_the_caller_hears_from_it_and_both_count() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    // Timeout > Bulkhead, as in the facade's stack: both end the queued
    // call at the same instant.
    let bulkhead = BulkheadLayer::new(config(1, 1, 10_000));
    let policy = grpc_timeout::TimeoutPolicy::new(Duration::from_millis(100)).unwrap();
    let stack = tower::ServiceBuilder::new()
        .layer(grpc_timeout::TimeoutLayer::new(policy))
        .layer(bulkhead.clone());
    let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(stack);
    assert!(service.poll_ready().is_ready());
    let mut a = task::spawn(service.call(request(GET)));
    assert!(a.poll().is_pending());
    let (_req, _send_a) = handle.next_request().await.expect("a is sent");
    assert!(service.poll_ready().is_ready());
    let mut b = task::spawn(service.call(request(GET)));
    assert!(b.poll().is_pending(), "queued");

    advance(Duration::from_millis(100)).await;
    let std::task::Poll::Ready(Err(err)) = b.poll() else {
        panic!("b's deadline has passed");
    };
    assert!(handle.poll_request().is_pending(), "b was never sent");
    let elapsed = err
        .downcast::<grpc_timeout::Elapsed>()
        .expect("the deadline layer's own error");
    assert!(!elapsed.was_sent(), "{}", elapsed.status().message());
    assert_eq!(elapsed.status().code(), Code::DeadlineExceeded);
    assert_eq!(status_of(&bulkhead, QUERY).queued, 0);

    let counters: std::collections::BTreeMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(c) if c > 0 => Some((key.key().name().to_owned(), c)),
            _ => None,
        })
        .collect();
    assert_eq!(
        counters,
        [
            ("bulkhead.rejected.count".to_owned(), 1),
            ("grpc.timeout.count".to_owned(), 1)
        ]
        .into_iter()
        .collect(),
        "the call timed out, and the bulkhead says it was in its queue"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_granted_at_the_deadline_is_passed_on() {
    // The slot frees at the very instant the waiter's deadline passes: the
    // waiter is refused, and the slot goes to the next call in the queue.
    let layer = BulkheadLayer::new(config(1, 4, 1_000));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    assert!(service.poll_ready().is_ready());
    let mut b = task::spawn(service.call(with_timeout(GET, 100)));
    let mut c = start(&mut service, GET);
    assert!(b.poll().is_pending() && c.poll().is_pending());
    advance(Duration::from_millis(100)).await;
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    let std::task::Poll::Ready(Err(err)) = b.poll() else {
        panic!("b's deadline has passed");
    };
    assert_eq!(
        err.downcast::<BulkheadFull>().unwrap().reason(),
        Rejection::Deadline
    );
    assert!(c.poll().is_pending());
    let std::task::Poll::Ready(Some((req, _send_c))) = handle.poll_request() else {
        panic!("c gets the slot b gave up, at once");
    };
    assert_eq!(req.uri().path(), GET);
    assert_eq!(status_of(&layer, QUERY).in_flight, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_queued_call_gives_up_its_place() {
    let layer = BulkheadLayer::new(config(1, 1, 1_000));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let mut b = start(&mut service, GET);
    assert!(b.poll().is_pending());
    drop(b);
    let mut c = start(&mut service, GET);
    assert!(c.poll().is_pending(), "b's place in the queue is free");
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert!(c.poll().is_pending());
    let (_req, _send_c) = handle.next_request().await.expect("c gets the slot");
}

#[tokio::test(start_paused = true)]
async fn partitions_are_independent() {
    let layer = BulkheadLayer::new(config(1, 0, 0));
    let (mut service, mut handle) = setup(&layer);
    let (_get, _send) = admitted(&mut service, &mut handle, GET).await;
    rejected(&mut service, &mut handle, LIST);
    // The Command service has its own partition.
    let (_create, _send) = admitted(&mut service, &mut handle, CREATE).await;
    let names: Vec<String> = layer.partitions().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["catalog.v1.CommandService", QUERY]);

    // Per method: GetProduct full leaves ListProducts alone.
    let layer = BulkheadLayer::with_partitioning(config(1, 0, 0), Partitioning::PerMethod);
    let (mut service, mut handle) = setup(&layer);
    let (_get, _send) = admitted(&mut service, &mut handle, GET).await;
    rejected(&mut service, &mut handle, GET);
    let (_list, _send) = admitted(&mut service, &mut handle, LIST).await;
}

#[tokio::test(start_paused = true)]
async fn a_selector_partition_takes_the_calls_it_matches() {
    let layer = BulkheadLayer::new(config(5, 0, 0))
        .with_partition("GetProduct", config(1, 0, 0))
        .unwrap();
    let (mut service, mut handle) = setup(&layer);
    let (_get, _send) = admitted(&mut service, &mut handle, GET).await;
    let full = rejected(&mut service, &mut handle, GET);
    assert_eq!(full.partition(), "GetProduct");
    // ListProducts goes to the Query service's own partition.
    let (_list, _send) = admitted(&mut service, &mut handle, LIST).await;
    assert_eq!(status_of(&layer, QUERY).in_flight, 1);

    // Only selected calls are limited by an empty layer.
    let layer = BulkheadLayer::empty()
        .with_partition("catalog.v1.CommandService/*", config(1, 0, 0))
        .unwrap();
    let (mut service, mut handle) = setup(&layer);
    let (_a, _s) = admitted(&mut service, &mut handle, CREATE).await;
    rejected(&mut service, &mut handle, CREATE);
    for _ in 0..3 {
        let (_f, _s) = admitted(&mut service, &mut handle, GET).await;
    }
    let names: Vec<String> = layer.partitions().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["catalog.v1.CommandService/*"]);
}

#[test]
fn bad_selectors_and_configs_are_named() {
    let err = BulkheadLayer::empty()
        .with_partition("a/b/c", BulkheadConfig::default())
        .unwrap_err();
    assert_eq!(err.field(), "selector");
    assert_eq!(err.value(), "a/b/c");
    let err = BulkheadLayer::empty()
        .with_partition("GetProduct", BulkheadConfig::default())
        .unwrap()
        .with_partition("GetProduct", BulkheadConfig::default())
        .unwrap_err();
    assert!(err.to_string().contains("more than once"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn non_grpc_paths_are_not_limited() {
    let layer = BulkheadLayer::new(config(1, 0, 0));
    let (mut service, mut handle) = setup(&layer);
    for _ in 0..3 {
        let (_f, _s) = admitted(&mut service, &mut handle, "/healthz").await;
    }
}

#[tokio::test(start_paused = true)]
async fn metrics_count_in_flight_rejections_and_waits() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let layer = BulkheadLayer::new(config(1, 1, 50));
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let mut waited = start(&mut service, GET);
    assert!(waited.poll().is_pending());
    rejected(&mut service, &mut handle, GET);
    advance(Duration::from_millis(20)).await;
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert!(waited.poll().is_pending());
    let (_req, _send) = handle.next_request().await.unwrap();
    let mut timed_out = start(&mut service, GET);
    assert!(timed_out.poll().is_pending());
    advance(Duration::from_millis(51)).await;
    assert!(timed_out.poll().is_ready());
    assert!(service.poll_ready().is_ready());
    let mut too_late = task::spawn(service.call(with_timeout(GET, 10)));
    assert!(too_late.poll().is_pending());
    advance(Duration::from_millis(11)).await;
    assert!(too_late.poll().is_ready());

    let mut gauges = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeMap::new();
    let mut histograms = std::collections::BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        match value {
            DebugValue::Gauge(g) => {
                gauges.insert(name, g.into_inner());
            }
            DebugValue::Counter(c) => {
                counters.insert(name, c);
            }
            DebugValue::Histogram(h) => {
                histograms.insert(
                    name,
                    h.into_iter().map(|v| v.into_inner()).collect::<Vec<_>>(),
                );
            }
        }
    }
    let p = "partition=catalog.v1.QueryService";
    assert_eq!(gauges[&format!("bulkhead.in_flight{{{p}}}")], 1.0);
    assert_eq!(gauges[&format!("bulkhead.limit{{{p}}}")], 1.0);
    assert_eq!(
        counters[&format!("bulkhead.rejected.count{{{p},reason=queue_full}}")],
        1
    );
    assert_eq!(
        counters[&format!("bulkhead.rejected.count{{{p},reason=max_wait}}")],
        1
    );
    assert_eq!(
        counters[&format!("bulkhead.rejected.count{{{p},reason=deadline}}")],
        1
    );
    let waits = &histograms[&format!("bulkhead.wait.duration{{{p}}}")];
    assert_eq!(waits.len(), 3, "{waits:?}");
    assert!((waits[0] - 0.020).abs() < 1e-3, "{waits:?}");
    assert!((waits[1] - 0.050).abs() < 2e-3, "{waits:?}");
    assert!((waits[2] - 0.010).abs() < 2e-3, "{waits:?}");
}

fn aimd_layer() -> BulkheadLayer {
    let config = BulkheadConfig::builder()
        .aimd(Aimd {
            initial_limit: 4,
            min_limit: 1,
            max_limit: 10,
            backoff_ratio: 0.5,
            latency_threshold: Duration::from_millis(100),
        })
        .build()
        .unwrap();
    BulkheadLayer::new(config)
}

#[tokio::test(start_paused = true)]
async fn aimd_backs_off_on_overload_and_slowness_and_grows_on_success() {
    let layer = aimd_layer();
    let (mut service, mut handle) = setup(&layer);
    assert_eq!(layer.partitions(), []);
    let limit = |layer: &BulkheadLayer| status_of(layer, QUERY).limit;

    // The server sheds the call: halve.
    let (f, send) = admitted(&mut service, &mut handle, GET).await;
    send.send_response(trailers_only(Code::ResourceExhausted));
    f.await.unwrap();
    assert_eq!(limit(&layer), 2);

    // Slow (150 ms to the response headers, over the 100 ms threshold):
    // halve again.
    let (f, send) = admitted(&mut service, &mut handle, GET).await;
    advance(Duration::from_millis(150)).await;
    send.send_response(trailers_only(Code::Ok));
    f.await.unwrap();
    assert_eq!(limit(&layer), 1);

    // Fast successes, the limit in use: after a backoff, one more per
    // limit's worth of calls: 1 + 1/1 = 2, 2.5, 2.9.
    for expected in [2, 2, 2] {
        let (f, send) = admitted(&mut service, &mut handle, GET).await;
        if status_of(&layer, QUERY).limit == 1 {
            rejected(&mut service, &mut handle, GET);
        }
        advance(Duration::from_millis(10)).await;
        send.send_response(trailers_only(Code::Ok));
        f.await.unwrap();
        assert_eq!(limit(&layer), expected);
    }

    // A stream that lasts long is not slow: latency is measured to its
    // response headers.
    let (f, send) = admitted(&mut service, &mut handle, LIST).await;
    let (response, tx) = streaming();
    advance(Duration::from_millis(10)).await;
    send.send_response(response);
    let mut body = f.await.unwrap().into_body();
    advance(Duration::from_secs(5)).await;
    tx.send(Ok(ok_trailers())).await.unwrap();
    assert!(body.frame().await.unwrap().unwrap().is_trailers());
    assert_eq!(
        limit(&layer),
        3,
        "a success like any other (2.9 + 1/2.9): no backoff"
    );

    // A call refused below (an open breaker) and a cancelled call say
    // nothing about the server.
    let (f, send) = admitted(&mut service, &mut handle, GET).await;
    send.send_error(LocalRejection::new(tonic::Status::unavailable(
        "breaker open",
    )));
    f.await.unwrap_err();
    let (f, _send) = admitted(&mut service, &mut handle, GET).await;
    drop(f);
    assert_eq!(limit(&layer), 3);
}

#[tokio::test(start_paused = true)]
async fn a_growing_adaptive_limit_wakes_queued_calls() {
    let config = BulkheadConfig::builder()
        .aimd(Aimd {
            initial_limit: 2,
            min_limit: 1,
            max_limit: 10,
            backoff_ratio: 0.5,
            latency_threshold: Duration::from_millis(100),
        })
        .max_queue(4)
        .max_wait(Duration::from_secs(1))
        .build()
        .unwrap();
    let layer = BulkheadLayer::new(config);
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let (_b, _send_b) = admitted(&mut service, &mut handle, GET).await;
    let mut c = start(&mut service, GET);
    let mut d = start(&mut service, GET);
    assert!(c.poll().is_pending() && d.poll().is_pending());
    // `a` succeeds: its slot goes to `c`, and the limit grows to 3, which
    // lets `d` in too.
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert_eq!(status_of(&layer, QUERY).limit, 3);
    assert!(c.poll().is_pending() && d.poll().is_pending());
    handle.next_request().await.expect("c is sent");
    handle.next_request().await.expect("d is sent");
    assert_eq!(status_of(&layer, QUERY).in_flight, 3);
}

#[tokio::test(start_paused = true)]
async fn gradient_settles_where_latency_starts_to_grow() {
    let config = BulkheadConfig::builder()
        .gradient(Gradient {
            initial_limit: 2,
            min_limit: 1,
            max_limit: 100,
            smoothing: 0.5,
            tolerance: 1.0,
            queue_allowance: 2.0,
            short_window: 1,
            min_rtt_window: Duration::from_secs(60),
        })
        .build()
        .unwrap();
    let layer = BulkheadLayer::new(config);
    let (mut service, mut handle) = setup(&layer);
    // Rounds of as many concurrent calls as the partition admits; the
    // server answers in 10 ms up to 8 at once, and proportionally slower
    // beyond (it queues).
    let mut limits = Vec::new();
    for _ in 0..40 {
        let mut calls = Vec::new();
        loop {
            let mut fut = start(&mut service, GET);
            if fut.poll().is_ready() {
                break;
            }
            let (_, send) = handle.next_request().await.unwrap();
            calls.push((fut, send));
        }
        let n = calls.len() as u64;
        advance(Duration::from_millis(10 * n.max(8) / 8)).await;
        for (fut, send) in calls {
            send.send_response(trailers_only(Code::Ok));
            fut.await.unwrap();
        }
        limits.push(status_of(&layer, QUERY).limit);
    }
    assert!(limits[0] > 2, "grows from 2: {limits:?}");
    // Every round brings a batch of samples at once, so it circles the
    // point where latency starts to grow (8) plus the allowance, never
    // far from it.
    assert!(
        limits[10..].iter().all(|l| (6..=13).contains(l)),
        "stays near 8 + allowance: {limits:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_maximum_wait_past_the_end_of_time_waits_without_panicking() {
    let config = BulkheadConfig::builder()
        .max_concurrent(1)
        .max_queue(1)
        .max_wait(Duration::MAX)
        .build()
        .unwrap();
    let layer = BulkheadLayer::new(config);
    let (mut service, mut handle) = setup(&layer);
    let (a, send_a) = admitted(&mut service, &mut handle, GET).await;
    let mut b = start(&mut service, GET);
    assert!(b.poll().is_pending());
    advance(Duration::from_secs(3600)).await;
    assert!(b.poll().is_pending(), "still waiting");
    send_a.send_response(trailers_only(Code::Ok));
    a.await.unwrap();
    assert!(b.poll().is_pending());
    handle.next_request().await.expect("b is sent");
}

/// The admission half, as a service that fuses the bulkhead into its own
/// future uses it: a queued call's wait resolves to its slot once, and a
/// wait polled again after that says so, without counting a refusal.
#[tokio::test(start_paused = true)]
async fn a_gate_queues_grants_and_resolves_its_wait_once() {
    let layer = BulkheadLayer::new(config(1, 1, 1_000));
    let mut gate = layer.gate();
    let Admission::Admitted(first) = gate.admit(&mut request(GET)) else {
        panic!("a free slot")
    };
    let Admission::Queued(wait) = gate.admit(&mut request(GET)) else {
        panic!("the partition is full: the call queues")
    };
    assert!(matches!(
        gate.admit(&mut request(GET)),
        Admission::Rejected(_)
    ));
    let mut wait = Box::pin(wait);
    let mut polled = task::spawn(std::future::poll_fn(|cx| wait.as_mut().poll(cx)));
    assert!(polled.poll().is_pending(), "no slot yet");
    drop(first);
    let std::task::Poll::Ready(Ok(second)) = polled.poll() else {
        panic!("the freed slot goes to the queued call")
    };
    drop(polled);
    assert_eq!(status_of(&layer, "catalog.v1.QueryService").in_flight, 1);
    let again = std::future::poll_fn(|cx| wait.as_mut().poll(cx)).await;
    let err = again.expect_err("a wait resolves once");
    assert!(find_error::<BulkheadFull>(&*err).is_none(), "{err}");
    assert_eq!(status_of(&layer, "catalog.v1.QueryService").in_flight, 1);
    drop(second);
    assert_eq!(status_of(&layer, "catalog.v1.QueryService").in_flight, 0);
}

/// A service whose readiness reserves capacity (a `ConcurrencyLimit`, as a
/// `Buffer` reserves a slot): a call the bulkhead refuses gives the
/// reservation back, so another clone can be made ready while the
/// refused caller backs off.
#[tokio::test]
async fn a_refused_call_releases_what_readiness_reserved() {
    use tower::{Service, ServiceExt};
    // Every call hangs: the first one holds its slot and one permit.
    let hangs = tower::service_fn(|_: Req| {
        std::future::pending::<Result<http::Response<Empty<Bytes>>, BoxError>>()
    });
    let limited = tower::limit::ConcurrencyLimit::new(hangs, 2);
    let mut first = Bulkhead::new(limited, config(1, 0, 1_000));
    let (mut refused, mut other) = (first.clone(), first.clone());
    let held = first.ready().await.unwrap().call(request(GET));
    let mut held = task::spawn(held);
    assert!(held.poll().is_pending(), "in flight, holding the only slot");
    // Made ready (the second permit), then refused: the partition is full.
    let err = refused
        .ready()
        .await
        .unwrap()
        .call(request(GET))
        .await
        .unwrap_err();
    assert!(find_error::<BulkheadFull>(&*err).is_some(), "{err}");
    let ready = tokio::time::timeout(Duration::from_secs(5), other.ready()).await;
    assert!(
        ready.is_ok(),
        "the refused call kept the permit its readiness reserved"
    );
    drop((held, refused));
}
