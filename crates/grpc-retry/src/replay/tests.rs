use super::*;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;

type Original =
    StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, std::io::Error>>>;

fn original(frames: Vec<Frame<Bytes>>) -> Original {
    let (tx, rx) = mpsc::channel(frames.len().max(1));
    for f in frames {
        tx.try_send(Ok(f)).unwrap();
    }
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `B` stating `size` as its exact size, as a body of known length does.
struct Exact<B>(B, u64);

impl<B: Body + Unpin> Body for Exact<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.1)
    }
}

async fn read_all<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> (Vec<u8>, Option<HeaderMap>)
where
    B::Error: fmt::Debug,
{
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame.unwrap().into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    (data, trailers)
}

fn trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("x-checksum", "abc".parse().unwrap());
    t
}

#[tokio::test]
async fn a_replay_is_byte_identical_with_trailers() {
    let limits = Limits::handle(1024, 4096);
    let frames = vec![
        Frame::data(Bytes::from_static(b"hello ")),
        Frame::data(Bytes::from_static(b"world")),
        Frame::trailers(trailers()),
    ];
    let (mut first, shared) = ReplayBody::first(original(frames), limits.clone(), Head::empty());
    let (data, t) = read_all(&mut first).await;
    assert_eq!(data, b"hello world");
    assert_eq!(t, Some(trailers()));
    assert!(first.is_end_stream());
    drop(first);
    assert_eq!(limits.in_use(), 11);
    for _ in 0..3 {
        let mut again = shared.replay().unwrap();
        // The size is known, but stated as exact only if the original's
        // was (this stream's was not).
        assert_eq!(again.size_hint().lower(), 11);
        assert_eq!(again.size_hint().exact(), None);
        let (data, t) = read_all(&mut again).await;
        assert_eq!(data, b"hello world");
        assert_eq!(t, Some(trailers()));
    }
    drop(shared);
    assert_eq!(limits.in_use(), 0, "released with the call");
}

#[tokio::test]
async fn a_replay_continues_where_the_first_attempt_stopped() {
    // The response came before the request body was done: the first
    // attempt read one frame, then was dropped.
    let limits = Limits::handle(1024, 4096);
    let (tx, rx) = mpsc::channel(4);
    let body: Original = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (mut first, shared) = ReplayBody::first(body, limits, Head::empty());
    tx.send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .await
        .unwrap();
    let frame = first.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"one,"));

    let mut second = shared.replay().unwrap();
    // The first attempt is still alive: the replay of what was recorded
    // works, then the second reads the original itself.
    let frame = second.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"one,"));
    let mut next = tokio_test::task::spawn(second.frame());
    assert!(next.poll().is_pending());
    drop(first);
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    assert!(
        next.is_woken(),
        "the original's next frame wakes the replay"
    );
    drop(next);
    drop(tx);
    let (rest, _) = read_all(&mut second).await;
    assert_eq!(rest, b"two");
    assert!(shared.replayable());
    let (all, _) = read_all(&mut shared.replay().unwrap()).await;
    assert_eq!(all, b"one,two");
}

#[tokio::test]
async fn a_body_over_the_per_call_cap_is_sent_but_not_replayable() {
    let limits = Limits::handle(8, 4096);
    let frames = vec![
        Frame::data(Bytes::from_static(b"12345")),
        Frame::data(Bytes::from_static(b"67890")),
    ];
    let (mut first, shared) = ReplayBody::first(original(frames), limits.clone(), Head::empty());
    let (data, _) = read_all(&mut first).await;
    assert_eq!(data, b"1234567890", "every byte still goes out");
    assert!(!shared.replayable());
    assert_eq!(shared.buffered(), 0);
    assert_eq!(limits.in_use(), 0);
}

#[tokio::test]
async fn the_layer_total_cap_is_shared_by_calls() {
    let limits = Limits::handle(100, 10);
    let (mut a, shared_a) = ReplayBody::first(
        original(vec![Frame::data(Bytes::from_static(b"123456"))]),
        limits.clone(),
        Head::empty(),
    );
    let (mut b, shared_b) = ReplayBody::first(
        original(vec![Frame::data(Bytes::from_static(b"abcdef"))]),
        limits.clone(),
        Head::empty(),
    );
    read_all(&mut a).await;
    read_all(&mut b).await;
    assert!(shared_a.replayable());
    assert!(!shared_b.replayable(), "6 + 6 is over the total of 10");
    assert_eq!(limits.in_use(), 6);
    drop((a, shared_a));
    assert_eq!(limits.in_use(), 0);
}

