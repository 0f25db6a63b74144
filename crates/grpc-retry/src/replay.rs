//! Request-body replay: tonic request bodies are not `Clone`, so the body
//! is recorded as the attempts read it and replayed for the next attempt.
//!
//! # The state machine
//!
//! The attempts of one call share one [`Inner`]: each attempt's body is a
//! [`ReplayBody`], and the retry future holds the call's [`Recording`].
//!
//! * **One frame at a time.** The original body stays in the shared state;
//!   a live attempt that has sent everything read so far takes it out for
//!   one `poll_frame` and puts it back, so an attempt whose connection
//!   stopped polling its body (a full send window) cannot pin it: any other
//!   live attempt reads on. Its data frames are numbered in the order read
//!   (`read` counts them). Once the call is over, only the attempt it
//!   ended with may read the original; another one that would need it
//!   fails with [`ReplayUnavailable::CallEnded`] (its stream is reset,
//!   never ended cleanly with a truncated body).
//! * **No gap, by construction.** Each attempt has sent frames `0..pos`. It
//!   sends frame `pos` from the recording; once `pos == read` it has sent
//!   everything read so far, and only then may it read the original itself
//!   (when handed back) or wait for the reader. A frame that is neither
//!   recorded nor next from the original fails the attempt with
//!   [`ReplayUnavailable`]: an attempt never sends a different body.
//! * **What is kept** ([`Keep`]): every frame while the call may be retried;
//!   once the call is over (committed, or returned to the caller), only what
//!   its last attempt still has to send when it lags behind the reader,
//!   freed as it is sent; nothing after the body crossed a buffer limit or
//!   failed. Bytes held are counted in the layer's [`Limits`].
//! * **Wakeups.** Every change a waiting attempt may wait for (a new frame,
//!   the end, a failure, the original handed back) wakes every waiting
//!   attempt. The original is polled with a waker that wakes every
//!   waiting attempt (and every attempt that polled it), so a frame
//!   arriving wakes whichever attempt still reads, whatever attempt polled
//!   last.

use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use grpc_resilience_core::BoxError;
#[cfg(test)]
use grpc_resilience_core::striped::Striped;
use grpc_resilience_core::striped::{STRIPES, Stripe, stripe_index};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::head::Head;
use crate::sync::{AtomicUsize, Mutex, MutexGuard, Ordering, lock};

/// Request body types the retry layer can wrap: it turns a
/// [`ReplayBody`] of the type back into the type, so the inner service
/// (a tonic `Channel`) gets the body type it expects.
pub trait ReplayableBody:
    Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + Sized + 'static
{
    /// Wraps a replaying body as `Self`.
    fn from_replay(body: ReplayBody<Self>) -> Self;
}

impl ReplayableBody for tonic::body::Body {
    fn from_replay(body: ReplayBody<Self>) -> Self {
        tonic::body::Body::new(body)
    }
}

/// The error a retry attempt's request body fails with when it cannot send
/// the call's body byte for byte. The attempt's stream is then reset, so
/// the server never sees a body the first attempt did not send, and the
/// caller gets the previous attempt's outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayUnavailable {
    /// The body grew past the replay buffer limit (per call or per layer,
    /// see [`RetryLayer::with_buffer_limits`](crate::RetryLayer::with_buffer_limits))
    /// after the retry had started: bytes this attempt still had to send
    /// were no longer held.
    BufferLimitExceeded,
    /// The original request body failed (its error went to the attempt
    /// that read it).
    BodyFailed,
    /// The call is over (another attempt was committed, or the call was
    /// answered or dropped): its recording was released.
    CallEnded,
}

impl fmt::Display for ReplayUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayUnavailable::BufferLimitExceeded => {
                "request body not replayed: it grew past the retry buffer limit after the retry started"
            }
            ReplayUnavailable::BodyFailed => {
                "request body not replayed: the original request body failed"
            }
            ReplayUnavailable::CallEnded => {
                "request body not replayed: the call is over and its recording was released"
            }
        })
    }
}

impl Error for ReplayUnavailable {}

