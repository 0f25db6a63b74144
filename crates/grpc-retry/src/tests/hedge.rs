//! Hedging (gRFC A6 `hedgingPolicy`), on paused time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use grpc_resilience_core::CodeSet;
use tokio::sync::{mpsc, oneshot};

use super::*;

/// A service that hands every attempt to the test, and lets it see when
/// the caller dropped (cancelled) an attempt.
#[derive(Clone)]
struct Mock {
    tx: mpsc::UnboundedSender<(Req, oneshot::Sender<Result<Res, BoxError>>)>,
}

impl tower_service::Service<Req> for Mock {
    type Response = Res;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let (tx, rx) = oneshot::channel();
        self.tx.send((req, tx)).expect("the test is listening");
        Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("dropped by the test".into()))
        })
    }
}

/// One attempt as the server sees it.
struct Attempt {
    headers: http::HeaderMap,
    body: Body,
    at: Instant,
    reply: oneshot::Sender<Result<Res, BoxError>>,
}

impl Attempt {
    fn previous(&self) -> Option<&str> {
        self.headers
            .get(PREVIOUS_ATTEMPTS)
            .map(|v| v.to_str().unwrap())
    }

    fn answer(self, res: Res) {
        let _ = self.reply.send(Ok(res));
    }

    fn cancelled(&self) -> bool {
        self.reply.is_closed()
    }
}

struct Server {
    rx: mpsc::UnboundedReceiver<(Req, oneshot::Sender<Result<Res, BoxError>>)>,
}

impl Server {
    async fn next(&mut self) -> Attempt {
        let (req, reply) = self.rx.recv().await.expect("an attempt");
        let (parts, body) = req.into_parts();
        Attempt {
            headers: parts.headers,
            body,
            at: Instant::now(),
            reply,
        }
    }

    /// Whether another attempt comes within `within`.
    async fn quiet_for(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.rx.recv()).await.is_err()
    }
}

type Hedged = Retry<Mock>;
type CallResult = Result<http::Response<ResponseBody<Body>>, BoxError>;

fn hedged(policy: HedgingPolicy) -> (Hedged, Server) {
    hedged_with(RetryLayer::new(
        RetryPolicies::none().with_hedging("*", policy).unwrap(),
    ))
}

fn hedged_with(layer: RetryLayer) -> (Hedged, Server) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        tower_layer::Layer::layer(&layer, Mock { tx }),
        Server { rx },
    )
}

fn start(service: &mut Hedged, req: Req) -> tokio::task::JoinHandle<CallResult> {
    tokio::spawn(tower_service::Service::call(service, req))
}

fn policy(delay_ms: u64) -> HedgingPolicy {
    HedgingPolicy::default().with_hedging_delay(Duration::from_millis(delay_ms))
}

async fn bytes(body: Body) -> Bytes {
    body.collect().await.expect("a body").to_bytes()
}

#[tokio::test(start_paused = true)]
async fn hedges_go_every_delay_and_the_first_answer_cancels_the_rest() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let (mut service, mut server) = hedged(policy(50).with_max_attempts(3));
    let t0 = Instant::now();
    let call = start(&mut service, request(GET, b"\0\0\0\0\x02p1"));
    let first = server.next().await;
    assert_eq!((first.at - t0, first.previous()), (Duration::ZERO, None));
    let second = server.next().await;
    assert_eq!(second.at - t0, Duration::from_millis(50));
    assert_eq!(second.previous(), Some("1"));
    let third = server.next().await;
    assert_eq!(third.at - t0, Duration::from_millis(100));
    assert_eq!(third.previous(), Some("2"));
    let (first, second, third) = (first, second, third);
    let bodies = [
        bytes(first.body).await,
        bytes(second.body).await,
        bytes(third.body).await,
    ];
    assert!(
        bodies.iter().all(|b| b == &b"\0\0\0\0\x02p1"[..]),
        "{bodies:?}"
    );
    // The second answers first: it commits, the others are cancelled.
    assert!(second.reply.send(Ok(committed(Code::Ok))).is_ok());
    let response = call.await.unwrap().expect("committed");
    assert_eq!(code_of_head(&Ok::<_, BoxError>(response)), None);
    assert!(first.reply.is_closed(), "attempt 1 cancelled");
    assert!(third.reply.is_closed(), "attempt 3 cancelled");
    assert!(
        server.quiet_for(Duration::from_secs(1)).await,
        "no 4th attempt"
    );
    // A snapshot resets the counters: take one.
    let snapshot = snapshotter.snapshot().into_vec();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(k, ..)| k.key().name() == name)
            .map(|(.., v)| match v {
                DebugValue::Counter(n) => *n,
                _ => panic!("{name} is not a counter"),
            })
    };
    assert_eq!(counter("grpc.retry.hedges"), Some(2));
    assert_eq!(counter("grpc.retry.hedges_cancelled"), Some(2));
}

