//! Deadlines, pushback bounds, throttle accounting and hostile status
//! headers, on paused time.

use std::time::Duration;

use bytes::Bytes;
use grpc_resilience_core::{BoxError, CallDeadline, timeout_header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;
use tower_test::mock;

use super::*;
use crate::decide::PUSHBACK;

const GET: &str = "/catalog.v1.QueryService/GetProduct";

type Req = http::Request<Body>;
type Res = http::Response<Body>;
type Svc = mock::Spawn<Retry<mock::Mock<Req, Res>>>;
type Handle = mock::Handle<Req, Res>;
type Out = Result<http::Response<ResponseBody<Body>>, BoxError>;

fn no_jitter() -> RetryPolicy {
    RetryPolicy::default().with_jitter(Jitter::None)
}

fn layer(policy: RetryPolicy) -> RetryLayer {
    RetryLayer::new(RetryPolicies::new(policy).unwrap())
}

fn request(path: &str, timeout: Option<&str>) -> Req {
    let mut builder = http::Request::builder().uri(format!("http://catalog{path}"));
    if let Some(t) = timeout {
        builder = builder.header("grpc-timeout", t);
    }
    builder
        .body(Body::new(Full::new(Bytes::from_static(b"x"))))
        .unwrap()
}

fn trailers_only(code: Code) -> Res {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", (code as i32).to_string().parse().unwrap());
    response
}

fn with_message(code: Code, message: &str) -> Res {
    let mut response = trailers_only(code);
    response
        .headers_mut()
        .insert("grpc-message", message.parse().unwrap());
    response
}

fn with_pushback(code: Code, value: &str) -> Res {
    let mut response = trailers_only(code);
    response
        .headers_mut()
        .insert(PUSHBACK, value.parse().unwrap());
    response
}

/// Headers first, then `trailers` after one message: committed.
fn committed_with(trailers: http::HeaderMap) -> Res {
    let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))),
        Ok(Frame::trailers(trailers)),
    ];
    http::Response::new(Body::new(StreamBody::new(tokio_stream::iter(frames))))
}

fn committed(code: Code) -> Res {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", (code as i32).to_string().parse().unwrap());
    committed_with(trailers)
}

/// What the service saw of one attempt.
struct Seen {
    headers: http::HeaderMap,
    deadline: Option<CallDeadline>,
    at: Instant,
}

async fn next(handle: &mut Handle) -> (Seen, mock::SendResponse<Res>) {
    let (req, send) = handle.next_request().await.expect("an attempt");
    let (parts, body) = req.into_parts();
    body.collect().await.expect("a body");
    let seen = Seen {
        deadline: parts.extensions.get::<CallDeadline>().copied(),
        headers: parts.headers,
        at: Instant::now(),
    };
    (seen, send)
}

fn status_of(result: Out) -> tonic::Status {
    match result {
        Ok(response) => tonic::Status::from_header_map(response.headers())
            .unwrap_or_else(|| tonic::Status::ok("")),
        Err(err) => tonic::Status::from_error(err),
    }
}

fn sent_timeout(seen: &Seen) -> Duration {
    timeout_header::decode(seen.headers["grpc-timeout"].as_bytes()).unwrap()
}

/// Runs one call: the service answers attempt `i` with `answers[i]`.
async fn run(
    service: &mut Svc,
    handle: &mut Handle,
    req: Req,
    answers: Vec<Res>,
) -> (Out, Vec<Seen>) {
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(req));
    let mut seen = Vec::new();
    for answer in answers {
        let (s, send) = next(handle).await;
        seen.push(s);
        send.send_response(answer);
    }
    (fut.await.unwrap(), seen)
}

// Item 7: one deadline per call, written when the attempt is sent.

