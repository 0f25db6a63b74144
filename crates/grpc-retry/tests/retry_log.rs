//! The retry log line and metric, in a process of their own: `tracing`
//! caches callsite interest per process, so a test that installs a
//! subscriber must not share it with tests that run without one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::time::advance;
use tonic::Code;
use tonic::body::Body;
use tower_test::mock;

type Req = http::Request<Body>;
type Res = http::Response<Body>;

fn trailers_only(code: Code) -> Res {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", (code as i32).to_string().parse().unwrap());
    response
}

fn committed_ok() -> Res {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![Ok(Frame::trailers(trailers))];
    http::Response::new(Body::new(StreamBody::new(tokio_stream::iter(frames))))
}

async fn next(handle: &mut mock::Handle<Req, Res>) -> mock::SendResponse<Res> {
    let (req, send) = handle.next_request().await.expect("an attempt");
    req.into_body().collect().await.expect("a body");
    send
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn each_retry_is_logged_and_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    let policy = RetryPolicy::default()
        .with_jitter(Jitter::None)
        .with_initial_delay(Duration::from_millis(200));
    let (mut service, mut handle) =
        mock::spawn_layer::<Req, Res, _>(RetryLayer::new(RetryPolicies::new(policy).unwrap()));
    let req = http::Request::builder()
        .uri("http://catalog/catalog.v1.QueryService/GetProduct")
        .body(Body::new(Full::new(Bytes::from_static(b"x"))))
        .unwrap();
    assert!(service.poll_ready().is_ready());
    let fut = service.call(req);
    let mut fut = tokio_test::task::spawn(fut);
    assert!(fut.poll().is_pending());
    let send = next(&mut handle).await;
    send.send_response(trailers_only(Code::Unavailable));
    assert!(fut.poll().is_pending());
    advance(Duration::from_millis(200)).await;
    assert!(fut.poll().is_pending());
    let send = next(&mut handle).await;
    send.send_response(committed_ok());
    assert!(fut.await.is_ok());

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.contains("WARN")
            && log.contains("gRPC call failed with unavailable, retrying in 200ms (attempt 1/3)"),
        "{log}"
    );
    assert!(
        log.contains("service=\"catalog.v1.QueryService\"") && log.contains("delay_ms=200"),
        "{log}"
    );
    let counted = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(k, ..)| k.key().name() == "grpc.retry.count");
    let (key, _, _, value) = counted.expect("grpc.retry.count");
    let labels: Vec<String> = key
        .key()
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    assert_eq!(
        labels,
        [
            "service=catalog.v1.QueryService",
            "method=GetProduct",
            "code=UNAVAILABLE"
        ]
    );
    assert_eq!(value, DebugValue::Counter(1));
}
