//! The state machine of one breaker: lock-free admission and recording,
//! transitions under a lock.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::events::{Hub, StateChange, Trigger};

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    /// Calls flow; failures are counted.
    Closed,
    /// Calls are rejected until `timeout` has passed.
    Open,
    /// A few probe calls test whether the service is back.
    HalfOpen,
    /// Held open by an operator ([`BreakerRegistry::force_open`](crate::BreakerRegistry::force_open)) until reset.
    ForcedOpen,
    /// Switched off by an operator: every call flows, nothing is counted.
    Disabled,
}

const STATES: [State; 5] = [
    State::Closed,
    State::Open,
    State::HalfOpen,
    State::ForcedOpen,
    State::Disabled,
];

impl State {
    /// `closed`, `open`, `half_open`, `forced_open` or `disabled`, as in
    /// metric labels and the registry's status.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
            State::ForcedOpen => "forced_open",
            State::Disabled => "disabled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn from_index(i: u64) -> State {
        STATES[(i as usize).min(STATES.len() - 1)]
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a call counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    /// Neither (a caller's cancellation): a probe's slot is given back.
    Ignored,
}

impl Verdict {
    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::Failure => "failure",
            Verdict::Ignored => "ignored",
        }
    }
}

/// A call the breaker let through, with the generation that admitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Admission {
    pub(crate) generation: u32,
    pub(crate) state: State,
}

/// Keeps hot atomics on their own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

fn pack(generation: u32, state: State) -> u64 {
    (u64::from(generation) << 8) | state.index() as u64
}

fn unpack(word: u64) -> (u32, State) {
    ((word >> 8) as u32, State::from_index(word & 0xff))
}

fn pack_count(generation: u32, count: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(count)
}

fn unpack_count(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

const BUCKETS: usize = 16;

/// Failures in CLOSED, in time buckets covering `reset_timeout`.
#[derive(Debug)]
struct FailureWindow {
    // Each: epoch (40 bits) and count (24 bits).
    buckets: [AtomicU64; BUCKETS],
    bucket_ms: u64,
}

impl FailureWindow {
    fn new(reset_timeout: Duration) -> Self {
        FailureWindow {
            buckets: Default::default(),
            bucket_ms: (reset_timeout.as_millis() as u64 / BUCKETS as u64).max(1),
        }
    }

    /// Adds a failure at `now_ms`; returns the failures within the window.
    fn add(&self, now_ms: u64) -> u32 {
        let epoch = now_ms / self.bucket_ms;
        let slot = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let mut current = slot.load(Ordering::Acquire);
        loop {
            let (e, count) = (current >> 24, current & 0xff_ffff);
            let next = if e == epoch {
                (e << 24) | (count + 1).min(0xff_ffff)
            } else {
                (epoch << 24) | 1
            };
            match slot.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        self.count(epoch)
    }

    fn count(&self, epoch: u64) -> u32 {
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .filter(|w| {
                let e = w >> 24;
                e >= oldest && e <= epoch
            })
            .map(|w| (w & 0xff_ffff) as u32)
            .sum()
    }

    fn clear(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Release);
        }
    }
}

/// The last `window` calls, for the failure-rate mode.
#[derive(Debug)]
struct Ring {
    // Bit 0: failure, bit 1: slow.
    slots: Box<[AtomicU8]>,
    cursor: AtomicU64,
    failures: AtomicU32,
    slow: AtomicU32,
}

impl Ring {
    fn new(window: u32) -> Self {
        Ring {
            slots: (0..window).map(|_| AtomicU8::new(0)).collect(),
            cursor: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            slow: AtomicU32::new(0),
        }
    }

