//! One partition: an atomic in-flight counter against a limit, and a wait
//! queue used only when the limit is reached.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::config::BulkheadConfig;
use crate::limit::{LimitState, Sample};
use crate::sync::{AtomicU32, AtomicU64, Mutex, SeqCst, lock, oneshot};

/// Why a call was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The limit was reached and the wait queue was full (or there is
    /// none).
    QueueFull,
    /// The call waited `max_wait` in the queue without getting a slot.
    WaitTimedOut,
    /// The call's deadline came before a slot did (or had passed when it
    /// found the partition full): it is refused with `DEADLINE_EXCEEDED`.
    Deadline,
}

impl Rejection {
    /// `queue_full`, `max_wait` or `deadline`, as in the metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rejection::QueueFull => "queue_full",
            Rejection::WaitTimedOut => "max_wait",
            Rejection::Deadline => "deadline",
        }
    }
}

struct Metrics {
    in_flight: Gauge,
    limit: Gauge,
    queue_full: Counter,
    timed_out: Counter,
    deadline: Counter,
    wait: Histogram,
}

impl Metrics {
    fn new(name: &Arc<str>) -> Self {
        let label = || name.to_string();
        Metrics {
            in_flight: metrics::gauge!("bulkhead.in_flight", "partition" => label()),
            limit: metrics::gauge!("bulkhead.limit", "partition" => label()),
            queue_full: metrics::counter!("bulkhead.rejected.count", "partition" => label(), "reason" => "queue_full"),
            timed_out: metrics::counter!("bulkhead.rejected.count", "partition" => label(), "reason" => "max_wait"),
            deadline: metrics::counter!("bulkhead.rejected.count", "partition" => label(), "reason" => "deadline"),
            wait: metrics::histogram!("bulkhead.wait.duration", "partition" => label()),
        }
    }
}

/// What happened to a call that found the partition at its limit.
pub(crate) enum Enqueued {
    /// A slot came free meanwhile; the call holds it.
    Acquired(u32),
    /// The call waits for a slot on this receiver.
    Waiting(oneshot::Receiver<()>),
    /// Rejected: no room in the queue.
    Full,
}

/// The calls in flight and the waiters queued, in one word, so that a
/// release learns in the same atomic step that freed its slot whether
/// anyone is waiting for one: no store-then-load between two atomics
/// (the pattern a model checker cannot follow, and one where a wake-up
/// can be lost to a weaker ordering).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts(u64);

impl Counts {
    /// One call in flight.
    const CALL: u64 = 1;
    const QUEUED_SHIFT: u32 = 32;

    fn in_flight(self) -> u32 {
        self.0 as u32
    }

    /// Senders in the queue, live or abandoned; non-zero means a release
    /// must look at the queue.
    fn queued(self) -> u32 {
        (self.0 >> Self::QUEUED_SHIFT) as u32
    }

    fn with_queued(self, queued: u32) -> Counts {
        Counts((u64::from(queued) << Self::QUEUED_SHIFT) | u64::from(self.in_flight()))
    }
}

/// A concurrency partition.
pub(crate) struct Partition {
    name: Arc<str>,
    // `Counts`: calls in flight (low half) and waiters queued (high half).
    counts: AtomicU64,
    limit: AtomicU32,
    waiters: Mutex<VecDeque<oneshot::Sender<()>>>,
    config: BulkheadConfig,
    adaptive: Option<Mutex<LimitState>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("name", &self.name)
            .field("in_flight", &self.counts().in_flight())
            .field("limit", &self.limit.load(SeqCst))
            .field("queued", &self.counts().queued())
            .finish_non_exhaustive()
    }
}

