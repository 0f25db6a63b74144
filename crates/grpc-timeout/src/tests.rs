use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::sync::mpsc;
use tokio::time::{Instant, advance};
use tonic::Code;
use tower_test::mock;

use super::*;
use grpc_resilience_core::timeout_header::{GRPC_TIMEOUT, decode};
use grpc_resilience_core::{CallDeadline, Outcome, Unobserved};
use tower_layer::Layer;

const GET: &str = "/catalog.v1.QueryService/GetProduct";
const LIST: &str = "/catalog.v1.QueryService/ListProducts";

type Req = http::Request<Empty<Bytes>>;
type Frames = mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>;
type Res = http::Response<
    StreamBody<tokio_stream::wrappers::ReceiverStream<Result<http_body::Frame<Bytes>, BoxError>>>,
>;

fn catalog_policy() -> TimeoutPolicy {
    TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
        .unwrap()
}

fn request(path: &str, caller_timeout: Option<&'static str>) -> Req {
    let mut builder = http::Request::builder().uri(format!("http://catalog{path}"));
    if let Some(t) = caller_timeout {
        builder = builder.header("grpc-timeout", t);
    }
    builder.body(Empty::new()).unwrap()
}

fn streaming_response() -> (mpsc::Sender<Result<http_body::Frame<Bytes>, BoxError>>, Res) {
    let (tx, rx): (_, Frames) = mpsc::channel(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    (tx, http::Response::new(body))
}

type Svc = mock::Spawn<Timeout<mock::Mock<Req, Res>>>;
type Handle = mock::Handle<Req, Res>;

fn setup(layer: TimeoutLayer) -> (Svc, Handle) {
    mock::spawn_layer(layer)
}

fn code_of(err: BoxError) -> Code {
    tonic::Status::from_error(err).code()
}

/// Sends `request` and returns what reached the inner service.
async fn forwarded(
    service: &mut Svc,
    handle: &mut Handle,
    request: Req,
) -> (
    Req,
    ResponseFuture<mock::future::ResponseFuture<Res>>,
    mock::SendResponse<Res>,
) {
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request);
    let (req, send) = handle
        .next_request()
        .await
        .expect("the request is forwarded");
    (req, fut, send)
}

fn sent_timeout(req: &Req) -> Option<Duration> {
    req.headers()
        .get(GRPC_TIMEOUT)
        .map(|v| decode(v.as_bytes()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn configured_timeout_is_sent_and_enforced() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "3000000u");

    let err = fut.await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let elapsed = err.downcast_ref::<Elapsed>().expect("an Elapsed error");
    assert_eq!(elapsed.timeout(), Duration::from_secs(3));
    assert_eq!(elapsed.scope(), Scope::Call);
    assert!(!elapsed.during_body());
    assert!(elapsed.was_sent());
    assert!(
        elapsed
            .status()
            .message()
            .contains("catalog.v1.QueryService/GetProduct")
    );
    assert_eq!(code_of(err), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn response_before_the_deadline_passes_through() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(LIST, None)).await;
    advance(Duration::from_millis(9_999)).await;
    let (tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.expect("in time");
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"hello"))))
        .await
        .unwrap();
    drop(tx);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(b"hello"));
}

#[tokio::test(start_paused = true)]
async fn a_shorter_caller_deadline_wins_and_keeps_its_header() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("250m"))).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "250m");
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn a_longer_caller_deadline_is_replaced_by_the_configured_one() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("1M"))).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(3)));
    assert_eq!(req.headers().get_all(GRPC_TIMEOUT).iter().count(), 1);
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_caller_deadline_is_replaced() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("soon"))).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(3)));
}

#[tokio::test(start_paused = true)]
async fn without_any_deadline_nothing_is_enforced() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let (req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    assert!(req.headers().get(GRPC_TIMEOUT).is_none());
    let mut fut = tokio_test::task::spawn(fut);
    advance(Duration::from_secs(24 * 3600)).await;
    assert!(fut.poll().is_pending(), "no deadline, no timeout");
    send.send_response(streaming_response().1);
    assert!(fut.await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn only_the_caller_deadline_applies_when_nothing_is_configured() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("40m"))).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "40m");
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_millis(40));
}

