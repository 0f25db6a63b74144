//! The final outcome of a gRPC call, read from the response.
//!
//! A gRPC call's status travels in one of two places:
//!
//! * a *Trailers-Only* response carries `grpc-status` in its headers and has
//!   no body (tonic servers answer every error this way);
//! * otherwise the status arrives in the trailers at the end of the body,
//!   after any messages: a streaming call can fail after it has sent data.
//!
//! [`OutcomeBody`] wraps a response body and reports the outcome exactly
//! once, from whichever place holds it, or [`Outcome::Cancelled`] when the
//! caller drops the body before its end.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Code;

use crate::error::{BoxError, error_code};
use crate::headers;

/// How a gRPC call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The call ended with this gRPC status (`Code::Ok` included), sent by
    /// the server or by a proxy in between.
    Status(Code),
    /// The call failed without a status from the other side (a transport
    /// error, a local timeout, a broken body); the code is what the caller
    /// sees.
    Error(Code),
    /// The caller dropped the response before the end of the call.
    Cancelled,
}

impl Outcome {
    /// The gRPC code of the outcome; `Code::Cancelled` for a cancelled call.
    pub fn code(&self) -> Code {
        match *self {
            Outcome::Status(code) | Outcome::Error(code) => code,
            Outcome::Cancelled => Code::Cancelled,
        }
    }

    /// Whether the call succeeded.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Status(Code::Ok))
    }
}

/// Reads the outcome from response headers, where it is known that early.
///
/// Returns `Some` for a Trailers-Only response (`grpc-status` in the
/// headers) and for a response whose HTTP status is not 200 (mapped as the
/// gRPC spec's HTTP-to-gRPC table says); `None` when the outcome will come
/// in the trailers. Only the code is parsed: nothing is allocated, and a
/// malformed `grpc-status` reads as `Code::Unknown`.
///
/// It only reads; a layer that hands these headers on to tonic removes a
/// hostile `grpc-status-details-bin` first with
/// [`headers::sanitize_status_details`] ([`OutcomeBody::wrap_response`]
/// does).
pub fn classify_head(status: StatusCode, headers: &HeaderMap) -> Option<Outcome> {
    if let Some(code) = headers::get(headers, &tonic::Status::GRPC_STATUS) {
        return Some(Outcome::Status(Code::from_bytes(code.as_bytes())));
    }
    if status == StatusCode::OK {
        return None;
    }
    let code = match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    };
    Some(Outcome::Status(code))
}

/// Reads the outcome from trailers; trailers without `grpc-status` read as
/// `Code::Unknown`, as grpc-go and tonic treat them.
pub fn classify_trailers(trailers: &HeaderMap) -> Outcome {
    match headers::get(trailers, &tonic::Status::GRPC_STATUS) {
        Some(code) => Outcome::Status(Code::from_bytes(code.as_bytes())),
        None => Outcome::Status(Code::Unknown),
    }
}

/// Receives the outcome of a call, once.
pub trait OnOutcome {
    /// Called exactly once with the call's final outcome.
    fn on_outcome(self, outcome: Outcome);

    /// The span the call runs in, if any. A layer that carries the
    /// observer in its own response future (as
    /// `grpc_timeout::Timeout::call_observed` does) enters it while it
    /// polls the call, so what the layers below log, and the spans they
    /// open, belong to the call.
    fn span(&self) -> Option<&tracing::Span> {
        None
    }

    /// Called, exactly once and instead of [`on_outcome`](Self::on_outcome),
    /// when a deadline of the layer that carries this observer ends the
    /// call (before its response or during its body); `scope` says whether
    /// that deadline bounds the whole call or one attempt. By default it is
    /// the outcome `Error(DEADLINE_EXCEEDED)`. An observer that holds what
    /// an attempt holds (a breaker's permit, a bulkhead's slot) can tell
    /// them that the call's deadline cancelled the attempt, as dropping the
    /// attempt would, while the attempt's own deadline is its failure.
    fn on_deadline(self, scope: crate::Scope)
    where
        Self: Sized,
    {
        let _ = scope;
        self.on_outcome(Outcome::Error(Code::DeadlineExceeded));
    }
}

impl<F: FnOnce(Outcome)> OnOutcome for F {
    fn on_outcome(self, outcome: Outcome) {
        self(outcome)
    }
}

/// The observer of a call nobody observes: it has no value, so an
/// `Option<Unobserved>` is always `None`, takes no space, and the code
/// that would report to it compiles to nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unobserved {}

impl OnOutcome for Unobserved {
    fn on_outcome(self, _: Outcome) {
        match self {}
    }
}

/// Reports a response head's outcome to `observer` when the head holds it
/// (see [`classify_head`]); otherwise gives `observer` back, to be told
/// once the body ends.
pub fn observe_head<B, F: OnOutcome>(response: &http::Response<B>, observer: F) -> Option<F> {
    match classify_head(response.status(), response.headers()) {
        Some(outcome) => {
            observer.on_outcome(outcome);
            None
        }
        None => Some(observer),
    }
}