#[tokio::test(start_paused = true)]
async fn the_attempt_header_is_written_when_the_attempt_is_sent() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    let start = Instant::now();
    handle.allow(1);
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, Some("1S"))));
    let (first, send) = next(&mut handle).await;
    assert_eq!(sent_timeout(&first), Duration::from_secs(1));
    send.send_response(trailers_only(Code::Unavailable));
    // The 100 ms backoff ends, then the service is not ready until 400 ms.
    tokio::time::sleep(Duration::from_millis(400)).await;
    handle.allow(1);
    let (second, send) = next(&mut handle).await;
    assert_eq!(second.at - start, Duration::from_millis(400));
    assert_eq!(
        sent_timeout(&second),
        Duration::from_millis(600),
        "the time left when the attempt was sent, not when the backoff ended"
    );
    assert_eq!(
        second.deadline.map(|d| d.instant()),
        Some(start + Duration::from_secs(1)),
        "every attempt carries the one instant"
    );
    assert_eq!(
        first.deadline.map(|d| d.instant()),
        Some(start + Duration::from_secs(1)),
        "the first attempt carries the call's deadline"
    );
    send.send_response(committed(Code::Ok));
    assert_eq!(status_of(fut.await.unwrap()).code(), Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_recorded_above_wins_over_the_header() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    let start = Instant::now();
    let mut req = request(GET, Some("5S"));
    CallDeadline::at(start + Duration::from_millis(300)).insert_into(&mut req);
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![trailers_only(Code::Unavailable), committed(Code::Ok)],
    )
    .await;
    assert_eq!(status_of(result).code(), Code::Ok);
    assert_eq!(sent_timeout(&seen[0]), Duration::from_millis(300));
    assert_eq!(sent_timeout(&seen[1]), Duration::from_millis(200));
}

// Item 10: an expired deadline is not sent.

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_is_not_sent() {
    let policies = RetryPolicies::new(no_jitter())
        .unwrap()
        .without_retry("ListProducts")
        .unwrap();
    let (mut service, mut handle) = mock::spawn_layer(RetryLayer::new(policies));
    let passed = {
        let mut req = request(GET, None);
        CallDeadline::at(Instant::now()).insert_into(&mut req);
        req
    };
    for (what, req) in [
        ("grpc-timeout 0", request(GET, Some("0n"))),
        ("a deadline reached above", passed),
        (
            "a method without a policy",
            request("/catalog.v1.QueryService/ListProducts", Some("0m")),
        ),
    ] {
        assert!(service.poll_ready().is_ready(), "{what}: ready");
        let mut fut = tokio_test::task::spawn(service.call(req));
        let result = match fut.poll() {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => panic!("{what}: the call was sent"),
        };
        let err = result.as_ref().expect_err("an error");
        assert!(
            grpc_resilience_core::error::find_error::<grpc_resilience_core::error::LocalRejection>(
                &**err
            )
            .is_some(),
            "{what}: never sent, a local rejection: {err:?}"
        );
        let status = status_of(result);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{what}: {status:?}");
        assert!(status.message().contains("deadline"), "{what}: {status:?}");
        assert!(handle.poll_request().is_pending(), "{what}: nothing sent");
    }
}

#[tokio::test(start_paused = true)]
async fn no_retry_attempt_starts_at_or_past_the_deadline() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    let start = Instant::now();
    handle.allow(1);
    assert!(service.poll_ready().is_ready());
    let call = service.call(request(GET, Some("1S")));
    let fut = tokio::spawn(async move {
        let result = call.await;
        (result, Instant::now())
    });
    let (_, send) = next(&mut handle).await;
    send.send_response(with_message(Code::Unavailable, "db down"));
    // The backoff fits, but the service stays busy past the deadline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fut.is_finished(), "the call ends at its deadline");
    handle.allow(1);
    tokio::task::yield_now().await;
    assert!(
        handle.poll_request().is_pending(),
        "no attempt after the deadline"
    );
    let (result, ended) = fut.await.unwrap();
    assert_eq!(
        ended - start,
        Duration::from_secs(1),
        "ended at the deadline"
    );
    let status = status_of(result);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("UNAVAILABLE") && status.message().contains("db down"),
        "names the last attempt's status: {status:?}"
    );
}

// Item 9: a retry abandoned for lack of time says so.

#[tokio::test(start_paused = true)]
async fn a_retry_abandoned_for_lack_of_time_says_so_and_keeps_the_code() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter().with_max_attempts(5)));
    let mut answer = with_message(Code::ResourceExhausted, "quota 100%");
    answer
        .headers_mut()
        .insert("x-server", "eu-1".parse().unwrap());
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, Some("250m")),
        vec![trailers_only(Code::Unavailable), answer],
    )
    .await;
    assert_eq!(seen.len(), 2);
    let response = result.expect("a Trailers-Only response");
    assert_eq!(response.headers()["x-server"], "eu-1", "metadata kept");
    let status = tonic::Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "the server's code");
    let message = status.message();
    assert!(message.starts_with("quota 100%"), "{message}");
    assert!(message.contains("deadline leaves no time"), "{message}");
    assert!(message.contains("150ms left"), "{message}");
    assert!(message.contains("200ms"), "{message}");

    let counted = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(k, ..)| k.key().name() == "grpc.retry.deadline_exhausted");
    let (key, _, _, value) = counted.expect("grpc.retry.deadline_exhausted");
    let labels: Vec<String> = key
        .key()
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    assert_eq!(
        labels,
        ["service=catalog.v1.QueryService", "method=GetProduct"]
    );
    assert_eq!(value, DebugValue::Counter(1));
}

