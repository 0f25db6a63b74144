//! A retried attempt carries the original head, kept without copying its
//! maps, and the body a stub encodes, read before the first attempt.

use bytes::{BufMut, Bytes};
use http_body_util::BodyExt;
use tonic::Code;
use tonic::body::Body;
use tonic::codec::{EncodeBody, EncodeBuf, Encoder};
use tower_test::mock;

use super::*;
use crate::future::PREVIOUS_ATTEMPTS;
use grpc_resilience_core::{CallDeadline, timeout_header};

type Req = http::Request<Body>;
type Res = http::Response<Body>;

/// Encodes raw message bytes, as a generated codec encodes a message.
struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// tonic's encoded unary body: an `EncodeBody` over one message, which says
/// it ended only when polled past its one frame.
fn unary_body(message: &'static [u8]) -> Body {
    let source = tokio_stream::once(Ok(Bytes::from_static(message)));
    Body::new(EncodeBody::new_client(RawEncoder, source, None, None))
}

/// The frame tonic sends for `message`: a 5-byte prefix, then the bytes.
fn framed(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

#[derive(Clone, Debug, PartialEq)]
struct Custom(&'static str);

/// A request as a generated stub hands it to the channel.
fn stub_request() -> Req {
    let mut request = http::Request::new(unary_body(b"p1"));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() =
        http::Uri::from_static("http://catalog/catalog.v1.QueryService/GetProduct");
    *request.version_mut() = http::Version::HTTP_2;
    request.extensions_mut().insert(tonic::GrpcMethod::new(
        "catalog.v1.QueryService",
        "GetProduct",
    ));
    let headers = request.headers_mut();
    headers.insert(http::header::TE, "trailers".parse().unwrap());
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/grpc".parse().unwrap(),
    );
    headers.insert("authorization", "Bearer t".parse().unwrap());
    headers.append("x-tag", "a".parse().unwrap());
    headers.append("x-tag", "b".parse().unwrap());
    headers.insert(timeout_header::GRPC_TIMEOUT, "10S".parse().unwrap());
    request
}

fn unavailable() -> Res {
    let mut response = http::Response::new(Body::empty());
    response.headers_mut().insert(
        "grpc-status",
        (Code::Unavailable as i32).to_string().parse().unwrap(),
    );
    response
}

/// Sends `request`; the first attempt fails with `UNAVAILABLE`, the second
/// succeeds. Returns both attempts as the service saw them, bodies read.
async fn retried_once(request: Req) -> Vec<(http::request::Parts, Bytes)> {
    let policy = RetryPolicy::default().with_jitter(Jitter::None);
    let (mut service, mut handle) =
        mock::spawn_layer::<Req, Res, _>(RetryLayer::new(RetryPolicies::new(policy).unwrap()));
    assert!(service.poll_ready().is_ready());
    let call = tokio::spawn(service.call(request));
    let mut seen = Vec::new();
    for answer in [unavailable(), http::Response::new(Body::empty())] {
        let (req, send) = handle.next_request().await.expect("an attempt");
        let (parts, body) = req.into_parts();
        seen.push((parts, body.collect().await.expect("a body").to_bytes()));
        send.send_response(answer);
    }
    let response = call.await.unwrap().expect("a response");
    assert!(response.headers().get("grpc-status").is_none());
    seen
}

#[tokio::test(start_paused = true)]
async fn a_retry_of_a_stub_request_carries_its_head_and_extension() {
    let seen = retried_once(stub_request()).await;
    assert_eq!(seen.len(), 2);
    let original = stub_request();
    for (i, (parts, body)) in seen.iter().enumerate() {
        assert_eq!(body, &framed(b"p1"), "attempt {}: the same body", i + 1);
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.uri, *original.uri());
        assert_eq!(parts.version, http::Version::HTTP_2);
        let method = parts
            .extensions
            .get::<tonic::GrpcMethod<'static>>()
            .unwrap_or_else(|| panic!("attempt {}: the GrpcMethod extension", i + 1));
        assert_eq!(
            (method.service(), method.method()),
            ("catalog.v1.QueryService", "GetProduct")
        );
        assert!(parts.extensions.get::<CallDeadline>().is_some());
        for name in ["te", "content-type", "authorization"] {
            assert_eq!(
                parts.headers.get(name),
                original.headers().get(name),
                "attempt {}: {name}",
                i + 1
            );
        }
        let tags: Vec<_> = parts.headers.get_all("x-tag").iter().collect();
        assert_eq!(
            tags,
            ["a", "b"],
            "attempt {}: repeated values in order",
            i + 1
        );
        assert!(parts.headers.contains_key(timeout_header::GRPC_TIMEOUT));
    }
    assert_eq!(seen[1].0.headers[PREVIOUS_ATTEMPTS], "1");
    // The second attempt's head is the first's, plus the attempt count.
    let mut second = seen[1].0.headers.clone();
    second.remove(PREVIOUS_ATTEMPTS);
    assert_eq!(second.len(), seen[0].0.headers.len());
}

