//! The synchronization primitives of the state machine: std's (and
//! arc-swap's) in normal builds, loom's under `--cfg grpc_resilience_loom`, so the model
//! tests check the same code that ships.

#[cfg(not(grpc_resilience_loom))]
pub(crate) use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
#[cfg(not(grpc_resilience_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};

#[cfg(grpc_resilience_loom)]
pub(crate) use loom::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};
#[cfg(grpc_resilience_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};

use std::sync::Arc;

/// Locks `m`; a poisoned lock is still used (the data it guards stays
/// consistent: every writer finishes its update before anything can panic).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(grpc_resilience_loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(grpc_resilience_loom)]
    {
        m.lock().unwrap()
    }
}

/// Locks `m` if nobody holds it.
pub(crate) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    #[cfg(not(grpc_resilience_loom))]
    {
        match m.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
    #[cfg(grpc_resilience_loom)]
    {
        m.try_lock().ok()
    }
}

/// An `Arc` that is replaced atomically; readers never lock (arc-swap).
/// Under loom a mutex stands in for it, which models the same atomic
/// pointer swap.
#[derive(Debug)]
pub(crate) struct AtomicArc<T> {
    #[cfg(not(grpc_resilience_loom))]
    inner: arc_swap::ArcSwap<T>,
    #[cfg(grpc_resilience_loom)]
    inner: Mutex<Arc<T>>,
}

#[cfg(not(grpc_resilience_loom))]
impl<T> AtomicArc<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        AtomicArc {
            inner: arc_swap::ArcSwap::new(value),
        }
    }

    #[inline]
    pub(crate) fn load(&self) -> Loaded<T> {
        Loaded(self.inner.load())
    }

    pub(crate) fn store(&self, value: Arc<T>) {
        self.inner.store(value);
    }
}

#[cfg(grpc_resilience_loom)]
impl<T> AtomicArc<T> {
    pub(crate) fn new(value: Arc<T>) -> Self {
        AtomicArc {
            inner: Mutex::new(value),
        }
    }

    pub(crate) fn load(&self) -> Loaded<T> {
        Loaded(lock(&self.inner).clone())
    }

    pub(crate) fn store(&self, value: Arc<T>) {
        *lock(&self.inner) = value;
    }
}

/// A value read from an [`AtomicArc`]; it stays valid while held.
#[cfg(not(grpc_resilience_loom))]
pub(crate) struct Loaded<T>(arc_swap::Guard<Arc<T>>);
/// A value read from an [`AtomicArc`]; it stays valid while held.
#[cfg(grpc_resilience_loom)]
pub(crate) struct Loaded<T>(Arc<T>);

impl<T> std::ops::Deref for Loaded<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}