#[tokio::test]
async fn a_broken_body_is_not_replayable() {
    let limits = Limits::handle(100, 1000);
    let (tx, rx) = mpsc::channel(2);
    tx.try_send(Ok(Frame::data(Bytes::from_static(b"abc"))))
        .unwrap();
    tx.try_send(Err(std::io::Error::other("client went away")))
        .unwrap();
    let body: Original = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (mut first, shared) = ReplayBody::first(body, limits.clone(), Head::empty());
    assert!(first.frame().await.unwrap().is_ok());
    assert!(first.frame().await.unwrap().is_err());
    assert!(!shared.replayable());
    assert_eq!(limits.in_use(), 0);
}

// ---------------------------------------------------------------------------
// The replay state machine: wakeups, gaps, commit (issue 8, items 1 to 3).

type Tx = mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

fn channel_body(capacity: usize) -> (Tx, Original) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        tx,
        StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

async fn push(tx: &Tx, data: &'static [u8]) {
    tx.send(Ok(Frame::data(Bytes::from_static(data))))
        .await
        .unwrap();
}

/// How a body stopped sending.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// It ended cleanly (`None`).
    End,
    /// It failed with this error text.
    Failed(String),
    /// It waits for more.
    Pending,
}

/// Polls `body` (with `task`'s waker) until it ends, fails or waits: the
/// data it sent, and how it stopped.
fn poll_out<B>(task: &mut tokio_test::task::Spawn<()>, body: &mut B) -> (Vec<u8>, Stop)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let mut data = Vec::new();
    loop {
        match task.enter(|cx, _| Pin::new(&mut *body).poll_frame(cx)) {
            Poll::Pending => return (data, Stop::Pending),
            Poll::Ready(None) => return (data, Stop::End),
            Poll::Ready(Some(Err(err))) => return (data, Stop::Failed(err.to_string())),
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    data.extend_from_slice(&d);
                }
            }
        }
    }
}

#[tokio::test]
async fn a_waiting_replay_is_woken_when_the_original_is_read_to_its_end() {
    let limits = Limits::handle(1024, 4096);
    let (tx, body) = channel_body(4);
    let (mut first, shared) = ReplayBody::first(body, limits, Head::empty());
    push(&tx, b"one,").await;
    let mut server1 = tokio_test::task::spawn(());
    assert_eq!(
        poll_out(&mut server1, &mut first),
        (b"one,".to_vec(), Stop::Pending)
    );

    let mut second = shared.replay().unwrap();
    let mut server2 = tokio_test::task::spawn(());
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"one,".to_vec(), Stop::Pending)
    );

    // The first attempt (its server keeps reading) reads the original to its
    // end while the replay waits for it.
    push(&tx, b"two").await;
    drop(tx);
    assert_eq!(
        poll_out(&mut server1, &mut first),
        (b"two".to_vec(), Stop::End)
    );
    assert!(
        server2.is_woken(),
        "the original's end (and its new data) must wake the waiting replay"
    );
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"two".to_vec(), Stop::End)
    );
}

#[tokio::test]
async fn a_waiting_replay_is_woken_and_fails_when_the_original_fails() {
    let limits = Limits::handle(1024, 4096);
    let (tx, body) = channel_body(4);
    let (mut first, shared) = ReplayBody::first(body, limits.clone(), Head::empty());
    push(&tx, b"one,").await;
    let mut server1 = tokio_test::task::spawn(());
    assert_eq!(poll_out(&mut server1, &mut first).1, Stop::Pending);
    let mut second = shared.replay().unwrap();
    let mut server2 = tokio_test::task::spawn(());
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"one,".to_vec(), Stop::Pending)
    );

    tx.send(Err(std::io::Error::other("client went away")))
        .await
        .unwrap();
    let (_, stop) = poll_out(&mut server1, &mut first);
    assert!(matches!(stop, Stop::Failed(_)), "{stop:?}");
    assert!(
        server2.is_woken(),
        "the original's failure must wake the replay"
    );
    let (rest, stop) = poll_out(&mut server2, &mut second);
    assert!(rest.is_empty());
    assert!(
        matches!(&stop, Stop::Failed(text) if text.contains("request body")),
        "the replay fails too, never ends as if complete: {stop:?}"
    );
    assert_eq!(limits.in_use(), 0);
}