/// How much request data may be held for replay.
///
/// Every call of a layer takes from one count of the bytes held and gives
/// back to it, which on two cores would move that count's cache line
/// between them on every call. So each thread stripe keeps a small
/// *credit*: bytes taken from the shared count ahead of need, which its
/// calls use and give back to without touching the shared count. The
/// shared count is the bytes held plus the credits, and never exceeds
/// `total`, so the bytes held never do; a call refused while stripes hold
/// credit takes that credit back and tries once more.
#[derive(Debug)]
pub(crate) struct Limits {
    pub(crate) per_call: usize,
    pub(crate) total: usize,
    // What a stripe takes from `in_use` as credit at a time (0: none).
    chunk: usize,
    in_use: AtomicUsize,
    credits: [Credit; STRIPES],
}

/// One stripe's credit, on its own cache line.
#[derive(Debug)]
#[repr(align(128))]
struct Credit(AtomicUsize);

/// A call's handle on its layer's [`Limits`] (see [`Striped`]).
pub(crate) type LimitsHandle = Arc<Stripe<Limits>>;

impl Limits {
    pub(crate) fn new(per_call: usize, total: usize) -> Self {
        Limits {
            per_call,
            total,
            // At most 1/256 of the total, so the credits (at most two
            // chunks per stripe) are a small part of it.
            chunk: (total / 256).min(64 * 1024),
            in_use: AtomicUsize::new(0),
            credits: std::array::from_fn(|_| Credit(AtomicUsize::new(0))),
        }
    }

    /// A handle on new limits, for tests.
    #[cfg(test)]
    pub(crate) fn handle(per_call: usize, total: usize) -> LimitsHandle {
        Striped::new(Arc::new(Limits::new(per_call, total)))
            .handle()
            .clone()
    }

    /// Bytes held for replay by every call now: exact when no call is
    /// taking or giving back bytes at that moment, else off by what those
    /// calls are moving (a few chunks).
    pub(crate) fn in_use(&self) -> usize {
        let credit: usize = self
            .credits
            .iter()
            .map(|c| c.0.load(Ordering::Acquire))
            .sum();
        self.in_use.load(Ordering::Acquire).saturating_sub(credit)
    }

    fn reserve(&self, n: usize) -> bool {
        self.reserve_in(stripe_index(), n)
    }

    fn release(&self, n: usize) {
        self.release_in(stripe_index(), n);
    }

    /// Reserves `n` bytes for a call on stripe `i`.
    pub(crate) fn reserve_in(&self, i: usize, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        let credit = &self.credits[i].0;
        if credit
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(n))
            .is_ok()
        {
            return true;
        }
        if self.chunk > 0 && self.take(n + self.chunk) {
            self.add_credit(credit, self.chunk);
            return true;
        }
        self.take(n) || (self.reclaim() && self.take(n))
    }

    /// Gives back `n` bytes a call on stripe `i` held.
    pub(crate) fn release_in(&self, i: usize, n: usize) {
        if n > 0 {
            self.add_credit(&self.credits[i].0, n);
        }
    }

    /// Adds `n` to a stripe's credit; credit over two chunks goes back to
    /// the shared count, down to one chunk.
    fn add_credit(&self, credit: &AtomicUsize, n: usize) {
        let after = credit.fetch_add(n, Ordering::AcqRel) + n;
        if after > 2 * self.chunk {
            let chunk = self.chunk;
            if let Ok(before) = credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c > chunk).then_some(chunk)
            }) {
                self.in_use.fetch_sub(before - chunk, Ordering::AcqRel);
            }
        }
    }

    /// Takes `n` from the shared count if it stays within `total`.
    fn take(&self, n: usize) -> bool {
        // One compare-and-swap: two calls near the limit never both see
        // the other's bytes and are refused for a sum that never held.
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_use| {
                in_use.checked_add(n).filter(|&after| after <= self.total)
            })
            .is_ok()
    }

    /// Gives every stripe's credit back to the shared count; whether there
    /// was any.
    #[cold]
    fn reclaim(&self) -> bool {
        let mut any = false;
        for credit in &self.credits {
            let c = credit.0.swap(0, Ordering::AcqRel);
            if c > 0 {
                self.in_use.fetch_sub(c, Ordering::AcqRel);
                any = true;
            }
        }
        any
    }
}

/// Recorded data frames in order; the first is kept inline, as a unary
/// call's body is one frame.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: std::collections::VecDeque<Bytes>,
}

impl Chunks {
    fn get(&self, i: usize) -> Option<&Bytes> {
        match &self.first {
            Some(first) if i == 0 => Some(first),
            Some(_) => self.more.get(i - 1),
            None => self.more.get(i),
        }
    }

    fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(chunk);
        } else {
            self.more.push_back(chunk);
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        self.first.take().or_else(|| self.more.pop_front())
    }
}

/// How the original body ended.
enum End {
    Open,
    /// Ended, with trailers or not.
    Done(Option<HeaderMap>),
    Failed,
}

/// What the recording keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// Every frame: the call may be retried.
    All,
    /// The call is over; this attempt lags behind the reader, so frames it
    /// has not sent yet are kept (and freed as it sends them).
    For(u32),
    /// Nothing, and nothing more is recorded.
    Nothing(ReplayUnavailable),
}

struct State<B> {
    // Recorded frames from `base` on; unless nothing is kept, that is every
    // frame from `base` to `read`.
    chunks: Chunks,
    base: usize,
    // Bytes of `chunks`, reserved in the layer's limits.
    buffered: usize,
    // Data frames read from the original so far.
    read: usize,
    end: End,
    // The original body (behind any frames read before the first attempt
    // was sent), unless it ended or an attempt polls it right now.
    rest: Option<Prefixed<B>>,
    // Whether the original body stated its exact size: a replay states
    // its own only then (see `size_hint`).
    exact: bool,
    // The attempt polling the original right now, if any.
    reader: Option<u32>,
    // The call is over (the recording was dropped): only `survivor` may
    // read the original.
    over: bool,
    keep: Keep,
    // The newest attempt.
    latest: u32,
    // Per attempt: whether its body is alive and how far it has sent; the
    // first inline (a call that is not retried allocates nothing), the
    // others (attempt n at n - 2) as they are made. Hedged attempts are
    // live together, each at its own position.
    first: Slot,
    more: Vec<Slot>,
    // Attempts (bit n - 1, up to 128) that failed for want of recorded data.
    refused: u128,
    // The attempt a hedged call committed to; else the newest survives.
    survivor: Option<u32>,
}

/// One attempt's progress.
#[derive(Clone, Copy, Debug)]
struct Slot {
    pos: usize,
    live: bool,
}

impl<B> State<B> {
    fn slot(&self, attempt: u32) -> Option<&Slot> {
        match attempt {
            0 => None,
            1 => Some(&self.first),
            n => self.more.get(n as usize - 2),
        }
    }

    fn slot_mut(&mut self, attempt: u32) -> Option<&mut Slot> {
        match attempt {
            0 => None,
            1 => Some(&mut self.first),
            n => self.more.get_mut(n as usize - 2),
        }
    }

    fn is_refused(&self, attempt: u32) -> bool {
        attempt
            .checked_sub(1)
            .and_then(|bit| 1u128.checked_shl(bit))
            .is_some_and(|mask| self.refused & mask != 0)
    }

    /// Frees every recorded frame and stops recording.
    fn clear(&mut self, limits: &Limits, why: ReplayUnavailable) {
        limits.release(std::mem::take(&mut self.buffered));
        self.chunks = Chunks::default();
        self.base = self.read;
        if !matches!(self.keep, Keep::Nothing(_)) {
            self.keep = Keep::Nothing(why);
        }
    }

    /// Frees the recorded frames before `pos`.
    fn free_before(&mut self, pos: usize, limits: &Limits) {
        while self.base < pos {
            let Some(chunk) = self.chunks.pop_front() else {
                self.base = pos;
                break;
            };
            limits.release(chunk.len());
            self.buffered -= chunk.len();
            self.base += 1;
        }
    }

    /// Recorded frame `i`, if held.
    fn chunk(&self, i: usize) -> Option<&Bytes> {
        if matches!(self.keep, Keep::Nothing(_)) {
            return None;
        }
        self.chunks.get(i.checked_sub(self.base)?)
    }

    /// Records the frame `attempt` (the reader) just read, if another
    /// attempt may need it.
    fn record(&mut self, attempt: u32, data: &Bytes, limits: &Limits) {
        let needed = match self.keep {
            Keep::All => true,
            Keep::For(lagging) => lagging != attempt,
            Keep::Nothing(_) => false,
        };
        if !needed {
            // Kept contiguous: nothing is recorded past a frame not kept.
            if !matches!(self.keep, Keep::Nothing(_)) {
                self.clear(limits, ReplayUnavailable::CallEnded);
            }
            return;
        }
        let fits = self.buffered + data.len() <= limits.per_call;
        if fits && limits.reserve(data.len()) {
            self.buffered += data.len();
            self.chunks.push(data.clone());
        } else {
            // This attempt goes on; no later one can replay the body.
            self.clear(limits, ReplayUnavailable::BufferLimitExceeded);
        }
    }