/// The outcome a body's frame (as a body's `poll_frame` returns it)
/// settles: the trailers' status, a body error's code, or `UNKNOWN` for a
/// body that ended without trailers. `None` for a message: the call goes
/// on.
pub fn outcome_of_frame<D>(frame: &Option<Result<Frame<D>, BoxError>>) -> Option<Outcome> {
    match frame {
        Some(Ok(frame)) => frame.trailers_ref().map(classify_trailers),
        Some(Err(err)) => Some(Outcome::Error(error_code(&**err))),
        None => Some(Outcome::Status(Code::Unknown)),
    }
}

pin_project! {
    /// A response body that reports the call's outcome exactly once.
    ///
    /// The outcome comes from the trailers, from a body error, from the end
    /// of a body that had no trailers (`Code::Unknown`), or is
    /// [`Outcome::Cancelled`] when the body is dropped before its end. Build
    /// it with [`OutcomeBody::wrap_response`], which reports Trailers-Only
    /// responses at once from their headers.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use grpc_resilience_core::{Outcome, OutcomeBody};
    ///
    /// let seen = Arc::new(Mutex::new(None));
    /// let response = http::Response::builder()
    ///     .header("grpc-status", "14")
    ///     .body(http_body_util::Empty::<bytes::Bytes>::new())
    ///     .unwrap();
    /// let record = seen.clone();
    /// let _response = OutcomeBody::wrap_response(response, move |o| {
    ///     *record.lock().unwrap() = Some(o);
    /// });
    /// assert_eq!(
    ///     *seen.lock().unwrap(),
    ///     Some(Outcome::Status(tonic::Code::Unavailable))
    /// );
    /// ```
    #[derive(Debug)]
    pub struct OutcomeBody<B, F: OnOutcome> {
        #[pin]
        inner: B,
        on_outcome: Option<F>,
    }

    impl<B, F: OnOutcome> PinnedDrop for OutcomeBody<B, F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(f) = this.project().on_outcome.take() {
                f.on_outcome(Outcome::Cancelled);
            }
        }
    }
}

impl<B, F: OnOutcome> OutcomeBody<B, F> {
    /// Wraps a body whose outcome is still to come (in trailers).
    pub fn new(inner: B, on_outcome: F) -> Self {
        OutcomeBody {
            inner,
            on_outcome: Some(on_outcome),
        }
    }

    /// Wraps a body whose outcome was already reported.
    pub fn reported(inner: B) -> Self {
        OutcomeBody {
            inner,
            on_outcome: None,
        }
    }

    /// Wraps a response's body; a response whose headers already hold the
    /// outcome (see [`classify_head`]) reports it before this returns.
    ///
    /// A `grpc-status-details-bin` that is not valid base64 is removed from
    /// the head (and, as the body is read, from the trailers), so that tonic,
    /// which panics on one, never sees it; see
    /// [`headers::sanitize_status_details`].
    pub fn wrap_response(mut response: http::Response<B>, on_outcome: F) -> http::Response<Self> {
        headers::sanitize_status_details(response.headers_mut());
        let on_outcome = observe_head(&response, on_outcome);
        response.map(|inner| OutcomeBody { inner, on_outcome })
    }

