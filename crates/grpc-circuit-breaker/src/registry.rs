//! Named breakers: read their state, reset them, force them open.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rustc_hash::FxHashMap;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::config::{BreakerConfig, BreakerConfigError};
use crate::events::{Hub, StateChange, Trigger};
use crate::state::{Core, State};

#[derive(Debug)]
struct Inner {
    default_config: BreakerConfig,
    configs: Mutex<FxHashMap<String, BreakerConfig>>,
    breakers: Mutex<BTreeMap<Arc<str>, Arc<Core>>>,
    hub: Arc<Hub>,
}

/// Every breaker of an application, by name. Cheap to clone; clones share
/// the breakers.
///
/// Breakers are made on first use with the config given for their name
/// ([`BreakerRegistry::configure`]) or the registry's default.
///
/// ```
/// use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, State};
///
/// let registry = BreakerRegistry::new();
/// registry.configure("query", BreakerConfig::default().with_failure_threshold(3))?;
/// registry.get_or_create("command");
/// registry.get_or_create("query");
///
/// // The seed's get_circuit_breaker_status():
/// let status = registry.status();
/// assert_eq!(status["command"], State::Closed);
///
/// registry.force_open("query")?;
/// assert_eq!(registry.state("query"), Some(State::ForcedOpen));
/// // The seed's reset_circuit_breakers():
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
    /// A registry whose breakers default to the seed's settings.
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
                configs: Mutex::default(),
                breakers: Mutex::default(),
                hub: Arc::new(Hub::new()),
            }),
        }
    }

    /// Sets the config of the breaker called `name`. Takes effect when the
    /// breaker is made; configure breakers before their first call.
    ///
    /// # Errors
    ///
    /// [`BreakerConfigError`] naming the breaker and the bad field, or if
    /// the breaker already exists.
    pub fn configure(&self, name: &str, config: BreakerConfig) -> Result<(), BreakerConfigError> {
        config.validate().map_err(|e| e.for_breaker(name))?;
        if lock(&self.inner.breakers).contains_key(name) {
            return Err(BreakerConfigError::exists(name));
        }
        lock(&self.inner.configs).insert(name.to_owned(), config);
        Ok(())
    }

    /// The breaker called `name`, made now if it does not exist.
    pub(crate) fn core(&self, name: &str) -> Arc<Core> {
        let mut breakers = lock(&self.inner.breakers);
        if let Some(core) = breakers.get(name) {
            return core.clone();
        }
        let config = lock(&self.inner.configs)
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.inner.default_config.clone());
        let name: Arc<str> = name.into();
        let core = Arc::new(Core::new(name.clone(), config, self.inner.hub.clone()));
        breakers.insert(name, core.clone());
        core
    }

    /// Makes the breaker called `name` if it does not exist yet (so it
    /// shows in [`BreakerRegistry::status`] before its first call).
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
        self.existing(name).ok().map(|core| core.config().clone())
    }

    /// Closes the breaker called `name` and forgets its failures (also ends
    /// a forced-open or disabled state).
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

    /// Calls `f` on every state change of every breaker, on the thread that
    /// caused it. Keep it short; for slow work use [`BreakerRegistry::watch`].
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