#[tokio::test(start_paused = true)]
async fn non_grpc_paths_get_the_default() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, request("/healthz", None)).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn a_stream_running_past_the_deadline_is_cut() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(LIST, None)).await;
    let (tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.unwrap();
    let mut body = std::pin::pin!(response.into_body());

    for i in 0..9 {
        tx.send(Ok(http_body::Frame::data(Bytes::from(vec![i; 3]))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from(vec![i; 3]));
        advance(Duration::from_secs(1)).await;
    }
    // 9 s in; the stream now stalls past the 10 s deadline.
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    let elapsed = err.downcast_ref::<Elapsed>().unwrap();
    assert!(elapsed.during_body());
    assert_eq!(code_of(err), Code::DeadlineExceeded);
    // The inner body was dropped, which resets the stream on a real channel.
    assert!(tx.is_closed());
    assert!(body.frame().await.is_none());
    assert!(http_body::Body::is_end_stream(&*body));
}

#[tokio::test(start_paused = true)]
async fn a_response_after_the_timer_fired_does_not_win() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    advance(Duration::from_secs(3)).await;
    // Timer fired and the response lands before the future is polled again.
    send.send_response(streaming_response().1);
    match fut.poll() {
        Poll::Ready(Err(err)) => assert_eq!(code_of(err), Code::DeadlineExceeded),
        other => panic!(
            "expected a deadline error, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
}

#[tokio::test(start_paused = true)]
async fn per_attempt_scope_is_reported() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()).per_attempt());
    let (_req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let err = fut.await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<Elapsed>().unwrap().scope(),
        Scope::Attempt
    );
    assert!(
        err.downcast_ref::<Elapsed>()
            .unwrap()
            .status()
            .message()
            .starts_with("attempt")
    );
}

#[tokio::test(start_paused = true)]
async fn the_channels_own_grpc_timeout_expiry_reads_as_deadline_exceeded() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    // What tonic's Channel returns when it enforces the header itself.
    send.send_error(tonic::TimeoutExpired(()));
    let err = fut.await.unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().is_some(), "{err}");
    assert_eq!(code_of(err), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_after_the_timer_fired_reads_as_deadline_exceeded() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    advance(Duration::from_secs(3)).await;
    send.send_error(tonic::Status::cancelled("Timeout expired"));
    match fut.poll() {
        Poll::Ready(Err(err)) => assert_eq!(code_of(err), Code::DeadlineExceeded),
        other => panic!(
            "expected a deadline error, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_refused_below_as_the_timer_fired_is_reported_as_not_sent() {
    // A bulkhead below refuses a queued call at the same deadline (a
    // local refusal: the call never left): the caller is told it was not
    // sent, and the log says so.
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    advance(Duration::from_secs(3)).await;
    send.send_error(grpc_resilience_core::error::LocalRejection::new(
        tonic::Status::deadline_exceeded("no free slot before the call's deadline"),
    ));
    let Poll::Ready(Err(err)) = fut.poll() else {
        panic!("the deadline has passed");
    };
    let elapsed = err.downcast::<Elapsed>().expect("this layer's own expiry");
    assert!(!elapsed.was_sent(), "the layer below never sent it");
    assert!(
        elapsed.status().message().contains("was not sent"),
        "{}",
        elapsed.status().message()
    );
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through_unchanged() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    send.send_error(tonic::Status::unavailable("down"));
    let err = fut.await.unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().is_none());
    assert_eq!(code_of(err), Code::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_the_inner_services() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    handle.allow(0);
    assert!(service.poll_ready().is_pending());
    handle.allow(1);
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(GET, None));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri().path(), GET);
    send.send_response(streaming_response().1);
    assert!(fut.await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn expiry_is_counted_with_labels() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    fut.await.unwrap_err();

    let counters: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "grpc.timeout.count")
        .collect();
    assert_eq!(counters.len(), 1);
    let (key, _, _, value) = &counters[0];
    let labels: Vec<(String, String)> = key
        .key()
        .labels()
        .map(|l| (l.key().to_owned(), l.value().to_owned()))
        .collect();
    assert!(labels.contains(&("service".into(), "catalog.v1.QueryService".into())));
    assert!(labels.contains(&("method".into(), "GetProduct".into())));
    assert!(labels.contains(&("scope".into(), "call".into())));
    assert_eq!(value, &DebugValue::Counter(1));
}