impl Partition {
    pub(crate) fn new(name: &str, config: BulkheadConfig) -> Self {
        let name: Arc<str> = name.into();
        let limit = config.limit().initial();
        let adaptive = config
            .limit()
            .is_adaptive()
            .then(|| Mutex::new(config.limit().state()));
        let metrics = Metrics::new(&name);
        metrics.limit.set(f64::from(limit));
        Partition {
            name,
            counts: AtomicU64::new(0),
            limit: AtomicU32::new(limit),
            waiters: Mutex::new(VecDeque::new()),
            config,
            adaptive,
            metrics,
        }
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn config(&self) -> &BulkheadConfig {
        &self.config
    }

    pub(crate) fn is_adaptive(&self) -> bool {
        self.adaptive.is_some()
    }

    fn counts(&self) -> Counts {
        Counts(self.counts.load(SeqCst))
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.counts().in_flight()
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(SeqCst)
    }

    pub(crate) fn queued(&self) -> usize {
        let waiters = lock(&self.waiters);
        waiters.iter().filter(|tx| !tx.is_closed()).count()
    }

    /// Takes a slot if one is free (and, unless `past_queue`, nobody is
    /// queued for one): one compare-exchange, no lock. Returns the calls
    /// in flight, this one included.
    #[inline]
    fn try_acquire(&self, past_queue: bool) -> Option<u32> {
        let limit = self.limit.load(SeqCst);
        let mut current = self.counts();
        loop {
            if current.in_flight() >= limit || (!past_queue && current.queued() != 0) {
                return None;
            }
            match self.counts.compare_exchange_weak(
                current.0,
                current.0 + Counts::CALL,
                SeqCst,
                SeqCst,
            ) {
                Ok(_) => return Some(current.in_flight() + 1),
                Err(now) => current = Counts(now),
            }
        }
    }

    /// The fast path: a slot if one is free and nobody is queued for one.
    #[inline]
    pub(crate) fn acquire(&self) -> Option<u32> {
        self.try_acquire(false)
    }

    /// Records how many senders the queue holds (under its lock).
    fn set_queued(&self, queued: usize) {
        let queued = u32::try_from(queued).unwrap_or(u32::MAX);
        let mut current = self.counts();
        while let Err(now) = self.counts.compare_exchange_weak(
            current.0,
            current.with_queued(queued).0,
            SeqCst,
            SeqCst,
        ) {
            current = Counts(now);
        }
    }

    /// The slow path, for a call the fast path turned away.
    #[cold]
    pub(crate) fn enqueue(&self) -> Enqueued {
        let max = self.config.max_queue() as usize;
        let mut waiters = lock(&self.waiters);
        if waiters.is_empty()
            && let Some(n) = self.try_acquire(true)
        {
            return Enqueued::Acquired(n);
        }
        if waiters.len() >= max {
            waiters.retain(|tx| !tx.is_closed());
        }
        if waiters.len() >= max {
            self.set_queued(waiters.len());
            return Enqueued::Full;
        }
        let (tx, rx) = oneshot::channel();
        waiters.push_back(tx);
        // Announce the waiter, then look for a free slot: a release whose
        // decrement came before the announcement left its slot free for
        // the hand-off below, and one that comes after it sees the waiter
        // (both change the one word, so one of the two is first).
        self.set_queued(waiters.len());
        self.hand_off(&mut waiters);
        Enqueued::Waiting(rx)
    }

    /// Gives free slots to the oldest waiters.
    fn hand_off(&self, waiters: &mut VecDeque<oneshot::Sender<()>>) {
        while !waiters.is_empty() {
            if self.try_acquire(true).is_none() {
                break;
            }
            let mut granted = false;
            while let Some(tx) = waiters.pop_front() {
                if tx.send(()).is_ok() {
                    granted = true;
                    break;
                }
            }
            if !granted {
                // Everyone had left: give the slot back.
                self.counts.fetch_sub(Counts::CALL, SeqCst);
            }
        }
        self.set_queued(waiters.len());
    }

    /// Frees a slot, handing it to a waiter if there is one.
    #[inline]
    pub(crate) fn release(&self) {
        let before = Counts(self.counts.fetch_sub(Counts::CALL, SeqCst));
        // Every release follows one admission (permits and tickets release
        // once): a second one would borrow from the queued half.
        debug_assert!(before.in_flight() != 0, "a slot released twice");
        if before.queued() != 0 {
            self.wake();
        }
    }

    #[cold]
    fn wake(&self) {
        let mut waiters = lock(&self.waiters);
        self.hand_off(&mut waiters);
    }

    /// Counts a call admitted to a slot.
    #[inline]
    pub(crate) fn on_admitted(&self) {
        self.metrics.in_flight.increment(1.0);
    }

    /// Frees an admitted call's slot.
    #[inline]
    pub(crate) fn on_finished(&self) {
        self.metrics.in_flight.decrement(1.0);
        self.release();
    }

    pub(crate) fn on_rejected(&self, why: Rejection) {
        match why {
            Rejection::QueueFull => self.metrics.queue_full.increment(1),
            Rejection::WaitTimedOut => self.metrics.timed_out.increment(1),
            Rejection::Deadline => self.metrics.deadline.increment(1),
        }
    }

    pub(crate) fn on_waited(&self, waited: Duration) {
        self.metrics.wait.record(waited.as_secs_f64());
    }

    /// Feeds an adaptive limit one sample.
    pub(crate) fn on_sample(&self, sample: Sample) {
        let Some(state) = &self.adaptive else {
            return;
        };
        let Some(limit) = lock(state).update(sample) else {
            return;
        };
        let previous = self.limit.swap(limit, SeqCst);
        if previous != limit {
            self.metrics.limit.set(f64::from(limit));
            if limit > previous {
                // Under the queue's lock, which every waiter takes to
                // queue: one queued before sees the new room here, one
                // queued after sees the new limit itself.
                self.wake();
            }
        }
    }
}

#[cfg(all(test, grpc_resilience_loom))]
mod loom_tests;

#[cfg(all(test, not(grpc_resilience_loom)))]
mod tests {
    use super::*;

