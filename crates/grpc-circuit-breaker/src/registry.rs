//! Named breakers: read their state, reset them, force them open.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::{BreakerConfig, BreakerConfigError};
use crate::events::{Hub, StateChange, Trigger};
use crate::state::{Core, State};

#[derive(Debug)]
struct Inner {
    default_config: BreakerConfig,
    breakers: Mutex<BTreeMap<Arc<str>, Arc<Core>>>,
    hub: Arc<Hub>,
}

/// One breaker at one moment, from [`BreakerRegistry::snapshot`].
///
/// The counts are those of the breaker's current CLOSED period: they stay
/// as they were while the breaker is open or half-open (they show what
/// opened it) and start afresh when it closes or is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSnapshot {
    state: State,
    failures: u32,
    calls: Option<u32>,
    next_probe_in: Option<Duration>,
}

impl BreakerSnapshot {
    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Failures in the current window: within `reset_timeout` in count
    /// mode, among the last `window` calls in the failure-rate mode.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Calls in the current window, in the failure-rate mode. `None` in
    /// count mode, which counts only failures (so that a successful call
    /// writes no memory shared between threads).
    pub fn calls_in_window(&self) -> Option<u32> {
        self.calls
    }

    /// For an OPEN breaker, the time until it lets probes through
    /// (HALF_OPEN); `None` in any other state.
    pub fn time_to_next_probe(&self) -> Option<Duration> {
        self.next_probe_in
    }
}

/// Every breaker of an application, by name. Cheap to clone; clones share
/// the breakers.
///
/// A breaker is made when it is configured ([`BreakerRegistry::configure`])
/// or else on its first call, with the registry's default config.
///
/// ```
/// use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, State};
///
/// let registry = BreakerRegistry::new();
/// registry.configure("query", BreakerConfig::default().with_failure_threshold(3))?;
/// registry.get_or_create("command");
///
/// // Every breaker, configured or used, by name.
/// let status = registry.status();
/// assert_eq!(status["command"], State::Closed);
/// assert_eq!(status["query"], State::Closed);
/// let query = registry.snapshot()["query"];
/// assert_eq!((query.failures(), query.time_to_next_probe()), (0, None));
///
/// registry.force_open("query")?;
/// assert_eq!(registry.state("query"), Some(State::ForcedOpen));
/// registry.reset_all();
/// assert_eq!(registry.state("query"), Some(State::Closed));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct BreakerRegistry {
    inner: Arc<Inner>,
}

impl Default for BreakerRegistry {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BreakerRegistry {
    /// A registry whose breakers default to [`BreakerConfig::default`].
    pub fn new() -> Self {
        Self::build(BreakerConfig::default())
    }

    /// A registry whose breakers default to `config`.
    ///
    /// # Errors
    ///
    /// [`BreakerConfigError`] if `config` is invalid.
    pub fn with_default_config(config: BreakerConfig) -> Result<Self, BreakerConfigError> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(default_config: BreakerConfig) -> Self {
        BreakerRegistry {
            inner: Arc::new(Inner {
                default_config,
                breakers: Mutex::default(),
                hub: Arc::new(Hub::new()),
            }),
        }
    }

    /// Sets the config of the breaker called `name`, making the breaker
    /// now if it does not exist (it is listed by [`status`](Self::status)
    /// from then on).
    ///
    /// A breaker that exists keeps its state and takes the new settings at
    /// once, for calls from now on: a new `timeout` applies to an open
    /// breaker from the moment it opened, new thresholds to the next
    /// result. Its counts go on when the window keeps its shape (same mode,
    /// same `window` or `reset_timeout`) and start afresh otherwise. The
    /// settings are swapped whole: a call counts under the old settings
    /// or the new ones, never a mix of the two (a call that finishes at the
    /// very moment of the swap may be judged by the old failure codes).
    ///
    /// # Errors
    ///
    /// [`BreakerConfigError`] naming the breaker and the bad field; the
    /// breaker then keeps the settings it had.
    pub fn configure(&self, name: &str, config: BreakerConfig) -> Result<(), BreakerConfigError> {
        config.validate().map_err(|e| e.for_breaker(name))?;
        let mut breakers = lock(&self.inner.breakers);
        match breakers.get(name) {
            Some(core) => core.reconfigure(config),
            None => {
                let name: Arc<str> = name.into();
                let core = Arc::new(Core::new(name.clone(), config, self.inner.hub.clone()));
                breakers.insert(name, core);
            }
        }
        Ok(())
    }

