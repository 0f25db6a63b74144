//! The metric handles of one breaker.
//!
//! Handles are registered with the recorder that is current when they are
//! first needed and re-registered when the recorder changes (installed
//! after the breaker was made, or a thread-local one in a test), so a
//! breaker made before the recorder still shows up. Checking costs a
//! thread-local read and an atomic load per call; registering happens once
//! per recorder, off the usual path.

use std::sync::Arc;

use crate::state::{STATES, State, Verdict};

#[cfg(not(loom))]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    use metrics::{Counter, Gauge, Histogram};

    use super::*;
    use crate::sync::{AtomicArc, Loaded};

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

    /// One breaker's metrics.
    #[derive(Debug)]
    pub(crate) struct Metrics {
        name: Arc<str>,
        handles: AtomicArc<Handles>,
        // The gauge of a newly registered set of handles is still to be set.
        gauge_unset: AtomicBool,
    }

    impl Metrics {
        pub(crate) fn new(name: Arc<str>) -> Self {
            Metrics {
                handles: AtomicArc::new(Arc::new(Handles::register(&name))),
                name,
                gauge_unset: AtomicBool::new(true),
            }
        }

        /// The handles for the current recorder; true when they were just
        /// registered (the caller then has the gauge set).
        #[inline]
        fn handles(&self) -> (Loaded<Handles>, bool) {
            let handles = self.handles.load();
            if handles.recorder == current_recorder() {
                return (handles, false);
            }
            self.refresh();
            (self.handles.load(), true)
        }

        #[cold]
        fn refresh(&self) {
            self.handles.store(Arc::new(Handles::register(&self.name)));
            self.gauge_unset.store(true, Ordering::Release);
        }

        /// Whether the recorder changed since the handles were registered;
        /// registers new ones if so.
        pub(crate) fn check_recorder(&self) -> bool {
            self.handles().1
        }

        /// Counts an admitted call; true when the gauge needs setting.
        #[inline]
        pub(crate) fn call(&self, admitted_in: State, verdict: Verdict, latency_s: f64) -> bool {
            let (h, refreshed) = self.handles();
            let row = match admitted_in {
                State::Closed => 0,
                State::HalfOpen => 1,
                _ => 2,
            };
            h.calls[row][verdict as usize].increment(1);
            h.latency.record(latency_s);
            refreshed
        }

        /// Counts a rejected call; true when the gauge needs setting.
        pub(crate) fn rejected(&self, state: State) -> bool {
            let (h, refreshed) = self.handles();
            let i = match state {
                State::Open => 0,
                State::HalfOpen => 1,
                _ => 2,
            };
            h.rejected[i].increment(1);
            refreshed
        }

        /// Sets the gauge to `state` if new handles still need it. Only
        /// the breaker's publisher calls this.
        pub(crate) fn set_gauge_if_unset(&self, state: impl FnOnce() -> State) {
            if self.gauge_unset.swap(false, Ordering::AcqRel) {
                let state = state();
                let (h, _) = self.handles();
                for s in STATES {
                    h.gauge[s as usize].set(if s == state { 1.0 } else { 0.0 });
                }
            }
        }

        /// Whether new handles still need their gauge set.
        pub(crate) fn gauge_unset(&self) -> bool {
            self.gauge_unset.load(Ordering::Acquire)
        }

        /// Moves the gauge. Only the breaker's publisher calls this, in
        /// transition order.
        pub(crate) fn transition(&self, from: State, to: State) {
            let (h, _) = self.handles();
            h.gauge[from as usize].set(0.0);
            h.gauge[to as usize].set(1.0);
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
#[cfg(loom)]
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
        pub(crate) fn call(&self, _: State, _: Verdict, _: f64) -> bool {
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
