use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::config::{BreakerConfig, FailureRate};
use crate::events::Hub;

fn config() -> BreakerConfig {
    BreakerConfig::default()
        .with_failure_threshold(3)
        .with_success_threshold(2)
        .with_timeout(Duration::from_millis(1000))
        .with_reset_timeout(Duration::from_millis(1600))
}

fn core(config: BreakerConfig) -> Core {
    Core::new("test".into(), config, Arc::new(Hub::new()))
}

/// Records a result the way a finished call does.
fn rec(core: &Core, admission: Admission, verdict: Verdict, now: Instant, latency: Duration) {
    core.record(core.hot(), admission, verdict, Some(latency), || now);
}

/// A clock the tests move by hand.
struct Clock(Instant);

impl Clock {
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn fail(core: &Core, clock: &Clock, ms: u64) {
    let a = core.admit(|| clock.at(ms)).expect("admitted");
    rec(core, a, Verdict::Failure, clock.at(ms), Duration::ZERO);
}

#[test]
fn opens_after_threshold_failures_and_rejects() {
    let core = core(config());
    let clock = Clock(core.base);
    fail(&core, &clock, 0);
    fail(&core, &clock, 10);
    assert_eq!(core.state(clock.at(20)), State::Closed);
    fail(&core, &clock, 20);
    assert_eq!(core.state(clock.at(20)), State::Open);
    assert_eq!(core.admit(|| clock.at(999)), Err(State::Open));
}

#[test]
fn successes_do_not_reset_the_failure_count() {
    let core = core(config());
    let clock = Clock(core.base);
    fail(&core, &clock, 0);
    let a = core.admit(|| clock.at(1)).unwrap();
    rec(&core, a, Verdict::Success, clock.at(1), Duration::ZERO);
    fail(&core, &clock, 2);
    fail(&core, &clock, 3);
    assert_eq!(core.state(clock.at(3)), State::Open);
}

#[test]
fn failures_older_than_reset_timeout_are_forgotten() {
    let core = core(config());
    let clock = Clock(core.base);
    fail(&core, &clock, 0);
    fail(&core, &clock, 50);
    // 1.7 s later both are out of the 1.6 s window.
    fail(&core, &clock, 1750);
    fail(&core, &clock, 1760);
    assert_eq!(core.state(clock.at(1760)), State::Closed);
    fail(&core, &clock, 1770);
    assert_eq!(core.state(clock.at(1770)), State::Open);
}

#[test]
fn open_turns_half_open_after_timeout_and_probes_close_it() {
    let core = core(config());
    let clock = Clock(core.base);
    for ms in 0..3 {
        fail(&core, &clock, ms);
    }
    assert_eq!(core.admit(|| clock.at(1001)), Err(State::Open));
    let p1 = core.admit(|| clock.at(1002)).unwrap();
    assert_eq!(p1.state, State::HalfOpen);
    let p2 = core.admit(|| clock.at(1002)).unwrap();
    assert_eq!(
        core.admit(|| clock.at(1002)),
        Err(State::HalfOpen),
        "only 2 probes"
    );
    rec(&core, p1, Verdict::Success, clock.at(1003), Duration::ZERO);
    assert_eq!(core.state(clock.at(1003)), State::HalfOpen);
    rec(&core, p2, Verdict::Success, clock.at(1004), Duration::ZERO);
    assert_eq!(core.state(clock.at(1004)), State::Closed);
    // Closing forgot the old failures.
    fail(&core, &clock, 1005);
    fail(&core, &clock, 1006);
    assert_eq!(core.state(clock.at(1006)), State::Closed);
}

#[test]
fn a_failed_probe_reopens_and_restarts_the_timeout() {
    let core = core(config());
    let clock = Clock(core.base);
    for ms in 0..3 {
        fail(&core, &clock, ms);
    }
    let probe = core.admit(|| clock.at(1010)).unwrap();
    rec(
        &core,
        probe,
        Verdict::Failure,
        clock.at(1500),
        Duration::ZERO,
    );
    assert_eq!(core.state(clock.at(1500)), State::Open);
    assert_eq!(core.admit(|| clock.at(2400)), Err(State::Open));
    assert!(core.admit(|| clock.at(2500)).is_ok());
}

#[test]
fn a_cancelled_probe_gives_its_slot_back() {
    let core = core(config());
    let clock = Clock(core.base);
    for ms in 0..3 {
        fail(&core, &clock, ms);
    }
    let p1 = core.admit(|| clock.at(1010)).unwrap();
    let _p2 = core.admit(|| clock.at(1010)).unwrap();
    assert!(core.admit(|| clock.at(1010)).is_err());
    rec(&core, p1, Verdict::Ignored, clock.at(1011), Duration::ZERO);
    assert!(core.admit(|| clock.at(1011)).is_ok(), "the slot came back");
    assert!(core.admit(|| clock.at(1011)).is_err());
}

#[test]
fn late_results_from_an_earlier_generation_change_nothing() {
    let core = core(config());
    let clock = Clock(core.base);
    let early = core.admit(|| clock.at(0)).unwrap();
    for ms in 0..3 {
        fail(&core, &clock, ms);
    }
    let p1 = core.admit(|| clock.at(1010)).unwrap();
    let p2 = core.admit(|| clock.at(1010)).unwrap();
    rec(&core, p1, Verdict::Success, clock.at(1011), Duration::ZERO);
    rec(&core, p2, Verdict::Success, clock.at(1011), Duration::ZERO);
    assert_eq!(core.state(clock.at(1011)), State::Closed);
    let generation = core.generation();
    // The call admitted before the breaker opened fails only now.
    rec(
        &core,
        early,
        Verdict::Failure,
        clock.at(1012),
        Duration::ZERO,
    );
    rec(&core, p1, Verdict::Failure, clock.at(1012), Duration::ZERO);
    assert_eq!(core.generation(), generation);
    fail(&core, &clock, 1004);
    fail(&core, &clock, 1005);
    assert_eq!(
        core.state(clock.at(1014)),
        State::Closed,
        "the stale failures were not counted"
    );
}

#[test]
fn failure_rate_mode_opens_on_the_rate_over_a_sliding_window() {
    let rate = FailureRate {
        window: 10,
        minimum_calls: 5,
        failure_rate: 50.0,
        ..FailureRate::default()
    };
    let core = core(config().with_failure_rate(rate));
    let clock = Clock(core.base);
    let call = |verdict| {
        let a = core.admit(|| clock.at(0)).unwrap();
        rec(&core, a, verdict, clock.at(0), Duration::ZERO);
    };
    // 4 failures out of 4: below minimum_calls.
    for _ in 0..4 {
        call(Verdict::Failure);
    }
    assert_eq!(core.state(clock.at(0)), State::Closed);
    core.force(State::Closed, Trigger::Reset);
    // 10 successes, then 4 failures: 4 of the last 10 fail.
    for _ in 0..10 {
        call(Verdict::Success);
    }
    for _ in 0..4 {
        call(Verdict::Failure);
    }
    assert_eq!(core.state(clock.at(0)), State::Closed);
    // One more slides a success out: 5 of 10 is 50 %.
    call(Verdict::Failure);
    assert_eq!(core.state(clock.at(0)), State::Open);
}

#[test]
fn slow_call_rate_opens() {
    let rate = FailureRate {
        window: 4,
        minimum_calls: 4,
        failure_rate: 100.0,
        slow_call_duration: Some(Duration::from_millis(500)),
        slow_call_rate: 75.0,
    };
    let core = core(config().with_failure_rate(rate));
    let clock = Clock(core.base);
    for latency in [600, 10, 700, 800] {
        let a = core.admit(|| clock.at(0)).unwrap();
        rec(
            &core,
            a,
            Verdict::Success,
            clock.at(0),
            Duration::from_millis(latency),
        );
    }
    assert_eq!(core.state(clock.at(0)), State::Open);
}

#[test]
fn operators_force_disable_and_reset() {
    let core = core(config());
    let clock = Clock(core.base);
    core.force(State::ForcedOpen, Trigger::ForcedOpen);
    assert_eq!(
        core.admit(|| clock.at(1_000_000)),
        Err(State::ForcedOpen),
        "no timeout ends it"
    );
    core.force(State::Disabled, Trigger::Disabled);
    for ms in 0..10 {
        fail(&core, &clock, ms);
    }
    assert_eq!(
        core.state(clock.at(10)),
        State::Disabled,
        "disabled counts nothing"
    );
    core.force(State::Closed, Trigger::Reset);
    assert_eq!(core.state(clock.at(10)), State::Closed);
}

#[test]
fn concurrent_callers_get_exactly_the_probe_slots() {
    let core = Arc::new(core(
        config()
            .with_half_open_max_calls(7)
            .with_success_threshold(3),
    ));
    let clock = Clock(core.base);
    for ms in 0..3 {
        fail(&core, &clock, ms);
    }
    let when = clock.at(5000);
    for round in 0..3 {
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let admitted: Vec<Admission> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let core = core.clone();
                    let barrier = barrier.clone();
                    s.spawn(move || {
                        barrier.wait();
                        (0..125)
                            .filter_map(|_| core.admit(|| when).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(admitted.len(), 7, "round {round}: 1,000 callers, 7 slots");
        // Every probe is cancelled: all slots come back for the next round.
        for a in admitted {
            rec(&core, a, Verdict::Ignored, when, Duration::ZERO);
        }
    }
}

/// A plain reference model of the count-mode breaker.
#[derive(Debug)]
struct Model {
    state: State,
    generation: u32,
    failures: Vec<u64>,
    opened_at: u64,
    probes: u32,
    successes: u32,
}

const BUCKET_MS: u64 = 100;

impl Model {
    fn new() -> Self {
        Model {
            state: State::Closed,
            generation: 0,
            failures: vec![],
            opened_at: 0,
            probes: 0,
            successes: 0,
        }
    }

    fn go(&mut self, to: State, now: u64) {
        self.generation += 1;
        self.state = to;
        match to {
            State::Open => self.opened_at = now,
            State::HalfOpen => {
                self.probes = 0;
                self.successes = 0;
            }
            State::Closed => self.failures.clear(),
            _ => {}
        }
    }

    fn admit(&mut self, now: u64) -> Option<(u32, State)> {
        if self.state == State::Open && now >= self.opened_at + 1000 {
            self.go(State::HalfOpen, now);
        }
        match self.state {
            State::Closed => Some((self.generation, State::Closed)),
            State::HalfOpen if self.probes < 2 => {
                self.probes += 1;
                Some((self.generation, State::HalfOpen))
            }
            _ => None,
        }
    }

    fn record(&mut self, (generation, state): (u32, State), verdict: Verdict, now: u64) {
        if generation != self.generation {
            return;
        }
        match (state, verdict) {
            (State::Closed, Verdict::Failure) => {
                self.failures.push(now);
                let epoch = now / BUCKET_MS;
                let recent = self
                    .failures
                    .iter()
                    .filter(|&&t| t / BUCKET_MS + 15 >= epoch)
                    .count();
                if recent >= 3 {
                    self.go(State::Open, now);
                }
            }
            (State::HalfOpen, Verdict::Failure) => self.go(State::Open, now),
            (State::HalfOpen, Verdict::Ignored) => self.probes -= 1,
            (State::HalfOpen, Verdict::Success) => {
                self.successes += 1;
                if self.successes >= 2 {
                    self.go(State::Closed, now);
                }
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Admit,
    Finish(usize, u8),
    Advance(u64),
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Admit),
        4 => (any::<usize>(), 0u8..3).prop_map(|(i, v)| Op::Finish(i, v)),
        2 => (0u64..1500).prop_map(Op::Advance),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn matches_the_reference_model(ops in proptest::collection::vec(op(), 1..120)) {
        let core = core(config());
        let clock = Clock(core.base);
        let mut model = Model::new();
        let mut now = 0u64;
        // Outstanding calls: (real admission, model admission).
        let mut calls: Vec<(Admission, (u32, State))> = vec![];
        for op in ops {
            match op {
                Op::Admit => {
                    let real = core.admit(|| clock.at(now));
                    let expected = model.admit(now);
                    prop_assert_eq!(real.is_ok(), expected.is_some(), "admit at {} ms in {:?}", now, model);
                    if let (Ok(r), Some(m)) = (real, expected) {
                        prop_assert_eq!(r.state, m.1);
                        calls.push((r, m));
                    }
                }
                Op::Finish(i, v) if !calls.is_empty() => {
                    let (r, m) = calls.remove(i % calls.len());
                    let verdict = [Verdict::Success, Verdict::Failure, Verdict::Ignored][v as usize];
                    rec(&core, r, verdict, clock.at(now), Duration::ZERO);
                    model.record(m, verdict, now);
                }
                Op::Finish(..) => {}
                Op::Advance(ms) => now += ms,
                Op::Reset => {
                    core.force(State::Closed, Trigger::Reset);
                    model.go(State::Closed, now);
                }
            }
            // Compare without letting the read itself move the state.
            let (_, state) = unpack(core.word.0.load(Ordering::Acquire));
            prop_assert_eq!(state, model.state, "after {} ms", now);
        }
    }
}

fn trip(core: &Core, clock: &Clock, ms: u64) {
    for _ in 0..100 {
        if core.state(clock.at(ms)) == State::Open {
            return;
        }
        fail(core, clock, ms);
    }
    panic!("the breaker did not open");
}

#[test]
fn a_timeout_of_centuries_never_half_opens() {
    // 18_446_744_073_709_552 s is 384 ms more than u64::MAX ms.
    let core = core(config().with_timeout(Duration::from_secs(18_446_744_073_709_552)));
    let clock = Clock(core.base);
    trip(&core, &clock, 0);
    assert_eq!(core.admit(|| clock.at(384)), Err(State::Open));
    assert_eq!(core.admit(|| clock.at(1_000_000_000)), Err(State::Open));
}

#[test]
fn a_reset_timeout_of_centuries_forgets_nothing() {
    let core = core(config().with_reset_timeout(Duration::from_secs(18_446_744_073_709_552)));
    let clock = Clock(core.base);
    fail(&core, &clock, 0);
    fail(&core, &clock, 1);
    fail(&core, &clock, 10_000);
    assert_eq!(core.state(clock.at(10_000)), State::Open);
}

fn rate(window: u32, minimum_calls: u32, failure_rate: f64) -> FailureRate {
    FailureRate {
        window,
        minimum_calls,
        failure_rate,
        ..FailureRate::default()
    }
}

#[test]
fn rate_mode_with_one_probe_closes_when_it_succeeds() {
    let config = config()
        .with_failure_rate(rate(2, 2, 50.0))
        .with_half_open_max_calls(1);
    config.validate().unwrap();
    let core = core(config);
    let clock = Clock(core.base);
    trip(&core, &clock, 0);
    let probe = core.admit(|| clock.at(1000)).unwrap();
    rec(
        &core,
        probe,
        Verdict::Success,
        clock.at(1001),
        Duration::ZERO,
    );
    assert_eq!(core.state(clock.at(1001)), State::Closed);
}

#[test]
fn rate_mode_half_open_judges_its_probes_as_a_sample() {
    for (verdicts, expected) in [
        ("FSSSS", State::Closed),
        ("SSSSF", State::Closed),
        ("SFSFS", State::Closed),
        ("FFSFS", State::Open),
        ("SSFFF", State::Open),
    ] {
        let core = core(
            config()
                .with_failure_rate(rate(4, 4, 50.0))
                .with_half_open_max_calls(5),
        );
        let clock = Clock(core.base);
        trip(&core, &clock, 0);
        let probes: Vec<_> = (0..5)
            .map(|_| core.admit(|| clock.at(1000)).unwrap())
            .collect();
        assert_eq!(core.admit(|| clock.at(1000)), Err(State::HalfOpen));
        for (probe, v) in probes.into_iter().zip(verdicts.chars()) {
            assert_eq!(core.state(clock.at(1001)), State::HalfOpen, "{verdicts}");
            let verdict = if v == 'F' {
                Verdict::Failure
            } else {
                Verdict::Success
            };
            rec(&core, probe, verdict, clock.at(1001), Duration::ZERO);
            if core.state(clock.at(1001)) != State::HalfOpen {
                break;
            }
        }
        assert_eq!(core.state(clock.at(1001)), expected, "{verdicts}");
    }
}

#[test]
fn count_mode_half_open_keeps_any_failure_reopens() {
    let core = core(
        config()
            .with_half_open_max_calls(5)
            .with_success_threshold(3),
    );
    let clock = Clock(core.base);
    trip(&core, &clock, 0);
    let a = core.admit(|| clock.at(1000)).unwrap();
    let b = core.admit(|| clock.at(1000)).unwrap();
    rec(&core, a, Verdict::Success, clock.at(1000), Duration::ZERO);
    rec(&core, b, Verdict::Failure, clock.at(1000), Duration::ZERO);
    assert_eq!(core.state(clock.at(1000)), State::Open);
}

fn any_config() -> impl Strategy<Value = BreakerConfig> {
    (
        1u32..6,
        1u32..6,
        proptest::option::of(1u32..8),
        proptest::option::of((1u32..10, 1u32..10, 1u32..=100, any::<bool>())),
    )
        .prop_map(|(failures, successes, max, rate)| {
            let mut config = config()
                .with_failure_threshold(failures)
                .with_success_threshold(successes);
            if let Some(max) = max {
                config = config.with_half_open_max_calls(max);
            }
            if let Some((window, minimum, percent, slow)) = rate {
                config = config.with_failure_rate(FailureRate {
                    window,
                    minimum_calls: minimum.min(window),
                    failure_rate: f64::from(percent),
                    slow_call_duration: slow.then_some(Duration::from_millis(50)),
                    slow_call_rate: 100.0,
                });
            }
            config
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever valid config: once the service answers well again, probes
    /// close the breaker.
    #[test]
    fn every_valid_config_recovers_from_half_open(config in any_config()) {
        prop_assume!(config.validate().is_ok());
        let core = core(config);
        let clock = Clock(core.base);
        trip(&core, &clock, 0);
        let mut now = 0;
        let mut closed = false;
        for _ in 0..100 {
            now += 1000;
            if let Ok(a) = core.admit(|| clock.at(now)) {
                rec(&core, a, Verdict::Success, clock.at(now), Duration::ZERO);
            }
            if core.state(clock.at(now)) == State::Closed {
                closed = true;
                break;
            }
        }
        prop_assert!(closed, "stuck in {:?}", core.state(clock.at(now)));
    }
}
