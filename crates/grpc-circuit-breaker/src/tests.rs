use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grpc_resilience_core::BoxError;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio::time::advance;
use tonic::Code;
use tower_test::mock;

use super::*;

const GET: &str = "/catalog.v1.QueryService/GetProduct";
const CREATE: &str = "/catalog.v1.CommandService/CreateProduct";

type FrameResult = Result<Frame<Bytes>, BoxError>;
type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<FrameResult>>;
type Req = http::Request<Empty<Bytes>>;
type Res = http::Response<Body>;
type Svc = mock::Spawn<CircuitBreaker<mock::Mock<Req, Res>>>;
type Handle = mock::Handle<Req, Res>;

fn registry() -> BreakerRegistry {
    BreakerRegistry::with_default_config(
        BreakerConfig::default()
            .with_failure_threshold(3)
            .with_timeout(Duration::from_secs(10)),
    )
    .unwrap()
}

fn setup(registry: &BreakerRegistry) -> (Svc, Handle) {
    mock::spawn_layer(CircuitBreakerLayer::new(registry.clone()))
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

/// A streaming response: one message, then `code` in the trailers.
fn streamed(code: Code) -> Res {
    let (tx, rx) = mpsc::channel(2);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", (code as i32).to_string().parse().unwrap());
    tx.try_send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))))
        .unwrap();
    tx.try_send(Ok(Frame::trailers(trailers))).unwrap();
    http::Response::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// Sends one call answered with `response`; reads the body to its end.
async fn call(
    service: &mut Svc,
    handle: &mut Handle,
    path: &str,
    response: Res,
) -> Result<(), BoxError> {
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(path));
    let (_, send) = handle
        .next_request()
        .await
        .expect("the call reaches the service");
    send.send_response(response);
    let response = fut.await?;
    response.into_body().collect().await?;
    Ok(())
}

/// Three Trailers-Only UNAVAILABLE answers: opens a breaker with the test
/// registry's threshold of 3.
async fn trip(service: &mut Svc, handle: &mut Handle) {
    for _ in 0..3 {
        call(service, handle, GET, trailers_only(Code::Unavailable))
            .await
            .unwrap();
    }
}

async fn rejected(service: &mut Svc, handle: &mut Handle, path: &str) -> BreakerOpen {
    assert!(
        service.poll_ready().is_ready(),
        "never rejects from poll_ready"
    );
    let err = service.call(request(path)).await.unwrap_err();
    assert!(
        handle.poll_request().is_pending(),
        "a rejected call is not sent"
    );
    *err.downcast::<BreakerOpen>().expect("a BreakerOpen")
}

#[tokio::test(start_paused = true)]
async fn trailers_only_failures_open_the_breaker() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    assert_eq!(registry.state("query"), Some(State::Open));
    let open = rejected(&mut service, &mut handle, GET).await;
    assert_eq!(open.breaker(), "query");
    assert_eq!(open.state(), State::Open);
    let status = tonic::Status::from_error(Box::new(open));
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("`query`"), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn failures_in_trailers_after_messages_count() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..3 {
        call(&mut service, &mut handle, GET, streamed(Code::Internal))
            .await
            .unwrap();
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn client_errors_and_successes_do_not_count() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for code in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::AlreadyExists,
        Code::Ok,
        Code::NotFound,
    ] {
        call(&mut service, &mut handle, GET, trailers_only(code))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        call(&mut service, &mut handle, GET, streamed(Code::Ok))
            .await
            .unwrap();
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
}

#[tokio::test(start_paused = true)]
async fn transport_errors_count() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..3 {
        assert!(service.poll_ready().is_ready());
        let fut = service.call(request(GET));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(fut.await.is_err());
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn services_have_independent_breakers() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    call(&mut service, &mut handle, CREATE, trailers_only(Code::Ok))
        .await
        .unwrap();
    let status = registry.status();
    assert_eq!(status["query"], State::Open);
    assert_eq!(status["command"], State::Closed);
}

