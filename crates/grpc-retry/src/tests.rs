use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::{Instant, advance};
use tonic::Code;
use tonic::body::Body;
use tower_test::mock;

use super::*;
use crate::decide::PUSHBACK;
use crate::future::PREVIOUS_ATTEMPTS;
use grpc_resilience_core::{BoxError, timeout_header};

const GET: &str = "/catalog.v1.QueryService/GetProduct";
const CREATE: &str = "/catalog.v1.CommandService/CreateProduct";

type Req = http::Request<Body>;
type Res = http::Response<Body>;
type Svc = mock::Spawn<Retry<mock::Mock<Req, Res>>>;
type Handle = mock::Handle<Req, Res>;

fn no_jitter() -> RetryPolicy {
    RetryPolicy::default().with_jitter(Jitter::None)
}

fn setup(layer: RetryLayer) -> (Svc, Handle) {
    mock::spawn_layer(layer)
}

fn layer(policy: RetryPolicy) -> RetryLayer {
    RetryLayer::new(RetryPolicies::new(policy).unwrap())
}

fn request(path: &str, body: &'static [u8]) -> Req {
    http::Request::builder()
        .uri(format!("http://catalog{path}"))
        .body(Body::new(Full::new(Bytes::from_static(body))))
        .unwrap()
}

fn trailers_only(code: Code) -> Res {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", (code as i32).to_string().parse().unwrap());
    response
}

fn with_pushback(code: Code, values: &[&str]) -> Res {
    let mut response = trailers_only(code);
    for v in values {
        response.headers_mut().append(PUSHBACK, v.parse().unwrap());
    }
    response
}

/// Headers first, then a failure in the trailers: committed.
fn committed(code: Code) -> Res {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", (code as i32).to_string().parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01x"))),
        Ok(Frame::trailers(trailers)),
    ];
    http::Response::new(Body::new(StreamBody::new(tokio_stream::iter(frames))))
}

/// What the service saw of one attempt.
#[derive(Debug)]
struct Seen {
    headers: http::HeaderMap,
    body: Bytes,
    at: Instant,
}

async fn next(handle: &mut Handle) -> (Seen, mock::SendResponse<Res>) {
    let (req, send) = handle.next_request().await.expect("an attempt");
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("a body").to_bytes();
    (
        Seen {
            headers: parts.headers,
            body,
            at: Instant::now(),
        },
        send,
    )
}

fn code_of<B>(result: Result<http::Response<B>, BoxError>) -> Code {
    match result {
        Ok(response) => grpc_resilience_core::classify_head(response.status(), response.headers())
            .map_or(Code::Ok, |o| o.code()),
        Err(err) => tonic::Status::from_error(err).code(),
    }
}

/// The status in a result's head (`None`: a response with headers only).
fn code_of_head<B>(result: &Result<http::Response<B>, BoxError>) -> Option<Code> {
    match result {
        Ok(response) => grpc_resilience_core::classify_head(response.status(), response.headers())
            .map(|o| o.code()),
        Err(err) => panic!("the server answered; the caller got an error: {err}"),
    }
}

