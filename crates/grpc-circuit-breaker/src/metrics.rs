//! The metric handles of one breaker.
//!
//! Handles are registered with the recorder that is current when they are
//! first needed and again for each new recorder (installed after the
//! breaker was made, or a thread-local one in a test), so a breaker made
//! before the recorder still shows up. Checking costs a thread-local read
//! and two atomic loads per call, no lock and no reference count;
//! registering happens once per recorder, off the usual path. The state
//! gauge is kept on every recorder a breaker has seen.

use std::sync::Arc;

use crate::state::{STATES, State, Verdict};

#[cfg(not(grpc_resilience_loom))]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock, PoisonError};

    use metrics::{Counter, Gauge, Histogram};

    use super::*;

    /// The recorder calls go to now, by address.
    fn current_recorder() -> usize {
        metrics::with_recorder(|r| (r as *const dyn metrics::Recorder).cast::<()>() as usize)
    }

    #[derive(Debug)]
    struct Handles {
        recorder: usize,
        // [admitting state: closed, half_open, disabled][verdict]
        calls: [[Counter; 3]; 3],
        latency: Histogram,
        // [open, half_open, forced_open]
        rejected: [Counter; 3],
        gauge: [Gauge; 5],
    }

    impl Handles {
        fn register(name: &str) -> Self {
            let breaker = name.to_owned();
            let calls = [State::Closed, State::HalfOpen, State::Disabled].map(|state| {
                [Verdict::Success, Verdict::Failure, Verdict::Ignored].map(|verdict| {
                    metrics::counter!(
                        "circuit_breaker.call.count",
                        "breaker" => breaker.clone(),
                        "state" => state.as_str(),
                        "outcome" => verdict.as_str(),
                    )
                })
            });
            let rejected = [State::Open, State::HalfOpen, State::ForcedOpen].map(|state| {
                metrics::counter!("circuit_breaker.rejected.count", "breaker" => breaker.clone(), "state" => state.as_str())
            });
            let gauge = STATES.map(|state| {
                metrics::gauge!("circuit_breaker.state", "breaker" => breaker.clone(), "state" => state.as_str())
            });
            Handles {
                recorder: current_recorder(),
                calls,
                latency: metrics::histogram!("circuit_breaker.call.latency", "breaker" => breaker),
                rejected,
                gauge,
            }
        }
    }

    /// How many recorders a breaker keeps handles for (usually two: none,
    /// then the one installed). Beyond that, calls count with the handles
    /// of the last recorder registered.
    const SLOTS: usize = 4;

    /// One breaker's metrics.
    #[derive(Debug)]
    pub(crate) struct Metrics {
        name: Arc<str>,
        // Handles per recorder, filled once each; never emptied, so calls
        // read them without a lock or a reference count.
        slots: [OnceLock<Handles>; SLOTS],
        // The slot calls used last: checked first.
        current: AtomicUsize,
        registering: Mutex<()>,
        // A newly registered set of handles still needs its gauge set.
        gauge_unset: AtomicBool,
    }

    impl Metrics {
        pub(crate) fn new(name: Arc<str>) -> Self {
            let metrics = Metrics {
                name,
                slots: Default::default(),
                current: AtomicUsize::new(0),
                registering: Mutex::new(()),
                gauge_unset: AtomicBool::new(true),
            };
            metrics.handles();
            metrics
        }

        /// The handles for the current recorder; true when they were just
        /// registered (the caller then has the gauge set).
        #[inline]
        fn handles(&self) -> (&Handles, bool) {
            let recorder = current_recorder();
            let i = self.current.load(Ordering::Relaxed);
            if let Some(h) = self.slots[i].get()
                && h.recorder == recorder
            {
                return (h, false);
            }
            self.find_or_register(recorder)
        }

        #[cold]
        fn find_or_register(&self, recorder: usize) -> (&Handles, bool) {
            if let Some(i) = self.find(recorder) {
                self.current.store(i, Ordering::Relaxed);
                return (self.slots[i].get().expect("a filled slot"), false);
            }
            let _guard = self
                .registering
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = self.find(recorder) {
                return (self.slots[i].get().expect("a filled slot"), false);
            }
            let Some(i) = self.slots.iter().position(|s| s.get().is_none()) else {
                // Every slot is taken: count with the last ones.
                let last = &self.slots[SLOTS - 1];
                return (last.get().expect("a filled slot"), false);
            };
            let handles = self.slots[i].get_or_init(|| Handles::register(&self.name));
            self.current.store(i, Ordering::Relaxed);
            self.gauge_unset.store(true, Ordering::Release);
            (handles, true)
        }

        fn find(&self, recorder: usize) -> Option<usize> {
            self.slots
                .iter()
                .position(|s| s.get().is_some_and(|h| h.recorder == recorder))
        }

        /// Every set of handles registered so far.
        fn all(&self) -> impl Iterator<Item = &Handles> {
            self.slots.iter().filter_map(OnceLock::get)
        }

        /// Whether the recorder changed since the handles were registered;
        /// registers new ones if so.
        pub(crate) fn check_recorder(&self) -> bool {
            self.handles().1
        }

        /// Counts an admitted call; true when the gauge needs setting.
        #[inline]
        pub(crate) fn call(
            &self,
            admitted_in: State,
            verdict: Verdict,
            latency_s: Option<f64>,
        ) -> bool {
            let (h, registered) = self.handles();
            let row = match admitted_in {
                State::Closed => 0,
                State::HalfOpen => 1,
                _ => 2,
            };
            h.calls[row][verdict as usize].increment(1);
            if let Some(latency_s) = latency_s {
                h.latency.record(latency_s);
            }
            registered
        }

        /// Counts a rejected call; true when the gauge needs setting.
        pub(crate) fn rejected(&self, state: State) -> bool {
            let (h, registered) = self.handles();
            let i = match state {
                State::Open => 0,
                State::HalfOpen => 1,
                _ => 2,
            };
            h.rejected[i].increment(1);
            registered
        }

        /// Sets the gauge (of every recorder) to `state` if new handles
        /// still need it. Only the breaker's publisher calls this.
        pub(crate) fn set_gauge_if_unset(&self, state: impl FnOnce() -> State) {
            if self.gauge_unset.swap(false, Ordering::AcqRel) {
                let state = state();
                for h in self.all() {
                    for s in STATES {
                        h.gauge[s as usize].set(if s == state { 1.0 } else { 0.0 });
                    }
                }
            }
        }

        /// Whether new handles still need their gauge set.
        pub(crate) fn gauge_unset(&self) -> bool {
            self.gauge_unset.load(Ordering::Acquire)
        }

        /// Moves the gauge of every recorder. Only the breaker's publisher
        /// calls this, in transition order.
        pub(crate) fn transition(&self, from: State, to: State) {
            for h in self.all() {
                h.gauge[from as usize].set(0.0);
                h.gauge[to as usize].set(1.0);
            }
            metrics::counter!(
                "circuit_breaker.transitions.count",
                "breaker" => self.name.to_string(),
                "from" => from.as_str(),
                "to" => to.as_str(),
            )
            .increment(1);
        }
    }
}

// The model tests check the state machine, not the metrics.
#[cfg(grpc_resilience_loom)]
mod imp {
    use super::*;

    #[derive(Debug)]
    pub(crate) struct Metrics;

    impl Metrics {
        pub(crate) fn new(_name: Arc<str>) -> Self {
            let _ = STATES;
            Metrics
        }
        pub(crate) fn check_recorder(&self) -> bool {
            false
        }
        pub(crate) fn call(&self, _: State, _: Verdict, _: Option<f64>) -> bool {
            false
        }
        pub(crate) fn rejected(&self, _: State) -> bool {
            false
        }
        pub(crate) fn set_gauge_if_unset(&self, _: impl FnOnce() -> State) {}
        pub(crate) fn gauge_unset(&self) -> bool {
            false
        }
        pub(crate) fn transition(&self, _: State, _: State) {}
    }
}

pub(crate) use imp::Metrics;
