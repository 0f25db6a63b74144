//! The response future, and the life of a keyed call.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use grpc_resilience_core::codes::code_name;
use grpc_resilience_core::{CallDeadline, Outcome, classify_head, classify_trailers};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::{Code, Status};
use tower_service::Service;

use crate::body::{RequestBody, ResponseBody};
use crate::config::{OnInProgress, OnOversize, OnStoreError};
use crate::error::StoreError;
use crate::layer::Shared;
use crate::record::{Fingerprint, Record};
use crate::service::labels;
use crate::stats::Event;
use crate::store::{Claim, ClaimToken, Entry, Store};

/// The header a replayed response carries: `idempotent-replayed: true`.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

const PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

type BoxedCall<RB, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<RB>>, E>> + Send>>;

pin_project! {
    /// The future of [`Idempotency`](crate::Idempotency)'s responses.
    ///
    /// A call the layer does not cover (another method, no key) is the
    /// wrapped service's own future, unboxed; a keyed call, which reads the
    /// request, talks to the store and may record the response, is one
    /// boxed future.
    pub struct ResponseFuture<F, RB: Body, E> {
        #[pin]
        kind: Kind<F, RB, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, RB: Body, E> {
        Passthrough {
            #[pin]
            inner: F,
        },
        Ready {
            response: Option<Response<ResponseBody<RB>>>,
        },
        Keyed {
            call: BoxedCall<RB, E>,
        },
    }
}

impl<F, RB: Body, E> ResponseFuture<F, RB, E> {
    pub(crate) fn passthrough(inner: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<RB>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn keyed(call: BoxedCall<RB, E>) -> Self {
        ResponseFuture {
            kind: Kind::Keyed { call },
        }
    }
}

impl<F, RB: Body, E> fmt::Debug for ResponseFuture<F, RB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Ready { .. } => "Ready",
            Kind::Keyed { .. } => "Keyed",
        };
        f.debug_tuple("ResponseFuture").field(&kind).finish()
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<Response<ResponseBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner
                .poll(cx)
                .map(|result| result.map(|r| r.map(ResponseBody::passthrough))),
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            KindProj::Keyed { call } => call.as_mut().poll(cx),
        }
    }
}

/// A Trailers-Only response carrying `status`.
pub(crate) fn status_response<RB: Body>(status: Status) -> Response<ResponseBody<RB>> {
    let mut response = Response::new(ResponseBody::empty());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    if status.add_header(response.headers_mut()).is_err() {
        response
            .headers_mut()
            .insert(Status::GRPC_STATUS, HeaderValue::from(status.code() as i32));
    }
    response
}

fn aborted<RB: Body>(key: &str, pushback: Duration) -> Response<ResponseBody<RB>> {
    let mut response = status_response(Status::aborted(format!(
        "a call with idempotency key `{key}` is still in progress; retry later"
    )));
    response
        .headers_mut()
        .insert(PUSHBACK, HeaderValue::from(pushback.as_millis() as u64));
    response
}

/// The answer to a call whose deadline passed before its handler could
/// run: while another call with its key was in progress, or before.
fn out_of_time<RB: Body>(key: &str, in_progress: bool) -> Response<ResponseBody<RB>> {
    status_response(Status::deadline_exceeded(if in_progress {
        format!(
            "the call's deadline passed while a call with idempotency key `{key}` was still in progress"
        )
    } else {
        format!("the call's deadline passed before it could run (idempotency key `{key}`)")
    }))
}

/// The request for the handler: `grpc-timeout` says the time left now
/// (the call may have waited for its key); `None` when none is left.
fn on_time(
    mut parts: http::request::Parts,
    deadline: Option<CallDeadline>,
) -> Option<http::request::Parts> {
    if let Some(deadline) = deadline {
        let now = Instant::now();
        if deadline.has_passed_at(now) {
            return None;
        }
        deadline.write_header(&mut parts.headers, now);
    }
    Some(parts)
}

fn conflict<RB: Body>(key: &str) -> Response<ResponseBody<RB>> {
    status_response(Status::failed_precondition(format!(
        "idempotency key `{key}` was already used with a different request"
    )))
}

fn replay<RB: Body>(record: &Record) -> Response<ResponseBody<RB>> {
    let mut response = Response::new(ResponseBody::full(
        record.body().clone(),
        record.trailers().cloned(),
    ));
    *response.status_mut() = record.status();
    *response.headers_mut() = record.headers().clone();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// One store call, bounded in time.
async fn bounded<T>(
    timeout: Duration,
    op: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::new(format!(
            "the idempotency store did not answer `{op}` within {timeout:?}"
        ))),
    }
}

