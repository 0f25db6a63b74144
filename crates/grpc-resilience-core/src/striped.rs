//! Reference-counted handles striped by thread.
//!
//! Cloning an `Arc` writes its reference count. When calls on two cores
//! each clone (and later drop) one shared `Arc`, the cache line holding
//! that count moves from one core to the other on every call, which costs
//! more than the rest of the clone. [`Striped`] keeps one handle per
//! *stripe*, each with a count on its own cache line; a thread always
//! clones the handle of its own stripe, so two threads with different
//! stripes share no count.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many stripes a [`Striped`] value has.
pub const STRIPES: usize = 8;

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The calling thread's stripe, in `0..STRIPES`. Threads get the stripes in
/// turn as they first ask, so the first [`STRIPES`] threads to ask each
/// have their own.
#[inline]
pub fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE
        .try_with(|s| {
            let mut i = s.get();
            if i == usize::MAX {
                i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
                s.set(i);
            }
            i
        })
        // A thread being torn down: any stripe will do.
        .unwrap_or(0)
}

/// One handle of a [`Striped`] value: dereferences to the value.
///
/// Aligned so that two handles' reference counts (at the start of each
/// handle's allocation) never share a cache line.
#[repr(align(128))]
pub struct Stripe<T: ?Sized>(Arc<T>);

impl<T: ?Sized> Stripe<T> {
    /// The shared value behind every handle.
    pub fn shared(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T: ?Sized> Deref for Stripe<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Stripe<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A shared value with one reference-counted handle per thread stripe.
///
/// Keep a `Striped` where an `Arc` would be kept, and give each call a
/// clone of [`handle`](Striped::handle) where it would get a clone of the
/// `Arc`: the clone writes the calling thread's stripe's count only.
///
/// ```
/// use std::sync::Arc;
/// use grpc_resilience_core::striped::Striped;
///
/// let limits = Striped::new(Arc::new(String::from("shared")));
/// // A call's handle: a clone of this thread's stripe's `Arc`.
/// let handle = limits.handle().clone();
/// assert_eq!(&**handle, "shared");
/// // Every handle reaches the one value.
/// assert!(Arc::ptr_eq(handle.shared(), limits.shared()));
/// ```
pub struct Striped<T: ?Sized> {
    stripes: [Arc<Stripe<T>>; STRIPES],
}

impl<T: ?Sized> Striped<T> {
    /// Handles to `value`, one per stripe.
    pub fn new(value: Arc<T>) -> Self {
        Striped {
            stripes: std::array::from_fn(|_| Arc::new(Stripe(value.clone()))),
        }
    }

    /// The calling thread's handle; clone it to keep the value alive.
    #[inline]
    pub fn handle(&self) -> &Arc<Stripe<T>> {
        &self.stripes[stripe_index()]
    }

    /// The shared value behind every handle.
    pub fn shared(&self) -> &Arc<T> {
        &self.stripes[0].0
    }
}

impl<T: ?Sized> Deref for Striped<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.stripes[0].0
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Striped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.stripes[0].0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_keeps_its_stripe_and_threads_take_stripes_in_turn() {
        let mine = stripe_index();
        assert_eq!(stripe_index(), mine, "a thread keeps its stripe");
        let others: Vec<usize> = (0..STRIPES)
            .map(|_| std::thread::spawn(stripe_index).join().unwrap())
            .collect();
        assert!(others.iter().all(|&i| i < STRIPES));
        // Threads ask one after the other here, so they take the stripes
        // in turn (other tests' threads may take some in between): more
        // than one stripe is in use.
        let mut distinct = others.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 1, "{others:?}");
    }

    #[test]
    fn handles_are_on_separate_cache_lines_and_reach_one_value() {
        let striped = Striped::new(Arc::new(7u64));
        let addresses: Vec<usize> = striped
            .stripes
            .iter()
            .map(|s| Arc::as_ptr(s) as usize)
            .collect();
        for (i, a) in addresses.iter().enumerate() {
            assert_eq!(a % 128, 0);
            for b in &addresses[i + 1..] {
                assert!(a.abs_diff(*b) >= 128);
            }
        }
        let handle = striped.handle().clone();
        assert_eq!(**handle, 7);
        assert!(Arc::ptr_eq(handle.shared(), striped.shared()));
        // The eight handles hold the one value.
        assert_eq!(Arc::strong_count(striped.shared()), STRIPES);
        // The thread's handle: one more count on it, none on the others.
        let mine = stripe_index();
        for (i, s) in striped.stripes.iter().enumerate() {
            assert_eq!(Arc::strong_count(s), if i == mine { 2 } else { 1 });
        }
    }
}