    /// `attempt` sent every frame before `pos`.
    fn sent(&mut self, attempt: u32, pos: usize, limits: &Limits) {
        if let Some(slot) = self.slot_mut(attempt) {
            slot.pos = pos;
        }
        if self.keep == Keep::For(attempt) {
            self.free_before(pos, limits);
        }
    }

    /// Why `attempt` cannot go on; noted for the retry future.
    fn refuse(&mut self, attempt: u32) -> ReplayUnavailable {
        if let Some(mask) = attempt.checked_sub(1).and_then(|b| 1u128.checked_shl(b)) {
            self.refused |= mask;
        }
        match (self.keep, &self.end) {
            (Keep::Nothing(why), _) => why,
            (_, End::Failed) => ReplayUnavailable::BodyFailed,
            _ => ReplayUnavailable::CallEnded,
        }
    }

    /// Whether `attempt` may read the original (once it sent all read).
    fn may_read(&self, attempt: u32) -> bool {
        !self.over || self.survivor == Some(attempt)
    }
}

/// The attempts waiting for the original's next frame, by attempt number.
/// Its waker (one per call) is the one the original is polled with, so
/// whichever attempt polled last, a frame arriving wakes them all.
#[derive(Default)]
struct Waiters {
    list: Mutex<Vec<(u32, Waker)>>,
}

impl Waiters {
    /// Registers `attempt`; called with the state locked, so a change made
    /// under that lock after it wakes the attempt.
    fn wait(&self, attempt: u32, waker: &Waker) {
        let mut list = lock(&self.list);
        match list.iter_mut().find(|(a, _)| *a == attempt) {
            Some((_, w)) if w.will_wake(waker) => {}
            Some((_, w)) => w.clone_from(waker),
            None => list.push((attempt, waker.clone())),
        }
    }

    fn forget(&self, attempt: u32) {
        lock(&self.list).retain(|(a, _)| *a != attempt);
    }

    /// Wakes every waiting attempt (they register again if still waiting).
    fn wake_all(&self) {
        let list = std::mem::take(&mut *lock(&self.list));
        for (_, waker) in list {
            waker.wake();
        }
    }
}

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}

/// What the attempts of one call share: the body as recorded.
struct Inner<B> {
    state: Mutex<State<B>>,
    limits: LimitsHandle,
    waiters: Arc<Waiters>,
    // Wakes every waiter: the waker the original is polled with.
    fanout: Waker,
}

impl<B> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        lock(&self.state)
    }
}

impl<B> Drop for Inner<B> {
    fn drop(&mut self) {
        let buffered = self.lock().buffered;
        self.limits.release(buffered);
    }
}

/// The retry future's handle on a call's recording. Dropping it (the call
/// committed, was answered, or was dropped) releases what no attempt still
/// needs at once.
pub(crate) struct Recording<B> {
    // Kept inline: a call that is not retried allocates nothing for it.
    head: Head,
    kind: RecordingKind<B>,
}

enum RecordingKind<B> {
    /// The body was one frame, read before the first attempt was sent:
    /// each attempt sends a clone of it (no lock, nothing shared). `data`
    /// is `None` when it is over a buffer limit (sent once, not
    /// replayed); else its bytes are reserved in `limits` until the call
    /// is over.
    Ready {
        data: Option<Bytes>,
        limits: LimitsHandle,
        // Whether the original body stated its exact size (see
        // `ReplayBody::size_hint`).
        exact: bool,
    },
    /// The body is recorded as the attempts read it.
    Shared(Arc<Inner<B>>),
}

impl<B> fmt::Debug for Recording<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RecordingKind::Ready { data, .. } => f
                .debug_struct("Recording")
                .field("ready", &data.as_ref().map(Bytes::len))
                .finish_non_exhaustive(),
            RecordingKind::Shared(inner) => {
                let state = inner.lock();
                f.debug_struct("Recording")
                    .field("buffered", &state.buffered)
                    .field("read", &state.read)
                    .field("keep", &state.keep)
                    .finish_non_exhaustive()
            }
        }
    }
}

/// What [`ReplayBody::capture`] kept of a call's body, to be joined with
/// the request head into the call's [`Recording`].
pub(crate) struct Captured<B>(RecordingKind<B>);