    /// Records a call; returns (calls, failures, slow) in the window.
    fn push(&self, failure: bool, slow: bool) -> (u32, u32, u32) {
        let bits = u8::from(failure) | (u8::from(slow) << 1);
        let n = self.cursor.fetch_add(1, Ordering::AcqRel);
        let len = self.slots.len() as u64;
        let old = self.slots[(n % len) as usize].swap(bits, Ordering::AcqRel);
        let adjust = |counter: &AtomicU32, was: bool, is: bool| match (was, is) {
            (false, true) => counter.fetch_add(1, Ordering::AcqRel) + 1,
            (true, false) => counter.fetch_sub(1, Ordering::AcqRel).saturating_sub(1),
            _ => counter.load(Ordering::Acquire),
        };
        let failures = adjust(&self.failures, old & 1 != 0, failure);
        let slow_calls = adjust(&self.slow, old & 2 != 0, slow);
        ((n + 1).min(len) as u32, failures, slow_calls)
    }

    fn clear(&self) {
        for s in self.slots.iter() {
            s.store(0, Ordering::Release);
        }
        self.failures.store(0, Ordering::Release);
        self.slow.store(0, Ordering::Release);
        self.cursor.store(0, Ordering::Release);
    }
}

/// Metric handles, registered once per breaker.
#[derive(Debug)]
struct Metrics {
    // [admitting state: closed, half_open, disabled][verdict]
    calls: [[Counter; 3]; 3],
    latency: Histogram,
    // [open, half_open, forced_open]
    rejected: [Counter; 3],
    gauge: [Gauge; 5],
}

impl Metrics {
    fn new(name: &Arc<str>) -> Self {
        let breaker = name.to_string();
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
        gauge[State::Closed.index()].set(1.0);
        Metrics {
            calls,
            latency: metrics::histogram!("circuit_breaker.call.latency", "breaker" => breaker),
            rejected,
            gauge,
        }
    }
}

/// One breaker.
#[derive(Debug)]
pub(crate) struct Core {
    name: Arc<str>,
    config: BreakerConfig,
    base: Instant,
    word: Padded<AtomicU64>,
    opened_at_ms: AtomicU64,
    probes: AtomicU64,
    probe_successes: AtomicU64,
    failures: FailureWindow,
    ring: Option<Ring>,
    transition: Mutex<()>,
    metrics: Metrics,
    hub: Arc<Hub>,
}

impl Core {
    pub(crate) fn new(name: Arc<str>, config: BreakerConfig, hub: Arc<Hub>) -> Self {
        Core {
            metrics: Metrics::new(&name),
            failures: FailureWindow::new(config.reset_timeout),
            ring: config.failure_rate.as_ref().map(|r| Ring::new(r.window)),
            name,
            config,
            base: Instant::now(),
            word: Padded(AtomicU64::new(pack(0, State::Closed))),
            opened_at_ms: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            probe_successes: AtomicU64::new(0),
            transition: Mutex::new(()),
            hub,
        }
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub(crate) fn config(&self) -> &BreakerConfig {
        &self.config
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.base).as_millis() as u64
    }

    fn open_elapsed(&self, now: Instant) -> bool {
        let opened = self.opened_at_ms.load(Ordering::Acquire);
        self.ms(now) >= opened.saturating_add(self.config.timeout.as_millis() as u64)
    }

    /// The current state; an OPEN breaker whose timeout has passed moves to
    /// HALF_OPEN here.
    pub(crate) fn state(&self, now: Instant) -> State {
        loop {
            let word = self.word.0.load(Ordering::Acquire);
            let (_, state) = unpack(word);
            if state == State::Open && self.open_elapsed(now) {
                self.transition(word, State::HalfOpen, now, Trigger::Timeout);
                continue;
            }
            return state;
        }
    }

    /// The current generation (bumped on every transition).
    #[cfg(test)]
    pub(crate) fn generation(&self) -> u32 {
        unpack(self.word.0.load(Ordering::Acquire)).0
    }