#[tokio::test(start_paused = true)]
async fn the_largest_grpc_timeout_is_handled_without_panic() {
    // 99,999,999 hours: the largest value the header can carry.
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let (req, fut, send) =
        forwarded(&mut service, &mut handle, request(GET, Some("99999999H"))).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "99999999H");
    let mut fut = tokio_test::task::spawn(fut);
    advance(Duration::from_secs(365 * 24 * 3600)).await;
    assert!(
        fut.poll().is_pending(),
        "a year later the call is still allowed to run"
    );
    send.send_response(streaming_response().1);
    assert!(fut.await.is_ok());
}

fn extension(req: &Req) -> Option<Instant> {
    req.extensions()
        .get::<CallDeadline>()
        .map(CallDeadline::instant)
}

fn with_deadline(mut req: Req, at: Instant) -> Req {
    CallDeadline::at(at).insert_into(&mut req);
    req
}

#[tokio::test(start_paused = true)]
async fn the_callers_deadline_extension_is_read_and_recorded() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    // Shorter than the policy's 3 s: it wins, with no grpc-timeout header.
    let at = start + Duration::from_secs(1);
    let req = with_deadline(request(GET, None), at);
    let (req, fut, _send) = forwarded(&mut service, &mut handle, req).await;
    assert_eq!(extension(&req), Some(at));
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(1)));
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_extension_wins_over_the_callers_header() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let start = Instant::now();
    let at = start + Duration::from_millis(700);
    // A stale header from above says 5 s; the recorded instant is the truth.
    let req = with_deadline(request(GET, Some("5S")), at);
    let (req, fut, _send) = forwarded(&mut service, &mut handle, req).await;
    assert_eq!(extension(&req), Some(at));
    assert_eq!(sent_timeout(&req), Some(Duration::from_millis(700)));
    fut.await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(700));
}

#[tokio::test(start_paused = true)]
async fn a_shorter_policy_replaces_the_recorded_deadline() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let req = with_deadline(request(GET, None), start + Duration::from_secs(60));
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, req).await;
    assert_eq!(extension(&req), Some(start + Duration::from_secs(3)));
    assert_eq!(req.headers()[GRPC_TIMEOUT], "3000000u");
}

#[tokio::test(start_paused = true)]
async fn the_callers_header_is_recorded_as_the_deadline() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let start = Instant::now();
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("250m"))).await;
    assert_eq!(extension(&req), Some(start + Duration::from_millis(250)));
    assert_eq!(sent_timeout(&req), Some(Duration::from_millis(250)));
}

#[tokio::test(start_paused = true)]
async fn per_attempt_deadline_is_the_earlier_of_the_calls_and_the_per_try() {
    for (call_left, attempt_left) in [(1u64, 1u64), (60, 3)] {
        let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()).per_attempt());
        let start = Instant::now();
        let req = with_deadline(request(GET, None), start + Duration::from_secs(call_left));
        let (req, fut, _send) = forwarded(&mut service, &mut handle, req).await;
        let attempt = start + Duration::from_secs(attempt_left);
        assert_eq!(extension(&req), Some(attempt));
        assert_eq!(sent_timeout(&req), Some(Duration::from_secs(attempt_left)));
        let err = fut.await.unwrap_err();
        assert_eq!(Instant::now(), attempt);
        assert_eq!(
            err.downcast_ref::<Elapsed>().unwrap().scope(),
            Scope::Attempt
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_header_is_written_when_the_inner_service_is_called() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let start = Instant::now();
    let req = with_deadline(request(GET, None), start + Duration::from_secs(2));
    // Readiness took 500 ms: the server is told the 1.5 s really left.
    advance(Duration::from_millis(500)).await;
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, req).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_millis(1500)));
}

/// A response body whose next frame is always ready.
fn endless_body() -> http_body_util::StreamBody<
    impl tokio_stream::Stream<Item = Result<http_body::Frame<Bytes>, BoxError>>,
