//! The synchronization a partition uses: `std`'s and tokio's in normal
//! builds, loom's under `--cfg grpc_resilience_loom`, so the model tests
//! (`src/partition/loom_tests.rs`) check the code that ships. Not
//! `--cfg loom`: under it tokio drops `tokio::net`, and hyper-util (below
//! tonic) no longer builds.
//!
//! loom has no one-shot channel; under the model a small one built on
//! loom's mutex stands in for tokio's, with the same part of its API and
//! the same semantics (after `close`, a value sent before is still
//! received, and a send fails).

#[cfg(not(all(test, grpc_resilience_loom)))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
#[cfg(not(all(test, grpc_resilience_loom)))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(all(test, grpc_resilience_loom)))]
pub(crate) use tokio::sync::oneshot;

#[cfg(all(test, grpc_resilience_loom))]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
#[cfg(all(test, grpc_resilience_loom))]
pub(crate) use loom::sync::{Mutex, MutexGuard};

/// Locks `m`; a panic elsewhere leaves plain data behind, so a poisoned
/// lock is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// tokio's one-shot channel, as far as a partition uses it, for the model.
#[cfg(all(test, grpc_resilience_loom))]
pub(crate) mod oneshot {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use loom::sync::{Arc, Mutex};

    #[derive(Debug)]
    struct State<T> {
        value: Option<T>,
        sent: bool,
        // The receiver closed or dropped: sends fail.
        closed: bool,
        // The sender dropped without sending.
        dropped: bool,
        waker: Option<Waker>,
    }

    #[derive(Debug)]
    pub(crate) struct Sender<T> {
        state: Arc<Mutex<State<T>>>,
    }

    #[derive(Debug)]
    pub(crate) struct Receiver<T> {
        state: Arc<Mutex<State<T>>>,
    }

    pub(crate) mod error {
        #[derive(Debug, PartialEq, Eq)]
        pub(crate) struct RecvError;
        #[derive(Debug, PartialEq, Eq)]
        pub(crate) enum TryRecvError {
            Empty,
            Closed,
        }
    }

    pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
        let state = Arc::new(Mutex::new(State {
            value: None,
            sent: false,
            closed: false,
            dropped: false,
            waker: None,
        }));
        let rx = Receiver {
            state: state.clone(),
        };
        (Sender { state }, rx)
    }

    impl<T> Sender<T> {
        pub(crate) fn send(self, value: T) -> Result<(), T> {
            let mut state = self.state.lock().unwrap();
            if state.closed {
                return Err(value);
            }
            state.value = Some(value);
            state.sent = true;
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
            Ok(())
        }

        pub(crate) fn is_closed(&self) -> bool {
            self.state.lock().unwrap().closed
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            let mut state = self.state.lock().unwrap();
            if !state.sent {
                state.dropped = true;
                if let Some(waker) = state.waker.take() {
                    waker.wake();
                }
            }
        }
    }

    impl<T> Receiver<T> {
        pub(crate) fn close(&mut self) {
            self.state.lock().unwrap().closed = true;
        }

        pub(crate) fn try_recv(&mut self) -> Result<T, error::TryRecvError> {
            let mut state = self.state.lock().unwrap();
            match state.value.take() {
                Some(value) => Ok(value),
                None if state.closed || state.dropped || state.sent => {
                    Err(error::TryRecvError::Closed)
                }
                None => Err(error::TryRecvError::Empty),
            }
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            self.state.lock().unwrap().closed = true;
        }
    }

    impl<T> Future for Receiver<T> {
        type Output = Result<T, error::RecvError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let mut state = self.state.lock().unwrap();
            if let Some(value) = state.value.take() {
                return Poll::Ready(Ok(value));
            }
            if state.closed || state.dropped || state.sent {
                return Poll::Ready(Err(error::RecvError));
            }
            state.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    // `Receiver` is moved freely, as tokio's is.
    impl<T> Unpin for Receiver<T> {}
}