#[tokio::test(start_paused = true)]
async fn recovery_half_open_then_closed() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    advance(Duration::from_secs(9)).await;
    rejected(&mut service, &mut handle, GET).await;
    advance(Duration::from_secs(1)).await;
    assert_eq!(registry.state("query"), Some(State::HalfOpen));
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();
    call(&mut service, &mut handle, GET, streamed(Code::Ok))
        .await
        .unwrap();
    assert_eq!(registry.state("query"), Some(State::Closed));
}

#[tokio::test(start_paused = true)]
async fn failures_older_than_reset_timeout_are_forgotten_on_the_tokio_clock() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    // The default reset_timeout is 60 s; 61 s later the two are forgotten.
    advance(Duration::from_secs(61)).await;
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        registry.state("query"),
        Some(State::Closed),
        "2 recent failures, threshold 3"
    );
    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_returns_its_slot() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    advance(Duration::from_secs(10)).await;
    // Two probes: one dropped before its response, one whose body is dropped.
    assert!(service.poll_ready().is_ready());
    let dropped_future = service.call(request(GET));
    let _ = handle.next_request().await.unwrap();
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(GET));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(streamed(Code::Ok));
    let response = fut.await.unwrap();
    rejected(&mut service, &mut handle, GET).await;
    drop(dropped_future);
    drop(response);
    // Both slots are back and nothing was counted.
    assert_eq!(registry.state("query"), Some(State::HalfOpen));
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(registry.state("query"), Some(State::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_call_cut_by_its_deadline_counts_as_a_failure() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..3 {
        assert!(service.poll_ready().is_ready());
        let mut req = request(GET);
        req.headers_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        let fut = service.call(req);
        let _pending = handle.next_request().await.unwrap();
        // A timeout layer above drops the call at its deadline.
        let _ = tokio::time::timeout(Duration::from_millis(100), fut).await;
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn a_caller_going_away_early_counts_as_nothing() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..5 {
        assert!(service.poll_ready().is_ready());
        let mut req = request(GET);
        req.headers_mut()
            .insert("grpc-timeout", "10S".parse().unwrap());
        let fut = service.call(req);
        let _pending = handle.next_request().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), fut).await;
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
}

#[tokio::test(start_paused = true)]
async fn operators_and_subscribers() {
    let registry = registry();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    registry.subscribe(move |c| {
        seen.lock()
            .unwrap()
            .push((c.breaker.to_string(), c.from, c.to))
    });
    let mut watch = registry.watch();
    let (mut service, mut handle) = setup(&registry);
    call(&mut service, &mut handle, CREATE, trailers_only(Code::Ok))
        .await
        .unwrap();

    registry.force_open("command").unwrap();
    let open = rejected(&mut service, &mut handle, CREATE).await;
    assert_eq!(open.state(), State::ForcedOpen);
    registry.disable("command").unwrap();
    for _ in 0..5 {
        call(
            &mut service,
            &mut handle,
            CREATE,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    assert_eq!(registry.state("command"), Some(State::Disabled));
    registry.reset("command").unwrap();
    assert_eq!(registry.state("command"), Some(State::Closed));
    assert_eq!(
        registry.reset("nope").unwrap_err().to_string(),
        "no circuit breaker is named `nope`"
    );

    let expected = vec![
        ("command".to_string(), State::Closed, State::ForcedOpen),
        ("command".to_string(), State::ForcedOpen, State::Disabled),
        ("command".to_string(), State::Disabled, State::Closed),
    ];
    assert_eq!(*changes.lock().unwrap(), expected);
    let first = watch.recv().await.unwrap();
    assert_eq!(
        (first.from, first.to, first.trigger),
        (State::Closed, State::ForcedOpen, Trigger::ForcedOpen)
    );
}

#[tokio::test(start_paused = true)]
async fn custom_and_single_keying() {
    let registry = registry();
    let key: KeyFn =
        Arc::new(|_uri, headers| headers.get("x-tenant").and_then(|v| v.to_str().ok()));
    let (mut service, mut handle) = mock::spawn_layer(CircuitBreakerLayer::with_keying(
        registry.clone(),
        Keying::Custom(key),
    ));
    for tenant in ["acme", "acme", "acme", "globex"] {
        assert!(service.poll_ready().is_ready());
        let mut req = request(GET);
        req.headers_mut()
            .insert("x-tenant", tenant.parse().unwrap());
        let fut = service.call(req);
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(trailers_only(Code::Unavailable));
        fut.await.unwrap();
    }
    assert_eq!(registry.state("acme"), Some(State::Open));
    assert_eq!(registry.state("globex"), Some(State::Closed));

    let single = BreakerRegistry::new();
    let (mut service, mut handle) = mock::spawn_layer(CircuitBreakerLayer::with_keying(
        single.clone(),
        Keying::Single("downstream".into()),
    ));
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();
    call(&mut service, &mut handle, CREATE, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(single.names(), vec!["downstream".to_string()]);
}

#[test]
fn service_names_become_breaker_names() {
    assert_eq!(service_breaker_name("catalog.v1.CommandService"), "command");
    assert_eq!(service_breaker_name("catalog.v1.QueryService"), "query");
    assert_eq!(
        service_breaker_name("shop.ProductCatalogService"),
        "product_catalog"
    );
    assert_eq!(service_breaker_name("Echo"), "echo");
    assert_eq!(service_breaker_name("pkg.Service"), "service");
}

#[tokio::test(start_paused = true)]
async fn the_state_gauge_zeroes_the_old_state() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = ::metrics::set_default_local_recorder(&recorder);
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    rejected(&mut service, &mut handle, GET).await;

    let mut gauges = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeMap::new();
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
            DebugValue::Histogram(_) => {}
        }
    }
    assert_eq!(
        gauges["circuit_breaker.state{breaker=query,state=closed}"],
        0.0
    );
    assert_eq!(
        gauges["circuit_breaker.state{breaker=query,state=open}"],
        1.0
    );
    assert_eq!(
        counters["circuit_breaker.call.count{breaker=query,state=closed,outcome=failure}"],
        3
    );
    assert_eq!(
        counters["circuit_breaker.rejected.count{breaker=query,state=open}"],
        1
    );
    assert_eq!(
        counters["circuit_breaker.transitions.count{breaker=query,from=closed,to=open}"],
        1
    );
}

/// Reads every metric of a debugging recorder into `name{labels}` keys.
fn metric_values(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> (
    std::collections::BTreeMap<String, f64>,
    std::collections::BTreeMap<String, u64>,
) {
    use metrics_util::debugging::DebugValue;
    let mut gauges = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeMap::new();
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
            DebugValue::Histogram(_) => {}
        }
    }
    (gauges, counters)
}