> {
    let frames = std::iter::repeat_with(|| Ok(http_body::Frame::data(Bytes::from_static(b"x"))));
    StreamBody::new(tokio_stream::iter(frames))
}

#[tokio::test(start_paused = true)]
async fn a_body_that_never_waits_is_still_cut_at_the_deadline() {
    let layer = TimeoutLayer::new(catalog_policy());
    let (service, mut handle) = mock::pair::<Req, http::Response<_>>();
    let mut service = tower_test::mock::Spawn::new(layer.layer(service));
    let start = Instant::now();
    assert!(service.poll_ready().is_ready());
    let fut = service.call(request(GET, None));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(http::Response::new(endless_body()));
    let response = fut.await.unwrap();
    let mut body = std::pin::pin!(response.into_body());
    // A slow consumer: a second between frames, the producer always ahead.
    let mut frames = 0;
    let err = loop {
        match body.frame().await.expect("an endless body") {
            Ok(_) => frames += 1,
            Err(err) => break err,
        }
        assert!(frames < 10, "the 3 s deadline never cut the body");
        advance(Duration::from_secs(1)).await;
    };
    assert_eq!(frames, 3, "frames at 0, 1 and 2 s");
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(err.downcast_ref::<Elapsed>().unwrap().during_body());
    assert_eq!(code_of(err), Code::DeadlineExceeded);
    assert!(body.frame().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn an_expired_deadline_fails_at_once_and_is_not_sent() {
    let past = |req: Req| {
        let at = Instant::now();
        with_deadline(req, at)
    };
    let cases: [(&str, Req); 3] = [
        ("grpc-timeout 0n", request(GET, Some("0n"))),
        ("grpc-timeout 0S with no policy", request(GET, Some("0S"))),
        ("a CallDeadline that has passed", past(request(GET, None))),
    ];
    for (what, req) in cases {
        let policy = if what.contains("no policy") {
            TimeoutPolicy::empty()
        } else {
            catalog_policy()
        };
        let (mut service, mut handle) = setup(TimeoutLayer::new(policy));
        advance(Duration::from_millis(1)).await;
        assert!(service.poll_ready().is_ready());
        let mut fut = tokio_test::task::spawn(service.call(req));
        match fut.poll() {
            Poll::Ready(Err(err)) => {
                let elapsed = err.downcast_ref::<Elapsed>().expect("an Elapsed error");
                assert!(!elapsed.was_sent(), "{what}");
                assert!(!elapsed.during_body(), "{what}");
                assert!(
                    elapsed.status().message().ends_with("it was not sent"),
                    "{what}: {}",
                    elapsed.status().message()
                );
                assert_eq!(code_of(err), Code::DeadlineExceeded, "{what}")
            }
            other => panic!(
                "{what}: expected DEADLINE_EXCEEDED at once, got {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
        let mut next = tokio_test::task::spawn(handle.next_request());
        assert!(next.poll().is_pending(), "{what}: the call was sent");
    }
}

#[tokio::test(start_paused = true)]
async fn a_malformed_caller_deadline_is_dropped_when_no_policy_applies() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(TimeoutPolicy::empty()));
    let (req, fut, send) = forwarded(&mut service, &mut handle, request(GET, Some("soon"))).await;
    assert!(
        req.headers().get(GRPC_TIMEOUT).is_none(),
        "{:?}",
        req.headers()
    );
    assert!(extension(&req).is_none());
    send.send_response(streaming_response().1);
    assert!(fut.await.is_ok());
}

const NOT_BASE64: &str = "not base64!";

#[tokio::test(start_paused = true)]
async fn invalid_details_are_removed_from_the_head_and_the_trailers() {
    // Trailers-Only head.
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let (_tx, mut response) = streaming_response();
    response
        .headers_mut()
        .insert("grpc-status", "5".parse().unwrap());
    response
        .headers_mut()
        .insert("grpc-status-details-bin", NOT_BASE64.parse().unwrap());
    send.send_response(response);
    let response = fut.await.unwrap();
    assert!(response.headers().get("grpc-status-details-bin").is_none());
    let status = tonic::Status::from_header_map(response.headers()).unwrap();
    assert_eq!(status.code(), Code::NotFound);

    // Trailers after a message.
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let (tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "15".parse().unwrap());
    trailers.insert("grpc-status-details-bin", NOT_BASE64.parse().unwrap());
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"m"))))
        .await
        .unwrap();
    tx.send(Ok(http_body::Frame::trailers(trailers)))
        .await
        .unwrap();
    drop(tx);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().unwrap();
    assert!(trailers.get("grpc-status-details-bin").is_none());
    assert_eq!(
        tonic::Status::from_header_map(trailers).unwrap().code(),
        Code::DataLoss
    );
}