#[tokio::test(start_paused = true)]
async fn a_transport_error_abandoned_for_lack_of_time_says_so() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, Some("50m"))));
    let (_, send) = next(&mut handle).await;
    send.send_error(std::io::Error::other("connection reset"));
    let err = fut.await.unwrap().unwrap_err();
    let status = tonic::Status::from_error(err);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("connection reset"), "{status:?}");
    assert!(
        status.message().contains("deadline leaves no time")
            && status.message().contains("50ms left"),
        "{status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pushback_past_the_deadline_says_so() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    let start = Instant::now();
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, Some("2S")),
        vec![with_pushback(Code::Unavailable, "3000")],
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "returned at once");
    let status = status_of(result);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("deadline leaves no time")
            && status.message().contains("pushback 3s"),
        "{status:?}"
    );
}

// Item 11: pushback is bounded.

#[tokio::test(start_paused = true)]
async fn a_pushback_of_years_is_not_waited_without_a_deadline() {
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, None)));
    let (_, send) = next(&mut handle).await;
    send.send_response(with_pushback(Code::Unavailable, "999999999999"));
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(3600), fut)
        .await
        .expect("the call returns instead of waiting years")
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(status_of(result).code(), Code::Unavailable);
    assert!(handle.poll_request().is_pending());
}

#[tokio::test(start_paused = true)]
async fn pushback_up_to_the_bound_is_waited_and_above_it_is_not() {
    // The default bound: the larger of max_delay (5 s) and 10 s.
    assert_eq!(
        RetryPolicy::default().max_pushback(),
        Duration::from_secs(10)
    );
    assert_eq!(
        RetryPolicy::default()
            .with_max_delay(Duration::from_secs(60))
            .max_pushback(),
        Duration::from_secs(60)
    );
    let (mut service, mut handle) = mock::spawn_layer(layer(no_jitter()));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![
            with_pushback(Code::Unavailable, "10000"),
            committed(Code::Ok),
        ],
    )
    .await;
    assert_eq!(status_of(result).code(), Code::Ok);
    assert_eq!(seen[1].at - seen[0].at, Duration::from_secs(10));

    let bounded = no_jitter().with_max_pushback(Duration::from_millis(500));
    let (mut service, mut handle) = mock::spawn_layer(layer(bounded));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![
            with_pushback(Code::Unavailable, "500"),
            with_pushback(Code::Aborted, "501"),
        ],
    )
    .await;
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].at - seen[0].at, Duration::from_millis(500));
    assert_eq!(
        status_of(result).code(),
        Code::Aborted,
        "the server's status"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());

    // A call can set its own bound.
    let mut req = request(GET, None);
    req.extensions_mut()
        .insert(RetryOverride::new().with_max_pushback(Duration::from_millis(100)));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![with_pushback(Code::Unavailable, "200")],
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(status_of(result).code(), Code::Unavailable);
}

// Item 12: the throttle counts what gRFC A6 counts.

fn throttled(max_attempts: u32) -> (RetryLayer, RetryThrottle) {
    let throttle = RetryThrottle::new(4.0, 1.0).unwrap();
    let layer = layer(no_jitter().with_max_attempts(max_attempts)).with_throttle(throttle.clone());
    (layer, throttle)
}

/// Drains the bucket from 4 to 2 tokens with two retryable failures.
async fn drain_to_two(service: &mut Svc, handle: &mut Handle, throttle: &RetryThrottle) {
    let (_, seen) = run(
        service,
        handle,
        request(GET, None),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
        ],
    )
    .await;
    assert_eq!(seen.len(), 2);
    assert_eq!(throttle.tokens(), 2.0);
}

