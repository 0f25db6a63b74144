//! The shared handle that holds fault plans and what was seen.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use grpc_resilience_core::{MethodId, MethodMap, Selector};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::fault::{Action, Fault};
use crate::stats::{Call, Counters, MethodStats, RecordedCall};

/// How many calls the log keeps by default.
pub const DEFAULT_LOG_CAPACITY: usize = 1024;

#[derive(Debug)]
enum Plan {
    Script {
        steps: VecDeque<Fault>,
        then: Fault,
    },
    Random {
        rng: Box<StdRng>,
        choices: Vec<(f64, Fault)>,
    },
}

impl Plan {
    fn next(&mut self) -> Fault {
        match self {
            Plan::Script { steps, then } => steps.pop_front().unwrap_or_else(|| then.clone()),
            Plan::Random { rng, choices } => {
                let draw: f64 = rng.random();
                let mut edge = 0.0;
                for (p, fault) in choices.iter() {
                    edge += p;
                    if draw < edge {
                        return fault.clone();
                    }
                }
                Fault::pass()
            }
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    plans: Mutex<MethodMap<Plan>>,
    counters: Mutex<HashMap<Box<str>, Arc<Counters>>>,
    log: Mutex<VecDeque<Arc<Call>>>,
    log_capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Holds the fault plan of each method and counts what the server saw.
///
/// Cheap to clone: clones share everything. Give one clone to
/// [`FaultInjectionLayer`](crate::FaultInjectionLayer) and keep another to
/// script faults and read counters while the server runs.
///
/// Methods are named by selector strings, as in the rest of the
/// workspace: `GetProduct`, `catalog.v1.QueryService/*`,
/// `catalog.v1.QueryService/GetProduct` or `*`. The most specific plan
/// wins; a method with no plan gets [`Fault::pass`].
///
/// ```
/// use grpc_fault::{Fault, FaultInjector};
/// use tonic::Code;
///
/// let faults = FaultInjector::new();
/// // Call 1 and 2 fail, every later call passes.
/// faults.script("GetProduct", [Fault::status(Code::Unavailable), Fault::status(Code::Unavailable)])?;
/// // 20% of CreateProduct calls fail, reproducibly.
/// faults.random("CreateProduct", 7, [(0.2, Fault::status(Code::Unavailable))])?;
/// # Ok::<(), grpc_fault::FaultConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct FaultInjector {
    shared: Arc<Shared>,
}

impl Default for FaultInjector {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultInjector {
    /// An injector with no faults that logs the last
    /// [`DEFAULT_LOG_CAPACITY`] calls.
    pub fn new() -> Self {
        Self::with_log_capacity(DEFAULT_LOG_CAPACITY)
    }

    /// An injector whose call log keeps the last `capacity` calls (0 keeps
    /// none; the counters still count).
    pub fn with_log_capacity(capacity: usize) -> Self {
        FaultInjector {
            shared: Arc::new(Shared {
                log_capacity: capacity,
                ..Shared::default()
            }),
        }
    }

    /// The layer that injects this injector's faults.
    pub fn layer(&self) -> crate::FaultInjectionLayer {
        crate::FaultInjectionLayer::new(self.clone())
    }

    /// Gives the next calls of `selector` these faults in order; calls after
    /// the script pass.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn script(
        &self,
        selector: &str,
        faults: impl IntoIterator<Item = Fault>,
    ) -> Result<(), FaultConfigError> {
        self.script_then(selector, faults, Fault::pass())
    }

    /// Like [`FaultInjector::script`], and calls after the script get `then`.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn script_then(
        &self,
        selector: &str,
        faults: impl IntoIterator<Item = Fault>,
        then: Fault,
    ) -> Result<(), FaultConfigError> {
        let plan = Plan::Script {
            steps: faults.into_iter().collect(),
            then,
        };
        self.set_plan(selector, plan)
    }

    /// Gives every call of `selector` this fault.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn always(&self, selector: &str, fault: Fault) -> Result<(), FaultConfigError> {
        self.script_then(selector, [], fault)
    }

