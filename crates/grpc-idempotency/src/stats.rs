//! Counters of what the layer did: as `metrics` counters (with service and
//! method labels) and as a snapshot a test or a status page can read.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a layer (and every service it made) did so far.
///
/// Read with [`IdempotencyLayer::stats`](crate::IdempotencyLayer::stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyStats {
    /// Repeats answered with a recorded response, without running the
    /// handler (`idempotency.hits`).
    pub hits: u64,
    /// Keyed calls that ran the handler (`idempotency.misses`).
    pub misses: u64,
    /// Keyed calls that found the key held by a running call
    /// (`idempotency.in_progress`), whether they then waited or were
    /// aborted.
    pub in_progress: u64,
    /// Keys reused with another request (`idempotency.conflicts`).
    pub conflicts: u64,
    /// Keys released so a retry can run: a retryable failure, a cancelled
    /// handler, a response too large to record (`idempotency.released`).
    pub released: u64,
    /// Store calls that failed or timed out (`idempotency.store_errors`).
    pub store_errors: u64,
    /// Calls that ran without deduplication because the store failed
    /// (`idempotency.unprotected`).
    pub unprotected: u64,
    /// Calls refused for their key: missing where one is required, or
    /// malformed (`idempotency.rejected`).
    pub rejected: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    in_progress: AtomicU64,
    conflicts: AtomicU64,
    released: AtomicU64,
    store_errors: AtomicU64,
    unprotected: AtomicU64,
    rejected: AtomicU64,
}

/// One event the layer counts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Hit,
    Miss,
    InProgress,
    Conflict,
    Released(&'static str),
    StoreError,
    Unprotected,
    Rejected(&'static str),
}

impl Counters {
    /// Counts `event` for the method at `path` (`/package.Service/Method`).
    pub(crate) fn count(&self, event: Event, service: &str, method: &str) {
        let (counter, name) = match event {
            Event::Hit => (&self.hits, "idempotency.hits"),
            Event::Miss => (&self.misses, "idempotency.misses"),
            Event::InProgress => (&self.in_progress, "idempotency.in_progress"),
            Event::Conflict => (&self.conflicts, "idempotency.conflicts"),
            Event::Released(reason) => {
                self.released.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("idempotency.released", "service" => service.to_owned(), "method" => method.to_owned(), "reason" => reason)
                    .increment(1);
                return;
            }
            Event::StoreError => (&self.store_errors, "idempotency.store_errors"),
            Event::Unprotected => (&self.unprotected, "idempotency.unprotected"),
            Event::Rejected(reason) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("idempotency.rejected", "service" => service.to_owned(), "method" => method.to_owned(), "reason" => reason)
                    .increment(1);
                return;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(name, "service" => service.to_owned(), "method" => method.to_owned())
            .increment(1);
    }

    pub(crate) fn snapshot(&self) -> IdempotencyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IdempotencyStats {
            hits: get(&self.hits),
            misses: get(&self.misses),
            in_progress: get(&self.in_progress),
            conflicts: get(&self.conflicts),
            released: get(&self.released),
            store_errors: get(&self.store_errors),
            unprotected: get(&self.unprotected),
            rejected: get(&self.rejected),
        }
    }
}