#[tokio::test(start_paused = true)]
async fn non_retryable_failures_neither_take_nor_add_tokens() {
    let (layer, throttle) = throttled(2);
    let (mut service, mut handle) = mock::spawn_layer(layer);
    drain_to_two(&mut service, &mut handle, &throttle).await;
    for code in [
        Code::NotFound,
        Code::InvalidArgument,
        Code::PermissionDenied,
    ] {
        let (result, _) = run(
            &mut service,
            &mut handle,
            request(GET, None),
            vec![trailers_only(code)],
        )
        .await;
        assert_eq!(status_of(result).code(), code);
        assert_eq!(throttle.tokens(), 2.0, "{code:?} leaves the bucket alone");
    }
    // A failure with pushback takes a token, whatever its code.
    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![with_pushback(Code::NotFound, "10")],
    )
    .await;
    assert_eq!(status_of(result).code(), Code::NotFound);
    assert_eq!(throttle.tokens(), 1.0, "pushback counts as a failure");
}

#[tokio::test(start_paused = true)]
async fn a_committed_call_adds_a_token_only_when_it_ends_ok() {
    let (layer, throttle) = throttled(2);
    let (mut service, mut handle) = mock::spawn_layer(layer);
    drain_to_two(&mut service, &mut handle, &throttle).await;

    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![committed(Code::Unavailable)],
    )
    .await;
    let body = result.unwrap().into_body();
    assert_eq!(throttle.tokens(), 2.0, "nothing before the trailers");
    let trailers = body.collect().await.unwrap().trailers().cloned();
    assert_eq!(trailers.unwrap()["grpc-status"], "14");
    assert_eq!(
        throttle.tokens(),
        2.0,
        "a failure in the trailers is no success"
    );

    // A body dropped before its end is not a success either.
    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![committed(Code::Ok)],
    )
    .await;
    drop(result.unwrap());
    assert_eq!(throttle.tokens(), 2.0);

    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![committed(Code::Ok)],
    )
    .await;
    result.unwrap().into_body().collect().await.unwrap();
    assert_eq!(
        throttle.tokens(),
        3.0,
        "OK in the trailers adds token_ratio"
    );

    // A Trailers-Only OK is known at once.
    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![trailers_only(Code::Ok)],
    )
    .await;
    assert_eq!(throttle.tokens(), 4.0);
    drop(result);
}

// Item 6: a hostile grpc-status-details-bin never reaches tonic.

fn bad_details(mut response: Res) -> Res {
    response.headers_mut().insert(
        grpc_resilience_core::headers::GRPC_STATUS_DETAILS,
        "not*base64!".parse().unwrap(),
    );
    response
}

#[tokio::test(start_paused = true)]
async fn invalid_status_details_are_dropped_before_tonic_reads_them() {
    let policies = RetryPolicies::new(no_jitter())
        .unwrap()
        .without_retry("ListProducts")
        .unwrap();
    let (mut service, mut handle) = mock::spawn_layer(RetryLayer::new(policies));
    // Retried, then returned; not retried; passed through.
    for (path, answers) in [
        (
            GET,
            vec![
                bad_details(trailers_only(Code::Unavailable)),
                bad_details(trailers_only(Code::Unavailable)),
                bad_details(trailers_only(Code::Unavailable)),
            ],
        ),
        (GET, vec![bad_details(trailers_only(Code::NotFound))]),
        (
            "/catalog.v1.QueryService/ListProducts",
            vec![bad_details(trailers_only(Code::Internal))],
        ),
    ] {
        let n = answers.len();
        let (result, seen) = run(&mut service, &mut handle, request(path, None), answers).await;
        assert_eq!(seen.len(), n);
        let response = result.unwrap();
        assert!(
            !response
                .headers()
                .contains_key(grpc_resilience_core::headers::GRPC_STATUS_DETAILS),
            "{path}: {:?}",
            response.headers()
        );
        // tonic 0.14.9 would panic here on the hostile value.
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_ne!(status.code(), Code::Ok);
    }

    // In the trailers of a committed call.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "13".parse().unwrap());
    trailers.insert(
        grpc_resilience_core::headers::GRPC_STATUS_DETAILS,
        "%%%".parse().unwrap(),
    );
    let (result, _) = run(
        &mut service,
        &mut handle,
        request(GET, None),
        vec![committed_with(trailers)],
    )
    .await;
    let trailers = result
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .trailers()
        .cloned()
        .unwrap();
    assert!(!trailers.contains_key(grpc_resilience_core::headers::GRPC_STATUS_DETAILS));
    assert_eq!(
        tonic::Status::from_header_map(&trailers).unwrap().code(),
        Code::Internal
    );
}