#[tokio::test]
async fn a_replay_in_flight_fails_rather_than_end_early_when_the_original_crosses_the_cap() {
    let limits = Limits::handle(8, 4096);
    let (tx, body) = channel_body(4);
    let (mut first, shared) = ReplayBody::first(body, limits.clone(), Head::empty());
    push(&tx, b"1234").await;
    let mut server1 = tokio_test::task::spawn(());
    assert_eq!(poll_out(&mut server1, &mut first).0, b"1234");
    let mut second = shared.replay().unwrap();
    let mut server2 = tokio_test::task::spawn(());
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"1234".to_vec(), Stop::Pending)
    );

    // The first attempt's server keeps reading: 12 bytes, over the cap of 8.
    push(&tx, b"5678").await;
    push(&tx, b"9abc").await;
    drop(tx);
    assert_eq!(
        poll_out(&mut server1, &mut first),
        (b"56789abc".to_vec(), Stop::End)
    );
    let (rest, stop) = poll_out(&mut server2, &mut second);
    assert!(
        matches!(&stop, Stop::Failed(text) if text.contains("buffer limit")),
        "the replay must fail, not send {:?} as the whole body: {stop:?}",
        String::from_utf8_lossy(&[b"1234".as_slice(), &rest].concat()),
    );
    // The error is typed, for code that looks through a failed attempt.
    let err = server2
        .enter(|cx, _| Pin::new(&mut second).poll_frame(cx))
        .map(|f| f.and_then(Result::err));
    let Poll::Ready(Some(err)) = err else {
        panic!("a refused replay keeps failing: {err:?}");
    };
    assert_eq!(
        err.downcast_ref::<ReplayUnavailable>(),
        Some(&ReplayUnavailable::BufferLimitExceeded)
    );
    assert!(!shared.replayable());
    assert_eq!(limits.in_use(), 0, "nothing held once over the cap");
}

#[tokio::test]
async fn a_replay_never_reads_on_past_a_gap_when_the_original_is_handed_back() {
    let limits = Limits::handle(8, 4096);
    let (tx, body) = channel_body(4);
    let (mut first, shared) = ReplayBody::first(body, limits.clone(), Head::empty());
    push(&tx, b"1234").await;
    let mut server1 = tokio_test::task::spawn(());
    assert_eq!(poll_out(&mut server1, &mut first).0, b"1234");
    let mut second = shared.replay().unwrap();
    let mut server2 = tokio_test::task::spawn(());
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"1234".to_vec(), Stop::Pending)
    );

    push(&tx, b"56789").await;
    assert_eq!(
        poll_out(&mut server1, &mut first).0,
        b"56789",
        "over the cap"
    );
    // The first attempt's stream is reset now: the original is handed back.
    drop(first);
    push(&tx, b"tail").await;
    drop(tx);
    let (rest, stop) = poll_out(&mut server2, &mut second);
    assert!(
        matches!(&stop, Stop::Failed(text) if text.contains("buffer limit")),
        "the replay must fail, not send {:?}: {stop:?}",
        String::from_utf8_lossy(&[b"1234".as_slice(), &rest].concat()),
    );
    assert_eq!(limits.in_use(), 0);
}

#[tokio::test]
async fn a_call_committed_on_a_lagging_replay_keeps_only_what_it_has_not_sent() {
    let limits = Limits::handle(1024, 4096);
    let (tx, body) = channel_body(4);
    let (mut first, recording) = ReplayBody::first(body, limits.clone(), Head::empty());
    push(&tx, b"ab").await;
    push(&tx, b"cd").await;
    let mut server1 = tokio_test::task::spawn(());
    assert_eq!(poll_out(&mut server1, &mut first).0, b"abcd");
    let mut second = recording.replay().unwrap();
    let mut server2 = tokio_test::task::spawn(());
    assert_eq!(
        second.frame().await.unwrap().unwrap().into_data().unwrap(),
        Bytes::from_static(b"ab")
    );
    // The second attempt's response headers came: the call is committed
    // while its body lags behind the first attempt's.
    drop(recording);
    assert_eq!(limits.in_use(), 2, "only `cd`, which it has not sent");
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"cd".to_vec(), Stop::Pending)
    );
    assert_eq!(limits.in_use(), 0, "freed as it is sent");
    // The first attempt may no longer read the original: it fails (its
    // stream is reset), it never ends cleanly with a truncated body.
    push(&tx, b"ef").await;
    let (rest, stop) = poll_out(&mut server1, &mut first);
    assert!(rest.is_empty());
    assert!(
        matches!(&stop, Stop::Failed(text) if text.contains("call is over")),
        "{stop:?}"
    );
    // The committed one reads the original itself; nothing is recorded.
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"ef".to_vec(), Stop::Pending)
    );
    assert_eq!(limits.in_use(), 0);
    drop(first);
    push(&tx, b"gh").await;
    drop(tx);
    assert!(server2.is_woken());
    assert_eq!(
        poll_out(&mut server2, &mut second),
        (b"gh".to_vec(), Stop::End)
    );
    assert_eq!(limits.in_use(), 0);
}

