//! The state machine of one breaker: lock-free admission and recording,
//! transitions under a lock, state changes published in transition order.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::BreakerConfig;
use crate::events::{Hub, StateChange, Trigger};
use crate::metrics::Metrics;
use crate::sync::{AtomicArc, AtomicU64, Loaded, Mutex, Ordering, lock, try_lock};
use crate::window::{Counts, saturating_ms};
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

pub(crate) const STATES: [State; 5] = [
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
    #[cfg_attr(grpc_resilience_loom, allow(dead_code))]
    pub(crate) fn as_str(self) -> &'static str {
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
#[derive(Debug)]
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

/// Results of HALF_OPEN probes: the low 16 bits of the generation, then
/// successes, failures and slow calls, 16 bits each (probes are at most
/// [`MAX_PROBES`](crate::config::MAX_PROBES)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProbeResults {
    generation: u16,
    successes: u16,
    failures: u16,
    slow: u16,
}

impl ProbeResults {
    fn new(generation: u32) -> Self {
        ProbeResults {
            generation: generation as u16,
            successes: 0,
            failures: 0,
            slow: 0,
        }
    }

    fn pack(self) -> u64 {
        (u64::from(self.generation) << 48)
            | (u64::from(self.successes) << 32)
            | (u64::from(self.failures) << 16)
            | u64::from(self.slow)
    }

    fn unpack(word: u64) -> Self {
        ProbeResults {
            generation: (word >> 48) as u16,
            successes: (word >> 32) as u16,
            failures: (word >> 16) as u16,
            slow: word as u16,
        }
    }
}

/// A breaker's config with the counts of its current (or last) CLOSED
/// period; replaced whole, so a call reads one consistent set.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) config: BreakerConfig,
    /// The generation of the CLOSED period `counts` belongs to.
    generation: u32,
    counts: Arc<Counts>,
}

/// The failure codes of the current settings as a bit mask, whether the
/// breaker counts by rate, and whether calls are timed and their latency
/// recorded: all a successful CLOSED call needs, in one atomic word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hot(u64);

const RATE_MODE: u64 = 1 << 32;
// Calls are timed (the latency histogram or a slow-call threshold).
const TIMED: u64 = 1 << 33;
// The latency histogram is recorded.
const LATENCY_METRIC: u64 = 1 << 34;

impl Hot {
    fn of(config: &BreakerConfig) -> Self {
        let mask = config
            .failure_codes
            .iter()
            .fold(0u64, |m, code| m | 1 << (code as i32 as u32 & 31));
        let flag = |on: bool, bit: u64| if on { bit } else { 0 };
        Hot(mask
            | flag(config.failure_rate.is_some(), RATE_MODE)
            | flag(config.times_calls(), TIMED)
            | flag(config.latency_metric, LATENCY_METRIC))
    }

    /// Whether `code` counts as a failure.
    #[inline]
    pub(crate) fn is_failure(self, code: tonic::Code) -> bool {
        self.0 & (1 << (code as i32 as u32 & 31)) != 0
    }

    fn rate_mode(self) -> bool {
        self.0 & RATE_MODE != 0
    }

    /// Whether calls are timed: the latency histogram or a slow-call
    /// threshold reads their latency.
    #[inline]
    pub(crate) fn timed(self) -> bool {
        self.0 & TIMED != 0
    }

    fn latency_metric(self) -> bool {
        self.0 & LATENCY_METRIC != 0
    }
}

/// Whether a call of `latency` (none when the call was not timed: the
/// settings changed after it was admitted) is slow under `threshold`.
fn is_slow(threshold: Option<Duration>, latency: Option<Duration>) -> bool {
    threshold.is_some_and(|d| latency.is_some_and(|l| l >= d))
}

/// What the registry reports about a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) state: State,
    pub(crate) failures: u32,
    pub(crate) calls: Option<u32>,
    pub(crate) next_probe_in: Option<Duration>,
}