    fn partition(limit: u32, queue: u32) -> Partition {
        let config = BulkheadConfig::builder()
            .max_concurrent(limit)
            .max_queue(queue)
            .max_wait(Duration::from_secs(1))
            .build()
            .unwrap();
        Partition::new("p", config)
    }

    #[test]
    fn fast_path_counts_up_to_the_limit() {
        let p = partition(2, 0);
        assert_eq!(p.acquire(), Some(1));
        assert_eq!(p.acquire(), Some(2));
        assert_eq!(p.acquire(), None);
        assert!(matches!(p.enqueue(), Enqueued::Full));
        p.release();
        assert_eq!(p.acquire(), Some(2));
    }

    #[test]
    fn a_release_hands_the_slot_to_the_oldest_live_waiter() {
        let p = partition(1, 3);
        assert_eq!(p.acquire(), Some(1));
        let Enqueued::Waiting(mut first) = p.enqueue() else {
            panic!("should queue")
        };
        let Enqueued::Waiting(mut second) = p.enqueue() else {
            panic!("should queue")
        };
        // With waiters queued, a newcomer does not barge past them.
        assert_eq!(p.acquire(), None);
        first.close();
        p.release();
        assert!(first.try_recv().is_err());
        assert_eq!(second.try_recv(), Ok(()));
        assert_eq!(p.in_flight(), 1, "the slot passed on, not freed");
        p.release();
        assert_eq!((p.in_flight(), p.queued()), (0, 0));
        assert_eq!(p.acquire(), Some(1));
    }

    #[test]
    fn abandoned_waiters_free_their_queue_places() {
        let p = partition(1, 1);
        p.acquire().unwrap();
        let Enqueued::Waiting(rx) = p.enqueue() else {
            panic!("should queue")
        };
        assert!(matches!(p.enqueue(), Enqueued::Full));
        drop(rx);
        assert!(matches!(p.enqueue(), Enqueued::Waiting(_)));
    }
}
