//! Each attempt is sent with its `grpc_attempt` span entered (a layer
//! below, such as trace-context propagation, sees it as the current span)
//! and the span carries what the attempt was: its number, the wait before
//! it and why, the deadline left, its status. A process of its own:
//! `tracing` caches callsite interest per process.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};
use http_body_util::Full;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, ServiceExt};
use tracing_subscriber::fmt::format::FmtSpan;

type Req = http::Request<Body>;
type Res = http::Response<Body>;

fn trailers_only(code: Code, pushback_ms: Option<u32>) -> Res {
    let mut response = http::Response::new(Body::empty());
    response
        .headers_mut()
        .insert("grpc-status", (code as i32).to_string().parse().unwrap());
    if let Some(ms) = pushback_ms {
        response
            .headers_mut()
            .insert("grpc-retry-pushback-ms", ms.to_string().parse().unwrap());
    }
    response
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

/// Calls with a 5 s deadline; the first attempt gets UNAVAILABLE with
/// `pushback` (or none), then OK. Returns the log lines.
async fn two_attempts(pushback: Option<u32>) -> Vec<String> {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .finish();
    let _log = tracing::subscriber::set_default(subscriber);

    let calls = Arc::new(AtomicUsize::new(0));
    let inner = tower::service_fn(move |_: Req| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        // In `call`, before the future: the span current now is what a
        // layer below sees.
        tracing::info!(n, "inner service called");
        let response = if n == 1 {
            trailers_only(Code::Unavailable, pushback)
        } else {
            trailers_only(Code::Ok, None)
        };
        async move { Ok::<_, Infallible>(response) }
    });
    let policy = RetryPolicy::default()
        .with_jitter(Jitter::None)
        .with_initial_delay(Duration::from_millis(200));
    let service = RetryLayer::new(RetryPolicies::new(policy).unwrap()).layer(inner);
    let req = http::Request::builder()
        .uri("http://catalog/catalog.v1.QueryService/GetProduct")
        .header("grpc-timeout", "5S")
        .body(Body::new(Full::new(Bytes::from_static(b"x"))))
        .unwrap();
    let response = service.oneshot(req).await.expect("a response");
    assert_eq!(response.headers()["grpc-status"], "0");

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    log.lines().map(str::to_owned).collect()
}

fn line<'a>(lines: &'a [String], needles: &[&str]) -> &'a str {
    lines
        .iter()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no line with {needles:?} in {lines:#?}"))
}

#[tokio::test(start_paused = true)]
async fn each_attempt_is_sent_inside_its_span_with_its_fields() {
    let lines = two_attempts(None).await;
    let first = line(&lines, &["inner service called", "n=1"]);
    assert!(first.contains("grpc_attempt{"), "{first}");
    for field in [
        "otel.kind=\"client\"",
        "rpc.system=\"grpc\"",
        "attempt=1",
        "hedge=false",
        "rpc.service=\"catalog.v1.QueryService\"",
        "rpc.method=\"GetProduct\"",
        "deadline_remaining_ms=5000",
    ] {
        assert!(first.contains(field), "{field}: {first}");
    }
    assert!(!first.contains("backoff_ms"), "{first}");
    let second = line(&lines, &["inner service called", "n=2"]);
    for field in ["attempt=2", "backoff_ms=200", "transparent=false"] {
        assert!(second.contains(field), "{field}: {second}");
    }
    assert!(
        second.contains("deadline_remaining_ms=4800"),
        "the deadline left when it was sent: {second}"
    );
    // When they end, each attempt's span has its status.
    line(
        &lines,
        &[
            "grpc_attempt{",
            "attempt=1",
            "rpc.grpc.status_code=14",
            "otel.status_code=\"error\"",
            "close",
        ],
    );
    line(
        &lines,
        &[
            "grpc_attempt{",
            "attempt=2",
            "rpc.grpc.status_code=0",
            "close",
        ],
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_server_pushback_says_so() {
    let lines = two_attempts(Some(30)).await;
    let second = line(&lines, &["inner service called", "n=2"]);
    assert!(second.contains("pushback_ms=30"), "{second}");
    assert!(!second.contains("backoff_ms"), "{second}");
}
