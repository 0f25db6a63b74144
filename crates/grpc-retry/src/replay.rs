//! Request-body replay: tonic request bodies are not `Clone`, so the body
//! is recorded as the first attempt sends it and replayed for the next.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use grpc_resilience_core::BoxError;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::head::Head;

/// Request body types the retry layer can wrap: it turns a
/// [`ReplayBody`] of the type back into the type, so the inner service
/// (a tonic `Channel`) gets the body type it expects.
pub trait ReplayableBody: Body<Data = Bytes> + Send + Unpin + Sized + 'static {
    /// Wraps a replaying body as `Self`.
    fn from_replay(body: ReplayBody<Self>) -> Self;
}

impl ReplayableBody for tonic::body::Body {
    fn from_replay(body: ReplayBody<Self>) -> Self {
        tonic::body::Body::new(body)
    }
}

/// How much request data may be held for replay.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) per_call: usize,
    pub(crate) total: usize,
    in_use: AtomicUsize,
}

impl Limits {
    pub(crate) fn new(per_call: usize, total: usize) -> Self {
        Limits {
            per_call,
            total,
            in_use: AtomicUsize::new(0),
        }
    }

    /// Bytes held for replay by every call now.
    pub(crate) fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    fn reserve(&self, n: usize) -> bool {
        let before = self.in_use.fetch_add(n, Ordering::AcqRel);
        if before + n > self.total {
            self.in_use.fetch_sub(n, Ordering::AcqRel);
            false
        } else {
            true
        }
    }

    fn release(&self, n: usize) {
        self.in_use.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Recorded data frames; the first is kept inline, as a unary call's
/// body is one frame.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: Vec<Bytes>,
}

impl Chunks {
    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    fn get(&self, i: usize) -> Option<&Bytes> {
        match i {
            0 => self.first.as_ref(),
            _ => self.more.get(i - 1),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() {
            self.first = Some(chunk);
        } else {
            self.more.push(chunk);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.first.iter().chain(self.more.iter())
    }
}

struct State<B> {
    // Data frames as the original body yielded them (zero-copy `Bytes`).
    chunks: Chunks,
    buffered: usize,
    trailers: Option<HeaderMap>,
    // The original body, when no attempt is reading from it.
    rest: Option<B>,
    // The original body has ended.
    done: bool,
    // Too large (or broken) to replay; nothing is held any more.
    capped: bool,
    // An attempt waiting for the previous one to give the original back.
    waiter: Option<Waker>,
}

/// What the attempts of one call share: the request head and the body as
/// recorded.
pub(crate) struct Recording<B> {
    head: Head,
    state: Mutex<State<B>>,
    limits: Arc<Limits>,
}

impl<B> fmt::Debug for Recording<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Recording")
            .field("buffered", &state.buffered)
            .field("done", &state.done)
            .field("capped", &state.capped)
            .finish()
    }
}

impl<B> Recording<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The head of the original request.
    pub(crate) fn head(&self) -> &Head {
        &self.head
    }

    /// Whether another attempt can replay the body byte for byte.
    pub(crate) fn replayable(&self) -> bool {
        !self.lock().capped
    }

    /// Bytes recorded so far.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.lock().buffered
    }
}

impl<B> Drop for Recording<B> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        self.limits.release(state.buffered);
    }
}

/// One attempt's request body: replays what earlier attempts read, then
/// reads on from the original body, recording as it goes.
pub struct ReplayBody<B> {
    shared: Arc<Recording<B>>,
    // Next recorded chunk to send.
    pos: usize,
    // The original body while this attempt reads from it.
    held: Option<B>,
    trailers_sent: bool,
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayBody")
            .field("pos", &self.pos)
            .field("holds_original", &self.held.is_some())
            .finish()
    }
}

