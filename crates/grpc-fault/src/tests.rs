use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::Instant;
use tonic::Code;
use tower::{Layer, ServiceExt, service_fn};

use super::*;

const GET: &str = "/catalog.v1.QueryService/GetProduct";

fn grpc_message(payload: &[u8]) -> Bytes {
    let mut m = vec![0];
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    m.into()
}

type TestBody =
    StreamBody<tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A handler that reads the whole request and answers three messages and
/// an OK status; counts how many times it finished.
fn handler(
    finished: Arc<AtomicUsize>,
) -> impl tower::Service<
    http::Request<RequestBody<Full<Bytes>>>,
    Response = http::Response<TestBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: http::Request<RequestBody<Full<Bytes>>>| {
        let finished = finished.clone();
        async move {
            req.into_body().collect().await.unwrap();
            finished.fetch_add(1, Ordering::SeqCst);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames = vec![
                Ok(Frame::data(grpc_message(b"one"))),
                Ok(Frame::data(grpc_message(b"two"))),
                Ok(Frame::data(grpc_message(b"three"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut response = http::Response::new(StreamBody::new(tokio_stream::iter(frames)));
            response
                .headers_mut()
                .insert("content-type", "application/grpc".parse().unwrap());
            Ok::<_, Infallible>(response)
        }
    })
}

fn request(body: &'static [u8]) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(format!("http://catalog{GET}"))
        .header("grpc-timeout", "1S")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

struct Collected {
    data: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
}

async fn collect<B: Body<Data = Bytes>>(body: B) -> Result<Collected, B::Error> {
    let mut body = std::pin::pin!(body);
    let mut out = Collected {
        data: vec![],
        trailers: None,
    };
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => out.data.push(data),
            Err(frame) => out.trailers = frame.into_trailers().ok(),
        }
    }
    Ok(out)
}

fn setup() -> (FaultInjector, Arc<AtomicUsize>) {
    (FaultInjector::new(), Arc::new(AtomicUsize::new(0)))
}

#[tokio::test]
async fn pass_runs_the_handler_and_counts_bytes() {
    let (faults, finished) = setup();
    let svc = faults.layer().layer(handler(finished.clone()));
    let response = svc.oneshot(request(b"twelve bytes")).await.unwrap();
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data.len(), 3);
    assert_eq!(body.trailers.unwrap()["grpc-status"], "0");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    let stats = faults.stats("GetProduct").unwrap();
    assert_eq!(
        stats,
        MethodStats {
            calls: 1,
            handler_runs: 1,
            faults_injected: 0,
            bytes_received: 12,
            cancelled: 0
        }
    );
    let calls = faults.calls();
    assert_eq!(calls[0].headers["grpc-timeout"], "1S");
    assert_eq!(calls[0].body_digest, body_digest(b"twelve bytes"));
    assert!(calls[0].handler_ran && !calls[0].cancelled);
}

#[tokio::test]
async fn status_is_trailers_only_and_skips_the_handler() {
    let (faults, finished) = setup();
    faults
        .script(
            "GetProduct",
            [Fault::status(Code::Unavailable)
                .with_message("try later")
                .with_pushback(Duration::from_millis(250))],
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished.clone()));
    let response = svc.clone().oneshot(request(b"x")).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(response.headers()["grpc-message"], "try%20later");
    assert_eq!(response.headers()["grpc-retry-pushback-ms"], "250");
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let body = collect(response.into_body()).await.unwrap();
    assert!(body.data.is_empty() && body.trailers.is_none());
    assert_eq!(finished.load(Ordering::SeqCst), 0);

    // The script is spent: the next call passes.
    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert!(response.headers().get("grpc-status").is_none());
    let stats = faults.stats("GetProduct").unwrap();
    assert_eq!(
        (stats.calls, stats.handler_runs, stats.faults_injected),
        (2, 1, 1)
    );
}

#[tokio::test]
async fn raw_pushback_values_are_sent_as_written() {
    let (faults, finished) = setup();
    faults
        .always(
            "*",
            Fault::status(Code::ResourceExhausted).with_raw_pushback("-1"),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert_eq!(response.headers()["grpc-retry-pushback-ms"], "-1");
    assert_eq!(response.headers()["grpc-status"], "8");
}

#[tokio::test]
async fn status_after_messages_commits_then_fails() {
    for (n, expected_data) in [(0usize, 0usize), (1, 1), (2, 2)] {
        let (faults, finished) = setup();
        faults
            .always("*", Fault::status_after_messages(n, Code::Internal))
            .unwrap();
        let svc = faults.layer().layer(handler(finished.clone()));
        let response = svc.oneshot(request(b"x")).await.unwrap();
        assert!(
            response.headers().get("grpc-status").is_none(),
            "headers first"
        );
        let body = collect(response.into_body()).await.unwrap();
        assert_eq!(body.data.len(), expected_data, "n = {n}");
        if n > 0 {
            assert_eq!(body.data[0], grpc_message(b"one"));
        }
        assert_eq!(body.trailers.unwrap()["grpc-status"], "13");
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(faults.stats("*").unwrap().cancelled, 0);
    }
}

#[tokio::test]
async fn status_after_more_messages_than_sent_keeps_the_handlers_end() {
    let (faults, finished) = setup();
    faults
        .always("*", Fault::status_after_messages(5, Code::Internal))
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data.len(), 3);
    assert_eq!(body.trailers.unwrap()["grpc-status"], "0");
}