/// Runs one call; the service answers attempt `i` with `answers[i]`.
async fn run(
    service: &mut Svc,
    handle: &mut Handle,
    req: Req,
    answers: Vec<Res>,
) -> (
    Result<http::Response<ResponseBody<Body>>, BoxError>,
    Vec<Seen>,
) {
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

#[tokio::test(start_paused = true)]
async fn unavailable_twice_then_ok_takes_three_attempts_with_identical_bodies() {
    let (mut service, mut handle) = setup(layer(no_jitter()));
    let start = Instant::now();
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"\0\0\0\0\x04p1p1"),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
            committed(Code::Ok),
        ],
    )
    .await;
    assert_eq!(code_of(result), Code::Ok);
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(
            s.body,
            Bytes::from_static(b"\0\0\0\0\x04p1p1"),
            "byte-identical replay"
        );
    }
    assert!(seen[0].headers.get(PREVIOUS_ATTEMPTS).is_none());
    assert_eq!(seen[1].headers[PREVIOUS_ATTEMPTS], "1");
    assert_eq!(seen[2].headers[PREVIOUS_ATTEMPTS], "2");
    assert_eq!(seen[1].at - seen[0].at, Duration::from_millis(100));
    assert_eq!(seen[2].at - seen[1].at, Duration::from_millis(200));
    assert_eq!(seen[2].at - start, Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn jittered_delays_stay_within_their_bounds() {
    for jitter in [Jitter::Proportional(0.2), Jitter::Full] {
        let (mut service, mut handle) = setup(layer(
            RetryPolicy::default()
                .with_jitter(jitter)
                .with_max_attempts(4),
        ));
        let (_, seen) = run(
            &mut service,
            &mut handle,
            request(GET, b"x"),
            vec![
                trailers_only(Code::Unavailable),
                trailers_only(Code::Unavailable),
                trailers_only(Code::Unavailable),
                committed(Code::Ok),
            ],
        )
        .await;
        for (i, base) in [100u64, 200, 400].into_iter().enumerate() {
            let gap = seen[i + 1].at - seen[i].at;
            let (low, high) = match jitter {
                Jitter::Full => (0, base),
                _ => (base * 8 / 10, base * 12 / 10),
            };
            assert!(
                gap >= Duration::from_millis(low) && gap <= Duration::from_millis(high),
                "{jitter:?} retry {}: {gap:?}",
                i + 1
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn attempts_stop_at_max_attempts_with_the_servers_code() {
    let (mut service, mut handle) = setup(layer(no_jitter()));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
            trailers_only(Code::ResourceExhausted),
        ],
    )
    .await;
    assert_eq!(seen.len(), 3);
    assert_eq!(code_of(result), Code::ResourceExhausted);
    advance(Duration::from_secs(60)).await;
    assert!(handle.poll_request().is_pending(), "no fourth attempt");
}

#[tokio::test(start_paused = true)]
async fn committed_failures_and_client_errors_are_not_retried() {
    for (answer, expected) in [
        (committed(Code::Unavailable), Code::Unavailable),
        (trailers_only(Code::NotFound), Code::NotFound),
        (trailers_only(Code::InvalidArgument), Code::InvalidArgument),
    ] {
        let (mut service, mut handle) = setup(layer(no_jitter()));
        let (result, seen) = run(&mut service, &mut handle, request(GET, b"x"), vec![answer]).await;
        assert_eq!(seen.len(), 1);
        // The caller gets the server's status unchanged: in the head, or
        // (committed) in the trailers after the messages.
        let code = match code_of_head(&result) {
            Some(code) => code,
            None => {
                let body = result.unwrap().into_body().collect().await.unwrap();
                let trailers = body.trailers().expect("trailers with the status");
                Code::from_bytes(trailers["grpc-status"].as_bytes())
            }
        };
        assert_eq!(code, expected);
        advance(Duration::from_secs(10)).await;
        assert!(
            handle.poll_request().is_pending(),
            "{code:?} must not be retried"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn pushback_is_waited_exactly_and_resets_the_backoff() {
    let (mut service, mut handle) = setup(layer(no_jitter().with_max_attempts(4)));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![
            trailers_only(Code::Unavailable),
            with_pushback(Code::Unavailable, &["750"]),
            trailers_only(Code::Unavailable),
            committed(Code::Ok),
        ],
    )
    .await;
    assert_eq!(code_of(result), Code::Ok);
    assert_eq!(seen[1].at - seen[0].at, Duration::from_millis(100));
    assert_eq!(
        seen[2].at - seen[1].at,
        Duration::from_millis(750),
        "pushback, exactly"
    );
    assert_eq!(
        seen[3].at - seen[2].at,
        Duration::from_millis(100),
        "backoff starts over"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_pushback_stops_retrying_and_keeps_the_servers_code() {
    for values in [&["-1"][..], &["soon"], &["10", "20"]] {
        let (mut service, mut handle) = setup(layer(no_jitter()));
        let (result, seen) = run(
            &mut service,
            &mut handle,
            request(GET, b"x"),
            vec![with_pushback(Code::ResourceExhausted, values)],
        )
        .await;
        assert_eq!(seen.len(), 1, "{values:?}");
        assert_eq!(code_of(result), Code::ResourceExhausted, "{values:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_huge_pushback_never_sleeps_past_the_deadline() {
    // max_pushback allows it: the deadline alone must stop the wait.
    let policy = no_jitter().with_max_pushback(Duration::from_secs(100 * 365 * 24 * 3600));
    let (mut service, mut handle) = setup(layer(policy));
    let mut req = request(GET, b"x");
    req.headers_mut()
        .insert("grpc-timeout", "2S".parse().unwrap());
    let start = Instant::now();
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![with_pushback(Code::Unavailable, &["99999999999"])],
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO, "returned at once");
    let response = result.expect("the server's Trailers-Only answer");
    let status = tonic::Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("deadline leaves no time"),
        "stopped by the deadline, not max_pushback: {status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_all_attempts() {
    let (mut service, mut handle) = setup(layer(no_jitter().with_max_attempts(5)));
    let mut req = request(GET, b"x");
    req.headers_mut()
        .insert("grpc-timeout", "250m".parse().unwrap());
    let start = Instant::now();
    // Attempt 1 at 0 ms, attempt 2 at 100 ms; the next would be at 300 ms,
    // past the 250 ms deadline.
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
        ],
    )
    .await;
    assert_eq!(seen.len(), 2);
    assert_eq!(code_of(result), Code::Unavailable);
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    let sent = timeout_header::decode(seen[1].headers["grpc-timeout"].as_bytes()).unwrap();
    assert_eq!(
        sent,
        Duration::from_millis(150),
        "the time left, not the original 250 ms"
    );
    advance(Duration::from_secs(1)).await;
    assert!(handle.poll_request().is_pending());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_during_backoff_stops_everything() {
    let (mut service, mut handle) = setup(layer(no_jitter()));
    assert!(service.poll_ready().is_ready());
    let mut fut = tokio_test::task::spawn(service.call(request(GET, b"x")));
    assert!(fut.poll().is_pending());
    let (_, send) = next(&mut handle).await;
    send.send_response(trailers_only(Code::Unavailable));
    assert!(fut.poll().is_pending(), "now in backoff");
    drop(fut);
    advance(Duration::from_secs(10)).await;
    assert!(
        handle.poll_request().is_pending(),
        "no attempt after the caller left"
    );
}

#[tokio::test(start_paused = true)]
async fn writes_are_retried_only_when_never_processed() {
    let (mut service, mut handle) = setup(layer(no_jitter().non_idempotent()));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(CREATE, b"w"),
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (1, Code::Unavailable));

    // A refused stream never reached the handler: retried even for a write.
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(CREATE, b"w")));
    let (_, send) = next(&mut handle).await;
    send.send_error(crate::test_h2::remote_reset(h2::Reason::REFUSED_STREAM).await);
    let (second, send) = next(&mut handle).await;
    assert_eq!(second.body, Bytes::from_static(b"w"));
    send.send_response(committed(Code::Ok));
    assert_eq!(code_of(fut.await.unwrap()), Code::Ok);

    // A reset after the server may have started: not retried.
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(CREATE, b"w")));
    let (_, send) = next(&mut handle).await;
    send.send_error(std::io::Error::other("connection reset"));
    let err = fut.await.unwrap().unwrap_err();
    let status = tonic::Status::from_error(err);
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "transport errors surface as UNAVAILABLE"
    );
    assert!(status.message().contains("connection reset"), "{status:?}");
    advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
}

#[tokio::test(start_paused = true)]
async fn idempotency_keys_make_writes_retryable_with_one_key() {
    let (mut service, mut handle) =
        setup(layer(no_jitter().non_idempotent().with_idempotency_keys()));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(CREATE, b"w"),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
            committed(Code::Ok),
        ],
    )
    .await;
    assert_eq!(code_of(result), Code::Ok);
    let keys: Vec<_> = seen
        .iter()
        .map(|s| s.headers[IDEMPOTENCY_KEY].clone())
        .collect();
    assert_eq!(keys[0].len(), 32);
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    // A new logical call gets a new key.
    let (_, again) = run(
        &mut service,
        &mut handle,
        request(CREATE, b"w"),
        vec![committed(Code::Ok)],
    )
    .await;
    assert_ne!(again[0].headers[IDEMPOTENCY_KEY], keys[0]);
}