#[tokio::test(start_paused = true)]
async fn an_answer_before_the_delay_sends_no_hedge() {
    let (mut service, mut server) = hedged(policy(50));
    let call = start(&mut service, request(GET, b"x"));
    let first = server.next().await;
    advance(Duration::from_millis(10)).await;
    first.answer(trailers_only(Code::Ok));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);
    assert!(server.quiet_for(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn a_non_fatal_failure_sends_the_next_hedge_at_once_and_a_fatal_one_commits() {
    let (mut service, mut server) = hedged(
        policy(1000)
            .with_max_attempts(4)
            .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable])),
    );
    let t0 = Instant::now();
    let call = start(&mut service, request(GET, b"x"));
    let first = server.next().await;
    advance(Duration::from_millis(10)).await;
    first.answer(trailers_only(Code::Unavailable));
    let second = server.next().await;
    assert_eq!(
        second.at - t0,
        Duration::from_millis(10),
        "at once, not after 1 s"
    );
    let third = server.next().await;
    assert_eq!(
        third.at - t0,
        Duration::from_millis(1010),
        "then the delay again"
    );
    // A fatal failure commits: the caller gets it, the other is cancelled.
    third.answer(trailers_only(Code::NotFound));
    assert_eq!(code_of(call.await.unwrap()), Code::NotFound);
    assert!(second.cancelled());
    assert!(server.quiet_for(Duration::from_secs(5)).await);
}

#[tokio::test(start_paused = true)]
async fn when_every_attempt_fails_non_fatally_the_last_failure_is_returned() {
    let (mut service, mut server) = hedged(
        policy(50)
            .with_max_attempts(2)
            .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable, Code::Aborted])),
    );
    let call = start(&mut service, request(GET, b"x"));
    let first = server.next().await;
    let second = server.next().await;
    first.answer(trailers_only(Code::Unavailable));
    advance(Duration::from_millis(5)).await;
    assert!(!call.is_finished(), "the second attempt is still in flight");
    second.answer(trailers_only(Code::Aborted));
    assert_eq!(code_of(call.await.unwrap()), Code::Aborted);
    assert!(server.quiet_for(Duration::from_secs(1)).await);
}

#[tokio::test(start_paused = true)]
async fn pushback_delays_the_next_hedge_and_an_invalid_one_stops_hedging() {
    let non_fatal = CodeSet::of(&[Code::Unavailable]);
    let (mut service, mut server) = hedged(policy(1000).with_non_fatal_codes(non_fatal));
    let t0 = Instant::now();
    let call = start(&mut service, request(GET, b"x"));
    server
        .next()
        .await
        .answer(with_pushback(Code::Unavailable, &["300"]));
    let second = server.next().await;
    assert_eq!(second.at - t0, Duration::from_millis(300));
    second.answer(trailers_only(Code::Ok));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);

    let call = start(&mut service, request(GET, b"x"));
    server
        .next()
        .await
        .answer(with_pushback(Code::Unavailable, &["-1"]));
    assert_eq!(code_of(call.await.unwrap()), Code::Unavailable);
    assert!(server.quiet_for(Duration::from_secs(5)).await, "no hedge");
}

#[tokio::test(start_paused = true)]
async fn hedges_count_like_retries_in_the_throttle() {
    // 2 tokens: one non-fatal failure leaves 1, not above half.
    let throttle = RetryThrottle::new(2.0, 0.1).unwrap();
    let policies = RetryPolicies::none()
        .with_hedging(
            "*",
            policy(1000).with_non_fatal_codes(CodeSet::of(&[Code::Unavailable])),
        )
        .unwrap();
    let (mut service, mut server) =
        hedged_with(RetryLayer::new(policies).with_throttle(throttle.clone()));
    let call = start(&mut service, request(GET, b"x"));
    server.next().await.answer(trailers_only(Code::Unavailable));
    assert_eq!(code_of(call.await.unwrap()), Code::Unavailable);
    assert_eq!(throttle.tokens(), 1.0);
    // Throttled: no hedge is sent even after the delay.
    let call = start(&mut service, request(GET, b"x"));
    let first = server.next().await;
    assert!(server.quiet_for(Duration::from_secs(3)).await);
    first.answer(trailers_only(Code::Ok));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);
    assert_eq!(throttle.tokens(), 1.1, "a success gives token_ratio back");
}