// Through the service, with a mock server.

mod through_the_service {
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tonic::Code;
    use tonic::body::Body as TonicBody;
    use tower_test::mock;

    use super::*;
    use crate::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};

    type Req = http::Request<TonicBody>;
    type Res = http::Response<TonicBody>;

    const IMPORT: &str = "http://catalog/catalog.v1.CommandService/ImportProducts";

    fn layer(per_call: usize, total: usize) -> RetryLayer {
        RetryLayer::new(
            RetryPolicies::new(RetryPolicy::default().with_jitter(Jitter::None)).unwrap(),
        )
        .with_buffer_limits(per_call, total)
        .unwrap()
    }

    fn streaming_request(body: Original) -> Req {
        http::Request::builder()
            .uri(IMPORT)
            .body(TonicBody::new(body))
            .unwrap()
    }

    fn unavailable() -> Res {
        let mut response = http::Response::new(TonicBody::empty());
        response.headers_mut().insert(
            "grpc-status",
            (Code::Unavailable as i32).to_string().parse().unwrap(),
        );
        response
    }

    /// Response headers without a status: the call is committed.
    fn headers_only() -> Res {
        http::Response::new(TonicBody::empty())
    }

    fn code_of<B>(result: Result<http::Response<B>, BoxError>) -> Code {
        match result {
            Ok(r) => grpc_resilience_core::classify_head(r.status(), r.headers())
                .map_or(Code::Ok, |o| o.code()),
            Err(err) => tonic::Status::from_error(err).code(),
        }
    }

    /// Reads a request body until it ends or fails, as a server that keeps
    /// reading does; bounded by a timeout so a stuck body fails the test.
    async fn read_to_end(mut body: TonicBody) -> (Vec<u8>, Stop) {
        let mut data = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
                Err(_) => return (data, Stop::Pending),
                Ok(None) => return (data, Stop::End),
                Ok(Some(Err(err))) => return (data, Stop::Failed(err.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(d) = frame.into_data() {
                        data.extend_from_slice(&d);
                    }
                }
            }
        }
    }

    async fn next_frame(body: &mut TonicBody) -> Bytes {
        body.frame()
            .await
            .expect("a frame")
            .expect("no error")
            .into_data()
            .expect("data")
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_outgrows_the_cap_during_backoff_is_never_replayed() {
        let layer = layer(8, 1024);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        let (tx, body) = channel_body(8);
        assert!(service.poll_ready().is_ready());
        let call = tokio::spawn(service.call(streaming_request(body)));
        push(&tx, b"1234").await;
        let (req1, send1) = handle.next_request().await.unwrap();
        let mut body1 = req1.into_body();
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"1234"));
        // Answered early; the server does not reset the stream and reads on
        // while the retry waits out its backoff (100 ms).
        send1.send_response(unavailable());
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(layer.buffered_bytes(), 4, "in backoff, still replayable");
        push(&tx, b"5678").await;
        push(&tx, b"9abc").await;
        drop(tx);
        let (rest, stop) = read_to_end(body1).await;
        assert_eq!((rest.as_slice(), stop), (b"56789abc".as_slice(), Stop::End));

        let second = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        if let Ok(Some((req2, send2))) = second {
            let (sent, stop) = read_to_end(req2.into_body()).await;
            send2.send_response(headers_only());
            panic!(
                "no attempt may follow once the body is no longer held; one sent {:?} then {stop:?}",
                String::from_utf8_lossy(&sent)
            );
        }
        assert_eq!(
            code_of(call.await.unwrap()),
            Code::Unavailable,
            "the caller gets the first attempt's outcome"
        );
        assert_eq!(layer.buffered_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_in_flight_fails_when_the_original_outgrows_the_cap_and_the_caller_gets_the_first_outcome()
     {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _metrics = metrics::set_default_local_recorder(&recorder);
        let layer = layer(8, 1024);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        let (tx, body) = channel_body(8);
        assert!(service.poll_ready().is_ready());
        let call = tokio::spawn(service.call(streaming_request(body)));
        push(&tx, b"1234").await;
        let (req1, send1) = handle.next_request().await.unwrap();
        let mut body1 = req1.into_body();
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"1234"));
        send1.send_response(unavailable());

        // The retry starts while the first attempt still holds the original.
        let (req2, send2) = handle.next_request().await.unwrap();
        let mut body2 = req2.into_body();
        assert_eq!(next_frame(&mut body2).await, Bytes::from_static(b"1234"));
        let replay = tokio::spawn(read_to_end(body2));

        // The first attempt's server reads on, past the cap.
        push(&tx, b"5678").await;
        push(&tx, b"9abc").await;
        drop(tx);
        let (rest, stop) = read_to_end(body1).await;
        assert_eq!((rest.as_slice(), stop), (b"56789abc".as_slice(), Stop::End));

        let (rest, stop) = replay.await.unwrap();
        assert!(
            matches!(&stop, Stop::Failed(text) if text.contains("buffer limit")),
            "the retry must fail, not send {:?} as the whole body: {stop:?}",
            String::from_utf8_lossy(&[b"1234".as_slice(), &rest].concat()),
        );
        // The client's HTTP/2 stack resets the stream of a body that failed.
        send2.send_error(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        let result = call.await.unwrap();
        assert_eq!(
            code_of(result),
            Code::Unavailable,
            "the caller gets the first attempt's outcome, not the broken retry's"
        );
        let third = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        assert!(!matches!(third, Ok(Some(_))), "no third attempt");
        assert_eq!(layer.buffered_bytes(), 0);
        // The abandoned retry is timed once.
        let samples: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == "grpc.retry.duration")
            .map(|(.., value)| value)
            .collect();
        assert!(
            matches!(samples.as_slice(), [DebugValue::Histogram(v)] if v.len() == 1),
            "exactly one grpc.retry.duration sample: {samples:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_outgrows_the_cap_while_the_service_is_busy_is_never_replayed() {
        let layer = layer(8, 1024);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        handle.allow(1);
        let (tx, body) = channel_body(8);
        assert!(service.poll_ready().is_ready());
        let call = tokio::spawn(service.call(streaming_request(body)));
        push(&tx, b"1234").await;
        let (req1, send1) = handle.next_request().await.unwrap();
        let mut body1 = req1.into_body();
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"1234"));
        send1.send_response(unavailable());
        // Past the backoff (100 ms) the retry waits for the busy service,
        // while the first attempt's server reads on past the cap.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!call.is_finished());
        push(&tx, b"5678").await;
        push(&tx, b"9abc").await;
        drop(tx);
        let (rest, stop) = read_to_end(body1).await;
        assert_eq!((rest.as_slice(), stop), (b"56789abc".as_slice(), Stop::End));
        handle.allow(1);
        let second = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        if let Ok(Some((req2, send2))) = second {
            let (sent, stop) = read_to_end(req2.into_body()).await;
            send2.send_response(headers_only());
            panic!(
                "no attempt may follow once the body is no longer held; one sent {:?} then {stop:?}",
                String::from_utf8_lossy(&sent)
            );
        }
        assert_eq!(code_of(call.await.unwrap()), Code::Unavailable);
        assert_eq!(layer.buffered_bytes(), 0);
    }

    fn trailers_only_ok() -> Res {
        let mut response = http::Response::new(TonicBody::empty());
        response
            .headers_mut()
            .insert("grpc-status", "0".parse().unwrap());
        response
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_answer_of_the_retry_is_returned_even_if_its_body_is_refused_later() {
        let layer = layer(8, 1024);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        let (tx, body) = channel_body(8);
        assert!(service.poll_ready().is_ready());
        let mut call = tokio_test::task::spawn(service.call(streaming_request(body)));
        assert!(call.poll().is_pending());
        push(&tx, b"1234").await;
        let (req1, send1) = handle.next_request().await.unwrap();
        let mut body1 = req1.into_body();
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"1234"));
        send1.send_response(unavailable());
        assert!(call.poll().is_pending(), "backing off");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(call.poll().is_pending(), "the retry is sent");
        let (req2, send2) = handle.next_request().await.unwrap();
        let mut body2 = req2.into_body();
        assert_eq!(next_frame(&mut body2).await, Bytes::from_static(b"1234"));
        // The second server completes the call (Trailers-Only OK) ...
        send2.send_response(trailers_only_ok());
        // ... and then, before the retry future looks, the first attempt
        // reads the original past the cap: the retry's body is refused.
        push(&tx, b"5678").await;
        push(&tx, b"9abc").await;
        drop(tx);
        let (rest, stop) = read_to_end(body1).await;
        assert_eq!((rest.as_slice(), stop), (b"56789abc".as_slice(), Stop::End));
        let (_, stop) = read_to_end(body2).await;
        assert!(
            matches!(&stop, Stop::Failed(text) if text.contains("buffer limit")),
            "{stop:?}"
        );
        let result = match call.poll() {
            Poll::Ready(result) => result,
            Poll::Pending => panic!("the call was answered"),
        };
        assert_eq!(
            code_of(result),
            Code::Ok,
            "the server completed the call: its answer, not the first attempt's UNAVAILABLE"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_committed_stream_releases_its_recording_and_records_no_more() {
        let layer = layer(1024, 4096);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        let (tx, body) = channel_body(8);
        assert!(service.poll_ready().is_ready());
        let call = tokio::spawn(service.call(streaming_request(body)));
        push(&tx, b"abcd").await;
        let (req1, send1) = handle.next_request().await.unwrap();
        let mut body1 = req1.into_body();
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"abcd"));
        assert_eq!(
            layer.buffered_bytes(),
            4,
            "recorded while it may be retried"
        );
        send1.send_response(headers_only());
        assert_eq!(code_of(call.await.unwrap()), Code::Ok);
        assert_eq!(
            layer.buffered_bytes(),
            0,
            "committed: nothing will replay it"
        );
        // The stream goes on for long: nothing more is held.
        push(&tx, b"efgh").await;
        assert_eq!(next_frame(&mut body1).await, Bytes::from_static(b"efgh"));
        assert_eq!(layer.buffered_bytes(), 0);
        drop(tx);
        assert_eq!(read_to_end(body1).await, (Vec::new(), Stop::End));
    }

    #[tokio::test(start_paused = true)]
    async fn committed_long_streams_leave_the_layer_budget_to_other_calls() {
        let layer = layer(100, 250);
        let (mut service, mut handle) = mock::spawn_layer::<Req, Res, _>(layer.clone());
        let mut streams = Vec::new();
        for _ in 0..3 {
            let (tx, body) = channel_body(8);
            assert!(service.poll_ready().is_ready());
            let call = tokio::spawn(service.call(streaming_request(body)));
            tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 90]))))
                .await
                .unwrap();
            let (req, send) = handle.next_request().await.unwrap();
            let mut body = req.into_body();
            assert_eq!(next_frame(&mut body).await.len(), 90);
            send.send_response(headers_only());
            assert_eq!(code_of(call.await.unwrap()), Code::Ok);
            streams.push((tx, body));
        }
        // A unary call that fails once is still retried: its 80 bytes fit in
        // the layer's 250 only if the committed streams hold nothing.
        let (tx, body) = channel_body(1);
        let unary = Bytes::from(vec![2u8; 80]);
        tx.send(Ok(Frame::data(unary.clone()))).await.unwrap();
        drop(tx);
        assert!(service.poll_ready().is_ready());
        let call = tokio::spawn(service.call(streaming_request(body)));
        let (req1, send1) = handle.next_request().await.unwrap();
        assert_eq!(read_to_end(req1.into_body()).await.0, unary);
        send1.send_response(unavailable());
        let second = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        let Ok(Some((req2, send2))) = second else {
            panic!("the unary call was not retried: the budget is held by committed streams");
        };
        assert_eq!(
            read_to_end(req2.into_body()).await,
            (unary.to_vec(), Stop::End)
        );
        send2.send_response(headers_only());
        assert_eq!(code_of(call.await.unwrap()), Code::Ok);
        drop(streams);
        assert_eq!(layer.buffered_bytes(), 0);
    }
}

