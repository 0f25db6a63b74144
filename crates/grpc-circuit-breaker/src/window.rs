//! What a CLOSED breaker counts: failures in time buckets (count mode) or
//! the outcomes of the last calls in a ring (failure-rate mode).
//!
//! A set of counts belongs to one CLOSED period: when the breaker closes
//! again, or an operator resets it, it gets a fresh set instead of clearing
//! this one in place, so a result racing the reset lands in the old set
//! and cannot corrupt the new one.

use std::time::Duration;

use crate::config::BreakerConfig;
use crate::sync::{AtomicI32, AtomicU8, AtomicU64, Ordering};

/// Milliseconds in `d`, saturating at `u64::MAX` (a duration of centuries
/// is "never", not a wrapped-around few milliseconds).
pub(crate) fn saturating_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

const BUCKETS: usize = 16;
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Failures in CLOSED, in 16 time buckets covering `reset_timeout`.
#[derive(Debug)]
pub(crate) struct FailureWindow {
    // Each: epoch (40 bits) and count (24 bits).
    buckets: [AtomicU64; BUCKETS],
    bucket_ms: u64,
}

impl FailureWindow {
    fn new(reset_timeout: Duration) -> Self {
        FailureWindow {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            bucket_ms: (saturating_ms(reset_timeout) / BUCKETS as u64).max(1),
        }
    }

    fn epoch(&self, now_ms: u64) -> u64 {
        // 40 bits of epochs: 34 years of milliseconds.
        (now_ms / self.bucket_ms) & ((1 << (64 - COUNT_BITS)) - 1)
    }

    /// Adds a failure at `now_ms`; returns the failures within the window.
    pub(crate) fn add(&self, now_ms: u64) -> u32 {
        let epoch = self.epoch(now_ms);
        let slot = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let mut current = slot.load(Ordering::Acquire);
        loop {
            let (e, count) = (current >> COUNT_BITS, current & COUNT_MASK);
            let next = if e == epoch {
                (e << COUNT_BITS) | (count + 1).min(COUNT_MASK)
            } else {
                (epoch << COUNT_BITS) | 1
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.count_at_epoch(epoch)
    }

    /// The failures within the window at `now_ms`.
    pub(crate) fn count(&self, now_ms: u64) -> u32 {
        self.count_at_epoch(self.epoch(now_ms))
    }

    fn count_at_epoch(&self, epoch: u64) -> u32 {
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|w| {
                let e = w >> COUNT_BITS;
                e >= oldest && e <= epoch
            })
            .map(|w| (w & COUNT_MASK) as u32)
            .fold(0u32, u32::saturating_add)
    }
}

/// What the ring holds: calls, failures and slow calls among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingCounts {
    pub(crate) calls: u32,
    pub(crate) failures: u32,
    pub(crate) slow: u32,
}

/// The last `window` calls, for the failure-rate mode.
#[derive(Debug)]
pub(crate) struct Ring {
    // Bit 0: failure, bit 1: slow.
    slots: Box<[AtomicU8]>,
    cursor: AtomicU64,
    // Signed: two calls overwriting the same slot may apply their changes
    // in either order, so a counter can dip below zero for a moment; reads
    // clamp it. It never wraps into a huge count.
    failures: AtomicI32,
    slow: AtomicI32,
}

impl Ring {
    fn new(window: u32) -> Self {
        Ring {
            slots: (0..window).map(|_| AtomicU8::new(0)).collect(),
            cursor: AtomicU64::new(0),
            failures: AtomicI32::new(0),
            slow: AtomicI32::new(0),
        }
    }