    /// Lets a call through, or says which state rejected it. `now` is read
    /// only when the breaker is OPEN.
    #[inline]
    pub(crate) fn admit(&self, now: impl Fn() -> Instant) -> Result<Admission, State> {
        loop {
            let word = self.word.0.load(Ordering::Acquire);
            let (generation, state) = unpack(word);
            match state {
                State::Closed | State::Disabled => return Ok(Admission { generation, state }),
                State::ForcedOpen => return Err(self.reject(state)),
                State::Open => {
                    let now = now();
                    if self.open_elapsed(now) {
                        self.transition(word, State::HalfOpen, now, Trigger::Timeout);
                        continue;
                    }
                    return Err(self.reject(state));
                }
                State::HalfOpen => {
                    let max = self.config.half_open_max();
                    let mut current = self.probes.load(Ordering::Acquire);
                    loop {
                        let (g, n) = unpack_count(current);
                        if g != generation {
                            // The state moved on since we read it.
                            break;
                        }
                        if n >= max {
                            return Err(self.reject(state));
                        }
                        match self.probes.compare_exchange_weak(
                            current,
                            pack_count(g, n + 1),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => return Ok(Admission { generation, state }),
                            Err(seen) => current = seen,
                        }
                    }
                }
            }
        }
    }

    fn reject(&self, state: State) -> State {
        let i = match state {
            State::Open => 0,
            State::HalfOpen => 1,
            _ => 2,
        };
        self.metrics.rejected[i].increment(1);
        state
    }

    /// Records how an admitted call went. Results from an earlier
    /// generation change nothing.
    pub(crate) fn record(
        &self,
        admission: Admission,
        verdict: Verdict,
        now: Instant,
        latency: Duration,
    ) {
        let row = match admission.state {
            State::Closed => 0,
            State::HalfOpen => 1,
            _ => 2,
        };
        self.metrics.calls[row][verdict.index()].increment(1);
        self.metrics.latency.record(latency.as_secs_f64());

        let word = self.word.0.load(Ordering::Acquire);
        let (generation, _) = unpack(word);
        if generation != admission.generation {
            return;
        }
        match admission.state {
            State::Closed => self.record_closed(word, verdict, now, latency),
            State::HalfOpen => self.record_probe(word, admission.generation, verdict, now),
            _ => {}
        }
    }

    fn record_closed(&self, word: u64, verdict: Verdict, now: Instant, latency: Duration) {
        if verdict == Verdict::Ignored {
            return;
        }
        let failure = verdict == Verdict::Failure;
        if let (Some(ring), Some(rate)) = (&self.ring, &self.config.failure_rate) {
            let slow = rate.slow_call_duration.is_some_and(|d| latency >= d);
            let (calls, failures, slow_calls) = ring.push(failure, slow);
            if calls < rate.minimum_calls {
                return;
            }
            let percent = |n: u32| f64::from(n) * 100.0 / f64::from(calls);
            if failures > 0 && percent(failures) >= rate.failure_rate {
                let trigger = Trigger::FailureRate {
                    percent: percent(failures),
                    calls,
                };
                self.transition(word, State::Open, now, trigger);
            } else if rate.slow_call_duration.is_some()
                && slow_calls > 0
                && percent(slow_calls) >= rate.slow_call_rate
            {
                let trigger = Trigger::SlowCallRate {
                    percent: percent(slow_calls),
                    calls,
                };
                self.transition(word, State::Open, now, trigger);
            }
        } else if failure {
            let failures = self.failures.add(self.ms(now));
            if failures >= self.config.failure_threshold {
                self.transition(word, State::Open, now, Trigger::Failures(failures));
            }
        }
    }

    fn record_probe(&self, word: u64, generation: u32, verdict: Verdict, now: Instant) {
        match verdict {
            Verdict::Failure => {
                self.transition(word, State::Open, now, Trigger::ProbeFailed);
            }
            Verdict::Ignored => self.release_probe(generation),
            Verdict::Success => {
                let mut current = self.probe_successes.load(Ordering::Acquire);
                let successes = loop {
                    let (g, n) = unpack_count(current);
                    if g != generation {
                        return;
                    }
                    match self.probe_successes.compare_exchange_weak(
                        current,
                        pack_count(g, n + 1),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    ) {
                        Ok(_) => break n + 1,
                        Err(seen) => current = seen,
                    }
                };
                if successes >= self.config.success_threshold {
                    self.transition(word, State::Closed, now, Trigger::Probes(successes));
                }
            }
        }
    }