/// A transport error without a status, as hyper's (an h2 error inside).
#[derive(Debug)]
struct Transport(h2::Error);
impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("http2 error")
    }
}
impl std::error::Error for Transport {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn a_reset_keeps_the_code_of_its_reason() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    send.send_error(Transport(h2::Error::from(h2::Reason::CANCEL)));
    let err = fut.await.unwrap_err();
    let status = tonic::Status::from_error(err);
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(grpc_resilience_core::error::find_error::<h2::Error>(&status).is_some());
}

#[tokio::test(start_paused = true)]
async fn relying_on_the_channel_leaves_the_head_to_it_and_keeps_the_body_timer() {
    let layer = TimeoutLayer::new(catalog_policy()).rely_on_channel_for_head();
    assert!(!layer.times_the_head());
    let (mut service, mut handle) = setup(layer);
    let (req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    // The channel is told the deadline, and enforces it.
    assert_eq!(req.headers()[GRPC_TIMEOUT], "3000000u");
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    advance(Duration::from_secs(4)).await;
    // No timer of this layer's: past the deadline, still the channel's to end.
    assert!(fut.poll().is_pending());
    send.send_error(tonic::TimeoutExpired(()));
    match fut.poll() {
        Poll::Ready(Err(err)) => {
            assert!(err.downcast_ref::<Elapsed>().is_some(), "{err}");
            assert_eq!(code_of(err), Code::DeadlineExceeded);
        }
        other => panic!(
            "expected the channel's expiry, got {:?}",
            other.map(|r| r.map(|_| ()))
        ),
    }

    // The body, which the channel does not bound, is still cut.
    let start = Instant::now();
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let (_tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.expect("the head in time");
    let err = response.into_body().frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert!(err.downcast_ref::<Elapsed>().unwrap().during_body());
    assert_eq!(code_of(err), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn trailers_already_there_at_the_deadline_end_the_call_normally() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let (tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.expect("in time");
    let mut body = std::pin::pin!(response.into_body());
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"m"))))
        .await
        .unwrap();
    tx.send(Ok(http_body::Frame::trailers(trailers)))
        .await
        .unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert!(frame.is_data());
    advance(Duration::from_secs(3)).await;
    // The server finished before the deadline; its trailers were waiting.
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_trailers().unwrap()["grpc-status"], "0");
    // A message waiting at the deadline is not delivered.
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    let (tx, response) = streaming_response();
    send.send_response(response);
    let response = fut.await.expect("in time");
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"m"))))
        .await
        .unwrap();
    advance(Duration::from_secs(3)).await;
    let err = response.into_body().frame().await.unwrap().unwrap_err();
    assert_eq!(code_of(err), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn each_method_gets_its_own_timeout_on_one_service_in_any_order() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    for (path, sent) in [
        (GET, "3000000u"),
        (GET, "3000000u"),
        (LIST, "10000000u"),
        (GET, "3000000u"),
        ("/catalog.v1.CommandService/CreateProduct", "5000000u"),
        ("/healthz", "5000000u"),
        (LIST, "10000000u"),
    ] {
        let (req, _fut, _send) = forwarded(&mut service, &mut handle, request(path, None)).await;
        assert_eq!(req.headers()[GRPC_TIMEOUT], sent, "{path}");
    }
}