    /// Records a call; returns what the window holds now.
    pub(crate) fn push(&self, failure: bool, slow: bool) -> RingCounts {
        let bits = u8::from(failure) | (u8::from(slow) << 1);
        let n = self.cursor.fetch_add(1, Ordering::AcqRel);
        let len = self.slots.len() as u64;
        let slot = &self.slots[(n % len) as usize];
        // A slot that already holds these bits (a success where a success
        // was, the usual case) is only read: two cores reading a cache line
        // can both keep it, while each write takes it from the other core.
        // Skipping a write of the value already there is the swap placed at
        // the moment of the read, so the counts stay those of the slots.
        let seen = slot.load(Ordering::Acquire);
        let old = if seen == bits {
            seen
        } else {
            slot.swap(bits, Ordering::AcqRel)
        };
        let adjust = |counter: &AtomicI32, was: bool, is: bool| match (was, is) {
            (false, true) => counter.fetch_add(1, Ordering::AcqRel).wrapping_add(1),
            (true, false) => counter.fetch_sub(1, Ordering::AcqRel).wrapping_sub(1),
            _ => counter.load(Ordering::Acquire),
        };
        let failures = adjust(&self.failures, old & 1 != 0, failure);
        let slow_calls = adjust(&self.slow, old & 2 != 0, slow);
        Self::clamp((n + 1).min(len) as u32, failures, slow_calls)
    }

    /// What the window holds.
    pub(crate) fn counts(&self) -> RingCounts {
        let n = self.cursor.load(Ordering::Acquire);
        let calls = n.min(self.slots.len() as u64) as u32;
        Self::clamp(
            calls,
            self.failures.load(Ordering::Acquire),
            self.slow.load(Ordering::Acquire),
        )
    }

    fn clamp(calls: u32, failures: i32, slow: i32) -> RingCounts {
        let clamp = |v: i32| u32::try_from(v).unwrap_or(0).min(calls);
        RingCounts {
            calls,
            failures: clamp(failures),
            slow: clamp(slow),
        }
    }
}

/// The counts of one CLOSED period.
#[derive(Debug)]
pub(crate) enum Counts {
    /// Count mode.
    Failures(FailureWindow),
    /// Failure-rate mode.
    Rate(Ring),
}

impl Counts {
    pub(crate) fn new(config: &BreakerConfig) -> Self {
        match &config.failure_rate {
            Some(rate) => Counts::Rate(Ring::new(rate.window)),
            None => Counts::Failures(FailureWindow::new(config.reset_timeout)),
        }
    }

    /// Whether counts made for `a` can go on counting for `b` (same mode,
    /// same window).
    pub(crate) fn same_shape(a: &BreakerConfig, b: &BreakerConfig) -> bool {
        match (&a.failure_rate, &b.failure_rate) {
            (Some(x), Some(y)) => x.window == y.window,
            (None, None) => a.reset_timeout == b.reset_timeout,
            _ => false,
        }
    }
}

#[cfg(all(test, grpc_resilience_loom))]
mod loom_tests {
    //! `RUSTFLAGS="--cfg grpc_resilience_loom" cargo test --release -p grpc-circuit-breaker --lib loom`

    use loom::sync::Arc;
    use loom::thread;

    use super::*;

    /// Two calls land on the one slot of a one-call window: one writes
    /// the bits the slot holds (and so only reads it, if it comes first),
    /// the other changes them; and a write that differs from the slot in
    /// one bit only. In every order the counts end equal to the slot's.
    #[test]
    fn loom_ring_counts_match_the_slots_when_pushes_race() {
        // (the slot before, the other thread's call, this thread's call),
        // each as (failure, slow).
        let cases = [
            ((true, false), (true, false), (false, false)),
            ((true, true), (true, true), (false, true)),
            ((true, false), (true, true), (false, false)),
        ];
        for (before, first, second) in cases {
            loom::model(move || {
                let ring = Arc::new(Ring::new(1));
                ring.push(before.0, before.1);
                let other = ring.clone();
                let t = thread::spawn(move || {
                    other.push(first.0, first.1);
                });
                ring.push(second.0, second.1);
                t.join().unwrap();
                let bits = ring.slots[0].load(Ordering::Acquire);
                let counts = ring.counts();
                assert_eq!(counts.calls, 1);
                assert_eq!(counts.failures, u32::from(bits & 1 != 0));
                assert_eq!(counts.slow, u32::from(bits & 2 != 0));
                assert_eq!(
                    ring.failures.load(Ordering::Acquire),
                    i32::from(bits & 1 != 0)
                );
                assert_eq!(ring.slow.load(Ordering::Acquire), i32::from(bits & 2 != 0));
            });
        }
    }
}
