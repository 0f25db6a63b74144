//! One partition: an atomic in-flight counter against a limit, and a wait
//! queue used only when the limit is reached.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::sync::oneshot;

use crate::config::BulkheadConfig;
use crate::limit::{LimitState, Sample};

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

/// A concurrency partition.
pub(crate) struct Partition {
    name: Arc<str>,
    in_flight: AtomicU32,
    limit: AtomicU32,
    // Senders in `waiters`, live or abandoned; non-zero means a release
    // must look at the queue.
    queued: AtomicUsize,
    waiters: Mutex<VecDeque<oneshot::Sender<()>>>,
    config: BulkheadConfig,
    adaptive: Option<Mutex<LimitState>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("name", &self.name)
            .field("in_flight", &self.in_flight.load(SeqCst))
            .field("limit", &self.limit.load(SeqCst))
            .field("queued", &self.queued.load(SeqCst))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            in_flight: AtomicU32::new(0),
            limit: AtomicU32::new(limit),
            queued: AtomicUsize::new(0),
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

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    pub(crate) fn limit(&self) -> u32 {
        self.limit.load(SeqCst)
    }

    pub(crate) fn queued(&self) -> usize {
        let waiters = lock(&self.waiters);
        waiters.iter().filter(|tx| !tx.is_closed()).count()
    }

    /// Takes a slot if one is free: one compare-exchange, no lock.
    /// Returns the calls in flight, this one included.
    #[inline]
    fn try_acquire(&self) -> Option<u32> {
        let limit = self.limit.load(SeqCst);
        let mut current = self.in_flight.load(SeqCst);
        loop {
            if current >= limit {
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(current, current + 1, SeqCst, SeqCst)
            {
                Ok(_) => return Some(current + 1),
                Err(now) => current = now,
            }
        }
    }

    /// The fast path: a slot if one is free and nobody is queued for one.
    #[inline]
    pub(crate) fn acquire(&self) -> Option<u32> {
        if self.queued.load(SeqCst) != 0 {
            return None;
        }
        self.try_acquire()
    }

    /// The slow path, for a call the fast path turned away.
    #[cold]
    pub(crate) fn enqueue(&self) -> Enqueued {
        let max = self.config.max_queue() as usize;
        let mut waiters = lock(&self.waiters);
        if waiters.is_empty()
            && let Some(n) = self.try_acquire()
        {
            return Enqueued::Acquired(n);
        }
        if waiters.len() >= max {
            waiters.retain(|tx| !tx.is_closed());
        }
        if waiters.len() >= max {
            self.queued.store(waiters.len(), SeqCst);
            return Enqueued::Full;
        }
        let (tx, rx) = oneshot::channel();
        waiters.push_back(tx);
        // Announce the waiter before looking at the counter again: a
        // release that decremented it before seeing the announcement is
        // caught here, one that sees it hands its slot on.
        self.queued.store(waiters.len(), SeqCst);
        self.hand_off(&mut waiters);
        Enqueued::Waiting(rx)
    }

    /// Gives free slots to the oldest waiters.
    fn hand_off(&self, waiters: &mut VecDeque<oneshot::Sender<()>>) {
        while !waiters.is_empty() {
            if self.try_acquire().is_none() {
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
                self.in_flight.fetch_sub(1, SeqCst);
            }
        }
        self.queued.store(waiters.len(), SeqCst);
    }

    /// Frees a slot, handing it to a waiter if there is one.
    #[inline]
    pub(crate) fn release(&self) {
        self.in_flight.fetch_sub(1, SeqCst);
        if self.queued.load(SeqCst) != 0 {
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
            if limit > previous && self.queued.load(SeqCst) != 0 {
                self.wake();
            }
        }
    }
}

#[cfg(test)]
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