/// One breaker.
#[derive(Debug)]
pub(crate) struct Core {
    name: Arc<str>,
    base: Instant,
    word: Padded<AtomicU64>,
    settings: AtomicArc<Settings>,
    // From `settings`, for the path of a successful call.
    hot: AtomicU64,
    opened_at_ms: AtomicU64,
    probes: AtomicU64,
    probe_results: AtomicU64,
    transition: Mutex<()>,
    // Changes waiting to be published, in transition order, and the turn
    // to publish them.
    pending: Mutex<VecDeque<StateChange>>,
    publishing: Mutex<()>,
    metrics: Metrics,
    hub: Arc<Hub>,
}

impl Core {
    pub(crate) fn new(name: Arc<str>, config: BreakerConfig, hub: Arc<Hub>) -> Self {
        let core = Core {
            metrics: Metrics::new(name.clone()),
            hot: AtomicU64::new(Hot::of(&config).0),
            settings: AtomicArc::new(Arc::new(Settings {
                counts: Arc::new(Counts::new(&config)),
                config,
                generation: 0,
            })),
            name,
            base: Instant::now(),
            word: Padded(AtomicU64::new(pack(0, State::Closed))),
            opened_at_ms: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            probe_results: AtomicU64::new(0),
            transition: Mutex::new(()),
            pending: Mutex::new(VecDeque::new()),
            publishing: Mutex::new(()),
            hub,
        };
        core.publish();
        core
    }

    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The failure codes and mode of the current settings.
    #[inline]
    pub(crate) fn hot(&self) -> Hot {
        Hot(self.hot.load(Ordering::Acquire))
    }

    /// The current settings; lock-free.
    #[inline]
    pub(crate) fn settings(&self) -> Loaded<Settings> {
        self.settings.load()
    }

    fn ms(&self, now: Instant) -> u64 {
        saturating_ms(now.saturating_duration_since(self.base))
    }

    /// When the breaker, OPEN since `opened_at_ms`, may let probes through.
    fn probe_at_ms(&self, config: &BreakerConfig) -> u64 {
        self.opened_at_ms
            .load(Ordering::Acquire)
            .saturating_add(saturating_ms(config.timeout))
    }

    fn open_elapsed(&self, now: Instant) -> bool {
        self.ms(now) >= self.probe_at_ms(&self.settings().config)
    }

    /// The current state; an OPEN breaker whose timeout has passed moves to
    /// HALF_OPEN here.
    pub(crate) fn state(&self, now: Instant) -> State {
        if self.metrics.check_recorder() {
            self.publish();
        }
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

    /// The state and counts, for the registry's snapshot.
    pub(crate) fn observe(&self, now: Instant) -> Observed {
        let state = self.state(now);
        let settings = self.settings();
        let (failures, calls) = match &*settings.counts {
            Counts::Failures(window) => (window.count(self.ms(now)), None),
            Counts::Rate(ring) => {
                let counts = ring.counts();
                (counts.failures, Some(counts.calls))
            }
        };
        let next_probe_in = (state == State::Open).then(|| {
            Duration::from_millis(
                self.probe_at_ms(&settings.config)
                    .saturating_sub(self.ms(now)),
            )
        });
        Observed {
            state,
            failures,
            calls,
            next_probe_in,
        }
    }

    /// The current generation (bumped on every transition and reset).
    #[cfg(all(test, not(grpc_resilience_loom)))]
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
                    let max = self.settings().config.half_open_max();
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
        if self.metrics.rejected(state) {
            self.publish();
        }
        state
    }

    /// Records how an admitted call went (judged with `hot`); `latency` is
    /// its time to the response headers. `now` is read only when needed.
    /// Results from an earlier generation change nothing. A success in
    /// count mode reads nothing more: no settings, no clock.
    #[inline]
    pub(crate) fn record(
        &self,
        hot: Hot,
        admission: Admission,
        verdict: Verdict,
        latency: Option<Duration>,
        now: impl Fn() -> Instant,
    ) {
        let histogram = latency
            .filter(|_| hot.latency_metric())
            .map(|l| l.as_secs_f64());
        if self.metrics.call(admission.state, verdict, histogram) {
            self.publish();
        }
        let word = self.word.0.load(Ordering::Acquire);
        let (generation, _) = unpack(word);
        if generation != admission.generation {
            return;
        }
        let counted = match verdict {
            Verdict::Ignored => admission.state == State::HalfOpen,
            Verdict::Success => admission.state == State::HalfOpen || hot.rate_mode(),
            Verdict::Failure => true,
        };
        if !counted {
            return;
        }
        let settings = self.settings();
        match admission.state {
            State::Closed => self.record_closed(&settings, word, admission, verdict, latency, now),
            State::HalfOpen => self.record_probe(&settings, word, admission, verdict, latency, now),
            _ => {}
        }
    }

