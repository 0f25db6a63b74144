//! Where a call's retries get their service.
//!
//! A call that may be retried needs a service for its next attempts, but
//! most calls succeed at once. Cloning the inner service for every call
//! (as tower's `Retry` does) is not free over a tonic `Channel`: the clone
//! allocates, makes the next readiness check allocate again, and touches
//! counts the channel's clones share across cores. So the layer keeps one
//! prototype per wrapped service, and a call holds only a reference to its
//! thread's stripe of it (no allocation, a count no other core writes); a
//! clone is made from the prototype only when a retry or a hedge is due.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use grpc_resilience_core::{Stripe, Striped};

/// The prototype of a wrapped service, shared by the [`Retry`](crate::Retry)
/// service that wraps it and every clone of that service.
pub(crate) struct Prototype<S>(Arc<Striped<Mutex<S>>>);

impl<S: Clone> Prototype<S> {
    /// A prototype cloned from `service` as the layer wraps it.
    pub(crate) fn of(service: &S) -> Self {
        Prototype(Arc::new(Striped::new(Arc::new(Mutex::new(
            service.clone(),
        )))))
    }
}

impl<S> Prototype<S> {
    /// What one call keeps: its thread's handle.
    pub(crate) fn spare(&self) -> Spare<S> {
        Spare(self.0.handle().clone())
    }
}

impl<S> Clone for Prototype<S> {
    fn clone(&self) -> Self {
        Prototype(self.0.clone())
    }
}

impl<S> fmt::Debug for Prototype<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Prototype")
    }
}

/// A call's way to a service for its retries.
pub(crate) struct Spare<S>(Arc<Stripe<Mutex<S>>>);

impl<S: Clone> Spare<S> {
    /// A fresh clone of the prototype, not yet ready: the caller polls its
    /// readiness before each attempt. Every stripe reaches the one
    /// prototype behind one lock, held only while cloning, and only when a
    /// retry or a hedge is due.
    pub(crate) fn make(&self) -> S {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S> fmt::Debug for Spare<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Spare")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A service handle that counts its clones.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, Ordering::Relaxed);
            Counted(self.0.clone())
        }
    }

    #[test]
    fn a_call_clones_the_service_only_when_it_makes_one() {
        let clones = Arc::new(AtomicUsize::new(0));
        let prototype = Prototype::of(&Counted(clones.clone()));
        assert_eq!(clones.load(Ordering::Relaxed), 1, "the prototype");
        let spares: Vec<_> = (0..100).map(|_| prototype.spare()).collect();
        assert_eq!(
            clones.load(Ordering::Relaxed),
            1,
            "a call's spare clones nothing"
        );
        let made = spares[0].make();
        assert_eq!(clones.load(Ordering::Relaxed), 2);
        assert!(Arc::ptr_eq(&made.0, &clones), "a clone of the prototype");
    }
}
