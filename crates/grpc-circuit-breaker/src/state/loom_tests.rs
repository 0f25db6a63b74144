//! Model tests: every interleaving (up to a preemption bound) of
//! admissions, results and operator resets.
//!
//! `RUSTFLAGS="--cfg grpc_resilience_loom" cargo test --release -p grpc-circuit-breaker --lib loom`

use std::time::Duration;

use loom::sync::Arc;
use loom::thread;

use tokio::time::Instant;

use super::*;
use crate::config::{BreakerConfig, FailureRate};
use crate::events::Hub;

/// Records a result the way a finished call does.
fn rec(core: &Core, admission: Admission, verdict: Verdict, now: Instant, latency: Duration) {
    core.record(core.hot(), admission, verdict, Some(latency), || now);
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
    Core::new(
        "loom".into(),
        rate_core_config(),
        std::sync::Arc::new(Hub::new()),
    )
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

/// Count mode, two probes needed: two probes admitted and finished
/// concurrently with a third caller always end CLOSED, and never admit
/// more than two.
#[test]
fn loom_concurrent_probes_close_the_breaker() {
    model(|| {
        let config = BreakerConfig::default()
            .with_failure_threshold(1)
            .with_success_threshold(2)
            .with_timeout(Duration::from_millis(1));
        let core = Arc::new(Core::new(
            "loom".into(),
            config,
            std::sync::Arc::new(Hub::new()),
        ));
        call(&core, Verdict::Failure);
        let later = core.base + Duration::from_millis(5);
        let admitted = Arc::new(AtomicU64::new(0));
        let probes: Vec<_> = (0..2)
            .map(|_| {
                let core = core.clone();
                let admitted = admitted.clone();
                thread::spawn(move || {
                    if let Ok(a) = core.admit(|| later) {
                        admitted.fetch_add(1, Ordering::AcqRel);
                        rec(&core, a, Verdict::Success, later, Duration::ZERO);
                    }
                })
            })
            .collect();
        for p in probes {
            p.join().unwrap();
        }
        // Both got in (two slots), or one did and the other came after
        // the breaker closed.
        assert!(admitted.load(Ordering::Acquire) >= 1);
        if core.state(later) == State::HalfOpen {
            // One probe so far: one more closes it.
            call_at(&core, Verdict::Success, later);
        }
        assert_eq!(core.state(later), State::Closed);
    });
}

fn call_at(core: &Core, verdict: Verdict, now: Instant) {
    if let Ok(admission) = core.admit(|| now) {
        rec(core, admission, verdict, now, Duration::ZERO);
    }
}

/// Failure-rate mode, a sample of two probes: a failure and a success
/// racing each other decide once, on both (50 % opens).
#[test]
fn loom_a_probe_sample_is_judged_once_complete() {
    model(|| {
        let config = BreakerConfig::default()
            .with_timeout(Duration::from_millis(1))
            .with_half_open_max_calls(2)
            .with_failure_rate(FailureRate {
                window: 1,
                minimum_calls: 1,
                failure_rate: 50.0,
                ..FailureRate::default()
            });
        let core = Arc::new(Core::new(
            "loom".into(),
            config,
            std::sync::Arc::new(Hub::new()),
        ));
        call(&core, Verdict::Failure);
        let later = core.base + Duration::from_millis(5);
        let a = core.admit(|| later).unwrap();
        let b = core.admit(|| later).unwrap();
        assert_eq!(core.admit(|| later), Err(State::HalfOpen));
        let other = {
            let core = core.clone();
            thread::spawn(move || rec(&core, b, Verdict::Success, later, Duration::ZERO))
        };
        rec(&core, a, Verdict::Failure, later, Duration::ZERO);
        other.join().unwrap();
        assert_eq!(core.state(later), State::Open);
    });
}

/// Concurrent transitions publish their changes in transition order, and
/// subscribers end on the current state.
#[test]
fn loom_state_changes_are_published_in_order() {
    model(|| {
        let hub = std::sync::Arc::new(Hub::new());
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        hub.subscribe_fn(std::sync::Arc::new(move |c: &StateChange| {
            record.lock().unwrap().push((c.generation, c.to));
        }));
        let core = Arc::new(Core::new("loom".into(), BreakerConfig::default(), hub));
        let other = {
            let core = core.clone();
            thread::spawn(move || core.force(State::ForcedOpen, Trigger::ForcedOpen))
        };
        core.force(State::Disabled, Trigger::Disabled);
        other.join().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].0 < seen[1].0, "{seen:?}");
        assert_eq!(seen[1].1, core.state(core.base));
    });
}

/// A reconfiguration from count mode to the failure-rate mode racing a
/// result: the result is counted under one consistent set of settings.
#[test]
fn loom_reconfiguring_while_calls_finish() {
    model(|| {
        let core = Arc::new(Core::new(
            "loom".into(),
            BreakerConfig::default().with_failure_threshold(2),
            std::sync::Arc::new(Hub::new()),
        ));
        call(&core, Verdict::Failure);
        let caller = {
            let core = core.clone();
            thread::spawn(move || call(&core, Verdict::Failure))
        };
        core.reconfigure(rate_core_config());
        caller.join().unwrap();
        // Open only if both failures were counted in count mode.
        let state = core.state(core.base);
        assert!(matches!(state, State::Closed | State::Open), "{state}");
        // Whatever happened, the breaker now counts by rate.
        core.force(State::Closed, Trigger::Reset);
        call(&core, Verdict::Failure);
        call(&core, Verdict::Failure);
        assert_eq!(core.state(core.base), State::Open);
    });
}

fn rate_core_config() -> BreakerConfig {
    BreakerConfig::default().with_failure_rate(FailureRate {
        window: 2,
        minimum_calls: 2,
        failure_rate: 100.0,
        ..FailureRate::default()
    })
}