    /// Whether the outcome has been reported.
    pub fn is_reported(&self) -> bool {
        self.on_outcome.is_none()
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B, F> Body for OutcomeBody<B, F>
where
    B: Body,
    B::Error: Into<BoxError>,
    F: OnOutcome,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut result = ready!(this.inner.poll_frame(cx)).map(|r| r.map_err(Into::into));
        if let Some(Ok(frame)) = &mut result
            && let Some(trailers) = frame.trailers_mut()
        {
            headers::sanitize_status_details(trailers);
        }
        if this.on_outcome.is_some()
            && let Some(outcome) = outcome_of_frame(&result)
            && let Some(f) = this.on_outcome.take()
        {
            f.on_outcome(outcome);
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<Outcome>>>;

    fn recorder() -> (Seen, impl FnOnce(Outcome) + Clone) {
        let seen: Seen = Arc::default();
        let s = seen.clone();
        (seen, move |o| s.lock().unwrap().push(o))
    }

    fn trailers(code: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("grpc-status", code.parse().unwrap());
        map
    }

    type Frames = Vec<Result<Frame<Bytes>, tonic::Status>>;

    fn stream_body(frames: Frames) -> impl Body<Data = Bytes, Error = tonic::Status> {
        StreamBody::new(tokio_stream::iter(frames))
    }

    async fn drain<B: Body>(body: B) -> Result<(), B::Error> {
        let mut body = std::pin::pin!(body);
        while let Some(frame) = body.frame().await {
            frame?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn status_in_trailers_after_messages() {
        for (code, expected) in [
            ("0", Code::Ok),
            ("14", Code::Unavailable),
            ("x", Code::Unknown),
        ] {
            let (seen, f) = recorder();
            let body = stream_body(vec![
                Ok(Frame::data(Bytes::from_static(b"msg"))),
                Ok(Frame::trailers(trailers(code))),
            ]);
            let response = OutcomeBody::wrap_response(http::Response::new(body), f);
            assert!(!response.body().is_reported());
            drain(response.into_body()).await.unwrap();
            assert_eq!(*seen.lock().unwrap(), vec![Outcome::Status(expected)]);
        }
    }

    #[tokio::test]
    async fn end_without_trailers_is_unknown() {
        let (seen, f) = recorder();
        let body = OutcomeBody::new(stream_body(vec![Ok(Frame::data(Bytes::new()))]), f);
        drain(body).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Status(Code::Unknown)]);
    }

    #[tokio::test]
    async fn body_error_reports_its_code_once() {
        let (seen, f) = recorder();
        let body = OutcomeBody::new(
            stream_body(vec![
                Ok(Frame::data(Bytes::from_static(b"a"))),
                Err(tonic::Status::data_loss("torn")),
                Ok(Frame::trailers(trailers("0"))),
            ]),
            f,
        );
        let mut body = Box::pin(body);
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("torn"));
        // Reading on after the error reports nothing more.
        let _ = body.frame().await;
        drop(body);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Error(Code::DataLoss)]);
    }

    #[tokio::test]
    async fn dropped_before_the_end_is_cancelled_once() {
        let (seen, f) = recorder();
        let body = OutcomeBody::new(
            stream_body(vec![
                Ok(Frame::data(Bytes::from_static(b"a"))),
                Ok(Frame::trailers(trailers("0"))),
            ]),
            f,
        );
        let mut body = Box::pin(body);
        assert!(body.frame().await.unwrap().is_ok());
        drop(body);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Cancelled]);
    }

    const NOT_BASE64: &str = "not base64!";

    #[tokio::test]
    async fn invalid_details_never_reach_the_caller() {
        // Trailers-Only head.
        let (seen, f) = recorder();
        let response = http::Response::builder()
            .header("grpc-status", "5")
            .header("grpc-status-details-bin", NOT_BASE64)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = OutcomeBody::wrap_response(response, f);
        assert!(response.headers().get("grpc-status-details-bin").is_none());
        // What tonic does with the head: no panic, the server's code.
        let status = tonic::Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Status(Code::NotFound)]);

        // Trailers after a message.
        let (seen, f) = recorder();
        let mut bad = trailers("15");
        bad.insert("grpc-status-details-bin", NOT_BASE64.parse().unwrap());
        let body = OutcomeBody::new(
            stream_body(vec![
                Ok(Frame::data(Bytes::from_static(b"msg"))),
                Ok(Frame::trailers(bad)),
            ]),
            f,
        );
        let mut body = std::pin::pin!(body);
        assert!(body.frame().await.unwrap().unwrap().is_data());
        let frame = body.frame().await.unwrap().unwrap();
        let sent = frame.trailers_ref().unwrap();
        assert!(sent.get("grpc-status-details-bin").is_none());
        let status = tonic::Status::from_header_map(sent).unwrap();
        assert_eq!(status.code(), Code::DataLoss);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Status(Code::DataLoss)]);

        // Valid details pass untouched.
        let mut good = trailers("15");
        good.insert("grpc-status-details-bin", "CAUSBWhlbGxv".parse().unwrap());
        let body = OutcomeBody::new(stream_body(vec![Ok(Frame::trailers(good))]), |_| {});
        let mut body = std::pin::pin!(body);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(
            frame.trailers_ref().unwrap()["grpc-status-details-bin"],
            "CAUSBWhlbGxv"
        );
    }

    #[test]
    fn outcome_codes() {
        assert_eq!(Outcome::Cancelled.code(), Code::Cancelled);
        assert_eq!(Outcome::Error(Code::Unavailable).code(), Code::Unavailable);
        assert!(Outcome::Status(Code::Ok).is_ok());
        assert!(!Outcome::Error(Code::Ok).is_ok());
    }

    #[test]
    fn trailers_only_is_reported_from_headers() {
        let (seen, f) = recorder();
        let response = http::Response::builder()
            .header("grpc-status", "5")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = OutcomeBody::wrap_response(response, f);
        assert!(response.body().is_reported());
        drop(response);
        assert_eq!(*seen.lock().unwrap(), vec![Outcome::Status(Code::NotFound)]);
    }

    #[test]
    fn http_errors_map_to_grpc_codes() {
        for (http, code) in [
            (503, Code::Unavailable),
            (429, Code::Unavailable),
            (404, Code::Unimplemented),
            (401, Code::Unauthenticated),
            (400, Code::Internal),
            (500, Code::Unknown),
        ] {
            let status = StatusCode::from_u16(http).unwrap();
            assert_eq!(
                classify_head(status, &HeaderMap::new()),
                Some(Outcome::Status(code))
            );
        }
        assert_eq!(classify_head(StatusCode::OK, &HeaderMap::new()), None);
        assert_eq!(
            classify_head(StatusCode::OK, &trailers("banana")),
            Some(Outcome::Status(Code::Unknown))
        );
    }
}
