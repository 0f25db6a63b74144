//! The synchronization the replay state machine uses: `std`'s, or loom's
//! under `--cfg grpc_resilience_loom` for the model tests
//! (`src/replay/loom_tests.rs`). Not `--cfg loom`: under it tokio drops
//! `tokio::net`, and hyper-util (below tonic) no longer builds.

#[cfg(all(test, grpc_resilience_loom))]
pub(crate) use loom::sync::atomic::{AtomicUsize, Ordering};
#[cfg(all(test, grpc_resilience_loom))]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(all(test, grpc_resilience_loom)))]
pub(crate) use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(not(all(test, grpc_resilience_loom)))]
pub(crate) use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`; a panic elsewhere leaves plain data behind, so a poisoned
/// lock is used as it is.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