/// A client that alternates methods gets each method's own timeout on
/// every call, worked out once per method for the whole layer (all its
/// services share it), not again at each switch.
#[tokio::test(start_paused = true)]
async fn alternating_methods_each_get_their_own_timeout_worked_out_once() {
    let layer = TimeoutLayer::new(catalog_policy());
    let (mut first, mut first_handle) = mock::spawn_layer(layer.clone());
    let (mut second, mut second_handle) = mock::spawn_layer(layer.clone());
    let other = "/catalog.v1.CommandService/CreateProduct";
    for round in 0..6 {
        let (service, handle) = if round % 2 == 0 {
            (&mut first, &mut first_handle)
        } else {
            (&mut second, &mut second_handle)
        };
        for (path, timeout) in [(GET, "3000000u"), (LIST, "10000000u"), (other, "5000000u")] {
            let (req, _fut, _send) = forwarded(service, handle, request(path, None)).await;
            assert_eq!(
                req.headers()[GRPC_TIMEOUT],
                timeout,
                "{path} in round {round}"
            );
        }
    }
    assert_eq!(layer.methods().len(), 3, "one entry per method");
}

/// The deadline `prepare` works out for `request` under `policy`.
fn prepared(policy: TimeoutPolicy, mut request: Req) -> future::Deadline {
    Timeout::new((), policy)
        .prepare(&mut request)
        .expect("time left")
        .expect("a deadline")
}

#[tokio::test(start_paused = true)]
async fn a_body_bound_by_an_earlier_deadline_ends_at_it() {
    let start = Instant::now();
    let five = prepared(catalog_policy(), request(LIST, Some("5S")));
    let two = prepared(catalog_policy(), request(LIST, Some("2S")));
    let (tx, response) = streaming_response();
    let mut body = TimeoutBody::new(response.into_body(), Some(five.clone()), None::<Unobserved>);
    // A later deadline does not loosen an earlier one.
    body.bound_by(prepared(catalog_policy(), request(LIST, Some("9S"))));
    let mut body = std::pin::pin!(body);
    // Waiting arms the body's timer for 5 s ...
    std::future::poll_fn(|cx| {
        assert!(http_body::Body::poll_frame(body.as_mut(), cx).is_pending());
        Poll::Ready(())
    })
    .await;
    // ... and an earlier deadline replaces it.
    body.as_mut().get_mut().bound_by(two);
    body.as_mut().get_mut().bound_by(five);
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert!(err.downcast_ref::<Elapsed>().unwrap().during_body());
    assert_eq!(code_of(err), Code::DeadlineExceeded);
    assert!(tx.is_closed(), "the inner body is dropped at the deadline");
}