impl<B> ReplayBody<B> {
    /// The first attempt's body, reading from `original`.
    pub(crate) fn first(original: B, limits: Arc<Limits>, head: Head) -> (Self, Arc<Recording<B>>) {
        let shared = Arc::new(Recording {
            head,
            state: Mutex::new(State {
                chunks: Chunks::default(),
                buffered: 0,
                trailers: None,
                rest: None,
                done: false,
                capped: false,
                waiter: None,
            }),
            limits,
        });
        let body = ReplayBody {
            shared: shared.clone(),
            pos: 0,
            held: Some(original),
            trailers_sent: false,
        };
        (body, shared)
    }

    /// A later attempt's body.
    pub(crate) fn replay(shared: &Arc<Recording<B>>) -> Self {
        ReplayBody {
            shared: shared.clone(),
            pos: 0,
            held: None,
            trailers_sent: false,
        }
    }
}

impl<B> Drop for ReplayBody<B> {
    fn drop(&mut self) {
        if let Some(original) = self.held.take() {
            let mut state = self.shared.lock();
            if !state.done {
                state.rest = Some(original);
                if let Some(waker) = state.waiter.take() {
                    waker.wake();
                }
            }
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            // The attempt that holds the original has sent everything
            // recorded (it recorded it): read on without a lock.
            if this.held.is_none() {
                let mut state = this.shared.lock();
                if !state.capped
                    && let Some(chunk) = state.chunks.get(this.pos).cloned()
                {
                    this.pos += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if state.done {
                    return Poll::Ready(match &state.trailers {
                        Some(trailers) if !this.trailers_sent => {
                            this.trailers_sent = true;
                            Some(Ok(Frame::trailers(trailers.clone())))
                        }
                        _ => None,
                    });
                }
                if this.held.is_none() {
                    match state.rest.take() {
                        Some(original) => this.held = Some(original),
                        None => {
                            // The previous attempt still holds the original.
                            state.waiter = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                }
            }
            let Some(original) = this.held.as_mut() else {
                continue;
            };
            let frame = ready!(Pin::new(original).poll_frame(cx));
            let limits = this.shared.limits.clone();
            let mut state = this.shared.lock();
            match frame {
                None => {
                    state.done = true;
                    drop(state);
                    this.held = None;
                    return Poll::Ready(None);
                }
                Some(Err(err)) => {
                    // A broken body cannot be replayed.
                    state.capped = true;
                    limits.release(std::mem::take(&mut state.buffered));
                    state.chunks = Chunks::default();
                    return Poll::Ready(Some(Err(err.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if !state.capped {
                            let fits = state.buffered + data.len() <= limits.per_call;
                            if fits && limits.reserve(data.len()) {
                                state.buffered += data.len();
                                state.chunks.push(data.clone());
                                this.pos += 1;
                            } else {
                                // Too large to replay: this attempt goes on,
                                // the call will not be retried.
                                state.capped = true;
                                limits.release(std::mem::take(&mut state.buffered));
                                state.chunks = Chunks::default();
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            state.done = true;
                            if !state.capped {
                                state.trailers = Some(trailers.clone());
                            }
                            this.trailers_sent = true;
                            drop(state);
                            this.held = None;
                            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                        }
                        // A frame kind this layer does not know: skip it.
                        Err(_) => continue,
                    },
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // The attempt reading the original has sent all it recorded: the
        // original knows whether more comes (so the last data frame can
        // carry END_STREAM).
        if let Some(original) = &self.held {
            return original.is_end_stream();
        }
        let state = self.shared.lock();
        let replayed = state.capped || self.pos >= state.chunks.len();
        let trailers_left = state.trailers.is_some() && !self.trailers_sent;
        state.done && replayed && !trailers_left
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(original) = &self.held {
            return original.size_hint();
        }
        let state = self.shared.lock();
        if state.done && !state.capped {
            let left: usize = state.chunks.iter().skip(self.pos).map(Bytes::len).sum();
            return SizeHint::with_exact(left as u64);
        }
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests;
