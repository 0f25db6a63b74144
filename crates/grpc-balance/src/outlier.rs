//! Outlier ejection: which endpoints are out of the ready set, why, for
//! how long, and how they come back.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use grpc_circuit_breaker::{BreakerRegistry, State, StateChange, Trigger};
use rustc_hash::FxHashMap;
use tokio::runtime::Handle;
use tokio::time::Instant;

use crate::config::BalanceConfig;
use crate::endpoint::{ACTIVE, EJECTED, EndpointState, PROBING};

/// Why an endpoint was ejected (the `reason` label of
/// `outlier.ejections.count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Its circuit breaker opened.
    Breaker,
    /// A probe failed while it was coming back.
    ProbeFailed,
    /// Its success rate fell below the others'.
    SuccessRate,
    /// Its health watch reported it was not serving.
    Health,
}

impl Reason {
    /// `breaker`, `probe_failed`, `success_rate` or `health`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Breaker => "breaker",
            Reason::ProbeFailed => "probe_failed",
            Reason::SuccessRate => "success_rate",
            Reason::Health => "health",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one endpoint stands, as [`BalancedChannel::endpoints`](crate::BalancedChannel::endpoints) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointStatus {
    /// In the ready set.
    Active,
    /// Out of the ready set, for this reason.
    Ejected(Reason),
    /// Coming back: takes a few probe calls at a time.
    Probing,
}

impl fmt::Display for EndpointStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointStatus::Active => f.write_str("active"),
            EndpointStatus::Ejected(reason) => write!(f, "ejected ({reason})"),
            EndpointStatus::Probing => f.write_str("probing"),
        }
    }
}

/// One endpoint's standing and history, as
/// [`BalancedChannel::endpoint_details`](crate::BalancedChannel::endpoint_details)
/// reports it: what an operator's status page shows.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointDetails {
    /// The endpoint's key (`host:port`).
    pub key: String,
    /// Its breaker's name (`<name>@<host:port>`).
    pub breaker: String,
    /// In the ready set, ejected (and why) or probing.
    pub status: EndpointStatus,
    /// Its breaker's state (`None` only if the breaker was removed from
    /// the registry by other code).
    pub breaker_state: Option<State>,
    /// Ejections since the endpoint was added.
    pub ejections: u64,
    /// Ejections in a row: the current (or last) ejection lasted
    /// `base_ejection_time` times this, capped.
    pub consecutive_ejections: u32,
    /// Its health watch last reported anything but `SERVING`.
    pub not_serving: bool,
}

impl EndpointDetails {
    /// Out of the ready set now (probing endpoints are not counted).
    pub fn is_ejected(&self) -> bool {
        matches!(self.status, EndpointStatus::Ejected(_))
    }
}

