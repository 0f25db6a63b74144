use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use tokio::sync::mpsc;
use tokio::time::{Instant, advance};
use tonic::Code;
use tower_test::mock;

use super::*;
use grpc_resilience_core::timeout_header::{GRPC_TIMEOUT, decode};

const GET: &str = "/catalog.v1.QueryService/GetProduct";
const LIST: &str = "/catalog.v1.QueryService/ListProducts";

type Req = http::Request<Empty<Bytes>>;
type Frames = mpsc::Receiver<Result<http_body::Frame<Bytes>, BoxError>>;
type Res = http::Response<
    StreamBody<tokio_stream::wrappers::ReceiverStream<Result<http_body::Frame<Bytes>, BoxError>>>,
>;

fn seed_policy() -> TimeoutPolicy {
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "3000000u");

    let err = fut.await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let elapsed = err.downcast_ref::<Elapsed>().expect("an Elapsed error");
    assert_eq!(elapsed.timeout(), Duration::from_secs(3));
    assert_eq!(elapsed.scope(), Scope::Call);
    assert!(!elapsed.during_body());
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("250m"))).await;
    assert_eq!(req.headers()[GRPC_TIMEOUT], "250m");
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn a_longer_caller_deadline_is_replaced_by_the_configured_one() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let start = Instant::now();
    let (req, fut, _send) = forwarded(&mut service, &mut handle, request(GET, Some("1M"))).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(3)));
    assert_eq!(req.headers().get_all(GRPC_TIMEOUT).iter().count(), 1);
    assert_eq!(code_of(fut.await.unwrap_err()), Code::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_caller_deadline_is_replaced() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let (req, _fut, _send) = forwarded(&mut service, &mut handle, request("/healthz", None)).await;
    assert_eq!(sent_timeout(&req), Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn a_stream_running_past_the_deadline_is_cut() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()).per_attempt());
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
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    // What tonic's Channel returns when it enforces the header itself.
    send.send_error(tonic::TimeoutExpired(()));
    let err = fut.await.unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().is_some(), "{err}");
    assert_eq!(code_of(err), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_after_the_timer_fired_reads_as_deadline_exceeded() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
async fn inner_errors_pass_through_unchanged() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
    let (_req, fut, send) = forwarded(&mut service, &mut handle, request(GET, None)).await;
    send.send_error(tonic::Status::unavailable("down"));
    let err = fut.await.unwrap_err();
    assert!(err.downcast_ref::<Elapsed>().is_none());
    assert_eq!(code_of(err), Code::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn readiness_is_the_inner_services() {
    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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

    let (mut service, mut handle) = setup(TimeoutLayer::new(seed_policy()));
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