#[tokio::test(start_paused = true)]
async fn a_watch_driven_by_hand_holds_a_call_to_its_deadline() {
    let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let observer = || {
        let told = told.clone();
        move |o: Outcome| told.lock().unwrap().push(o)
    };
    let start = Instant::now();
    let mut timeout = Timeout::new((), catalog_policy());

    // No answer by the deadline: the head timer fires at 3 s.
    let mut req = request(GET, None);
    let deadline = timeout.prepare(&mut req).unwrap();
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(3)));
    assert_eq!(extension(&req), Some(start + Duration::from_secs(3)));
    let mut watch = std::pin::pin!(future::Watch::new(
        deadline,
        timeout.times_the_head(),
        Some(observer())
    ));
    let err = std::future::poll_fn(|cx| watch.as_mut().poll_deadline(cx)).await;
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(code_of(err), Code::DeadlineExceeded);

    // A response that lands after the timer fired, before the call was
    // polled again, loses the race.
    let mut req = request(GET, None);
    let deadline = timeout.prepare(&mut req).unwrap();
    let mut watch = std::pin::pin!(future::Watch::new(deadline, true, Some(observer())));
    std::future::poll_fn(|cx| {
        assert!(watch.as_mut().poll_deadline(cx).is_pending(), "armed");
        Poll::Ready(())
    })
    .await;
    advance(Duration::from_secs(3)).await;
    let mut late: Result<Res, BoxError> = Ok(streaming_response().1);
    assert!(watch.as_mut().settle(&mut late).is_none());
    assert_eq!(code_of(late.unwrap_err()), Code::DeadlineExceeded);

    // An answer in time: settled with its head cleaned, the deadline and
    // the observer handed on, nothing told yet.
    let mut req = request(GET, None);
    let deadline = timeout.prepare(&mut req).unwrap();
    let mut watch = std::pin::pin!(future::Watch::new(deadline, true, Some(observer())));
    let mut answer: Result<Res, BoxError> = Ok(streaming_response().1);
    answer
        .as_mut()
        .unwrap()
        .headers_mut()
        .insert("grpc-status-details-bin", "%%%".parse().unwrap());
    let (deadline, kept) = watch.as_mut().settle(&mut answer).expect("in time");
    let response = answer.unwrap();
    assert!(!response.headers().contains_key("grpc-status-details-bin"));
    assert_eq!(
        deadline.map(|d| d.instant()),
        Some(Instant::now() + Duration::from_secs(3))
    );
    assert!(kept.is_some());

    // An error that is not the deadline's keeps its code.
    let mut req = request(GET, None);
    let deadline = timeout.prepare(&mut req).unwrap();
    let mut watch = std::pin::pin!(future::Watch::new(deadline, true, Some(observer())));
    let mut failed: Result<Res, BoxError> =
        Err(Box::new(tonic::Status::unavailable("connection refused")));
    assert!(watch.as_mut().settle(&mut failed).is_none());
    assert_eq!(code_of(failed.unwrap_err()), Code::Unavailable);

    // No time left: not to be sent, and the watch fails it.
    let mut req = request(GET, Some("0n"));
    let expired = timeout.prepare(&mut req).unwrap_err();
    let mut watch = std::pin::pin!(future::Watch::expired(expired, Some(observer())));
    let err = watch.as_mut().unsent();
    assert!(!err.downcast_ref::<Elapsed>().unwrap().was_sent());

    assert_eq!(
        *told.lock().unwrap(),
        [
            Outcome::Error(Code::DeadlineExceeded),
            Outcome::Error(Code::DeadlineExceeded),
            Outcome::Error(Code::Unavailable),
            Outcome::Error(Code::DeadlineExceeded),
        ],
        "each failed call told once; the answered one left to its body"
    );
}

/// Records which of its methods was called, and with what.
#[derive(Clone, Default)]
struct Heard(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl OnOutcome for Heard {
    fn on_outcome(self, outcome: Outcome) {
        self.0.lock().unwrap().push(format!("outcome {outcome:?}"));
    }

    fn on_deadline(self, scope: Scope) {
        self.0.lock().unwrap().push(format!("deadline {scope:?}"));
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_reported_as_such_and_anything_else_as_an_outcome() {
    let heard = Heard::default();
    let (mut service, mut handle) = setup(TimeoutLayer::new(catalog_policy()));
    // The head timer fires.
    assert!(service.poll_ready().is_ready());
    let call = service
        .get_mut()
        .call_observed(request(GET, None), Some(heard.clone()));
    let (_req, _send) = handle.next_request().await.unwrap();
    assert_eq!(code_of(call.await.unwrap_err()), Code::DeadlineExceeded);
    // The body is cut.
    assert!(service.poll_ready().is_ready());
    let call = service
        .get_mut()
        .call_observed(request(LIST, None), Some(heard.clone()));
    let (_req, send) = handle.next_request().await.unwrap();
    let (tx2, response) = streaming_response();
    send.send_response(response);
    let mut body = std::pin::pin!(call.await.unwrap().into_body());
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().unwrap().during_body());
    // An error of the body's own is an outcome.
    assert!(service.poll_ready().is_ready());
    let call = service
        .get_mut()
        .call_observed(request(GET, None), Some(heard.clone()));
    let (_req, send) = handle.next_request().await.unwrap();
    let (tx3, response) = streaming_response();
    send.send_response(response);
    let mut body = std::pin::pin!(call.await.unwrap().into_body());
    tx3.send(Err(Box::new(tonic::Status::internal("broken"))))
        .await
        .unwrap();
    assert!(body.frame().await.unwrap().is_err());
    drop(tx2);
    assert_eq!(
        *heard.0.lock().unwrap(),
        ["deadline Call", "deadline Call", "outcome Error(Internal)"]
    );
}