    /// Gives a HALF_OPEN slot back (a probe that was cancelled).
    pub(crate) fn release_probe(&self, generation: u32) {
        let mut current = self.probes.load(Ordering::Acquire);
        loop {
            let (g, n) = unpack_count(current);
            if g != generation || n == 0 {
                return;
            }
            match self.probes.compare_exchange_weak(
                current,
                pack_count(g, n - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }

    /// Moves from the state in `expected` to `to`; false if another
    /// transition got there first.
    fn transition(&self, expected: u64, to: State, now: Instant, trigger: Trigger) -> bool {
        let guard = self
            .transition
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let word = self.word.0.load(Ordering::Acquire);
        if word != expected {
            return false;
        }
        let (generation, from) = unpack(word);
        let next = generation.wrapping_add(1);
        match to {
            State::Open => self.opened_at_ms.store(self.ms(now), Ordering::Release),
            State::HalfOpen => {
                self.probes.store(pack_count(next, 0), Ordering::Release);
                self.probe_successes
                    .store(pack_count(next, 0), Ordering::Release);
            }
            State::Closed => {
                self.failures.clear();
                if let Some(ring) = &self.ring {
                    ring.clear();
                }
            }
            State::ForcedOpen | State::Disabled => {}
        }
        self.word.0.store(pack(next, to), Ordering::Release);
        drop(guard);
        self.announce(StateChange {
            breaker: self.name.clone(),
            from,
            to,
            generation: next,
            trigger,
        });
        true
    }

    /// Moves to `to` from whatever state the breaker is in (operator
    /// actions: reset, force open, disable).
    pub(crate) fn force(&self, to: State, trigger: Trigger) {
        let now = Instant::now();
        loop {
            let word = self.word.0.load(Ordering::Acquire);
            if unpack(word).1 == to && to != State::Closed {
                return;
            }
            if self.transition(word, to, now, trigger.clone()) {
                return;
            }
        }
    }

    fn announce(&self, change: StateChange) {
        self.metrics.gauge[change.from.index()].set(0.0);
        self.metrics.gauge[change.to.index()].set(1.0);
        metrics::counter!(
            "circuit_breaker.transitions.count",
            "breaker" => self.name.to_string(),
            "from" => change.from.as_str(),
            "to" => change.to.as_str(),
        )
        .increment(1);
        let breaker = &*self.name;
        match (&change.trigger, change.to) {
            (Trigger::Failures(n), State::Open) => tracing::warn!(
                breaker,
                failures = n,
                from = change.from.as_str(),
                "Circuit breaker opening after {n} failures"
            ),
            (Trigger::FailureRate { percent, calls }, State::Open) => tracing::warn!(
                breaker,
                failure_rate = percent,
                calls,
                "Circuit breaker opening: failure rate {percent:.0}% over the last {calls} calls"
            ),
            (Trigger::SlowCallRate { percent, calls }, State::Open) => tracing::warn!(
                breaker,
                slow_call_rate = percent,
                calls,
                "Circuit breaker opening: slow-call rate {percent:.0}% over the last {calls} calls"
            ),
            (Trigger::ProbeFailed, State::Open) => {
                tracing::warn!(
                    breaker,
                    "Circuit breaker opening again: a half-open probe failed"
                )
            }
            (_, State::HalfOpen) => tracing::info!(
                breaker,
                timeout_ms = self.config.timeout.as_millis() as u64,
                "Circuit breaker half-open: letting probes through"
            ),
            (Trigger::Probes(n), State::Closed) => {
                tracing::info!(
                    breaker,
                    successes = n,
                    "Circuit breaker closed after {n} successful probes"
                )
            }
            (trigger, to) => tracing::info!(
                breaker,
                ?trigger,
                to = to.as_str(),
                "Circuit breaker {to} by an operator"
            ),
        }
        self.hub.publish(&change);
    }
}

#[cfg(test)]
mod tests;