#[tokio::test(start_paused = true)]
async fn local_rejections_are_not_retried() {
    let (mut service, mut handle) = setup(layer(no_jitter()));
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, b"x")));
    let (_, send) = next(&mut handle).await;
    send.send_error(grpc_resilience_core::error::LocalRejection::new(
        tonic::Status::unavailable("breaker open"),
    ));
    assert_eq!(code_of(fut.await.unwrap()), Code::Unavailable);
    advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
}

#[tokio::test(start_paused = true)]
async fn local_rejections_leave_the_throttle_alone() {
    let layer = layer(no_jitter().with_max_attempts(2))
        .with_throttle(RetryThrottle::new(4.0, 1.0).unwrap());
    let (mut service, mut handle) = setup(layer.clone());
    // Two failed attempts: 4 -> 3 -> 2 tokens, below the cap, so a refill
    // would show.
    let (_, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
        ],
    )
    .await;
    assert_eq!(seen.len(), 2);
    assert_eq!(layer.throttle().unwrap().tokens(), 2.0);
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, b"x")));
    let (_, send) = next(&mut handle).await;
    send.send_error(grpc_resilience_core::error::LocalRejection::new(
        tonic::Status::unavailable("breaker open"),
    ));
    assert!(fut.await.unwrap().is_err());
    assert_eq!(
        layer.throttle().unwrap().tokens(),
        2.0,
        "a call refused below never reached the server: no token taken or given"
    );
}