impl<B> Recording<B> {
    /// The call's recording: its head and its captured body.
    #[inline(always)]
    pub(crate) fn new(head: Head, captured: Captured<B>) -> Self {
        Recording {
            head,
            kind: captured.0,
        }
    }

    /// The head of the original request.
    pub(crate) fn head(&self) -> &Head {
        &self.head
    }

    /// Whether another attempt can replay the body byte for byte.
    pub(crate) fn replayable(&self) -> bool {
        match &self.kind {
            RecordingKind::Ready { data, .. } => data.is_some(),
            RecordingKind::Shared(inner) => inner.lock().keep == Keep::All,
        }
    }

    /// The next attempt's body, unless the body can no longer be replayed
    /// byte for byte (checked under the same lock, so a body that outgrew
    /// the limit while the service was busy is never sent). Replays may
    /// run at once (hedging): each sends from its own position, from the
    /// recording or, once it has caught up, from the original, and never
    /// with a gap.
    pub(crate) fn replay(&self) -> Option<ReplayBody<B>> {
        let inner = match &self.kind {
            RecordingKind::Ready { data, exact, .. } => {
                return data.clone().map(|d| ReplayBody::ready(d, *exact));
            }
            RecordingKind::Shared(inner) => inner,
        };
        let mut state = inner.lock();
        if state.keep != Keep::All {
            return None;
        }
        state.latest += 1;
        state.more.push(Slot { pos: 0, live: true });
        Some(ReplayBody::shared(SharedBody {
            inner: inner.clone(),
            attempt: state.latest,
            pos: 0,
            trailers_sent: false,
        }))
    }

    /// Whether the newest attempt's body failed because the data it had to
    /// send was not held ([`ReplayUnavailable`]).
    pub(crate) fn latest_refused(&self) -> bool {
        match &self.kind {
            // A ready body is sent whole by every attempt.
            RecordingKind::Ready { .. } => false,
            RecordingKind::Shared(inner) => {
                let state = inner.lock();
                state.is_refused(state.latest)
            }
        }
    }

    /// Whether `attempt`'s body failed because the data it had to send was
    /// not held ([`ReplayUnavailable`]).
    pub(crate) fn refused(&self, attempt: u32) -> bool {
        match &self.kind {
            RecordingKind::Ready { .. } => false,
            RecordingKind::Shared(inner) => inner.lock().is_refused(attempt),
        }
    }

    /// The call committed to `attempt` (hedging): once this recording is
    /// dropped, only what that attempt still has to send is kept.
    pub(crate) fn commit_to(&self, attempt: u32) {
        if let RecordingKind::Shared(inner) = &self.kind {
            inner.lock().survivor = Some(attempt);
        }
    }

    /// Bytes recorded now.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        match &self.kind {
            RecordingKind::Ready { data, .. } => data.as_ref().map_or(0, Bytes::len),
            RecordingKind::Shared(inner) => inner.lock().buffered,
        }
    }

    /// Whether the body was read whole before the first attempt was sent
    /// (no shared recording).
    #[cfg(test)]
    pub(crate) fn is_ready(&self) -> bool {
        matches!(self.kind, RecordingKind::Ready { .. })
    }
}

impl<B> Drop for Recording<B> {
    fn drop(&mut self) {
        let inner = match &self.kind {
            RecordingKind::Ready { data, limits, .. } => {
                limits.release(data.as_ref().map_or(0, Bytes::len));
                return;
            }
            RecordingKind::Shared(inner) => inner,
        };
        let limits = &inner.limits;
        let mut state = inner.lock();
        if state.keep != Keep::All {
            return;
        }
        // Nothing will be retried. The last attempt goes on (its response
        // may be streaming); while another attempt reads the original, it
        // may lag behind: keep what it has not sent yet. Else keep nothing.
        let survivor = state.survivor.unwrap_or(state.latest);
        state.over = true;
        state.survivor = Some(survivor);
        let Slot { pos, live } = state.slot(survivor).copied().unwrap_or(Slot {
            pos: 0,
            live: false,
        });
        let sent_all = pos == state.read && !matches!(state.end, End::Open);
        let lagging = live && state.reader != Some(survivor) && !sent_all;
        if lagging {
            state.keep = Keep::For(survivor);
            state.free_before(pos, limits);
        } else {
            state.clear(limits, ReplayUnavailable::CallEnded);
        }
        drop(state);
        // An older attempt waiting for the original now fails instead.
        inner.waiters.wake_all();
    }
}