#[tokio::test(start_paused = true)]
async fn hedges_spend_the_retry_budget() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
    let policies = RetryPolicies::none()
        .with_hedging("*", policy(50).with_max_attempts(3))
        .unwrap();
    let (mut service, mut server) = hedged_with(RetryLayer::new(policies).with_budget(budget));
    // Two calls deposit enough for one hedge in all.
    let a = start(&mut service, request(GET, b"x"));
    let b = start(&mut service, request(GET, b"x"));
    let mut attempts = Vec::new();
    loop {
        tokio::select! {
            attempt = server.next() => attempts.push(attempt),
            () = tokio::time::sleep(Duration::from_secs(1)) => break,
        }
    }
    assert_eq!(attempts.len(), 3, "two first attempts and one hedge");
    for attempt in attempts {
        attempt.answer(trailers_only(Code::Ok));
    }
    assert_eq!(code_of(a.await.unwrap()), Code::Ok);
    assert_eq!(code_of(b.await.unwrap()), Code::Ok);
}

#[tokio::test(start_paused = true)]
async fn no_hedge_starts_at_or_after_the_deadline() {
    let (mut service, mut server) = hedged(policy(50).with_max_attempts(5));
    let t0 = Instant::now();
    let mut req = request(GET, b"x");
    req.headers_mut()
        .insert("grpc-timeout", "120m".parse().unwrap());
    let call = start(&mut service, req);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(server.next().await);
    }
    let at: Vec<_> = seen.iter().map(|a| a.at - t0).collect();
    assert_eq!(
        at,
        [0, 50, 100].map(Duration::from_millis),
        "hedges at 50 and 100 ms"
    );
    let left = |a: &Attempt| timeout_header::decode(a.headers["grpc-timeout"].as_bytes()).unwrap();
    assert_eq!(left(&seen[1]), Duration::from_millis(70), "the time left");
    assert_eq!(left(&seen[2]), Duration::from_millis(20));
    assert!(
        server.quiet_for(Duration::from_secs(1)).await,
        "none at 150 ms"
    );
    seen.pop()
        .unwrap()
        .answer(trailers_only(Code::DeadlineExceeded));
    assert_eq!(code_of(call.await.unwrap()), Code::DeadlineExceeded);
}

#[tokio::test(start_paused = true)]
async fn hedging_a_write_needs_idempotency_keys_and_sends_one_key() {
    let err = RetryPolicies::none()
        .with_hedging("CreateProduct", HedgingPolicy::default().non_idempotent())
        .unwrap_err();
    assert_eq!(err.field(), "hedging.idempotent");
    assert!(err.to_string().contains("`CreateProduct`"), "{err}");

    let (mut service, mut server) = hedged(
        policy(50)
            .with_max_attempts(2)
            .non_idempotent()
            .with_idempotency_keys(),
    );
    let call = start(&mut service, request(CREATE, b"w"));
    let first = server.next().await;
    let second = server.next().await;
    let key = first.headers[IDEMPOTENCY_KEY].clone();
    assert_eq!(key.len(), 32);
    assert_eq!(second.headers[IDEMPOTENCY_KEY], key);
    first.answer(trailers_only(Code::Ok));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);
    assert!(second.cancelled());
}