#[tokio::test(start_paused = true)]
async fn bodies_over_the_cap_are_sent_whole_and_not_retried() {
    let layer = layer(no_jitter()).with_buffer_limits(4, 1024).unwrap();
    let (mut service, mut handle) = setup(layer.clone());
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"0123456789"),
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!(seen[0].body, Bytes::from_static(b"0123456789"));
    assert_eq!(code_of(result), Code::Unavailable);
    advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
    assert_eq!(layer.buffered_bytes(), 0);
}

#[tokio::test(start_paused = true)]
async fn methods_without_a_policy_pass_straight_through() {
    let policies = RetryPolicies::new(no_jitter())
        .unwrap()
        .without_retry("GetProduct")
        .unwrap();
    let layer = RetryLayer::new(policies);
    let (mut service, mut handle) = setup(layer.clone());
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"abc"),
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (1, Code::Unavailable));
    assert_eq!(layer.buffered_bytes(), 0);
    advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
}

#[tokio::test(start_paused = true)]
async fn throttling_stops_retries_when_tokens_run_low() {
    let throttle = RetryThrottle::new(4.0, 0.5).unwrap();
    let layer = layer(no_jitter().with_max_attempts(2)).with_throttle(throttle);
    let (mut service, mut handle) = setup(layer.clone());
    // Call 1: two failures (4 -> 3 -> 2 tokens); the retry was allowed (3 > 2).
    let (_, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![
            trailers_only(Code::Unavailable),
            trailers_only(Code::Unavailable),
        ],
    )
    .await;
    assert_eq!(seen.len(), 2);
    assert_eq!(layer.throttle().unwrap().tokens(), 2.0);
    // Call 2: 2 -> 1 token, not above half: no retry.
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (1, Code::Unavailable));
    advance(Duration::from_secs(5)).await;
    assert!(handle.poll_request().is_pending());
    // Successes refill the bucket: calls that end with OK in their trailers.
    for _ in 0..4 {
        let (result, _) = run(
            &mut service,
            &mut handle,
            request(GET, b"x"),
            vec![committed(Code::Ok)],
        )
        .await;
        let trailers = result.unwrap().into_body().collect().await.unwrap();
        assert_eq!(trailers.trailers().unwrap()["grpc-status"], "0");
    }
    assert_eq!(layer.throttle().unwrap().tokens(), 3.0);
}