/// One attempt's request body: replays what earlier attempts read, then
/// reads on from the original body, recording as it goes. It fails with
/// [`ReplayUnavailable`] rather than skip a byte.
pub struct ReplayBody<B> {
    kind: BodyKind<B>,
}

enum BodyKind<B> {
    /// A body read whole before the first attempt: sent as it is. The
    /// flag: whether the original body stated its exact size.
    Ready(Option<Bytes>, bool),
    Shared(SharedBody<B>),
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            BodyKind::Ready(data, _) => f
                .debug_struct("ReplayBody")
                .field("ready", &data.as_ref().map(Bytes::len))
                .finish(),
            BodyKind::Shared(body) => f
                .debug_struct("ReplayBody")
                .field("attempt", &body.attempt)
                .field("pos", &body.pos)
                .finish(),
        }
    }
}

impl<B> ReplayBody<B> {
    fn ready(data: Bytes, exact: bool) -> Self {
        ReplayBody {
            kind: BodyKind::Ready(Some(data).filter(|d| !d.is_empty()), exact),
        }
    }

    fn shared(body: SharedBody<B>) -> Self {
        ReplayBody {
            kind: BodyKind::Shared(body),
        }
    }
}

/// An attempt's body reading the shared recording.
struct SharedBody<B> {
    inner: Arc<Inner<B>>,
    // 1 for the first attempt.
    attempt: u32,
    // Data frames sent so far.
    pos: usize,
    trailers_sent: bool,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The first attempt's body and what the call's recording keeps of
    /// it. A body that is one frame ready now (a unary call's encoded
    /// message) is read at once and kept as it is, within the buffer
    /// limits: no shared recording, no lock per frame. Any other body is
    /// recorded as the attempts read it, starting with what was read here.
    ///
    /// The request head is not taken here: the caller builds the
    /// [`Recording`] ([`Recording::new`]) where it is stored, so the
    /// kept head (hundreds of bytes, inline) is not moved through the
    /// returns on the way.
    #[inline]
    pub(crate) fn capture(original: B, limits: LimitsHandle) -> (Self, Captured<B>) {
        let exact = original.size_hint().exact().is_some();
        let original = match Prefixed::read_ready(original) {
            Ok(data) => {
                let fits = data.len() <= limits.per_call && limits.reserve(data.len());
                let kind = RecordingKind::Ready {
                    data: fits.then(|| data.clone()),
                    limits,
                    exact,
                };
                return (ReplayBody::ready(data, exact), Captured(kind));
            }
            Err(original) => original,
        };
        Self::record(original, limits, exact)
    }

    /// [`capture`](Self::capture) with the recording built at once.
    #[cfg(test)]
    pub(crate) fn capture_with(
        original: B,
        limits: LimitsHandle,
        head: impl FnOnce() -> Head,
    ) -> (Self, Recording<B>) {
        let (body, captured) = Self::capture(original, limits);
        (body, Recording::new(head(), captured))
    }
}

impl<B> ReplayBody<B> {
    /// The first attempt's body, reading from `original`, and the call's
    /// recording.
    #[cfg(test)]
    pub(crate) fn first(original: B, limits: LimitsHandle, head: Head) -> (Self, Recording<B>)
    where
        B: Body,
    {
        let exact = original.size_hint().exact().is_some();
        let (body, captured) = Self::record(Prefixed::new(original), limits, exact);
        (body, Recording::new(head, captured))
    }

    fn record(original: Prefixed<B>, limits: LimitsHandle, exact: bool) -> (Self, Captured<B>) {
        let waiters = Arc::new(Waiters::default());
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                chunks: Chunks::default(),
                base: 0,
                buffered: 0,
                read: 0,
                end: End::Open,
                rest: Some(original),
                exact,
                reader: None,
                over: false,
                keep: Keep::All,
                latest: 1,
                first: Slot { pos: 0, live: true },
                more: Vec::new(),
                refused: 0,
                survivor: None,
            }),
            limits,
            fanout: Waker::from(waiters.clone()),
            waiters,
        });
        let body = ReplayBody::shared(SharedBody {
            inner: inner.clone(),
            attempt: 1,
            pos: 0,
            trailers_sent: false,
        });
        (body, Captured(RecordingKind::Shared(inner)))
    }
}