#[tokio::test]
async fn a_replay_does_not_wait_for_an_attempt_that_stopped_reading() {
    // The first attempt's server answered (Trailers-Only UNAVAILABLE) but
    // hyper stopped polling its body (full send window) without dropping
    // it: the retry must read the original itself, not wait for it.
    let limits = Limits::handle(1024, 4096);
    let (tx, rx) = mpsc::channel(4);
    let body: Original = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (mut first, shared) = ReplayBody::first(body, limits, Head::empty());
    tx.send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .await
        .unwrap();
    let frame = first.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"one,"));
    // The first attempt also polled once more and is now parked.
    let mut parked = tokio_test::task::spawn(first.frame());
    assert!(parked.poll().is_pending());
    drop(parked);

    let mut second = shared.replay().unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"two,"))))
        .await
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"three"))))
        .await
        .unwrap();
    drop(tx);
    let mut all = tokio_test::task::spawn(read_all(&mut second));
    let (data, _) = match all.poll() {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("the replay waits for an attempt that no longer reads"),
    };
    assert_eq!(data, b"one,two,three");
    drop(all);
    // The stalled attempt, if ever polled again, sends the same body.
    let (rest, _) = read_all(&mut first).await;
    assert_eq!(rest, b"two,three");
}

#[tokio::test]
async fn a_body_with_more_to_come_is_recorded_from_its_first_frame() {
    // One frame is ready when the call starts, the rest comes later: the
    // body is recorded, and the frame read at the start is sent first.
    let limits = Limits::handle(1024, 4096);
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(Ok(Frame::data(Bytes::from_static(b"one,"))))
        .unwrap();
    let body: Original = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (mut first, recording) = ReplayBody::capture_with(body, limits.clone(), Head::empty);
    assert!(!recording.is_ready());
    assert!(!first.is_end_stream());
    assert_eq!(first.size_hint().lower(), 4);
    let frame = first.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"one,"));
    tx.send(Ok(Frame::data(Bytes::from_static(b"two"))))
        .await
        .unwrap();
    tx.send(Ok(Frame::trailers(trailers()))).await.unwrap();
    drop(tx);
    let (data, t) = read_all(&mut first).await;
    assert_eq!(data, b"two");
    assert_eq!(t, Some(trailers()));
    let mut again = recording.replay().unwrap();
    let (data, t) = read_all(&mut again).await;
    assert_eq!(data, b"one,two");
    assert_eq!(t, Some(trailers()));
    drop((first, again, recording));
    assert_eq!(limits.in_use(), 0);
}