    fn record_closed(
        &self,
        settings: &Settings,
        word: u64,
        admission: Admission,
        verdict: Verdict,
        latency: Option<Duration>,
        now: impl Fn() -> Instant,
    ) {
        // Counts of another CLOSED period (a reset came between): not ours.
        if verdict == Verdict::Ignored || settings.generation != admission.generation {
            return;
        }
        let failure = verdict == Verdict::Failure;
        match (&*settings.counts, &settings.config.failure_rate) {
            (Counts::Rate(ring), Some(rate)) => {
                let slow = is_slow(rate.slow_call_duration, latency);
                let counts = ring.push(failure, slow);
                if counts.calls < rate.minimum_calls {
                    return;
                }
                if let Some(trigger) = rate.trips(counts.calls, counts.failures, counts.slow) {
                    self.transition(word, State::Open, now(), trigger);
                }
            }
            (Counts::Failures(window), _) if failure => {
                let now = now();
                let failures = window.add(self.ms(now));
                if failures >= settings.config.failure_threshold {
                    self.transition(word, State::Open, now, Trigger::Failures(failures));
                }
            }
            _ => {}
        }
    }

    fn record_probe(
        &self,
        settings: &Settings,
        word: u64,
        admission: Admission,
        verdict: Verdict,
        latency: Option<Duration>,
        now: impl Fn() -> Instant,
    ) {
        let config = &settings.config;
        if verdict == Verdict::Ignored {
            return self.release_probe(admission.generation);
        }
        let rate = config.failure_rate.as_ref();
        if rate.is_none() && verdict == Verdict::Failure {
            // Count mode: any failure reopens.
            self.transition(word, State::Open, now(), Trigger::ProbeFailed);
            return;
        }
        let slow = is_slow(rate.and_then(|r| r.slow_call_duration), latency);
        let mut current = self.probe_results.load(Ordering::Acquire);
        let results = loop {
            let mut results = ProbeResults::unpack(current);
            if results.generation != admission.generation as u16 {
                return;
            }
            match verdict {
                Verdict::Failure => results.failures = results.failures.saturating_add(1),
                _ => results.successes = results.successes.saturating_add(1),
            }
            results.slow = results.slow.saturating_add(u16::from(slow));
            match self.probe_results.compare_exchange_weak(
                current,
                results.pack(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break results,
                Err(seen) => current = seen,
            }
        };
        let successes = u32::from(results.successes);
        let Some(rate) = rate else {
            if successes >= config.success_threshold {
                self.transition(word, State::Closed, now(), Trigger::Probes(successes));
            }
            return;
        };
        // Failure-rate mode: the probes are a sample, judged once complete
        // (or as soon as its failures alone decide it).
        let sample = config.half_open_max();
        let failures = u32::from(results.failures);
        let done = successes + failures;
        if f64::from(failures) * 100.0 >= rate.failure_rate * f64::from(sample) {
            let percent = f64::from(failures) * 100.0 / f64::from(done);
            let trigger = Trigger::FailureRate {
                percent,
                calls: done,
            };
            self.transition(word, State::Open, now(), trigger);
        } else if done >= sample {
            match rate.trips(done, failures, u32::from(results.slow)) {
                Some(trigger) => self.transition(word, State::Open, now(), trigger),
                None => self.transition(word, State::Closed, now(), Trigger::Probes(successes)),
            };
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

    /// Fresh counts for the CLOSED period of `generation`. Under the
    /// transition lock.
    fn fresh_counts(&self, generation: u32) {
        let current = self.settings();
        self.settings.store(Arc::new(Settings {
            config: current.config.clone(),
            generation,
            counts: Arc::new(Counts::new(&current.config)),
        }));
    }

    /// Moves from the state in `expected` to `to`; false if another
    /// transition got there first.
    fn transition(&self, expected: u64, to: State, now: Instant, trigger: Trigger) -> bool {
        {
            let _guard = lock(&self.transition);
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
                    self.probe_results
                        .store(ProbeResults::new(next).pack(), Ordering::Release);
                }
                State::Closed => self.fresh_counts(next),
                State::ForcedOpen | State::Disabled => {}
            }
            self.word.0.store(pack(next, to), Ordering::Release);
            // Queued under the transition lock: the queue is in transition
            // order.
            lock(&self.pending).push_back(StateChange {
                breaker: self.name.clone(),
                from,
                to,
                generation: next,
                trigger,
            });
        }
        self.publish();
        true
    }

    /// Forgets a CLOSED breaker's counts (and the results of calls still
    /// in flight), without a state change; false if the state moved on.
    fn clear_closed(&self, expected: u64) -> bool {
        let _guard = lock(&self.transition);
        let word = self.word.0.load(Ordering::Acquire);
        if word != expected {
            return false;
        }
        let next = unpack(word).0.wrapping_add(1);
        self.fresh_counts(next);
        self.word
            .0
            .store(pack(next, State::Closed), Ordering::Release);
        true
    }

    /// Moves to `to` from whatever state the breaker is in (operator
    /// actions: reset, force open, disable). Resetting a CLOSED breaker
    /// clears its counts silently.
    pub(crate) fn force(&self, to: State, trigger: Trigger) {
        let now = Instant::now();
        loop {
            let word = self.word.0.load(Ordering::Acquire);
            let done = if unpack(word).1 == to {
                to != State::Closed || self.clear_closed(word)
            } else {
                self.transition(word, to, now, trigger.clone())
            };
            if done {
                return;
            }
        }
    }

    /// Applies new settings for calls from now on; the state stays. Counts
    /// go on when the window has the same shape, else start afresh.
    pub(crate) fn reconfigure(&self, config: BreakerConfig) {
        let _guard = lock(&self.transition);
        let current = self.settings();
        let counts = if Counts::same_shape(&current.config, &config) {
            current.counts.clone()
        } else {
            Arc::new(Counts::new(&config))
        };
        self.hot.store(Hot::of(&config).0, Ordering::Release);
        self.settings.store(Arc::new(Settings {
            config,
            generation: current.generation,
            counts,
        }));
    }

    /// Publishes queued state changes, one thread at a time, in transition
    /// order: metrics, logs, callbacks, the broadcast channel. A thread
    /// that finds another publishing leaves its change to that one.
    fn publish(&self) {
        loop {
            let Some(turn) = try_lock(&self.publishing) else {
                return;
            };
            self.metrics
                .set_gauge_if_unset(|| unpack(self.word.0.load(Ordering::Acquire)).1);
            loop {
                let next = lock(&self.pending).pop_front();
                let Some(change) = next else { break };
                self.announce(&change);
            }
            drop(turn);
            // A change queued (or new metric handles made) after the
            // last look, while this thread held the turn, is published by
            // going round again.
            if lock(&self.pending).is_empty() && !self.metrics.gauge_unset() {
                return;
            }
        }
    }

    fn announce(&self, change: &StateChange) {
        self.metrics.transition(change.from, change.to);
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
                from = change.from.as_str(),
                "Circuit breaker opening: failure rate {percent:.0}% over the last {calls} calls"
            ),
            (Trigger::SlowCallRate { percent, calls }, State::Open) => tracing::warn!(
                breaker,
                slow_call_rate = percent,
                calls,
                from = change.from.as_str(),
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
                timeout_ms = saturating_ms(self.settings().config.timeout),
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
        self.hub.publish(change);
    }
}

#[cfg(all(test, grpc_resilience_loom))]
mod loom_tests;
#[cfg(all(test, not(grpc_resilience_loom)))]
mod tests;
