use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::sync::mpsc;
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
    let _guard = metrics::set_default_local_recorder(&recorder);
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