#[tokio::test]
async fn a_body_with_two_ready_frames_is_recorded_whole() {
    let limits = Limits::handle(1024, 4096);
    let frames = vec![
        Frame::data(Bytes::from_static(b"a")),
        Frame::data(Bytes::from_static(b"b")),
        Frame::data(Bytes::from_static(b"c")),
    ];
    // Ends after its frames: the sender is gone.
    let body = original(frames);
    let (mut first, recording) = ReplayBody::capture_with(body, limits, Head::empty);
    assert!(!recording.is_ready());
    let (data, _) = read_all(&mut first).await;
    assert_eq!(data, b"abc");
    let (data, _) = read_all(&mut recording.replay().unwrap()).await;
    assert_eq!(data, b"abc");
}

#[tokio::test]
async fn a_body_with_only_trailers_is_recorded() {
    let limits = Limits::handle(1024, 4096);
    let (mut first, recording) = ReplayBody::capture_with(
        original(vec![Frame::trailers(trailers())]),
        limits,
        Head::empty,
    );
    assert!(!recording.is_ready());
    let (data, t) = read_all(&mut first).await;
    assert!(data.is_empty());
    assert_eq!(t, Some(trailers()));
    let (_, t) = read_all(&mut recording.replay().unwrap()).await;
    assert_eq!(t, Some(trailers()));
}

