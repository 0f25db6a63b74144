//! State changes, for alerting.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::broadcast;

use crate::State;

/// Why a breaker changed state.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// This many failures within `reset_timeout`.
    Failures(u32),
    /// The failure rate (percent) over the last `calls` calls.
    FailureRate {
        /// Failures in percent.
        percent: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// The slow-call rate (percent) over the last `calls` calls.
    SlowCallRate {
        /// Slow calls in percent.
        percent: f64,
        /// Calls in the window.
        calls: u32,
    },
    /// A HALF_OPEN probe failed.
    ProbeFailed,
    /// OPEN lasted `timeout`.
    Timeout,
    /// This many HALF_OPEN probes succeeded.
    Probes(u32),
    /// An operator reset the breaker.
    Reset,
    /// An operator forced the breaker open.
    ForcedOpen,
    /// An operator disabled the breaker.
    Disabled,
}

/// A breaker moved from one state to another.
#[derive(Clone, Debug, PartialEq)]
pub struct StateChange {
    /// The breaker's name.
    pub breaker: Arc<str>,
    /// The state it left.
    pub from: State,
    /// The state it entered.
    pub to: State,
    /// The generation it entered; later changes of the breaker have higher
    /// generations (an operator reset of a closed breaker also moves the
    /// generation on, without a change).
    pub generation: u32,
    /// Why.
    pub trigger: Trigger,
}

type Callback = Arc<dyn Fn(&StateChange) + Send + Sync>;

/// Where state changes go: callbacks and a broadcast channel.
pub(crate) struct Hub {
    callbacks: Mutex<Vec<Callback>>,
    channel: broadcast::Sender<StateChange>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    pub(crate) fn new() -> Self {
        Hub {
            callbacks: Mutex::new(Vec::new()),
            channel: broadcast::channel(256).0,
        }
    }

    pub(crate) fn subscribe_fn(&self, f: Callback) {
        self.callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(f);
    }

    pub(crate) fn watch(&self) -> broadcast::Receiver<StateChange> {
        self.channel.subscribe()
    }

    pub(crate) fn publish(&self, change: &StateChange) {
        // Clone the list so a callback may subscribe or act on the registry.
        let callbacks = self
            .callbacks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for f in callbacks {
            f(change);
        }
        // No receivers is fine.
        let _ = self.channel.send(change.clone());
    }
}