#[tokio::test(start_paused = true)]
async fn a_client_stream_is_hedged_byte_for_byte_while_it_is_sent() {
    let (frames, rx) = mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(8);
    let body = Body::new(StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let req = http::Request::builder()
        .uri(format!("http://catalog{GET}"))
        .body(body)
        .unwrap();
    let (mut service, mut server) = hedged(policy(50).with_max_attempts(3));
    let call = start(&mut service, req);
    let first = server.next().await;
    let first_body = tokio::spawn(bytes(first.body));
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .await
        .unwrap();
    // The hedges start mid-stream; each reads at its own pace.
    let second = server.next().await;
    let second_body = tokio::spawn(bytes(second.body));
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"two,"))))
        .await
        .unwrap();
    let third = server.next().await;
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"three"))))
        .await
        .unwrap();
    drop(frames);
    let third_body = bytes(third.body).await;
    assert_eq!(third_body, &b"one,two,three"[..]);
    assert_eq!(first_body.await.unwrap(), &b"one,two,three"[..]);
    assert_eq!(second_body.await.unwrap(), &b"one,two,three"[..]);
    assert!(third.reply.send(Ok(committed(Code::Ok))).is_ok());
    assert!(call.await.unwrap().is_ok());
    assert!(first.reply.is_closed() && second.reply.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_cap_is_sent_once_and_not_hedged() {
    let layer = RetryLayer::new(RetryPolicies::none().with_hedging("*", policy(50)).unwrap())
        .with_buffer_limits(4, 1024)
        .unwrap();
    let (mut service, mut server) = hedged_with(layer);
    let call = start(&mut service, request(GET, b"0123456789"));
    let first = server.next().await;
    assert_eq!(bytes(first.body).await, &b"0123456789"[..]);
    assert!(server.quiet_for(Duration::from_secs(1)).await, "no hedge");
    let _ = first.reply.send(Ok(trailers_only(Code::Ok)));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);
}

#[test]
fn a_method_has_a_retry_or_a_hedging_policy() {
    let policies = RetryPolicies::new(RetryPolicy::default())
        .unwrap()
        .with_hedging("GetProduct", HedgingPolicy::default())
        .unwrap();
    assert!(policies.hedging_policy_for(GET).is_some());
    assert!(policies.policy_for(GET).is_none());
    assert!(policies.policy_for(CREATE).is_some());
    assert!(policies.hedging_policy_for(CREATE).is_none());
    let err = policies
        .with_hedging("GetProduct", HedgingPolicy::default())
        .unwrap_err();
    assert!(err.to_string().contains("GetProduct"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_stream_sends_the_next_hedge_at_once_and_a_rejection_stops_hedging() {
    let (mut service, mut server) = hedged(policy(1000).with_max_attempts(3));
    let t0 = Instant::now();
    let call = start(&mut service, request(GET, b"x"));
    let first = server.next().await;
    // The server never saw it: not a response, so the next hedge goes now.
    let _ = first.reply.send(Err(Box::new(
        crate::test_h2::remote_reset(h2::Reason::REFUSED_STREAM).await,
    )));
    let second = server.next().await;
    assert_eq!(second.at - t0, Duration::ZERO);
    // Refused below (an open breaker): no further hedge; the caller gets
    // the refusal once nothing else is in flight.
    let _ = second.reply.send(Err(Box::new(
        grpc_resilience_core::error::LocalRejection::new(tonic::Status::unavailable("open")),
    )));
    let err = call.await.unwrap().expect_err("refused");
    assert_eq!(tonic::Status::from_error(err).code(), Code::Unavailable);
    assert!(
        server.quiet_for(Duration::from_secs(5)).await,
        "no third attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_override_makes_a_hedged_call_a_retried_one() {
    let (mut service, mut server) = hedged(policy(50));
    // Disabled: sent once, never hedged.
    let mut req = request(GET, b"x");
    req.extensions_mut().insert(RetryOverride::disabled());
    let call = start(&mut service, req);
    let first = server.next().await;
    assert!(server.quiet_for(Duration::from_secs(1)).await, "no hedge");
    first.answer(trailers_only(Code::Unavailable));
    assert_eq!(code_of(call.await.unwrap()), Code::Unavailable);

    // Any other override: retried after a failure, not hedged.
    let mut req = request(GET, b"x");
    req.extensions_mut().insert(
        RetryOverride::new()
            .with_max_attempts(2)
            .with_initial_delay(Duration::from_millis(10)),
    );
    let call = start(&mut service, req);
    let first = server.next().await;
    assert!(server.quiet_for(Duration::from_secs(1)).await, "no hedge");
    first.answer(trailers_only(Code::Unavailable));
    let retry = server.next().await;
    assert_eq!(retry.previous(), Some("1"));
    retry.answer(trailers_only(Code::Ok));
    assert_eq!(code_of(call.await.unwrap()), Code::Ok);
}
