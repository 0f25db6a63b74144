//! What a call through one wrapped service keeps: the layer's shared
//! state and where its retries get their service, behind one handle.
//!
//! A call that may be retried needs a service for its next attempts, but
//! most calls succeed at once. Cloning the inner service for every call
//! (as tower's `Retry` does) is not free over a tonic `Channel`: the clone
//! allocates, makes the next readiness check allocate again, and touches
//! counts the channel's clones share across cores. So each wrapped service
//! has one prototype, cloned only when a retry or a hedge is due.
//!
//! The prototype sits beside the layer's shared state (policies,
//! throttle, budget, replay limits) in one [`Striped`] value: a call
//! clones one handle, its thread's stripe, and no count another core
//! writes.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use grpc_resilience_core::{Stripe, Striped};

use crate::Shared;

/// The layer's shared state and the prototype of one wrapped service.
pub(crate) struct PerService<S> {
    shared: Arc<Shared>,
    prototype: Mutex<S>,
}

/// A call's handle: its thread's stripe of a [`PerService`].
pub(crate) type Handle<S> = Arc<Stripe<PerService<S>>>;

impl<S: Clone> PerService<S> {
    /// The layer's `shared` state, and a prototype cloned from `service`
    /// as the layer wraps it.
    pub(crate) fn new(shared: Arc<Shared>, service: &S) -> Arc<Striped<Self>> {
        Arc::new(Striped::new(Arc::new(PerService {
            shared,
            prototype: Mutex::new(service.clone()),
        })))
    }

    /// A fresh clone of the prototype, not yet ready: the caller polls its
    /// readiness before each attempt. Every stripe reaches the one
    /// prototype behind one lock, held only while cloning, and only when a
    /// retry or a hedge is due.
    pub(crate) fn make(&self) -> S {
        self.prototype
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S> Deref for PerService<S> {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl<S> fmt::Debug for PerService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerService")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
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
        let layer = crate::RetryLayer::new(crate::RetryPolicies::none());
        let per_service = PerService::new(layer.shared().clone(), &Counted(clones.clone()));
        assert_eq!(clones.load(Ordering::Relaxed), 1, "the prototype");
        let handles: Vec<Handle<Counted>> =
            (0..100).map(|_| per_service.handle().clone()).collect();
        assert_eq!(
            clones.load(Ordering::Relaxed),
            1,
            "a call's handle clones nothing"
        );
        let made = handles[0].make();
        assert_eq!(clones.load(Ordering::Relaxed), 2);
        assert!(Arc::ptr_eq(&made.0, &clones), "a clone of the prototype");
    }
}