/// The original body behind the frames read from it before the first
/// attempt was sent (at most two: a data frame and what came next).
struct Prefixed<B> {
    read: [Option<Result<Frame<Bytes>, BoxError>>; 2],
    rest: B,
}

impl<B> Prefixed<B> {
    fn new(rest: B) -> Self {
        Prefixed {
            read: [None, None],
            rest,
        }
    }
}

impl<B> Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// The whole body, if it is one data frame (or none) ready now; else
    /// the body behind what was read. Polled with a waker that does
    /// nothing: a body not ready registers the attempt's waker when the
    /// attempt polls it.
    // The body is moved once per call; boxing it would cost an allocation.
    #[allow(clippy::result_large_err)]
    fn read_ready(mut body: B) -> Result<Bytes, Self> {
        if body.is_end_stream() {
            return Ok(Bytes::new());
        }
        let mut cx = Context::from_waker(Waker::noop());
        let data = match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Pending => return Err(Prefixed::new(body)),
            Poll::Ready(None) => return Ok(Bytes::new()),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    return Err(Prefixed {
                        read: [Some(Ok(frame)), None],
                        rest: body,
                    });
                }
            },
            Poll::Ready(Some(Err(err))) => {
                return Err(Prefixed {
                    read: [Some(Err(err.into())), None],
                    rest: body,
                });
            }
        };
        if body.is_end_stream() {
            return Ok(data);
        }
        // tonic's encoded unary body says it ended only when polled again.
        let next = match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Ok(data),
            Poll::Pending => None,
            Poll::Ready(Some(next)) => Some(next.map_err(Into::into)),
        };
        Err(Prefixed {
            read: [Some(Ok(Frame::data(data))), next],
            rest: body,
        })
    }
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.read.iter_mut().find_map(Option::take) {
            return Poll::Ready(Some(frame));
        }
        Pin::new(&mut this.rest)
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.read.iter().all(Option::is_none) && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .flatten()
            .filter_map(|frame| frame.as_ref().ok()?.data_ref())
            .map(|data| data.len() as u64)
            .sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(read));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}

/// An attempt's progress, borrowed apart from its shared state.
struct Progress<'a, B> {
    inner: &'a Inner<B>,
    attempt: u32,
    pos: &'a mut usize,
    trailers_sent: &'a mut bool,
}

impl<B> Drop for SharedBody<B> {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(slot) = state.slot_mut(self.attempt) {
            slot.live = false;
        }
        if state.keep == Keep::For(self.attempt) {
            state.clear(&self.inner.limits, ReplayUnavailable::CallEnded);
        }
        drop(state);
        self.inner.waiters.forget(self.attempt);
    }
}

