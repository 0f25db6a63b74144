//! Model tests of the replay state machine under loom: every interleaving
//! (up to the preemption bound) of the attempt reading the original, the
//! replaying attempts and the call's end. Run with
//! `RUSTFLAGS="--cfg grpc_resilience_loom" cargo test -p grpc-retry --release --lib loom`
//! (in its own target directory).
//!
//! Each model checks that a replay sends the whole body or fails with a
//! typed [`ReplayUnavailable`] (never a shorter or different body), that a
//! waiting replay is always woken (loom reports a lost wakeup as a
//! deadlock), and that every byte held is given back to the layer.

use std::collections::VecDeque;
use std::future::poll_fn;

use loom::thread;

use super::*;

/// An original body that always has its next frame ready.
struct Script(VecDeque<Result<Frame<Bytes>, std::io::Error>>);

impl Body for Script {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front())
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

const BODY: &[u8] = b"abcdef";

/// `ab`, `cd`, `ef`, then the end.
fn script() -> Script {
    Script(
        [b"ab", b"cd", b"ef"]
            .into_iter()
            .map(|d| Ok(Frame::data(Bytes::from_static(d))))
            .collect(),
    )
}

/// `ab`, then a failure.
fn failing_script() -> Script {
    Script(
        [
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("client went away")),
        ]
        .into(),
    )
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    End,
    Refused(ReplayUnavailable),
    Failed,
}

fn next<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
    loom::future::block_on(poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)))
}

/// Reads up to `frames` data frames (all, with `usize::MAX`): the data and,
/// if it stopped, how.
fn read(body: &mut ReplayBody<Script>, frames: usize) -> (Vec<u8>, Option<Outcome>) {
    let mut data = Vec::new();
    for _ in 0..frames {
        match next(body) {
            None => return (data, Some(Outcome::End)),
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    data.extend_from_slice(&d);
                }
            }
            Some(Err(err)) => {
                let outcome = match err.downcast_ref::<ReplayUnavailable>() {
                    Some(why) => Outcome::Refused(*why),
                    None => Outcome::Failed,
                };
                return (data, Some(outcome));
            }
        }
    }
    (data, None)
}

fn drain(body: &mut ReplayBody<Script>) -> (Vec<u8>, Outcome) {
    let (data, outcome) = read(body, usize::MAX);
    (data, outcome.expect("read to its end"))
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(4);
    }
    builder.check(f);
}

/// A call whose first attempt has sent its first frame (`ab`).
fn started(
    original: Script,
    per_call: usize,
) -> (LimitsHandle, ReplayBody<Script>, Recording<Script>) {
    let limits = Limits::handle(per_call, 1024);
    let (mut first, recording) = ReplayBody::first(original, limits.clone(), Head::empty());
    assert_eq!(read(&mut first, 1).0, b"ab");
    (limits, first, recording)
}

/// A replay's whole output: the whole body, or a prefix and a refusal for
/// `allowed` reasons.
fn assert_never_a_different_body(
    (data, outcome): (Vec<u8>, Outcome),
    full: &[u8],
    allowed: &[ReplayUnavailable],
) {
    match outcome {
        Outcome::End => assert_eq!(data, full, "a replay that ends sent the whole body"),
        Outcome::Refused(why) => {
            assert!(allowed.contains(&why), "refused for {why:?}");
            assert!(full.starts_with(&data), "only a prefix before failing");
        }
        Outcome::Failed => panic!("a replay fails with a typed ReplayUnavailable"),
    }
}