/// Decides ejections for one balanced channel.
pub(crate) struct Controller {
    pub(crate) config: BalanceConfig,
    pub(crate) registry: BreakerRegistry,
    pub(crate) handle: Handle,
    /// Endpoints by breaker name.
    endpoints: Mutex<FxHashMap<Arc<str>, Arc<EndpointState>>>,
    ejected: metrics::Gauge,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.config.name())
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub(crate) fn new(
        config: BalanceConfig,
        registry: BreakerRegistry,
        handle: Handle,
    ) -> Arc<Self> {
        let ejected = metrics::gauge!("outlier.ejected", "balancer" => config.name().to_owned());
        let controller = Arc::new(Controller {
            config,
            registry,
            handle,
            endpoints: Mutex::default(),
            ejected,
        });
        let weak = Arc::downgrade(&controller);
        controller.registry.subscribe(move |change| {
            if let Some(controller) = weak.upgrade() {
                controller.on_breaker_change(change);
            }
        });
        if let Some(rate) = controller.config.outlier().success_rate() {
            let weak = Arc::downgrade(&controller);
            let interval = rate.interval();
            let first = Instant::now() + interval;
            controller.handle.spawn(async move {
                let mut ticks = tokio::time::interval_at(first, interval);
                loop {
                    ticks.tick().await;
                    let Some(controller) = weak.upgrade() else {
                        return;
                    };
                    controller.judge_success_rates();
                }
            });
        }
        controller
    }

    fn map(&self) -> MutexGuard<'_, FxHashMap<Arc<str>, Arc<EndpointState>>> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The breaker name of the endpoint with this key.
    pub(crate) fn breaker_name(&self, key: &str) -> String {
        format!("{}@{}", self.config.name(), key)
    }

    pub(crate) fn insert(&self, state: Arc<EndpointState>) {
        let old = self.map().insert(state.breaker.clone(), state);
        drop(old);
        self.update_gauge();
    }

    pub(crate) fn remove(&self, breaker: &str) {
        let old = self.map().remove(breaker);
        if let Some(old) = old {
            old.abort_tasks();
        }
        self.update_gauge();
    }

    pub(crate) fn get(&self, breaker: &str) -> Option<Arc<EndpointState>> {
        self.map().get(breaker).cloned()
    }

    pub(crate) fn status(&self) -> BTreeMap<String, EndpointStatus> {
        let endpoints: Vec<_> = self.map().values().cloned().collect();
        endpoints
            .into_iter()
            .map(|ep| {
                let status = match ep.mode() {
                    ACTIVE => EndpointStatus::Active,
                    PROBING => EndpointStatus::Probing,
                    _ => EndpointStatus::Ejected(ep.slow().reason.unwrap_or(Reason::Breaker)),
                };
                (ep.key.to_string(), status)
            })
            .collect()
    }

    pub(crate) fn details(&self) -> BTreeMap<String, EndpointDetails> {
        let endpoints: Vec<_> = self.map().values().cloned().collect();
        endpoints
            .into_iter()
            .map(|ep| {
                let (reason, consecutive, not_serving) = {
                    let slow = ep.slow();
                    (slow.reason, slow.consecutive, slow.unhealthy)
                };
                let status = match ep.mode() {
                    ACTIVE => EndpointStatus::Active,
                    PROBING => EndpointStatus::Probing,
                    _ => EndpointStatus::Ejected(reason.unwrap_or(Reason::Breaker)),
                };
                let details = EndpointDetails {
                    key: ep.key.to_string(),
                    breaker: ep.breaker.to_string(),
                    status,
                    breaker_state: self.registry.state(&ep.breaker),
                    ejections: ep.ejections.load(Ordering::Relaxed),
                    consecutive_ejections: consecutive,
                    not_serving,
                };
                (ep.key.to_string(), details)
            })
            .collect()
    }

    fn update_gauge(&self) {
        let n = self
            .map()
            .values()
            .filter(|ep| ep.mode() == EJECTED)
            .count();
        self.ejected.set(n as f64);
    }

    fn on_breaker_change(self: &Arc<Self>, change: &StateChange) {
        let Some(ep) = self.get(&change.breaker) else {
            return;
        };
        match (change.to, &change.trigger) {
            (State::Open | State::ForcedOpen, _) => {
                let reason = if ep.mode() == PROBING {
                    Reason::ProbeFailed
                } else {
                    Reason::Breaker
                };
                self.eject(&ep, reason);
            }
            (State::Closed, Trigger::Probes(_)) => {
                ep.slow().wants_ejection = false;
                if ep.mode() == PROBING {
                    self.activate(&ep);
                }
            }
            // An operator's reset or switch-off brings it back at once (our
            // own reset on SERVING leaves it probing).
            (State::Closed | State::Disabled, Trigger::Reset | Trigger::Disabled) => {
                ep.slow().wants_ejection = false;
                if ep.mode() != ACTIVE && !ep.resetting.load(Ordering::Acquire) {
                    self.activate(&ep);
                }
            }
            _ => {}
        }
    }

    /// Takes `ep` out of the ready set, unless that would eject more than
    /// `max_ejection_percent` of the endpoints. Returns whether it is out.
    pub(crate) fn eject(self: &Arc<Self>, ep: &Arc<EndpointState>, reason: Reason) -> bool {
        let (until, epoch, n) = {
            let map = self.map();
            let total = map.len();
            let out = map.values().filter(|e| e.mode() != ACTIVE).count();
            let mut slow = ep.slow();
            if ep.mode() == EJECTED {
                // Already out: a NOT_SERVING keeps it out until SERVING.
                if reason == Reason::Health {
                    slow.reason = Some(Reason::Health);
                    slow.epoch += 1;
                }
                return true;
            }
            if ep.mode() == ACTIVE {
                let cap = total * usize::from(self.config.outlier().max_ejection_percent()) / 100;
                if out + 1 > cap {
                    slow.wants_ejection = true;
                    tracing::warn!(
                        endpoint = %ep.key,
                        %reason,
                        ejected = out,
                        endpoints = total,
                        "endpoint not ejected: max_ejection_percent reached"
                    );
                    return false;
                }
            }
            slow.wants_ejection = false;
            let now = Instant::now();
            if ep.mode() == ACTIVE
                && now.saturating_duration_since(slow.active_since)
                    >= self.config.outlier().max_ejection_time()
            {
                slow.consecutive = 0;
            }
            slow.consecutive = slow.consecutive.saturating_add(1);
            slow.reason = Some(reason);
            slow.epoch += 1;
            ep.mode.store(EJECTED, Ordering::Release);
            ep.ejections.fetch_add(1, Ordering::Relaxed);
            let time = self.config.outlier().ejection_time(slow.consecutive);
            // A health ejection lasts until the endpoint says SERVING again
            // (or its watch breaks).
            let until = (!slow.unhealthy).then(|| now + time);
            (until, slow.epoch, slow.consecutive)
        };
        ep.waker.wake();
        metrics::counter!(
            "outlier.ejections.count",
            "endpoint" => ep.breaker.to_string(),
            "reason" => reason.as_str()
        )
        .increment(1);
        tracing::warn!(endpoint = %ep.key, %reason, consecutive = n, "endpoint ejected");
        self.update_gauge();
        if let Some(until) = until {
            self.schedule_return(ep, epoch, until);
        }
        true
    }

    /// Ends ejection `epoch` of `ep` at `until` (unless it has changed).
    pub(crate) fn schedule_return(
        self: &Arc<Self>,
        ep: &Arc<EndpointState>,
        epoch: u64,
        until: Instant,
    ) {
        let weak_ep = Arc::downgrade(ep);
        let weak = Arc::downgrade(self);
        let task = self.handle.spawn(async move {
            tokio::time::sleep_until(until).await;
            if let (Some(controller), Some(ep)) = (weak.upgrade(), weak_ep.upgrade()) {
                controller.start_probing(&ep, Some(epoch));
            }
        });
        ep.add_task(task.abort_handle());
    }

    /// Lets probes through to `ep` (if it is still in ejection `epoch`,
    /// when given).
    pub(crate) fn start_probing(&self, ep: &Arc<EndpointState>, epoch: Option<u64>) {
        {
            let mut slow = ep.slow();
            if ep.mode() != EJECTED || epoch.is_some_and(|e| e != slow.epoch) {
                return;
            }
            slow.epoch += 1;
            ep.probe_successes.store(0, Ordering::Relaxed);
            ep.mode.store(PROBING, Ordering::Release);
        }
        tracing::info!(endpoint = %ep.key, "ejection over: probing the endpoint");
        ep.waker.wake();
        self.update_gauge();
    }

    pub(crate) fn activate(self: &Arc<Self>, ep: &Arc<EndpointState>) {
        {
            let mut slow = ep.slow();
            if ep.mode() == ACTIVE {
                return;
            }
            slow.reason = None;
            slow.epoch += 1;
            slow.active_since = Instant::now();
            ep.mode.store(ACTIVE, Ordering::Release);
        }
        tracing::info!(endpoint = %ep.key, "endpoint back in the ready set");
        ep.waker.wake();
        self.update_gauge();
        // An endpoint whose breaker opened while the cap kept it in gets
        // its turn now.
        for other in self.wanting() {
            if matches!(
                self.registry.state(&other.breaker),
                Some(State::Open | State::ForcedOpen)
            ) {
                self.eject(&other, Reason::Breaker);
            }
        }
    }

    pub(crate) fn on_probe_outcome(self: &Arc<Self>, ep: &Arc<EndpointState>, ok: bool) {
        if ep.mode() != PROBING {
            return;
        }
        if ok {
            let n = ep.probe_successes.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.config.outlier().probe_successes() {
                self.activate(ep);
            }
        } else {
            self.eject(ep, Reason::ProbeFailed);
        }
    }

    pub(crate) fn on_probe_cancelled(&self, _ep: &Arc<EndpointState>) {}

    /// Health: the endpoint said NOT_SERVING (or an unknown status).
    pub(crate) fn on_not_serving(self: &Arc<Self>, ep: &Arc<EndpointState>) {
        ep.slow().unhealthy = true;
        if ep.mode() == EJECTED && ep.slow().reason == Some(Reason::Health) {
            return;
        }
        self.eject(ep, Reason::Health);
    }

    /// Health: the endpoint said SERVING.
    pub(crate) fn on_serving(self: &Arc<Self>, ep: &Arc<EndpointState>) {
        let was_unhealthy = std::mem::replace(&mut ep.slow().unhealthy, false);
        if ep.mode() != EJECTED {
            return;
        }
        // Probe at once instead of waiting out the ejection; the breaker,
        // if it is open, is reset so the probes reach the endpoint.
        self.start_probing(ep, None);
        if matches!(
            self.registry.state(&ep.breaker),
            Some(State::Open | State::HalfOpen)
        ) {
            ep.resetting.store(true, Ordering::Release);
            let _ = self.registry.reset(&ep.breaker);
            ep.resetting.store(false, Ordering::Release);
        }
        if was_unhealthy {
            tracing::info!(endpoint = %ep.key, "health: SERVING again");
        }
    }

    /// Health: the watch broke; an endpoint ejected for health alone now
    /// comes back on the passive schedule.
    pub(crate) fn on_watch_broken(self: &Arc<Self>, ep: &Arc<EndpointState>) {
        let (epoch, consecutive) = {
            let mut slow = ep.slow();
            let was = std::mem::replace(&mut slow.unhealthy, false);
            if !was || ep.mode() != EJECTED {
                return;
            }
            (slow.epoch, slow.consecutive)
        };
        let until = Instant::now() + self.config.outlier().ejection_time(consecutive);
        self.schedule_return(ep, epoch, until);
    }

    fn judge_success_rates(self: &Arc<Self>) {
        let Some(rate) = self.config.outlier().success_rate() else {
            return;
        };
        let endpoints: Vec<_> = self.map().values().cloned().collect();
        let mut judged = Vec::new();
        for ep in endpoints {
            let ok = ep.ok.swap(0, Ordering::Relaxed);
            let failed = ep.failed.swap(0, Ordering::Relaxed);
            let total = ok + failed;
            if ep.mode() == ACTIVE && total >= rate.request_volume() {
                judged.push((ep, ok as f64 / total as f64));
            }
        }
        if judged.len() < rate.minimum_hosts() {
            return;
        }
        let n = judged.len() as f64;
        let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / n;
        let variance = judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
        let threshold = mean - rate.stdev_factor() * variance.sqrt();
        for (ep, r) in judged {
            if r < threshold {
                tracing::warn!(endpoint = %ep.key, success_rate = r, threshold, "success rate below the others'");
                self.eject(&ep, Reason::SuccessRate);
            }
        }
    }

    /// Breaker ejections kept in by the cap get their turn when another
    /// endpoint comes back.
    pub(crate) fn wanting(&self) -> Vec<Arc<EndpointState>> {
        self.map()
            .values()
            .filter(|ep| ep.slow().wants_ejection)
            .cloned()
            .collect()
    }
}