impl<B> SharedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Polls the original once, taken out of the shared state (`state`,
    /// locked, is released meanwhile): `Some` with what to return, `None`
    /// to look again (a frame kind this layer does not know is skipped).
    #[allow(clippy::type_complexity)]
    fn poll_original(
        Progress {
            inner,
            attempt,
            pos,
            trailers_sent,
        }: Progress<'_, B>,
        mut state: MutexGuard<'_, State<B>>,
        mut original: Prefixed<B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Option<Result<Frame<Bytes>, BoxError>>>> {
        let limits = &inner.limits;
        state.reader = Some(attempt);
        if state.keep == Keep::For(attempt) {
            // Caught up and reading itself: nothing is needed.
            state.clear(limits, ReplayUnavailable::CallEnded);
        }
        // Registered before polling: a frame arriving meanwhile wakes this
        // attempt too, whoever polls the original next.
        inner.waiters.wait(attempt, cx.waker());
        drop(state);
        let mut fanout = Context::from_waker(&inner.fanout);
        let frame = Pin::new(&mut original).poll_frame(&mut fanout);
        let mut state = inner.lock();
        state.reader = None;
        let Poll::Ready(frame) = frame else {
            state.rest = Some(original);
            return Poll::Pending;
        };
        let mut ended = None;
        let out = match frame {
            None => {
                state.end = End::Done(None);
                ended = Some(original);
                None
            }
            Some(Err(err)) => {
                // A broken body cannot be replayed.
                state.end = End::Failed;
                state.clear(limits, ReplayUnavailable::BodyFailed);
                ended = Some(original);
                Some(Some(Err(err)))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    state.rest = Some(original);
                    state.read += 1;
                    *pos = state.read;
                    state.record(attempt, &data, limits);
                    state.sent(attempt, *pos, limits);
                    Some(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        state.end = End::Done(Some(trailers.clone()));
                        ended = Some(original);
                        *trailers_sent = true;
                        Some(Some(Ok(Frame::trailers(trailers))))
                    }
                    // A frame kind this layer does not know: skip it.
                    Err(_) => {
                        state.rest = Some(original);
                        None
                    }
                },
            },
        };
        drop(state);
        drop(ended);
        inner.waiters.forget(attempt);
        inner.waiters.wake_all();
        Poll::Ready(out)
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
        match &mut self.get_mut().kind {
            BodyKind::Ready(data, _) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyKind::Shared(body) => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Ready(data, _) => data.is_none(),
            BodyKind::Shared(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Ready(data, exact) => {
                size_hint(data.as_ref().map_or(0, |d| d.len() as u64), *exact)
            }
            BodyKind::Shared(body) => body.size_hint(),
        }
    }
}

impl<B> SharedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        loop {
            let limits = &this.inner.limits;
            let mut state = this.inner.lock();
            if this.pos < state.read {
                let Some(chunk) = state.chunk(this.pos).cloned() else {
                    let why = state.refuse(this.attempt);
                    return Poll::Ready(Some(Err(Box::new(why))));
                };
                this.pos += 1;
                state.sent(this.attempt, this.pos, limits);
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            // Everything read so far is sent.
            match &state.end {
                End::Done(trailers) => {
                    return Poll::Ready(match trailers {
                        Some(trailers) if !this.trailers_sent => {
                            this.trailers_sent = true;
                            Some(Ok(Frame::trailers(trailers.clone())))
                        }
                        _ => None,
                    });
                }
                End::Failed => {
                    let why = state.refuse(this.attempt);
                    return Poll::Ready(Some(Err(Box::new(why))));
                }
                End::Open => {}
            }
            if !state.may_read(this.attempt) {
                // The call went on with another attempt.
                let why = state.refuse(this.attempt);
                return Poll::Ready(Some(Err(Box::new(why))));
            }
            let Some(original) = state.rest.take() else {
                // Another attempt polls the original right now: wait for
                // its frame (or its Pending: the original's waker then
                // wakes this attempt too).
                this.inner.waiters.wait(this.attempt, cx.waker());
                return Poll::Pending;
            };
            let progress = Progress {
                inner: &this.inner,
                attempt: this.attempt,
                pos: &mut this.pos,
                trailers_sent: &mut this.trailers_sent,
            };
            match Self::poll_original(progress, state, original, cx) {
                Poll::Ready(Some(frame)) => return Poll::Ready(frame),
                Poll::Ready(None) => continue,
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // An attempt that has sent all that was read asks the original
        // whether more comes (so the last data frame can carry END_STREAM).
        let state = self.inner.lock();
        if self.pos < state.read {
            return false;
        }
        match &state.end {
            End::Done(trailers) => trailers.is_none() || self.trailers_sent,
            End::Failed => false,
            End::Open => state.rest.as_ref().is_some_and(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let state = self.inner.lock();
        match &state.end {
            End::Done(_) => {}
            End::Open if self.pos == state.read => {
                return state
                    .rest
                    .as_ref()
                    .map_or_else(SizeHint::default, Body::size_hint);
            }
            _ => return SizeHint::default(),
        }
        let mut left = 0u64;
        for i in self.pos..state.read {
            match state.chunk(i) {
                Some(chunk) => left += chunk.len() as u64,
                None => return SizeHint::default(),
            }
        }
        size_hint(left, state.exact)
    }
}

/// The size hint of a replay with `left` bytes to send: exact only if the
/// original body's was. A replay knows its size, but an exact hint makes
/// hyper add a `content-length` header the caller's body never had (a
/// tonic stub's body states no size): bytes on the wire and allocations
/// on both ends for every attempt, and a request that differs from the
/// one sent without this layer.
fn size_hint(left: u64, exact: bool) -> SizeHint {
    if exact {
        SizeHint::with_exact(left)
    } else {
        let mut hint = SizeHint::new();
        hint.set_lower(left);
        hint
    }
}

#[cfg(test)]
mod tests;

#[cfg(all(test, grpc_resilience_loom))]
mod loom_tests;