    /// Gives each call of `selector` one of the faults with its probability
    /// (and [`Fault::pass`] otherwise), drawn from a generator seeded with
    /// `seed`: the same seed gives the same sequence.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed, a probability is
    /// not within `[0, 1]`, or they add up to more than 1.
    pub fn random(
        &self,
        selector: &str,
        seed: u64,
        choices: impl IntoIterator<Item = (f64, Fault)>,
    ) -> Result<(), FaultConfigError> {
        let choices: Vec<(f64, Fault)> = choices.into_iter().collect();
        let mut total = 0.0;
        for (p, fault) in &choices {
            if !(0.0..=1.0).contains(p) {
                return Err(FaultConfigError::new(
                    selector,
                    format!(
                        "the probability {p} of fault `{}` is not within [0, 1]",
                        fault.name()
                    ),
                ));
            }
            total += p;
        }
        if total > 1.0 + 1e-9 {
            return Err(FaultConfigError::new(
                selector,
                format!("the probabilities add up to {total}, more than 1"),
            ));
        }
        let plan = Plan::Random {
            rng: Box::new(StdRng::seed_from_u64(seed)),
            choices,
        };
        self.set_plan(selector, plan)
    }

    /// Removes the plan of `selector`.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn clear(&self, selector: &str) -> Result<(), FaultConfigError> {
        let selector = parse(selector)?;
        lock(&self.shared.plans).remove(&selector);
        Ok(())
    }

    /// Removes every plan: all calls pass.
    pub fn clear_all(&self) {
        *lock(&self.shared.plans) = MethodMap::new();
    }

    fn set_plan(&self, selector: &str, plan: Plan) -> Result<(), FaultConfigError> {
        let selector = parse(selector)?;
        lock(&self.shared.plans).replace(selector, plan);
        Ok(())
    }

    /// The counters summed over the methods `selector` names (`*` for all).
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn stats(&self, selector: &str) -> Result<MethodStats, FaultConfigError> {
        let selector = parse(selector)?;
        let mut sum = MethodStats::default();
        for (path, counters) in lock(&self.shared.counters).iter() {
            let matches = match MethodId::from_path(path) {
                Ok(id) => selector.matches(&id),
                Err(_) => selector == Selector::Default,
            };
            if matches {
                sum.add(&counters.snapshot());
            }
        }
        Ok(sum)
    }

    /// The logged calls, oldest first.
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.shared.log)
            .iter()
            .map(|c| c.snapshot())
            .collect()
    }

    /// The logged calls of the methods `selector` names, oldest first.
    ///
    /// # Errors
    ///
    /// [`FaultConfigError`] if the selector is malformed.
    pub fn calls_to(&self, selector: &str) -> Result<Vec<RecordedCall>, FaultConfigError> {
        let selector = parse(selector)?;
        Ok(lock(&self.shared.log)
            .iter()
            .filter(|c| MethodId::from_path(&c.path).is_ok_and(|id| selector.matches(&id)))
            .map(|c| c.snapshot())
            .collect())
    }

    /// Zeroes the counters and empties the log; plans stay.
    pub fn reset_stats(&self) {
        lock(&self.shared.counters).clear();
        lock(&self.shared.log).clear();
    }

    /// Picks the fault for a request and starts its record.
    pub(crate) fn begin<B>(&self, request: &http::Request<B>) -> (Fault, Arc<Call>) {
        let path = request.uri().path();
        let fault = match MethodId::from_path(path) {
            Ok(id) => lock(&self.shared.plans).get_mut(&id).map(Plan::next),
            Err(_) => None,
        }
        .unwrap_or_else(Fault::pass);
        let counters = {
            let mut all = lock(&self.shared.counters);
            match all.get(path) {
                Some(c) => c.clone(),
                None => all.entry(path.into()).or_default().clone(),
            }
        };
        let injected = fault.action != Action::Pass || !fault.delay.is_zero();
        let call = Arc::new(Call::new(
            path.to_owned(),
            request.headers().clone(),
            fault.name(),
            counters,
            injected,
        ));
        if self.shared.log_capacity > 0 {
            let mut log = lock(&self.shared.log);
            if log.len() == self.shared.log_capacity {
                log.pop_front();
            }
            log.push_back(call.clone());
        }
        if injected {
            tracing::debug!(
                path,
                fault = fault.name(),
                delay_ms = u64::try_from(fault.delay.as_millis()).unwrap_or(u64::MAX),
                "injecting fault"
            );
        }
        (fault, call)
    }
}

fn parse(selector: &str) -> Result<Selector, FaultConfigError> {
    selector
        .parse()
        .map_err(|e| FaultConfigError::new(selector, format!("{e}")))
}

/// A fault plan that was rejected; it names the selector and the problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultConfigError {
    selector: String,
    reason: String,
}