#[tokio::test(start_paused = true)]
async fn a_rejection_releases_the_buffer_slot_it_reserved() {
    let registry = registry();
    registry.get_or_create("query");
    registry.force_open("query").unwrap();
    let (inner, _handle) = mock::pair::<Req, Res>();
    // One slot: whoever holds the reservation blocks every other clone.
    let buffer = tower::buffer::Buffer::new(inner, 1);
    let mut breaker = mock::Spawn::new(tower_layer::Layer::layer(
        &CircuitBreakerLayer::new(registry.clone()),
        buffer.clone(),
    ));
    assert!(breaker.poll_ready().is_ready());
    let err = breaker.call(request(GET)).await.unwrap_err();
    assert!(err.is::<BreakerOpen>(), "{err}");
    let mut other = mock::Spawn::new(buffer.clone());
    assert!(
        other.poll_ready().is_ready(),
        "the rejected call still pins the buffer's only slot"
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_cancelled_at_its_recorded_deadline_counts_as_a_failure() {
    use grpc_resilience_core::CallDeadline;
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..3 {
        assert!(service.poll_ready().is_ready());
        // An upper layer recorded the deadline; no grpc-timeout header.
        let mut req = request(GET);
        CallDeadline::at(Instant::now() + Duration::from_millis(100)).insert_into(&mut req);
        let fut = service.call(req);
        let _pending = handle.next_request().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), fut).await;
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn a_call_cancelled_just_before_its_recorded_deadline_counts_as_nothing() {
    use grpc_resilience_core::CallDeadline;
    let registry = registry();
    registry.get_or_create("query");
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..5 {
        assert_eq!(registry.state("query"), Some(State::Closed));
        assert!(service.poll_ready().is_ready());
        let mut req = request(GET);
        req.headers_mut()
            .insert("grpc-timeout", "100m".parse().unwrap());
        CallDeadline::at(Instant::now() + Duration::from_millis(100)).insert_into(&mut req);
        let fut = service.call(req);
        let _pending = handle.next_request().await.unwrap();
        // The caller leaves 1 ms before the deadline: its own choice.
        let _ = tokio::time::timeout(Duration::from_millis(99), fut).await;
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
}

/// A response whose headers arrive at once and whose body ends with OK
/// after `body_for`.
async fn long_stream(
    service: &mut Svc,
    handle: &mut Handle,
    headers_after: Duration,
    body_for: Duration,
) {
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(GET));
    let (_, send) = handle.next_request().await.unwrap();
    let (tx, rx) = mpsc::channel(2);
    tokio::time::advance(headers_after).await;
    send.send_response(http::Response::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )));
    let response = fut.await.unwrap();
    tokio::time::advance(body_for).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    tx.try_send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))))
        .unwrap();
    tx.try_send(Ok(Frame::trailers(trailers))).unwrap();
    drop(tx);
    response.into_body().collect().await.unwrap();
}