#[tokio::test]
async fn a_body_that_fails_at_once_fails_its_first_attempt_and_is_not_replayed() {
    let limits = Limits::handle(1024, 4096);
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(Err(std::io::Error::other("broken"))).unwrap();
    let body: Original = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (mut first, recording) = ReplayBody::capture_with(body, limits, Head::empty);
    let err = first.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "broken");
    assert!(!recording.replayable());
    assert!(recording.replay().is_none());
}

#[tokio::test]
async fn a_ready_body_is_sent_whole_and_replayed_without_a_shared_recording() {
    let limits = Limits::handle(1024, 4096);
    let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
    let (mut first, recording) = ReplayBody::capture_with(body, limits.clone(), Head::empty);
    assert!(recording.is_ready());
    assert_eq!(first.size_hint().exact(), Some(5));
    assert_eq!(limits.in_use(), 5, "held for replay");
    let (data, t) = read_all(&mut first).await;
    assert_eq!(data, b"hello");
    assert_eq!(t, None);
    assert!(first.is_end_stream());
    assert!(recording.replayable());
    for _ in 0..2 {
        let mut again = recording.replay().unwrap();
        assert!(!again.is_end_stream());
        let (data, _) = read_all(&mut again).await;
        assert_eq!(data, b"hello");
    }
    assert!(!recording.latest_refused());
    drop(recording);
    assert_eq!(limits.in_use(), 0, "released with the call");
}

#[tokio::test]
async fn an_empty_body_is_ready_and_ends_at_once() {
    let limits = Limits::handle(1024, 4096);
    let body = http_body_util::Empty::<Bytes>::new();
    let (first, recording) = ReplayBody::capture_with(body, limits, Head::empty);
    assert!(recording.is_ready());
    assert!(first.is_end_stream());
    assert!(recording.replay().unwrap().is_end_stream());
}