#[tokio::test(start_paused = true)]
async fn a_call_can_override_its_policy() {
    let (mut service, mut handle) = setup(layer(no_jitter()));
    let mut req = request(GET, b"x");
    req.extensions_mut().insert(RetryOverride::disabled());
    let (_, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!(seen.len(), 1);

    let mut req = request(GET, b"x");
    req.extensions_mut().insert(
        RetryOverride::new()
            .with_max_attempts(5)
            .with_initial_delay(Duration::from_millis(200)),
    );
    let answers = (0..4)
        .map(|_| trailers_only(Code::Unavailable))
        .chain([committed(Code::Ok)])
        .collect();
    let (result, seen) = run(&mut service, &mut handle, req, answers).await;
    assert_eq!((seen.len(), code_of(result)), (5, Code::Ok));
    assert_eq!(seen[1].at - seen[0].at, Duration::from_millis(200));

    let mut req = request(GET, b"x");
    req.extensions_mut()
        .insert(RetryOverride::new().with_max_attempts(0));
    assert!(service.poll_ready().is_ready());
    let status = tonic::Status::from_error(service.call(req).await.unwrap_err());
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("max_attempts"), "{status:?}");
}

mod budget;
mod hedge;

#[tokio::test(start_paused = true)]
async fn a_readiness_failure_before_a_retry_is_not_an_attempt() {
    let layer = layer(no_jitter().with_max_attempts(3))
        .with_throttle(RetryThrottle::new(10.0, 0.5).unwrap());
    let (mut service, mut handle) = setup(layer.clone());
    let start = Instant::now();
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, b"x")));
    let (_, send) = next(&mut handle).await;
    // The service breaks during the backoff: its next poll_ready fails.
    handle.send_error(std::io::Error::other("connection closed"));
    send.send_response(trailers_only(Code::Unavailable));
    let result = tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .expect("the call ends at once, with no further backoff or attempt")
        .unwrap();
    assert_eq!(code_of(result), Code::Unavailable, "the last outcome");
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(100),
        "one backoff, no second"
    );
    assert_eq!(
        layer.throttle().unwrap().tokens(),
        9.0,
        "only the server's failure took a token"
    );
    assert!(handle.poll_request().is_pending(), "no further attempt");
}

#[tokio::test(start_paused = true)]
async fn an_override_can_say_whether_the_call_is_idempotent() {
    // A non-idempotent method made idempotent for one call: retried.
    let policies = RetryPolicies::new(no_jitter())
        .unwrap()
        .with_operation(
            "CreateProduct",
            no_jitter().non_idempotent().with_idempotency_keys(),
        )
        .unwrap();
    let (mut service, mut handle) = setup(RetryLayer::new(policies));
    let mut req = request(CREATE, b"w");
    req.extensions_mut()
        .insert(RetryOverride::new().with_idempotent(false));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!(
        (seen.len(), code_of(result)),
        (1, Code::Unavailable),
        "not retried"
    );
    assert!(
        !seen[0].headers.contains_key(IDEMPOTENCY_KEY),
        "false also clears idempotency keys"
    );
    let mut req = request(GET, b"r");
    req.extensions_mut()
        .insert(RetryOverride::new().with_idempotent(true));
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![trailers_only(Code::Unavailable), trailers_only(Code::Ok)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (2, Code::Ok));
}