#[tokio::test(start_paused = true)]
async fn a_retry_carries_extensions_of_any_type() {
    let mut request = stub_request();
    request.extensions_mut().insert(Custom("kept"));
    let seen = retried_once(request).await;
    for (parts, _) in &seen {
        assert_eq!(parts.extensions.get::<Custom>(), Some(&Custom("kept")));
        assert!(
            parts
                .extensions
                .get::<tonic::GrpcMethod<'static>>()
                .is_some()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_carries_many_headers() {
    let mut request = stub_request();
    for i in 0..8 {
        request.headers_mut().insert(
            format!("x-h{i}").parse::<http::HeaderName>().unwrap(),
            i.into(),
        );
    }
    let expected = request.headers().clone();
    let seen = retried_once(request).await;
    for (parts, _) in &seen {
        for name in expected.keys() {
            if name != timeout_header::GRPC_TIMEOUT {
                let want: Vec<_> = expected.get_all(name).iter().collect();
                let got: Vec<_> = parts.headers.get_all(name).iter().collect();
                assert_eq!(got, want, "{name}");
            }
        }
    }
}

#[test]
fn a_stub_request_is_captured_whole_before_the_first_attempt() {
    let limits = crate::replay::Limits::handle(1024, 4096);
    let (parts, body) = stub_request().into_parts();
    let head = crate::head::Head::of(&parts, true);
    let (first, recording) = ReplayBody::capture_with(body, limits.clone(), || head);
    assert!(recording.is_ready(), "no shared recording for a unary body");
    // A stub's body states no exact size, nor does its replay: hyper would
    // add a `content-length` the stub never sends.
    assert_eq!(http_body::Body::size_hint(&first).exact(), None);
    let replay = recording.replay().expect("a replay");
    assert_eq!(http_body::Body::size_hint(&replay).exact(), None);
    assert_eq!(limits.in_use(), framed(b"p1").len());
    drop(first);
    drop(recording);
    assert_eq!(limits.in_use(), 0, "released with the call");
}

/// The future a call through the layer returns holds the head a retry
/// needs inline (no allocation), so it is larger than the inner future;
/// this bound keeps it from growing by accident (720 bytes with a
/// `tower_test` inner service when this was written, 240 before the head
/// was kept inline, 728 once the context kept why the latest retry was
/// decided, for the next attempt's span, 736 once a ready body kept
/// whether its original stated an exact size).
#[test]
fn the_response_future_stays_within_its_size() {
    type Fut = crate::future::ResponseFuture<mock::Mock<Req, Res>, Body, Body>;
    let size = std::mem::size_of::<Fut>();
    println!("ResponseFuture<Mock, tonic Body, tonic Body>: {size} bytes");
    assert!(size <= 736, "the retry future grew to {size} bytes");
}