#[tokio::test]
async fn a_ready_body_over_a_limit_is_sent_once() {
    for limits in [Limits::handle(4, 4096), Limits::handle(1024, 4)] {
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let (mut first, recording) = ReplayBody::capture_with(body, limits.clone(), Head::empty);
        assert_eq!(limits.in_use(), 0, "not held");
        let (data, _) = read_all(&mut first).await;
        assert_eq!(data, b"hello", "still sent");
        assert!(!recording.replayable());
        assert!(recording.replay().is_none());
        drop(recording);
        assert_eq!(limits.in_use(), 0);
    }
}

#[test]
fn stripe_credit_never_lets_the_bytes_held_pass_the_total_and_a_refusal_takes_it_back() {
    // A total of 512 bytes: stripes take credit 2 bytes at a time.
    let limits = Limits::new(4096, 512);
    assert!(limits.reserve_in(0, 500));
    assert_eq!(limits.in_use(), 500);
    limits.release_in(0, 500);
    assert_eq!(limits.in_use(), 0, "credit is not counted as held");
    // Stripe 0 keeps 2 bytes of credit, so 511 more do not fit in the
    // shared count at once: the refusal takes the credit back first.
    assert!(limits.reserve_in(1, 511));
    assert_eq!(limits.in_use(), 511);
    assert!(!limits.reserve_in(2, 2), "511 + 2 bytes would pass 512");
    assert!(limits.reserve_in(3, 1));
    assert_eq!(limits.in_use(), 512);
    limits.release_in(1, 511);
    limits.release_in(3, 1);
    assert_eq!(limits.in_use(), 0);

    // A stripe's credit settles at two chunks at most, however its calls
    // take and give back.
    let limits = Limits::new(4096, 512);
    assert!(limits.reserve_in(0, 3));
    limits.release_in(0, 2);
    assert!(limits.reserve_in(0, 5));
    assert!(limits.credits[0].0.load(Ordering::Acquire) <= 4);
    assert_eq!(limits.in_use(), 6);
}

proptest::proptest! {
    /// One thread at a time, the credits change nothing a caller sees: a
    /// reservation succeeds exactly when the bytes held plus it fit in the
    /// total, and `in_use` is the bytes held.
    #[test]
    fn stripe_credit_is_exact_one_call_at_a_time(
        total in 0usize..4096,
        ops in proptest::collection::vec((0..STRIPES, 0usize..600, proptest::bool::ANY), 1..60),
    ) {
        let limits = Limits::new(usize::MAX, total);
        // What each reservation holds, in order.
        let mut held: Vec<usize> = Vec::new();
        for (stripe, n, reserve) in ops {
            if reserve || held.is_empty() {
                let fits = held.iter().sum::<usize>() + n <= total;
                proptest::prop_assert_eq!(limits.reserve_in(stripe, n), fits);
                if fits {
                    held.push(n);
                }
            } else {
                limits.release_in(stripe, held.remove(n % held.len()));
            }
            proptest::prop_assert_eq!(limits.in_use(), held.iter().sum::<usize>());
            for credit in &limits.credits {
                proptest::prop_assert!(credit.0.load(Ordering::Acquire) <= 2 * limits.chunk);
            }
        }
    }
}

#[tokio::test]
async fn a_replay_states_an_exact_size_only_if_the_original_did() {
    let limits = Limits::handle(1024, 4096);
    // One frame, ready: kept as it is.
    let one = || vec![Frame::data(Bytes::from_static(b"hello"))];
    for (exact, hint) in [(false, None), (true, Some(5))] {
        let (first, recording) = if exact {
            let (body, c) = ReplayBody::capture(Exact(original(one()), 5), limits.clone());
            let replay = Recording::new(Head::empty(), c).replay();
            (body.size_hint(), replay.map(|r| r.size_hint()))
        } else {
            let (body, c) = ReplayBody::capture(original(one()), limits.clone());
            let replay = Recording::new(Head::empty(), c).replay();
            (body.size_hint(), replay.map(|r| r.size_hint()))
        };
        assert_eq!((first.lower(), first.exact()), (5, hint), "exact: {exact}");
        let again = recording.expect("a replay");
        assert_eq!((again.lower(), again.exact()), (5, hint), "exact: {exact}");
    }
    // Recorded as read: a replay of the whole body.
    let two = vec![
        Frame::data(Bytes::from_static(b"hello ")),
        Frame::data(Bytes::from_static(b"world")),
    ];
    let (mut first, shared) =
        ReplayBody::first(Exact(original(two), 11), limits.clone(), Head::empty());
    read_all(&mut first).await;
    drop(first);
    let again = shared.replay().expect("a replay");
    assert_eq!(again.size_hint().exact(), Some(11));
    drop(again);
    drop(shared);
    assert_eq!(limits.in_use(), 0, "released with the call");
}