#[tokio::test(start_paused = true)]
async fn a_callers_idempotency_key_lets_a_non_idempotent_method_be_retried() {
    let policies = RetryPolicies::new(no_jitter())
        .unwrap()
        .with_operation("CreateProduct", no_jitter().non_idempotent())
        .unwrap();
    let (mut service, mut handle) = setup(RetryLayer::new(policies));
    let mut req = request(CREATE, b"w");
    req.headers_mut()
        .insert(IDEMPOTENCY_KEY, "caller-key-1".parse().unwrap());
    let (result, seen) = run(
        &mut service,
        &mut handle,
        req,
        vec![trailers_only(Code::Unavailable), trailers_only(Code::Ok)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (2, Code::Ok), "retried");
    for s in &seen {
        assert_eq!(
            s.headers[IDEMPOTENCY_KEY], "caller-key-1",
            "the caller's key kept"
        );
    }
    // Without a key: not retried.
    let (result, seen) = run(
        &mut service,
        &mut handle,
        request(CREATE, b"w"),
        vec![trailers_only(Code::Unavailable)],
    )
    .await;
    assert_eq!((seen.len(), code_of(result)), (1, Code::Unavailable));
}

/// The policy remembered for the last method is that method's: calls that
/// alternate between two methods (by static path, as stubs send them, and
/// by equal paths from other strings) each get their own.
#[tokio::test(start_paused = true)]
async fn each_method_gets_its_own_policy_when_calls_alternate() {
    use std::sync::{Arc, Mutex};
    use tower::{Service, ServiceExt};

    let policies = RetryPolicies::new(no_jitter().with_max_attempts(4))
        .unwrap()
        .with_operation("CreateProduct", no_jitter().with_max_attempts(2))
        .unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let inner = tower::service_fn({
        let seen = seen.clone();
        move |req: Req| {
            seen.lock().unwrap().push(req.uri().path().to_owned());
            async move { Ok::<_, BoxError>(trailers_only(Code::Unavailable)) }
        }
    });
    let mut service = Retry::new(inner, policies);
    let static_request = |path: &'static str| {
        let mut parts = http::Uri::from_static("http://catalog").into_parts();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        let mut req = request("", b"x");
        *req.uri_mut() = http::Uri::from_parts(parts).unwrap();
        req
    };
    let mut attempts = Vec::new();
    for req in [
        static_request(GET),
        static_request(GET),
        static_request(CREATE),
        request(GET, b"x"),
        request(CREATE, b"x"),
        static_request(CREATE),
        static_request(GET),
    ] {
        let path = req.uri().path().to_owned();
        let before = seen.lock().unwrap().len();
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "14");
        let calls = seen.lock().unwrap()[before..].to_vec();
        assert!(calls.iter().all(|p| *p == path), "{calls:?}");
        attempts.push(calls.len());
    }
    assert_eq!(attempts, [4, 4, 2, 4, 2, 2, 4]);
}

/// A service that answers each attempt with the next code of its script
/// (then OK) and counts how often it is cloned.
#[derive(Debug)]
struct Scripted {
    codes: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Code>>>,
    clones: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Clone for Scripted {
    fn clone(&self) -> Self {
        self.clones
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Scripted {
            codes: self.codes.clone(),
            clones: self.clones.clone(),
        }
    }
}

impl tower_service::Service<Req> for Scripted {
    type Response = Res;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Res, BoxError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Req) -> Self::Future {
        let code = self.codes.lock().unwrap().pop_front().unwrap_or(Code::Ok);
        std::future::ready(Ok(trailers_only(code)))
    }
}

/// Calls through `layer` over a [`Scripted`] service: `quick` calls that
/// succeed at once, then one whose first two attempts fail with
/// UNAVAILABLE. Returns the clones made by the quick calls, then by the
/// one that failed twice.
async fn clones_made(layer: &RetryLayer, quick: usize) -> (usize, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    use tower::ServiceExt;
    use tower_service::Service;
    let codes = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let clones = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = Scripted {
        codes: codes.clone(),
        clones: clones.clone(),
    };
    let mut service = tower_layer::Layer::layer(layer, inner);
    let mut call = async || {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request(GET, b"x"))
            .await;
        assert_eq!(response.unwrap().headers()["grpc-status"], "0");
    };
    let made = clones.load(Relaxed);
    for _ in 0..quick {
        call().await;
    }
    let quick_clones = clones.load(Relaxed) - made;
    codes
        .lock()
        .unwrap()
        .extend([Code::Unavailable, Code::Unavailable]);
    call().await;
    assert!(codes.lock().unwrap().is_empty(), "three attempts");
    (quick_clones, clones.load(Relaxed) - made - quick_clones)
}

#[tokio::test(start_paused = true)]
async fn a_call_clones_the_inner_service_only_when_a_retry_is_due() {
    let (quick, retried) = clones_made(&layer(no_jitter()), 10).await;
    assert_eq!(quick, 0, "ten successes clone nothing");
    assert_eq!(retried, 1, "one clone for both retries");
}

#[tokio::test(start_paused = true)]
async fn a_hedged_call_clones_the_inner_service_only_when_a_hedge_is_due() {
    // A non-fatal failure sends the next hedge at once.
    let policy = HedgingPolicy::default()
        .with_non_fatal_codes(grpc_resilience_core::CodeSet::of(&[Code::Unavailable]));
    let layer = RetryLayer::new(RetryPolicies::none().with_hedging("*", policy).unwrap());
    let (quick, hedged) = clones_made(&layer, 5).await;
    assert_eq!(
        quick, 0,
        "calls answered before the hedging delay clone nothing"
    );
    assert_eq!(hedged, 1, "one clone for both hedges");
}