impl FaultConfigError {
    fn new(selector: &str, reason: String) -> Self {
        FaultConfigError {
            selector: selector.to_owned(),
            reason,
        }
    }
}

impl fmt::Display for FaultConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid fault plan for `{}`: {}",
            self.selector, self.reason
        )
    }
}

impl std::error::Error for FaultConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn next(faults: &FaultInjector, path: &str) -> &'static str {
        faults.begin(&request(path)).0.name()
    }

    #[test]
    fn scripts_run_in_order_then_continue() {
        let faults = FaultInjector::new();
        faults
            .script_then(
                "GetProduct",
                [Fault::status(Code::Unavailable), Fault::lose_response()],
                Fault::slow_stream(std::time::Duration::from_millis(1)),
            )
            .unwrap();
        let path = "/catalog.v1.QueryService/GetProduct";
        assert_eq!(next(&faults, path), "status");
        assert_eq!(next(&faults, path), "lose_response");
        assert_eq!(next(&faults, path), "slow_stream");
        assert_eq!(next(&faults, path), "slow_stream");
        assert_eq!(
            next(&faults, "/catalog.v1.QueryService/ListProducts"),
            "pass"
        );
        assert_eq!(next(&faults, "/not-grpc"), "pass");
        let stats = faults.stats("GetProduct").unwrap();
        assert_eq!((stats.calls, stats.faults_injected), (4, 4));
        assert_eq!(faults.stats("*").unwrap().calls, 6);
        assert_eq!(faults.stats("catalog.v1.QueryService/*").unwrap().calls, 5);
        assert_eq!(faults.calls_to("ListProducts").unwrap().len(), 1);
    }

    #[test]
    fn most_specific_plan_wins_and_clear_removes_it() {
        let faults = FaultInjector::new();
        faults.always("*", Fault::status(Code::Internal)).unwrap();
        faults.always("a.B/C", Fault::lose_response()).unwrap();
        assert_eq!(next(&faults, "/a.B/C"), "lose_response");
        assert_eq!(next(&faults, "/a.B/D"), "status");
        faults.clear("a.B/C").unwrap();
        assert_eq!(next(&faults, "/a.B/C"), "status");
        faults.clear_all();
        assert_eq!(next(&faults, "/a.B/C"), "pass");
    }

    #[test]
    fn random_plans_are_reproducible_and_near_their_rate() {
        let run = |seed| {
            let faults = FaultInjector::with_log_capacity(0);
            faults
                .random("*", seed, [(0.2, Fault::status(Code::Unavailable))])
                .unwrap();
            (0..2000)
                .map(|_| next(&faults, "/a.B/C"))
                .collect::<Vec<_>>()
        };
        let first = run(42);
        assert_eq!(first, run(42));
        assert_ne!(first, run(43));
        let failures = first.iter().filter(|n| **n == "status").count();
        // 2000 draws at p = 0.2: mean 400, sd ~18; a wide band that a broken
        // draw (all or none) cannot hit.
        assert!((300..500).contains(&failures), "{failures}");
    }

    #[test]
    fn bad_plans_are_errors_naming_the_selector() {
        let faults = FaultInjector::new();
        let err = faults
            .random("GetProduct", 1, [(1.5, Fault::lose_response())])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid fault plan for `GetProduct`: the probability 1.5 of fault `lose_response` is not within [0, 1]"
        );
        let err = faults
            .random(
                "GetProduct",
                1,
                [(0.6, Fault::pass()), (0.6, Fault::lose_response())],
            )
            .unwrap_err();
        assert!(err.to_string().contains("add up to 1.2"), "{err}");
        let err = faults.always("not a method", Fault::pass()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid fault plan for `not a method`"),
            "{err}"
        );
        assert!(faults.stats("a b").is_err());
    }

    #[test]
    fn the_log_is_bounded() {
        let faults = FaultInjector::with_log_capacity(3);
        for i in 0..5 {
            next(&faults, &format!("/a.B/M{i}"));
        }
        let paths: Vec<String> = faults.calls().into_iter().map(|c| c.path).collect();
        assert_eq!(paths, ["/a.B/M2", "/a.B/M3", "/a.B/M4"]);
        assert_eq!(faults.stats("*").unwrap().calls, 5);
        faults.reset_stats();
        assert!(faults.calls().is_empty());
        assert_eq!(faults.stats("*").unwrap(), MethodStats::default());
    }
}
