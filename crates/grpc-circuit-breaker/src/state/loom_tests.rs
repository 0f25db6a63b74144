//! Model tests: every interleaving (up to a preemption bound) of
//! admissions, results and operator resets.
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release -p grpc-circuit-breaker --lib loom`

use std::time::Duration;

use loom::sync::Arc;
use loom::thread;

use tokio::time::Instant;

use super::*;
use crate::config::{BreakerConfig, FailureRate};
use crate::events::Hub;

/// Records a result the way a finished call does.
fn rec(core: &Core, admission: Admission, verdict: Verdict, now: Instant, latency: Duration) {
    core.record(&core.settings(), admission, verdict, latency, || now);
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

/// Failure-rate mode over the last 2 calls; opens only when both failed.
fn rate_core() -> Core {
    let config = BreakerConfig::default().with_failure_rate(FailureRate {
        window: 2,
        minimum_calls: 2,
        failure_rate: 100.0,
        ..FailureRate::default()
    });
    Core::new("loom".into(), config, std::sync::Arc::new(Hub::new()))
}

fn call(core: &Core, verdict: Verdict) {
    let now = core.base;
    if let Ok(admission) = core.admit(|| now) {
        rec(&core, admission, verdict, now, Duration::ZERO);
    }
}

/// A success overwrites a failure in the ring while an operator resets
/// the breaker: the reset must not leave a phantom count that opens it.
#[test]
fn loom_a_reset_racing_a_result_leaves_no_phantom_count() {
    model(|| {
        let core = Arc::new(rate_core());
        // Failure, success: the next call overwrites the failure's slot.
        call(&core, Verdict::Failure);
        call(&core, Verdict::Success);
        let caller = {
            let core = core.clone();
            thread::spawn(move || call(&core, Verdict::Success))
        };
        core.force(State::Closed, Trigger::Reset);
        caller.join().unwrap();
        // Two more successes fill the window: nothing failed in it.
        call(&core, Verdict::Success);
        call(&core, Verdict::Success);
        assert_eq!(core.state(core.base), State::Closed);
    });
}

/// Concurrent results and a reset: one failure alone never opens a
/// breaker that needs two.
#[test]
fn loom_concurrent_results_and_a_reset_never_open_on_one_failure() {
    model(|| {
        let core = Arc::new(rate_core());
        call(&core, Verdict::Success);
        let failing = {
            let core = core.clone();
            thread::spawn(move || call(&core, Verdict::Failure))
        };
        let resetting = {
            let core = core.clone();
            thread::spawn(move || core.force(State::Closed, Trigger::Reset))
        };
        call(&core, Verdict::Success);
        failing.join().unwrap();
        resetting.join().unwrap();
        call(&core, Verdict::Success);
        assert_eq!(core.state(core.base), State::Closed);
    });
}