/// A client that alternates methods (through clones of one service) gets
/// each method's own policy on every call, worked out once per method for
/// the whole layer, not again at each switch.
#[tokio::test(start_paused = true)]
async fn alternating_methods_each_get_their_own_policy_worked_out_once() {
    use tower::ServiceExt;
    use tower_service::Service;
    const LIST: &str = "/catalog.v1.QueryService/ListProducts";
    let policies = RetryPolicies::none()
        .with_operation("GetProduct", no_jitter().with_max_attempts(3))
        .and_then(|p| p.with_operation("ListProducts", no_jitter().with_max_attempts(2)))
        .unwrap();
    let layer = RetryLayer::new(policies);
    let codes = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let inner = Scripted {
        codes: codes.clone(),
        clones: Default::default(),
    };
    let mut clones = [
        tower_layer::Layer::layer(&layer, inner.clone()),
        tower_layer::Layer::layer(&layer, inner),
    ];
    for round in 0..6 {
        for (path, attempts) in [(GET, 3), (LIST, 2), (CREATE, 1)] {
            codes.lock().unwrap().extend([Code::Unavailable; 3]);
            let service = &mut clones[round % 2];
            let response = service
                .ready()
                .await
                .unwrap()
                .call(request(path, b"x"))
                .await
                .unwrap();
            assert_eq!(response.headers()["grpc-status"], "14");
            let left = std::mem::take(&mut *codes.lock().unwrap()).len();
            assert_eq!(3 - left, attempts, "{path} in round {round}");
        }
    }
    assert_eq!(layer.shared().methods.len(), 3, "one entry per method");
}

/// Runs one call through `poll_answer`; the service answers attempt `i`
/// with `answers[i]`. Returns the unwrapped result and the refill owed.
async fn run_unwrapped(
    service: &mut Svc,
    handle: &mut Handle,
    req: Req,
    answers: Vec<Res>,
) -> (Result<Res, BoxError>, Option<RetryThrottle>) {
    assert!(service.poll_ready().is_ready());
    let fut = service.call(req);
    let call = tokio::spawn(async move {
        let mut fut = std::pin::pin!(fut);
        let mut refill = None;
        let result = std::future::poll_fn(|cx| fut.as_mut().poll_answer(cx, &mut refill)).await;
        (result, refill)
    });
    for answer in answers {
        let (_, send) = next(handle).await;
        send.send_response(answer);
    }
    call.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn poll_answer_leaves_the_body_and_its_refill_to_the_caller() {
    let layer = layer(no_jitter().with_max_attempts(2))
        .with_throttle(RetryThrottle::new(4.0, 1.0).unwrap());
    let bucket = layer.throttle().unwrap().clone();
    let (mut service, mut handle) = setup(layer);
    // Retried, then committed: one token taken (4 -> 3). The body comes as
    // the service sent it; reading its OK trailers refills nothing, the
    // refill is the caller's to make.
    let (result, refill) = run_unwrapped(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![trailers_only(Code::Unavailable), committed(Code::Ok)],
    )
    .await;
    let body = result.unwrap().into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(bucket.tokens(), 3.0);
    let refill = refill.expect("a committed call owes the throttle its outcome");
    assert!(refill.same_bucket(&bucket));
    refill.on_success();
    assert_eq!(bucket.tokens(), 4.0);
    // Committed on its first attempt: the same.
    let (result, refill) = run_unwrapped(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![committed(Code::Ok)],
    )
    .await;
    assert!(result.is_ok());
    assert!(refill.is_some_and(|r| r.same_bucket(&bucket)));
    // A Trailers-Only answer settles the throttle itself: nothing owed.
    let (result, refill) = run_unwrapped(
        &mut service,
        &mut handle,
        request(GET, b"x"),
        vec![trailers_only(Code::NotFound)],
    )
    .await;
    assert_eq!(code_of_head(&result), Some(Code::NotFound));
    assert!(refill.is_none());
}
