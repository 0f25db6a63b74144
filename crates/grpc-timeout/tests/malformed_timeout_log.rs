//! A malformed `grpc-timeout` from the caller is dropped with a WARN.
//!
//! In its own test binary: the subscriber is process-wide, so no other
//! test's events (or tracing's per-callsite interest cache, shared across
//! threads) can interfere.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use http_body_util::Empty;
use tower::{Layer, Service, ServiceExt, service_fn};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_malformed_caller_timeout_is_dropped_with_a_warning() {
    let logs = Logs::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let inner = service_fn(move |req: http::Request<Empty<Bytes>>| {
        *record.lock().unwrap() = Some(req.headers().clone());
        async { Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new())) }
    });
    let mut service = TimeoutLayer::new(TimeoutPolicy::empty()).layer(inner);
    let request = http::Request::builder()
        .uri("http://catalog/catalog.v1.QueryService/GetProduct")
        .header("grpc-timeout", "soon")
        .body(Empty::new())
        .unwrap();
    service.ready().await.unwrap().call(request).await.unwrap();

    let headers = seen.lock().unwrap().take().expect("the call was forwarded");
    assert!(headers.get("grpc-timeout").is_none(), "{headers:?}");
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("WARN") && text.contains("dropping the caller's malformed grpc-timeout"),
        "{text}"
    );
    assert!(text.contains("soon"), "the log names the value: {text}");
}