#[tokio::test(start_paused = true)]
async fn delay_and_slow_stream_take_their_time() {
    let (faults, finished) = setup();
    faults
        .always(
            "*",
            Fault::slow_stream(Duration::from_millis(100)).with_delay(Duration::from_secs(2)),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let start = Instant::now();
    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data.len(), 3);
    // A gap after each of the three messages.
    assert_eq!(start.elapsed(), Duration::from_millis(2300));
}

#[tokio::test]
async fn lose_response_runs_the_handler_and_answers_unavailable() {
    let (faults, finished) = setup();
    faults.script("*", [Fault::lose_response()]).unwrap();
    let svc = faults.layer().layer(handler(finished.clone()));
    let response = svc.oneshot(request(b"write me")).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "the handler ran to its end"
    );
    let stats = faults.stats("*").unwrap();
    assert_eq!(
        (stats.handler_runs, stats.bytes_received, stats.cancelled),
        (1, 8, 0)
    );
}

#[tokio::test]
async fn reset_fails_the_call_with_an_h2_reason() {
    let (faults, finished) = setup();
    faults
        .always("*", Fault::reset(ResetReason::RefusedStream))
        .unwrap();
    let svc = faults.layer().layer(handler(finished.clone()));
    let err = svc.oneshot(request(b"x")).await.unwrap_err();
    let reset = err.downcast_ref::<ResetStream>().unwrap();
    assert_eq!(reset.reason(), ResetReason::RefusedStream);
    let h2 = std::error::Error::source(reset)
        .unwrap()
        .downcast_ref::<h2::Error>()
        .unwrap();
    assert_eq!(h2.reason(), Some(h2::Reason::REFUSED_STREAM));
    // tonic's server must not turn it into a status response.
    assert!(tonic::Status::try_from_error(err).is_err());
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn drop_connection_without_a_handle_resets_the_stream() {
    let (faults, finished) = setup();
    faults.always("*", Fault::drop_connection()).unwrap();
    let svc = faults.layer().layer(handler(finished));
    let err = svc.oneshot(request(b"x")).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<ResetStream>().unwrap().reason(),
        ResetReason::RefusedStream
    );
}