/// Reads a request body to its end, up to `max` bytes.
async fn read_request<B: Body<Data = Bytes>>(body: B, max: usize) -> Result<Bytes, &'static str> {
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    let mut len = 0usize;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let Ok(frame) = frame else {
            return Err("body");
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        len += data.len();
        if len > max {
            return Err("size");
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(earlier) => {
                joined.extend_from_slice(&earlier);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// A response body read by the layer.
enum ReadResponse<B: Body> {
    Whole {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    TooLarge {
        frames: VecDeque<Frame<Bytes>>,
    },
    Failed {
        frames: VecDeque<Frame<Bytes>>,
        error: B::Error,
    },
}

async fn read_response<B: Body<Data = Bytes>>(
    body: &mut Pin<Box<B>>,
    max: usize,
) -> ReadResponse<B> {
    let mut frames: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        match frame {
            None => break,
            Some(Err(error)) => return ReadResponse::Failed { frames, error },
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len();
                    frames.push_back(frame);
                    if len > max {
                        return ReadResponse::TooLarge { frames };
                    }
                } else if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    let data = if frames.len() == 1 {
        frames
            .pop_front()
            .and_then(|f| f.into_data().ok())
            .unwrap_or_default()
    } else {
        let mut joined = BytesMut::with_capacity(len);
        for frame in frames {
            if let Some(data) = frame.data_ref() {
                joined.extend_from_slice(data);
            }
        }
        joined.freeze()
    };
    ReadResponse::Whole { data, trailers }
}

/// Owns a claim until it is completed or released; a claim dropped with
/// its call (the caller went away, the handler was cancelled, or either
/// happened while the store was being asked to complete or release it)
/// is released in the background.
struct ClaimGuard<St: Store> {
    shared: Arc<Shared<St>>,
    key: String,
    path: String,
    // Kept until the store has answered: a call dropped during a store
    // call still releases its claim (a release of a key already completed
    // or released is a no-op in every store).
    token: Option<ClaimToken>,
    // Whether this claim's release was already counted.
    counted: bool,
}

impl<St: Store> ClaimGuard<St> {
    fn count(&self, event: Event) {
        let (service, method) = labels(&self.path);
        self.shared.counters.count(event, service, method);
    }

    async fn release(&mut self, reason: &'static str) {
        let Some(token) = self.token else {
            return;
        };
        self.count(Event::Released(reason));
        self.counted = true;
        let timeout = self.shared.settings.store_timeout;
        let released = bounded(
            timeout,
            "release",
            self.shared.store.release(&self.key, token),
        )
        .await;
        self.token = None;
        if let Err(err) = released {
            self.count(Event::StoreError);
            tracing::warn!(key = %self.key, path = %self.path, error = %err, "could not release an idempotency key; it stays locked until its lease ends");
        } else {
            tracing::debug!(key = %self.key, path = %self.path, reason, "released an idempotency key");
        }
    }

    async fn complete(&mut self, record: Record) {
        let Some(token) = self.token else {
            return;
        };
        let settings = &self.shared.settings;
        let completed = bounded(
            settings.store_timeout,
            "complete",
            self.shared
                .store
                .complete(&self.key, token, record, settings.retention),
        )
        .await;
        if completed.is_ok() {
            self.token = None;
        }
        match completed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(key = %self.key, path = %self.path, "the claim on an idempotency key ended (lease expired) before its handler finished; its response was not recorded")
            }
            Err(err) => {
                self.count(Event::StoreError);
                tracing::warn!(key = %self.key, path = %self.path, error = %err, "could not record a response for an idempotency key; releasing it");
                // Let a retry run rather than wait out the lease.
                self.release("store_error").await;
            }
        }
    }
}

impl<St: Store> Drop for ClaimGuard<St> {
    fn drop(&mut self) {
        let Some(token) = self.token.take() else {
            return;
        };
        if !self.counted {
            self.count(Event::Released("cancelled"));
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.shared.store.clone();
        let key = std::mem::take(&mut self.key);
        let timeout = self.shared.settings.store_timeout;
        runtime.spawn(async move {
            if let Err(err) = bounded(timeout, "release", store.release(&key, token)).await {
                tracing::warn!(key = %key, error = %err, "could not release the idempotency key of a cancelled call; it stays locked until its lease ends");
            }
        });
    }
}

/// What the claim step decided (short-lived: the size difference between
/// variants costs nothing).
#[allow(clippy::large_enum_variant)]
enum Claimed<RB: Body> {
    Run(ClaimToken),
    Answer(Response<ResponseBody<RB>>),
    Unprotected,
}

/// A keyed call: fingerprint the request, claim the key, then run the
/// handler and record its outcome, or answer from what the key holds.
pub(crate) async fn keyed<S, St, B, RB>(
    shared: Arc<Shared<St>>,
    mut inner: S,
    request: Request<B>,
    key: String,
) -> Result<Response<ResponseBody<RB>>, S::Error>
where
    S: Service<Request<RequestBody<B>>, Response = Response<RB>>,
    St: Store,
    B: Body<Data = Bytes>,
    RB: Body<Data = Bytes>,
{
    let settings = &shared.settings;
    // The call's deadline, from its `grpc-timeout` as it arrives: a repeat
    // waits for its key no longer, and the handler is told the time left.
    let deadline = CallDeadline::of_request(&request);
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let (service, method) = labels(&path);
    let count = |event| shared.counters.count(event, service, method);

    let body = match read_request(body, settings.max_request_bytes).await {
        Ok(body) => body,
        Err("size") => {
            count(Event::Rejected("request_too_large"));
            return Ok(status_response(Status::resource_exhausted(format!(
                "the request with idempotency key `{key}` is larger than the {} bytes the server reads to check it",
                settings.max_request_bytes
            ))));
        }
        Err(_) => {
            return Ok(status_response(Status::cancelled(
                "the request body could not be read",
            )));
        }
    };
    let fingerprint = Fingerprint::of(&path, &body);
    // A call already out of time is not worth a claim and a release.
    if deadline.is_some_and(|d| d.has_passed_at(Instant::now())) {
        return Ok(out_of_time(&key, false));
    }

    let claimed = claim(&shared, &key, fingerprint, deadline, service, method).await;
    let token = match claimed {
        Claimed::Run(token) => token,
        Claimed::Answer(response) => return Ok(response),
        Claimed::Unprotected => {
            let Some(parts) = on_time(parts, deadline) else {
                return Ok(out_of_time(&key, false));
            };
            count(Event::Unprotected);
            tracing::warn!(
                key,
                service,
                method,
                "running a keyed call without deduplication: the idempotency store failed"
            );
            let request = Request::from_parts(parts, RequestBody::buffered(body));
            let response = inner.call(request).await?;
            return Ok(response.map(ResponseBody::passthrough));
        }
    };

    count(Event::Miss);
    let mut guard = ClaimGuard {
        shared: shared.clone(),
        key,
        path: path.clone(),
        token: Some(token),
        counted: false,
    };
    let Some(parts) = on_time(parts, deadline) else {
        // Claimed as its deadline passed (after a wait): not run.
        guard.release("deadline").await;
        return Ok(out_of_time(&guard.key, false));
    };
    let request = Request::from_parts(parts, RequestBody::buffered(body));
    let response = match inner.call(request).await {
        Ok(response) => response,
        Err(err) => {
            guard.release("error").await;
            return Err(err);
        }
    };
    let (head, body) = response.into_parts();
    let (data, trailers, code) = if let Some(outcome) = classify_head(head.status, &head.headers) {
        // Trailers-Only: the whole answer is in the headers.
        (Bytes::new(), None, outcome.code())
    } else {
        // Boxed, so what is left of a body too large to record can be
        // handed on.
        let mut body = Box::pin(body);
        match read_response(&mut body, settings.max_response_bytes).await {
            ReadResponse::Whole { data, trailers } => {
                let code = trailers
                    .as_ref()
                    .map_or(Outcome::Status(Code::Unknown), classify_trailers)
                    .code();
                (data, trailers, code)
            }
            ReadResponse::TooLarge { frames } => match settings.on_oversize {
                OnOversize::Release => {
                    guard.release("too_large").await;
                    tracing::warn!(
                        key = guard.key,
                        service,
                        method,
                        max = settings.max_response_bytes,
                        "a response too large to record; its idempotency key was released"
                    );
                    return Ok(Response::from_parts(
                        head,
                        ResponseBody::prefixed(frames, body),
                    ));
                }
                OnOversize::Reject => {
                    let response = status_response::<RB>(Status::resource_exhausted(format!(
                        "the response to idempotency key `{}` is larger than the {} bytes the server records",
                        guard.key, settings.max_response_bytes
                    )));
                    tracing::warn!(
                        key = guard.key,
                        service,
                        method,
                        max = settings.max_response_bytes,
                        "a response too large to record; recording RESOURCE_EXHAUSTED for its key"
                    );
                    let record = Record::new(
                        fingerprint,
                        response.status(),
                        response.headers().clone(),
                        Bytes::new(),
                        None,
                    );
                    guard.complete(record).await;
                    return Ok(response);
                }
            },
            ReadResponse::Failed { frames, error } => {
                guard.release("body_error").await;
                return Ok(Response::from_parts(
                    head,
                    ResponseBody::failed(frames, error),
                ));
            }
        }
    };
    if settings.release_on.contains(code) {
        guard.release(code_name(code)).await;
        return Ok(Response::from_parts(
            head,
            ResponseBody::full(data, trailers),
        ));
    }
    let record = Record::new(
        fingerprint,
        head.status,
        head.headers.clone(),
        data.clone(),
        trailers.clone(),
    );
    guard.complete(record).await;
    tracing::debug!(
        key = guard.key,
        service,
        method,
        code = code_name(code),
        "recorded the response for an idempotency key"
    );
    Ok(Response::from_parts(
        head,
        ResponseBody::full(data, trailers),
    ))
}

/// Claims the key, or answers from what it holds, waiting for a running
/// call as configured.
async fn claim<St: Store, RB: Body>(
    shared: &Shared<St>,
    key: &str,
    fingerprint: Fingerprint,
    deadline: Option<CallDeadline>,
    service: &str,
    method: &str,
) -> Claimed<RB> {
    let settings = &shared.settings;
    let count = |event| shared.counters.count(event, service, method);
    let store_failed = |err: StoreError| {
        count(Event::StoreError);
        match settings.on_store_error {
            OnStoreError::FailClosed => {
                tracing::warn!(key, service, method, error = %err, "the idempotency store failed; refusing the call (UNAVAILABLE)");
                Claimed::Answer(status_response(Status::unavailable(
                    "the idempotency store is unavailable; retry later",
                )))
            }
            OnStoreError::RunUnprotected => {
                tracing::warn!(key, service, method, error = %err, "the idempotency store failed");
                Claimed::Unprotected
            }
        }
    };
    let mut waiting_since: Option<Instant> = None;
    let mut interval = settings.poll_interval;
    loop {
        let claimed = bounded(
            settings.store_timeout,
            "claim",
            shared.store.claim(key, fingerprint, settings.lease),
        )
        .await;
        let mut entry = match claimed {
            Ok(Claim::Claimed(token)) => return Claimed::Run(token),
            Ok(Claim::Existing(entry)) => entry,
            Err(err) => return store_failed(err),
        };
        // Look at the entry until the key is free again.
        loop {
            match entry {
                Entry::Completed(record) => {
                    if record.fingerprint() != fingerprint {
                        count(Event::Conflict);
                        tracing::info!(
                            key,
                            service,
                            method,
                            "idempotency key reused with a different request"
                        );
                        return Claimed::Answer(conflict(key));
                    }
                    count(Event::Hit);
                    tracing::debug!(
                        key,
                        service,
                        method,
                        "replaying the recorded response of an idempotency key"
                    );
                    return Claimed::Answer(replay(&record));
                }
                Entry::InProgress {
                    fingerprint: theirs,
                } => {
                    if theirs != fingerprint {
                        count(Event::Conflict);
                        tracing::info!(
                            key,
                            service,
                            method,
                            "idempotency key reused with a different request"
                        );
                        return Claimed::Answer(conflict(key));
                    }
                    let now = Instant::now();
                    let since = *waiting_since.get_or_insert_with(|| {
                        count(Event::InProgress);
                        now
                    });
                    let max = match settings.on_in_progress {
                        OnInProgress::Abort => Duration::ZERO,
                        OnInProgress::Wait(max) => max,
                    };
                    let waited = now - since;
                    let left = deadline.map(|d| d.remaining_at(now));
                    if left.is_some_and(|left| left.is_zero()) {
                        tracing::debug!(
                            key,
                            service,
                            method,
                            "idempotency key in progress past the call's deadline; answering DEADLINE_EXCEEDED"
                        );
                        return Claimed::Answer(out_of_time(key, true));
                    }
                    if waited >= max {
                        tracing::debug!(
                            key,
                            service,
                            method,
                            "idempotency key in progress; answering ABORTED"
                        );
                        return Claimed::Answer(aborted(key, settings.pushback));
                    }
                    let nap = interval.min(max - waited);
                    if let Some(left) = left.filter(|&left| left <= nap) {
                        // The deadline comes first: answer then (above),
                        // without another store call (tonic's own timer
                        // for it is already running).
                        tokio::time::sleep(left).await;
                        entry = Entry::InProgress {
                            fingerprint: theirs,
                        };
                        continue;
                    }
                    tokio::time::sleep(nap).await;
                    interval = (interval * 2).min(settings.poll_interval * 10);
                    match bounded(settings.store_timeout, "fetch", shared.store.fetch(key)).await {
                        Ok(Some(next)) => entry = next,
                        // Released or expired: try to claim it.
                        Ok(None) => break,
                        Err(err) => return store_failed(err),
                    }
                }
            }
        }
    }
}