#[test]
fn loom_replay_waits_while_the_original_is_read_to_its_end() {
    model(|| {
        let (limits, mut first, recording) = started(script(), 1024);
        let mut replay = recording.replay().unwrap();
        // The first attempt's server reads on after its answer: the body
        // is read to its end, and only dropped after the replay is done
        // (so no drop can hide a lost wakeup).
        let reader = thread::spawn(move || {
            assert_eq!(drain(&mut first), (b"cdef".to_vec(), Outcome::End));
            first
        });
        assert_eq!(drain(&mut replay), (BODY.to_vec(), Outcome::End));
        drop(reader.join().unwrap());
        drop((replay, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_replay_waits_while_the_original_is_handed_back() {
    model(|| {
        let (limits, first, recording) = started(script(), 1024);
        let mut replay = recording.replay().unwrap();
        let reset = thread::spawn(move || drop(first));
        assert_eq!(drain(&mut replay), (BODY.to_vec(), Outcome::End));
        reset.join().unwrap();
        drop((replay, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_replay_waits_while_the_original_fails() {
    model(|| {
        let (limits, mut first, recording) = started(failing_script(), 1024);
        let mut replay = recording.replay().unwrap();
        let reader = thread::spawn(move || {
            let (data, outcome) = drain(&mut first);
            assert!(data.is_empty());
            (first, outcome)
        });
        let (data, outcome) = drain(&mut replay);
        assert!(b"ab".starts_with(&data));
        let (first, first_outcome) = reader.join().unwrap();
        // Whichever attempt read the failure gets the original's error;
        // the other one fails with a typed refusal.
        let mut outcomes = [outcome, first_outcome];
        outcomes.sort_by_key(|o| matches!(o, Outcome::Refused(_)));
        assert_eq!(
            outcomes,
            [
                Outcome::Failed,
                Outcome::Refused(ReplayUnavailable::BodyFailed)
            ]
        );
        drop(first);
        assert!(!recording.replayable());
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_replay_waits_while_the_original_crosses_the_cap() {
    model(|| {
        // 4 bytes per call: `ef` crosses the cap while the replay runs.
        let (limits, mut first, recording) = started(script(), 4);
        let mut replay = recording.replay().unwrap();
        let reader = thread::spawn(move || {
            // The replay may have read (and sent) what crossed the cap:
            // this attempt then fails rather than skip it.
            let (data, outcome) = read(&mut first, 2);
            assert_never_a_different_body(
                (data, outcome.unwrap_or(Outcome::End)),
                b"cdef",
                &[ReplayUnavailable::BufferLimitExceeded],
            );
            // Reset after its answer.
            drop(first);
        });
        assert_never_a_different_body(
            drain(&mut replay),
            BODY,
            &[ReplayUnavailable::BufferLimitExceeded],
        );
        reader.join().unwrap();
        assert!(!recording.replayable());
        drop((replay, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_replay_waits_while_the_original_is_read_past_the_cap_to_its_end() {
    model(|| {
        let (limits, mut first, recording) = started(script(), 4);
        let mut replay = recording.replay().unwrap();
        let reader = thread::spawn(move || {
            assert_never_a_different_body(
                drain(&mut first),
                b"cdef",
                &[ReplayUnavailable::BufferLimitExceeded],
            );
            first
        });
        assert_never_a_different_body(
            drain(&mut replay),
            BODY,
            &[ReplayUnavailable::BufferLimitExceeded],
        );
        drop(reader.join().unwrap());
        drop((replay, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_two_replays_in_sequence() {
    model(|| {
        let (limits, first, recording) = started(script(), 1024);
        let mut second = recording.replay().unwrap();
        let reset = thread::spawn(move || drop(first));
        // The second attempt sends two frames (it may take the original
        // over), then its stream is reset too.
        let retry = thread::spawn(move || {
            assert_eq!(read(&mut second, 2), (b"abcd".to_vec(), None));
        });
        retry.join().unwrap();
        let mut third = recording.replay().unwrap();
        assert_eq!(drain(&mut third), (BODY.to_vec(), Outcome::End));
        reset.join().unwrap();
        assert!(recording.replayable());
        drop((third, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_the_call_ending_while_a_replay_lags_keeps_what_it_needs() {
    model(|| {
        let (limits, mut first, recording) = started(script(), 1024);
        let mut replay = recording.replay().unwrap();
        let reader = thread::spawn(move || {
            // Once the call is over, only the replay reads the original:
            // this attempt may fail then, never send a shorter body.
            assert_never_a_different_body(
                drain(&mut first),
                b"cdef",
                &[ReplayUnavailable::CallEnded],
            );
            first
        });
        // The call commits on the replay (its response headers came) while
        // it lags behind the reader: it still sends the whole body.
        let call = thread::spawn(move || drop(recording));
        assert_eq!(drain(&mut replay), (BODY.to_vec(), Outcome::End));
        drop(reader.join().unwrap());
        call.join().unwrap();
        drop(replay);
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_the_call_dropped_at_any_point_gives_every_byte_back() {
    model(|| {
        let (limits, mut first, recording) = started(script(), 1024);
        let mut replay = recording.replay().unwrap();
        let reader = thread::spawn(move || {
            let (data, outcome) = read(&mut first, 1);
            assert!(
                (data == b"cd" && outcome.is_none())
                    || (data.is_empty()
                        && outcome == Some(Outcome::Refused(ReplayUnavailable::CallEnded))),
                "{data:?} {outcome:?}"
            );
            drop(first);
        });
        // The replaying attempt sends a frame and is reset, while the call
        // is dropped.
        let retry = thread::spawn(move || {
            let (data, outcome) = read(&mut replay, 1);
            assert!(outcome.is_none() && data == b"ab", "{data:?} {outcome:?}");
        });
        drop(recording);
        reader.join().unwrap();
        retry.join().unwrap();
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_two_concurrent_replays_each_send_the_whole_body() {
    model(|| {
        // Hedging: two replays read the one recording at the same time,
        // each at its own position; the first attempt was reset, so one of
        // them takes the original over while the other waits for it.
        let (limits, first, recording) = started(script(), 1024);
        drop(first);
        let mut a = recording.replay().unwrap();
        let mut b = recording.replay().unwrap();
        let hedge = thread::spawn(move || {
            assert_eq!(drain(&mut a), (BODY.to_vec(), Outcome::End));
            a
        });
        assert_eq!(drain(&mut b), (BODY.to_vec(), Outcome::End));
        drop(hedge.join().unwrap());
        assert!(recording.replayable());
        drop((b, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

#[test]
fn loom_a_hedge_committed_while_another_reads_still_sends_the_whole_body() {
    model(|| {
        let (limits, first, recording) = started(script(), 1024);
        drop(first);
        // The call commits to the older hedge (attempt 2), not the newest.
        let mut winner = recording.replay().unwrap();
        let mut loser = recording.replay().unwrap();
        // The loser may take the original over; it is cancelled after a
        // frame, while the call commits to the winner.
        let cancelled = thread::spawn(move || {
            let (data, outcome) = read(&mut loser, 2);
            assert!(
                outcome
                    .as_ref()
                    .is_none_or(|o| *o == Outcome::Refused(ReplayUnavailable::CallEnded)),
                "{outcome:?}"
            );
            assert!(BODY.starts_with(&data), "never a different body");
            drop(loser);
        });
        let commit = thread::spawn(move || {
            recording.commit_to(2);
            drop(recording);
        });
        assert_eq!(drain(&mut winner), (BODY.to_vec(), Outcome::End));
        cancelled.join().unwrap();
        commit.join().unwrap();
        drop(winner);
        assert_eq!(limits.in_use(), 0);
    });
}

/// An original body fed by another thread: `Pending` until a frame comes.
#[derive(Clone, Default)]
struct Feed(Arc<Mutex<FeedState>>);

#[derive(Default)]
struct FeedState {
    frames: VecDeque<Bytes>,
    closed: bool,
    waker: Option<Waker>,
}

impl Feed {
    fn push(&self, data: &'static [u8]) {
        let mut state = lock(&self.0);
        state.frames.push_back(Bytes::from_static(data));
        let waker = state.waker.take();
        drop(state);
        waker.map(Waker::wake);
    }

    fn close(&self) {
        let mut state = lock(&self.0);
        state.closed = true;
        let waker = state.waker.take();
        drop(state);
        waker.map(Waker::wake);
    }
}

impl Body for Feed {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let mut state = lock(&self.0);
        match state.frames.pop_front() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if state.closed => Poll::Ready(None),
            None => {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[test]
fn loom_a_replay_reads_on_while_an_older_attempt_neither_polls_nor_drops() {
    model(|| {
        // The first attempt's connection stopped polling its body (a full
        // send window) after it had polled the original once more; it is
        // not dropped. The retry must read the original itself and be
        // woken by its frames.
        let limits = Limits::handle(1024, 1024);
        let feed = Feed::default();
        feed.push(b"ab");
        let (mut first, recording) = ReplayBody::first(feed.clone(), limits.clone(), Head::empty());
        let frame = next(&mut first).unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"ab"));
        let parked = loom::future::block_on(async {
            let mut once = false;
            poll_fn(|cx| {
                if once {
                    return Poll::Ready(());
                }
                once = true;
                assert!(Pin::new(&mut first).poll_frame(cx).is_pending());
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await;
        });
        let () = parked;
        let mut second = recording.replay().unwrap();
        let producer = thread::spawn(move || {
            feed.push(b"cd");
            feed.push(b"ef");
            feed.close();
        });
        let mut data = Vec::new();
        loop {
            match next(&mut second) {
                None => break,
                Some(frame) => data.extend_from_slice(&frame.unwrap().into_data().unwrap()),
            }
        }
        assert_eq!(data, BODY);
        producer.join().unwrap();
        drop((first, second, recording));
        assert_eq!(limits.in_use(), 0);
    });
}

/// Two calls on two stripes reserve at once while one stripe holds credit:
/// the bytes held never pass the total, a refusal can take the credit back,
/// and once both are done nothing is counted as held.
#[test]
fn loom_stripe_credit_keeps_the_bytes_held_within_the_total() {
    loom::model(|| {
        // A total of 512: credit comes 2 bytes at a time.
        let limits = loom::sync::Arc::new(Limits::new(usize::MAX, 512));
        limits.reserve_in(0, 10);
        limits.release_in(0, 10);
        // What the calls hold, counted apart from the limits.
        let held = loom::sync::Arc::new(AtomicUsize::new(0));
        let hold = |limits: &Limits, held: &AtomicUsize, stripe: usize, n: usize| {
            if limits.reserve_in(stripe, n) {
                let now = held.fetch_add(n, Ordering::AcqRel) + n;
                assert!(now <= 512, "{now} bytes held");
                held.fetch_sub(n, Ordering::AcqRel);
                limits.release_in(stripe, n);
                true
            } else {
                false
            }
        };
        let (l, h) = (limits.clone(), held.clone());
        let other = thread::spawn(move || hold(&l, &h, 0, 300));
        let mine = hold(&limits, &held, 1, 511);
        let theirs = other.join().unwrap();
        assert!(mine || theirs, "one of them fits alone");
        assert_eq!(limits.in_use(), 0);
    });
}