    /// The breaker called `name`, made now if it does not exist.
    pub(crate) fn core(&self, name: &str) -> Arc<Core> {
        let mut breakers = lock(&self.inner.breakers);
        if let Some(core) = breakers.get(name) {
            return core.clone();
        }
        let name: Arc<str> = name.into();
        let config = self.inner.default_config.clone();
        let core = Arc::new(Core::new(name.clone(), config, self.inner.hub.clone()));
        breakers.insert(name, core.clone());
        core
    }

    /// Makes the breaker called `name`, with the registry's default
    /// config, if it does not exist yet (so it shows in
    /// [`BreakerRegistry::status`] before its first call).
    pub fn get_or_create(&self, name: &str) {
        self.core(name);
    }

    fn existing(&self, name: &str) -> Result<Arc<Core>, UnknownBreaker> {
        lock(&self.inner.breakers)
            .get(name)
            .cloned()
            .ok_or_else(|| UnknownBreaker(name.to_owned()))
    }

    fn all(&self) -> Vec<Arc<Core>> {
        lock(&self.inner.breakers).values().cloned().collect()
    }

    /// Every breaker's state, by name.
    pub fn status(&self) -> BTreeMap<String, State> {
        let now = Instant::now();
        self.all()
            .into_iter()
            .map(|core| (core.name().to_string(), core.state(now)))
            .collect()
    }

    /// Every breaker's state and counts, by name.
    pub fn snapshot(&self) -> BTreeMap<String, BreakerSnapshot> {
        let now = Instant::now();
        self.all()
            .into_iter()
            .map(|core| {
                let seen = core.observe(now);
                let snapshot = BreakerSnapshot {
                    state: seen.state,
                    failures: seen.failures,
                    calls: seen.calls,
                    next_probe_in: seen.next_probe_in,
                };
                (core.name().to_string(), snapshot)
            })
            .collect()
    }

    /// The state of the breaker called `name`.
    pub fn state(&self, name: &str) -> Option<State> {
        self.existing(name)
            .ok()
            .map(|core| core.state(Instant::now()))
    }

    /// The names of every breaker.
    pub fn names(&self) -> Vec<String> {
        lock(&self.inner.breakers)
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// The config the breaker called `name` runs with.
    pub fn config(&self, name: &str) -> Option<BreakerConfig> {
        self.existing(name)
            .ok()
            .map(|core| core.settings().config.clone())
    }

    /// Closes the breaker called `name` and forgets its counts (also ends
    /// a forced-open or disabled state). Resetting a closed breaker only
    /// clears its counts: no state change is published.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is no such breaker.
    pub fn reset(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.existing(name)?.force(State::Closed, Trigger::Reset);
        Ok(())
    }

    /// Resets every breaker.
    pub fn reset_all(&self) {
        for core in self.all() {
            core.force(State::Closed, Trigger::Reset);
        }
    }

    /// Holds the breaker called `name` open (isolates the service) until
    /// it is reset.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is no such breaker.
    pub fn force_open(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.existing(name)?
            .force(State::ForcedOpen, Trigger::ForcedOpen);
        Ok(())
    }

    /// Switches the breaker called `name` off: every call flows and nothing
    /// is counted, until it is reset.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is no such breaker.
    pub fn disable(&self, name: &str) -> Result<(), UnknownBreaker> {
        self.existing(name)?
            .force(State::Disabled, Trigger::Disabled);
        Ok(())
    }

    /// Calls `f` on every state change of every breaker, in the order of
    /// the changes, on the thread that caused the change (or on one that
    /// was publishing an earlier change of the same breaker at the time).
    /// Keep it short; for slow work use [`BreakerRegistry::watch`].
    pub fn subscribe(&self, f: impl Fn(&StateChange) + Send + Sync + 'static) {
        self.inner.hub.subscribe_fn(Arc::new(f));
    }

    /// A channel of every state change of every breaker (it keeps the last
    /// 256 for a slow reader).
    pub fn watch(&self) -> broadcast::Receiver<StateChange> {
        self.inner.hub.watch()
    }
}

/// No breaker has this name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownBreaker(pub String);

impl fmt::Display for UnknownBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no circuit breaker is named `{}`", self.0)
    }
}

impl std::error::Error for UnknownBreaker {}