#[tokio::test]
async fn a_response_dropped_early_counts_as_cancelled() {
    let (faults, finished) = setup();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    let mut body = Box::pin(response.into_body());
    body.frame().await.unwrap().unwrap();
    drop(body);
    assert_eq!(faults.stats("*").unwrap().cancelled, 1);
    assert!(faults.calls()[0].cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_during_its_delay_counts_as_cancelled() {
    let (faults, finished) = setup();
    faults
        .always("*", Fault::pass().with_delay(Duration::from_secs(5)))
        .unwrap();
    let svc = faults.layer().layer(handler(finished.clone()));
    let call = svc.oneshot(request(b"x"));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), call)
            .await
            .is_err()
    );
    assert_eq!(faults.stats("*").unwrap().cancelled, 1);
    assert_eq!(finished.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn raw_status_values_are_sent_as_written() {
    for value in ["abc", "99999", "", "14"] {
        let (faults, finished) = setup();
        faults.always("*", Fault::raw_status(value)).unwrap();
        let svc = faults.layer().layer(handler(finished.clone()));
        let response = svc.oneshot(request(b"x")).await.unwrap();
        let statuses: Vec<_> = response.headers().get_all("grpc-status").iter().collect();
        assert_eq!(statuses, [value], "exactly one grpc-status, as written");
        assert_eq!(response.headers()["content-type"], "application/grpc");
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }
}

#[tokio::test]
async fn raw_status_in_trailers_after_messages() {
    let (faults, finished) = setup();
    faults
        .always("*", Fault::raw_status_after_messages(1, "abc"))
        .unwrap();
    let svc = faults.layer().layer(handler(finished.clone()));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert!(response.headers().get("grpc-status").is_none());
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data, [grpc_message(b"one")]);
    assert_eq!(body.trailers.unwrap()["grpc-status"], "abc");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn raw_details_go_with_the_head_or_the_trailers() {
    let (faults, finished) = setup();
    faults
        .script(
            "*",
            [
                Fault::status(Code::Unavailable).with_raw_details("not base64!"),
                Fault::status_after_messages(2, Code::Internal).with_raw_details("%%%"),
            ],
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.clone().oneshot(request(b"x")).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
    assert_eq!(response.headers()["grpc-status-details-bin"], "not base64!");

    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert!(response.headers().get("grpc-status-details-bin").is_none());
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data.len(), 2);
    let trailers = body.trailers.unwrap();
    assert_eq!(trailers["grpc-status"], "13");
    assert_eq!(trailers["grpc-status-details-bin"], "%%%");
}

#[tokio::test]
async fn headers_can_be_repeated() {
    let (faults, finished) = setup();
    faults
        .always(
            "*",
            Fault::status(Code::Unavailable)
                .with_pushback(Duration::from_millis(10))
                .with_header("grpc-status", "0")
                .with_header("grpc-retry-pushback-ms", "20")
                .with_header("x-extra", "a")
                .with_header("x-extra", "b"),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    let all = |name| -> Vec<String> {
        response
            .headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(all("grpc-status"), ["14", "0"]);
    assert_eq!(all("grpc-retry-pushback-ms"), ["10", "20"]);
    assert_eq!(all("x-extra"), ["a", "b"]);
}

#[tokio::test]
async fn trailers_can_repeat_headers_and_carry_oversized_messages() {
    let (faults, finished) = setup();
    let long = "y".repeat(100_000);
    faults
        .always(
            "*",
            Fault::status_after_messages(1, Code::Unavailable)
                .with_message(long.clone())
                .with_header("grpc-status", "0")
                .with_raw_message("%zz"),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.data.len(), 1);
    let trailers = body.trailers.unwrap();
    let statuses: Vec<_> = trailers.get_all("grpc-status").iter().collect();
    assert_eq!(statuses, ["14", "0"]);
    // The raw message replaced the encoded one.
    assert_eq!(trailers["grpc-message"], "%zz");

    let (faults, finished) = setup();
    faults
        .always(
            "*",
            Fault::status_after_messages(0, Code::Internal).with_message(long.clone()),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    let body = collect(response.into_body()).await.unwrap();
    assert_eq!(body.trailers.unwrap()["grpc-message"], long.as_str());
}

#[tokio::test]
async fn messages_can_be_oversized_or_raw() {
    let (faults, finished) = setup();
    let long = "x".repeat(100_000);
    faults
        .script(
            "*",
            [
                Fault::status(Code::Internal).with_message(long.clone()),
                Fault::status(Code::Internal).with_raw_message("%zz\u{e9}"),
            ],
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.clone().oneshot(request(b"x")).await.unwrap();
    assert_eq!(response.headers()["grpc-message"], long.as_str());
    let response = svc.oneshot(request(b"x")).await.unwrap();
    assert_eq!(
        response.headers()["grpc-message"].as_bytes(),
        "%zz\u{e9}".as_bytes()
    );
}

#[tokio::test]
async fn values_no_header_can_carry_are_not_sent() {
    let (faults, finished) = setup();
    faults
        .always(
            "*",
            Fault::raw_status("1\r\n4")
                .with_raw_details("a\0b")
                .with_header("bad name", "x"),
        )
        .unwrap();
    let svc = faults.layer().layer(handler(finished));
    let response = svc.oneshot(request(b"x")).await.unwrap();
    // The status it would have replaced stays.
    assert_eq!(response.headers()["grpc-status"], "2");
    assert!(response.headers().get("grpc-status-details-bin").is_none());
}

#[tokio::test]
async fn resets_carry_any_http2_reason() {
    let reasons = ResetReason::ALL
        .into_iter()
        .chain([ResetReason::Other(0x99)]);
    for reason in reasons {
        let (faults, finished) = setup();
        faults.always("*", Fault::reset(reason)).unwrap();
        let svc = faults.layer().layer(handler(finished.clone()));
        let err = svc.oneshot(request(b"x")).await.unwrap_err();
        let h2 = grpc_resilience_core::error::find_error::<h2::Error>(&*err).unwrap();
        assert_eq!(h2.reason(), Some(h2::Reason::from(reason.code())));
        assert_eq!(ResetReason::from_code(reason.code()), reason);
        assert_eq!(finished.load(Ordering::SeqCst), 0);
    }
    assert_eq!(ResetReason::Cancel.to_h2(), h2::Reason::CANCEL);
    assert_eq!(
        ResetReason::EnhanceYourCalm.to_h2(),
        h2::Reason::ENHANCE_YOUR_CALM
    );
}

#[tokio::test]
async fn reset_after_messages_cuts_a_committed_stream() {
    for n in [0usize, 2] {
        let (faults, finished) = setup();
        faults
            .always("*", Fault::reset_after_messages(n, ResetReason::Cancel))
            .unwrap();
        let svc = faults.layer().layer(handler(finished.clone()));
        let response = svc.oneshot(request(b"x")).await.unwrap();
        assert!(response.headers().get("grpc-status").is_none());
        let mut body = Box::pin(response.into_body());
        for _ in 0..n {
            assert!(body.frame().await.unwrap().unwrap().is_data());
        }
        let err = body.frame().await.unwrap().unwrap_err();
        let reset = err.downcast_ref::<ResetStream>().unwrap();
        assert_eq!(reset.reason(), ResetReason::Cancel);
        assert!(body.frame().await.is_none());
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert_eq!(faults.calls()[0].fault, "reset_after_messages");
    }
}