/// A window of 4 calls that opens when all 4 were slow (headers after 1 s
/// or more).
/// Four calls whose headers take 2 s: slow by [`four_slow_calls_open`].
async fn four_slow_calls(service: &mut Svc, handle: &mut Handle) {
    for _ in 0..4 {
        long_stream(service, handle, Duration::from_secs(2), Duration::ZERO).await;
    }
}

fn four_slow_calls_open() -> FailureRate {
    FailureRate {
        window: 4,
        minimum_calls: 4,
        failure_rate: 100.0,
        slow_call_duration: Some(Duration::from_secs(1)),
        slow_call_rate: 100.0,
    }
}

#[tokio::test(start_paused = true)]
async fn slow_calls_are_slow_to_answer_not_long_streams() {
    let slow = BreakerConfig::default().with_failure_rate(four_slow_calls_open());
    let registry = BreakerRegistry::with_default_config(slow).unwrap();
    let (mut service, mut handle) = setup(&registry);
    // Answers at once, then streams for 2 s: not slow.
    for _ in 0..4 {
        long_stream(
            &mut service,
            &mut handle,
            Duration::ZERO,
            Duration::from_secs(2),
        )
        .await;
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
    // Headers after 2 s: slow.
    four_slow_calls(&mut service, &mut handle).await;
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn metrics_appear_when_the_recorder_comes_after_the_breaker() {
    use metrics_util::debugging::DebuggingRecorder;

    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    // Both breakers exist and have served calls before any recorder.
    call(&mut service, &mut handle, CREATE, trailers_only(Code::Ok))
        .await
        .unwrap();
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = ::metrics::set_default_local_recorder(&recorder);
    call(&mut service, &mut handle, CREATE, trailers_only(Code::Ok))
        .await
        .unwrap();
    trip(&mut service, &mut handle).await;
    rejected(&mut service, &mut handle, GET).await;

    let (gauges, counters) = metric_values(&snapshotter);
    assert_eq!(
        counters.get("circuit_breaker.call.count{breaker=query,state=closed,outcome=failure}"),
        Some(&3),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("circuit_breaker.call.count{breaker=command,state=closed,outcome=success}"),
        Some(&1),
        "{counters:?}"
    );
    assert_eq!(
        counters.get("circuit_breaker.rejected.count{breaker=query,state=open}"),
        Some(&1)
    );
    assert_eq!(
        gauges.get("circuit_breaker.state{breaker=query,state=open}"),
        Some(&1.0),
        "{gauges:?}"
    );
    assert_eq!(
        gauges.get("circuit_breaker.state{breaker=command,state=closed}"),
        Some(&1.0),
        "{gauges:?}"
    );
}

#[test]
fn the_state_gauge_ends_on_the_current_state_under_concurrent_transitions() {
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let registry = ::metrics::with_local_recorder(&recorder, || {
        let registry = BreakerRegistry::new();
        registry.get_or_create("query");
        registry
    });
    // Every change as subscribers see it: (generation, to).
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    registry.subscribe(move |c| seen.lock().unwrap().push((c.generation, c.to)));
    let actions: [fn(&BreakerRegistry); 3] = [
        |r| r.force_open("query").unwrap(),
        |r| r.disable("query").unwrap(),
        |r| r.reset("query").unwrap(),
    ];
    for round in 0..200 {
        std::thread::scope(|s| {
            for t in 0..3 {
                let registry = &registry;
                let recorder = &recorder;
                s.spawn(move || {
                    ::metrics::with_local_recorder(recorder, || {
                        for i in 0..20 {
                            actions[(t + i) % 3](registry);
                        }
                    })
                });
            }
        });
        let state = registry.state("query").unwrap();
        let changes = std::mem::take(&mut *changes.lock().unwrap());
        assert!(
            changes.windows(2).all(|w| w[0].0 < w[1].0),
            "round {round}: changes published out of order: {changes:?}"
        );
        assert_eq!(changes.last().map(|c| c.1), Some(state), "round {round}");
        let (gauges, _) = metric_values(&snapshotter);
        for other in [State::Closed, State::ForcedOpen, State::Disabled] {
            let value = gauges
                .get(&format!(
                    "circuit_breaker.state{{breaker=query,state={other}}}"
                ))
                .copied();
            let expected = if other == state { 1.0 } else { 0.0 };
            assert_eq!(
                value.unwrap_or(0.0),
                expected,
                "round {round}: the breaker is {state}, the gauge says {gauges:?}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn resetting_a_closed_breaker_forgets_its_failures_silently() {
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = ::metrics::set_default_local_recorder(&recorder);
    let registry = registry();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    registry.subscribe(move |c| seen.lock().unwrap().push((c.from, c.to)));
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    registry.reset("query").unwrap();
    assert_eq!(
        *changes.lock().unwrap(),
        vec![],
        "a closed breaker stays closed"
    );
    let (_, counters) = metric_values(&snapshotter);
    assert!(
        !counters
            .keys()
            .any(|k| k.starts_with("circuit_breaker.transitions.count")),
        "{counters:?}"
    );
    // The two failures were forgotten: two more do not open it.
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test(start_paused = true)]
async fn configuring_an_existing_breaker_keeps_its_state_and_applies_the_new_settings() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    trip(&mut service, &mut handle).await;
    assert_eq!(registry.state("query"), Some(State::Open));
    let new = BreakerConfig::default()
        .with_failure_threshold(1)
        .with_success_threshold(1)
        .with_timeout(Duration::from_secs(20));
    registry.configure("query", new.clone()).unwrap();
    assert_eq!(registry.state("query"), Some(State::Open), "still open");
    assert_eq!(registry.config("query"), Some(new));
    // The new timeout (20 s, not 10 s) counts from when it opened.
    advance(Duration::from_secs(10)).await;
    rejected(&mut service, &mut handle, GET).await;
    advance(Duration::from_secs(10)).await;
    // One probe closes it now, one failure opens it.
    call(&mut service, &mut handle, GET, trailers_only(Code::Ok))
        .await
        .unwrap();
    assert_eq!(registry.state("query"), Some(State::Closed));
    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[test]
fn configured_breakers_are_listed_from_the_start() {
    let registry = BreakerRegistry::new();
    registry
        .configure("command", BreakerConfig::default())
        .unwrap();
    registry
        .configure("query", BreakerConfig::default().with_failure_threshold(2))
        .unwrap();
    let status = registry.status();
    assert_eq!(
        status.into_iter().collect::<Vec<_>>(),
        vec![
            ("command".to_string(), State::Closed),
            ("query".to_string(), State::Closed)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_shows_counts_and_the_time_to_the_next_probe() {
    let registry = registry();
    registry
        .configure(
            "command",
            BreakerConfig::default().with_failure_rate(FailureRate {
                window: 10,
                minimum_calls: 5,
                ..FailureRate::default()
            }),
        )
        .unwrap();
    let (mut service, mut handle) = setup(&registry);
    for code in [Code::Ok, Code::Unavailable, Code::Ok] {
        call(&mut service, &mut handle, CREATE, trailers_only(code))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    let snapshot = registry.snapshot();
    let query = snapshot["query"];
    assert_eq!(query.state(), State::Closed);
    assert_eq!(query.failures(), 2);
    assert_eq!(
        query.calls_in_window(),
        None,
        "count mode counts failures only"
    );
    assert_eq!(query.time_to_next_probe(), None);
    let command = snapshot["command"];
    assert_eq!(
        (
            command.state(),
            command.failures(),
            command.calls_in_window()
        ),
        (State::Closed, 1, Some(3))
    );

    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    advance(Duration::from_secs(4)).await;
    let query = registry.snapshot()["query"];
    assert_eq!(query.state(), State::Open);
    assert_eq!(query.failures(), 3, "the failures that opened it");
    assert_eq!(query.time_to_next_probe(), Some(Duration::from_secs(6)));
    assert_eq!(registry.status()["query"], State::Open);

    registry.reset("query").unwrap();
    let query = registry.snapshot()["query"];
    assert_eq!((query.state(), query.failures()), (State::Closed, 0));
}

#[test]
fn a_bad_config_for_an_existing_breaker_changes_nothing() {
    let registry = registry();
    registry.get_or_create("query");
    let before = registry.config("query").unwrap();
    let err = registry
        .configure("query", BreakerConfig::default().with_failure_threshold(0))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid circuit breaker setting `query.failure_threshold` = 0: must be at least 1"
    );
    assert_eq!(registry.config("query"), Some(before));
}

#[tokio::test(start_paused = true)]
async fn reconfiguring_keeps_the_counts_when_the_window_keeps_its_shape() {
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for _ in 0..2 {
        call(
            &mut service,
            &mut handle,
            GET,
            trailers_only(Code::Unavailable),
        )
        .await
        .unwrap();
    }
    // Same window, lower threshold: the two failures count towards it.
    let config = registry.config("query").unwrap().with_failure_threshold(2);
    registry.configure("query", config).unwrap();
    assert_eq!(registry.snapshot()["query"].failures(), 2);
    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    assert_eq!(registry.state("query"), Some(State::Open));

    // Another mode: counts start afresh.
    registry.reset("query").unwrap();
    call(
        &mut service,
        &mut handle,
        GET,
        trailers_only(Code::Unavailable),
    )
    .await
    .unwrap();
    let rate = registry
        .config("query")
        .unwrap()
        .with_failure_rate(FailureRate::default());
    registry.configure("query", rate).unwrap();
    let query = registry.snapshot()["query"];
    assert_eq!((query.failures(), query.calls_in_window()), (0, Some(0)));
}

/// A caller may call through a fresh clone per call (a client cloned per
/// request): each clone's first call finds its breaker in the shared map,
/// and the breakers stay per service.
#[tokio::test(start_paused = true)]
async fn a_fresh_clone_per_call_reaches_each_services_breaker() {
    let registry = registry();
    let (template, mut handle) = setup(&registry);
    let template = template.into_inner();
    for (path, code) in [
        (GET, Code::Unavailable),
        (CREATE, Code::Ok),
        (GET, Code::Unavailable),
        (CREATE, Code::Unavailable),
        (GET, Code::Unavailable),
    ] {
        let mut service = mock::Spawn::new(template.clone());
        call(&mut service, &mut handle, path, trailers_only(code))
            .await
            .unwrap();
    }
    let status = registry.status();
    assert_eq!(status["query"], State::Open);
    assert_eq!(status["command"], State::Closed);
    let mut service = mock::Spawn::new(template.clone());
    assert_eq!(
        rejected(&mut service, &mut handle, GET).await.breaker(),
        "query"
    );
}

/// What a debugging recorder got since its last snapshot: the latencies in
/// `circuit_breaker.call.latency` and the successes counted in CLOSED.
fn latencies_and_successes(snapshotter: &metrics_util::debugging::Snapshotter) -> (Vec<f64>, u64) {
    use metrics_util::debugging::DebugValue;
    let (mut latencies, mut successes) = (Vec::new(), 0);
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
        };
        match (key.name(), value) {
            ("circuit_breaker.call.latency", DebugValue::Histogram(values)) => {
                latencies.extend(values.into_iter().map(|v| v.into_inner()));
            }
            ("circuit_breaker.call.count", DebugValue::Counter(n))
                if label("state").as_deref() == Some("closed")
                    && label("outcome").as_deref() == Some("success") =>
            {
                successes += n;
            }
            _ => {}
        }
    }
    (latencies, successes)
}

#[tokio::test(start_paused = true)]
async fn the_latency_metric_is_recorded_unless_turned_off_and_slow_calls_count_either_way() {
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = ::metrics::set_default_local_recorder(&recorder);
    let answered_after_300ms = |registry: &BreakerRegistry| {
        let (mut service, mut handle) = setup(registry);
        async move {
            long_stream(
                &mut service,
                &mut handle,
                Duration::from_millis(300),
                Duration::ZERO,
            )
            .await;
        }
    };

    // On by default: each call's time to its headers.
    answered_after_300ms(&registry()).await;
    assert_eq!(latencies_and_successes(&snapshotter), (vec![0.3], 1));

    // Off: calls are counted, not timed.
    let off =
        BreakerRegistry::with_default_config(BreakerConfig::default().with_latency_metric(false))
            .unwrap();
    answered_after_300ms(&off).await;
    assert_eq!(latencies_and_successes(&snapshotter), (vec![], 1));

    // Off, with a slow-call threshold: still timed for it (slow calls open
    // the breaker), still no histogram.
    let slow = BreakerConfig::default()
        .with_latency_metric(false)
        .with_failure_rate(four_slow_calls_open());
    let registry = BreakerRegistry::with_default_config(slow).unwrap();
    let (mut service, mut handle) = setup(&registry);
    four_slow_calls(&mut service, &mut handle).await;
    assert_eq!(registry.state("query"), Some(State::Open));
    assert_eq!(latencies_and_successes(&snapshotter), (vec![], 4));
}

/// A call admitted under one setting and ending under another: the one it
/// was admitted with decides whether it was timed, the current one whether
/// its latency goes to the histogram, and a call that was not timed is
/// never counted slow.
#[tokio::test(start_paused = true)]
async fn the_latency_setting_changing_while_a_call_runs() {
    use metrics_util::debugging::DebuggingRecorder;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = ::metrics::set_default_local_recorder(&recorder);
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);

    // Timed at admission, the metric turned off before the answer.
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(GET));
    let (_, send) = handle.next_request().await.unwrap();
    registry
        .configure("query", BreakerConfig::default().with_latency_metric(false))
        .unwrap();
    tokio::time::advance(Duration::from_millis(300)).await;
    send.send_response(trailers_only(Code::Ok));
    fut.await.unwrap().into_body().collect().await.unwrap();
    assert_eq!(latencies_and_successes(&snapshotter), (vec![], 1));

    // Not timed at admission; then slow calls count and the metric is on.
    // Four slow answers: not counted slow, so the breaker stays closed.
    let mut sent = Vec::new();
    for _ in 0..4 {
        assert!(service.poll_ready().is_ready());
        let fut = service.call(request(GET));
        let (_, send) = handle.next_request().await.unwrap();
        sent.push((fut, send));
    }
    registry
        .configure(
            "query",
            BreakerConfig::default().with_failure_rate(four_slow_calls_open()),
        )
        .unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    for (fut, send) in sent {
        send.send_response(trailers_only(Code::Ok));
        fut.await.unwrap().into_body().collect().await.unwrap();
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
    assert_eq!(latencies_and_successes(&snapshotter), (vec![], 4));
}

/// A request with a static path, as a generated stub sends it.
fn static_request(path: &'static str) -> Req {
    let mut parts = http::Uri::from_static("http://catalog").into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
    http::Request::builder()
        .uri(http::Uri::from_parts(parts).unwrap())
        .body(Empty::new())
        .unwrap()
}

/// Whether the breaker lets `request` through (answered OK) or rejects it.
async fn admitted(service: &mut Svc, handle: &mut Handle, request: Req) -> bool {
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request);
    match handle.poll_request() {
        std::task::Poll::Ready(Some((_, send))) => {
            send.send_response(trailers_only(Code::Ok));
            fut.await.unwrap();
            true
        }
        _ => {
            let err = fut.await.unwrap_err();
            err.downcast::<BreakerOpen>().expect("a BreakerOpen");
            false
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn one_thread_alternating_layers_and_services_reaches_each_ones_own_breaker() {
    // More (layer, path) pairs than a thread remembers, through two layers with their
    // own registries, on one thread: each call must find its own layer's
    // breaker for its own service, whatever the thread last used.
    const PATHS: [&str; 6] = [
        "/test.Svc0/Call",
        "/test.Svc1/Call",
        "/test.Svc2/Call",
        "/test.Svc3/Call",
        "/test.Svc4/Call",
        "/test.Svc5/Call",
    ];
    let (a, b) = (registry(), registry());
    for i in 0..PATHS.len() {
        let name = format!("svc{i}");
        let opened = if i % 2 == 1 { &a } else { &b };
        opened.get_or_create(&name);
        opened.force_open(&name).unwrap();
    }
    let (mut svc_a, mut handle_a) = setup(&a);
    let (mut svc_b, mut handle_b) = setup(&b);
    for _round in 0..2 {
        for (i, path) in PATHS.into_iter().enumerate() {
            let open_in_a = i % 2 == 1;
            for request in [static_request, |p: &'static str| request(p)] {
                assert_eq!(
                    admitted(&mut svc_a, &mut handle_a, request(path)).await,
                    !open_in_a,
                    "{path} through the first layer"
                );
                assert_eq!(
                    admitted(&mut svc_b, &mut handle_b, request(path)).await,
                    open_in_a,
                    "{path} through the second layer"
                );
            }
            // A path that names no gRPC method has no breaker.
            assert!(admitted(&mut svc_a, &mut handle_a, request("/healthz")).await);
        }
    }
    // Each layer worked each path out once (the six methods and the path
    // that names none), though the thread's memory holds fewer pairs.
    assert_eq!(svc_a.get_ref().methods_kept(), PATHS.len() + 1);
    assert_eq!(svc_b.get_ref().methods_kept(), PATHS.len());
    // A layer made after one is dropped gets its own breakers.
    drop((svc_b, handle_b));
    let c = registry();
    let (mut svc_c, mut handle_c) = setup(&c);
    assert!(admitted(&mut svc_c, &mut handle_c, static_request(PATHS[0])).await);
    c.force_open("svc0").unwrap();
    assert!(!admitted(&mut svc_c, &mut handle_c, static_request(PATHS[0])).await);
    assert!(admitted(&mut svc_a, &mut handle_a, static_request(PATHS[0])).await);
}

#[tokio::test(flavor = "current_thread")]
async fn more_paths_than_a_layer_keeps_still_reach_their_own_breakers() {
    // 70 services: the layer's table keeps the first 64 paths; the rest
    // are found as without it, and each call still reaches its own
    // service's breaker.
    let registry = registry();
    let (mut service, mut handle) = setup(&registry);
    for i in (0..70).step_by(3) {
        let name = format!("svc{i}");
        registry.get_or_create(&name);
        registry.force_open(&name).unwrap();
    }
    for round in 0..2 {
        for i in 0..70 {
            let open = i % 3 == 0;
            let path = format!("/test.Svc{i}/Call");
            // A fresh coop budget: the mock's channel refuses to give a
            // request to a task that has not yielded for a while.
            tokio::task::yield_now().await;
            assert_eq!(
                admitted(&mut service, &mut handle, request(&path)).await,
                !open,
                "{path} in round {round}"
            );
        }
    }
    assert_eq!(service.get_ref().methods_kept(), 64);
}
