//! The gateway's gRPC channels: the one module that knows how they are
//! built.
//!
//! Per downstream service (`command`, `query`) it builds a channel wrapped
//! in the design's stack, outermost first:
//!
//! 1. [`grpc_timeout::TimeoutLayer`]: the per-operation deadline of the
//!    whole call, retries included;
//! 2. [`grpc_retry::RetryLayer`]: attempts, backoff with jitter, body
//!    replay, one retry throttle per target;
//! 3. [`CountAttemptsLayer`]: counts attempts for the GraphQL errors and
//!    the dashboard (not part of the design's stack; it only observes);
//! 4. [`grpc_circuit_breaker::CircuitBreakerLayer`]: per attempt, breakers
//!    `command` and `query` in one shared [`BreakerRegistry`];
//! 5. the tonic `Channel`.
//!
//! [`Stack::Plain`] builds the same channels with nothing but the attempt
//! counter, for the side-by-side comparison of the demo.
//!
//! The values are the design's configuration (`config/resilience.exs` of
//! the original system) where they fit, and otherwise chosen for the chaos
//! a user meets (issue 10, "Defaults that hold up"); each is explained
//! where it is set, and [`Channels::settings`] lists them with where they
//! came from. When the `grpc-resilience` facade lands, this module is
//! where its named channels (from `config/resilience.toml`) replace the
//! hand-built stack; the rest of the example only uses [`build`], the two
//! channels, [`Channels::breakers`], [`Channels::reset`],
//! [`Channels::watch`] (transitions) and [`Channels::settings`] (the
//! demo's report).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use grpc_circuit_breaker::{
    BreakerConfig, BreakerRegistry, CircuitBreakerLayer, FailureRate, State, StateChange,
    UnknownBreaker,
};
use grpc_resilience_core::BoxError;
use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use super::attempts::{CountAttemptsLayer, Downstream, FailureCounts};

/// A gRPC channel as the generated stubs take it, whatever its stack.
pub type GrpcChannel = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    CallFailure,
>;

/// The error of a [`GrpcChannel`]: the stack's error, whole (its source
/// chain still holds the layers' typed errors and the `tonic::Status`).
///
/// A sized error type rather than a bare `BoxError`: with a boxed error the
/// compiler cannot prove the stubs' futures `Send` inside async-graphql's
/// resolvers (a higher-ranked lifetime limit).
#[derive(Debug)]
pub struct CallFailure(pub BoxError);

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for CallFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Which stack the channels get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// Deadline, retries and circuit breakers.
    Resilient,
    /// A bare tonic channel.
    Plain,
}

impl Stack {
    /// `resilient` or `plain`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stack::Resilient => "resilient",
            Stack::Plain => "plain",
        }
    }
}

/// Where the Command and the Query service listen (`http://host:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    /// The Command service.
    pub command: String,
    /// The Query service.
    pub query: String,
}

// Timeouts: the design's `[timeouts]`: 5 s by default, 10 s for the
// streaming `ListProducts`, 3 s for `GetProduct`, 5 s for `CreateProduct`.
const TIMEOUT_DEFAULT: Duration = Duration::from_millis(5000);
const TIMEOUT_LIST_PRODUCTS: Duration = Duration::from_millis(10_000);
const TIMEOUT_GET_PRODUCT: Duration = Duration::from_millis(3000);
const TIMEOUT_CREATE_PRODUCT: Duration = Duration::from_millis(5000);

// Retry throttle (gRFC A6 token bucket), one bucket per target. Each
// failed attempt takes a token, each success gives back `TOKEN_RATIO`, and
// retries stop while the bucket is at half or less. With a ratio of 1.0,
// retries stay on as long as fewer than half of the attempts fail, and dry
// up after ten failures in a row when the service is down (the breaker
// then takes over). Under 30% UNAVAILABLE + 10% lost responses (40% of
// attempts fail) three attempts turn 60% success into 92% with 20 tokens;
// with 10 tokens the bucket's random walk reaches half often enough to
// leave 85%. gRPC's example values (10 tokens, ratio 0.1) or a ratio of
// 0.5 drain the bucket under that chaos, so retries stop exactly when they
// would help and the stack does no better than a bare channel (60%).
const THROTTLE_MAX_TOKENS: f64 = 20.0;
const THROTTLE_TOKEN_RATIO: f64 = 1.0;

// Breakers in failure-rate mode. A count of failures (the design's
// default: 5 failures within a minute) cannot tell 40% random failures
// from an outage: under chaos it opens within a second, every failed
// probe reopens it, and almost every call is rejected. A rate over a
// window can. A breaker never makes a call succeed: it spares a service
// that is down and fails fast; while the service answers, retries do
// better. So the breaker opens only when the service is as good as down.
//
// - window 100 attempts, at least 40 before judging.
// - 80% failure rate: under 40% random failures, 80 failures in 100
//   attempts practically never happen, so chaos alone does not open it;
//   a hard outage opens it after 40 attempts from a clean window, or
//   after about 70 when the window still holds the chaos before it (one
//   to two seconds at 40 calls/s), so a 1 s restart usually does not.
//   At 60% a 1 s restart under chaos opened it, and the two seconds of
//   rejections that followed cost more than the retries won.
// - open for 1 s (the design says 30 s): a dead service gets one probe a
//   second, which costs it nothing, and a service that is back is found
//   within a second.
// - one probe in HALF_OPEN; its success closes the breaker. This breaker
//   reopens on any failed probe (it does not judge probes as a sample),
//   so with three probes under 40% random failures only 0.6^3 = 22% of
//   HALF_OPEN periods close it, and it stayed open for seconds after a
//   restart (tests/defaults.rs); with one probe, 60% do.
const BREAKER_WINDOW: u32 = 100;
const BREAKER_MINIMUM_CALLS: u32 = 40;
const BREAKER_FAILURE_RATE: f64 = 80.0;
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(1);
const BREAKER_PROBES: u32 = 1;
const BREAKER_RESET_TIMEOUT: Duration = Duration::from_secs(60);

/// Why channels could not be built: the setting and what was wrong.
#[derive(Debug)]
pub struct ChannelError(String);

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChannelError {}

fn config_error(what: &str, err: impl fmt::Display) -> ChannelError {
    ChannelError(format!("invalid {what}: {err}"))
}

/// One thing that shapes the channels' behaviour, for the demo's report.
#[derive(Clone, Debug)]
pub struct Setting {
    /// What it is.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// Where the value came from.
    pub source: &'static str,
}

/// A breaker as the operations API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerStatus {
    /// `command` or `query`.
    pub name: String,
    /// Its state.
    pub state: State,
    /// Failed attempts the gateway saw go through it since it last closed.
    pub failure_count: u64,
    /// While open: how long until it lets probes through.
    pub next_probe_in: Option<Duration>,
}

#[derive(Debug)]
struct Breakers {
    registry: BreakerRegistry,
    opened_at: Mutex<HashMap<String, Instant>>,
}

/// The channels to the Command and the Query service.
#[derive(Clone)]
pub struct Channels {
    /// The channel to the Command service.
    pub command: GrpcChannel,
    /// The channel to the Query service.
    pub query: GrpcChannel,
    stack: Stack,
    failures: Arc<FailureCounts>,
    breakers: Option<Arc<Breakers>>,
}

impl fmt::Debug for Channels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("stack", &self.stack)
            .finish_non_exhaustive()
    }
}

fn endpoint(uri: &str) -> Result<Channel, ChannelError> {
    let endpoint = Endpoint::from_shared(uri.to_owned())
        .map_err(|e| ChannelError(format!("invalid target `{uri}`: {e}")))?
        .connect_timeout(Duration::from_secs(1));
    Ok(endpoint.connect_lazy())
}

fn timeout_policy() -> Result<TimeoutPolicy, ChannelError> {
    let policy = |e| config_error("timeout", e);
    TimeoutPolicy::new(TIMEOUT_DEFAULT)
        .map_err(policy)?
        .with_operation("ListProducts", TIMEOUT_LIST_PRODUCTS)
        .map_err(policy)?
        .with_operation("GetProduct", TIMEOUT_GET_PRODUCT)
        .map_err(policy)?
        .with_operation("CreateProduct", TIMEOUT_CREATE_PRODUCT)
        .map_err(policy)
}

fn retry_policies() -> Result<RetryPolicies, ChannelError> {
    let error = |e| config_error("retry policy", e);
    // The design's `[retry.default]`: 3 attempts, 100 ms, at most 5 s,
    // doubling, ±20% jitter.
    let default = RetryPolicy::default()
        .with_max_attempts(3)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(5000))
        .with_multiplier(2.0)
        .with_jitter(Jitter::Proportional(0.2));
    RetryPolicies::new(default)
        .map_err(error)?
        // A write: retried only with one idempotency key per logical call,
        // which the Command service deduplicates on.
        .with_operation(
            "CreateProduct",
            default.non_idempotent().with_idempotency_keys(),
        )
        .map_err(error)?
        // A client stream of writes without keys: only transparent retries
        // (the server provably never saw it).
        .with_operation("ImportProducts", default.non_idempotent())
        .map_err(error)
}

fn breaker_config() -> BreakerConfig {
    BreakerConfig::default()
        .with_failure_rate(FailureRate {
            window: BREAKER_WINDOW,
            minimum_calls: BREAKER_MINIMUM_CALLS,
            failure_rate: BREAKER_FAILURE_RATE,
            slow_call_duration: None,
            slow_call_rate: 100.0,
        })
        .with_timeout(BREAKER_OPEN_FOR)
        .with_success_threshold(BREAKER_PROBES)
        .with_half_open_max_calls(BREAKER_PROBES)
        .with_reset_timeout(BREAKER_RESET_TIMEOUT)
}

fn boxed<S, B>(service: S) -> GrpcChannel
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<B>,
            Error = BoxError,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_err(CallFailure)
            .map_response(|r: http::Response<B>| r.map(tonic::body::Body::new))
            .service(service),
    )
}

/// Builds the channels to `targets` with `stack`. Install the metrics
/// recorder before: the layers register their metrics when they are made.
///
/// # Errors
///
/// [`ChannelError`] naming a bad target URI or a rejected setting.
pub fn build(targets: &Targets, stack: Stack) -> Result<Channels, ChannelError> {
    let failures = Arc::new(FailureCounts::default());
    let command = endpoint(&targets.command)?;
    let query = endpoint(&targets.query)?;
    match stack {
        Stack::Plain => {
            let counted = |channel| {
                ServiceBuilder::new()
                    .layer(CountAttemptsLayer::new(failures.clone()))
                    .service(channel)
            };
            Ok(Channels {
                command: boxed(counted(command)),
                query: boxed(counted(query)),
                stack,
                failures,
                breakers: None,
            })
        }
        Stack::Resilient => {
            let registry = BreakerRegistry::new();
            for name in ["command", "query"] {
                registry
                    .configure(name, breaker_config())
                    .map_err(|e| config_error("circuit breaker", e))?;
                registry.get_or_create(name);
            }
            let breakers = Arc::new(Breakers {
                registry: registry.clone(),
                opened_at: Mutex::default(),
            });
            {
                let breakers = Arc::downgrade(&breakers);
                let failures = failures.clone();
                registry.subscribe(move |change: &StateChange| {
                    let service = match &*change.breaker {
                        "command" => Downstream::Command,
                        "query" => Downstream::Query,
                        _ => return,
                    };
                    if change.to == State::Closed {
                        failures.clear(service);
                    }
                    if let Some(breakers) = breakers.upgrade() {
                        let mut opened = breakers
                            .opened_at
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        if change.to == State::Open {
                            opened.insert(change.breaker.to_string(), Instant::now());
                        } else {
                            opened.remove(&*change.breaker);
                        }
                    }
                });
            }
            let timeouts = TimeoutLayer::new(timeout_policy()?);
            let retries = retry_policies()?;
            let stack = |channel, throttle| -> Result<GrpcChannel, ChannelError> {
                Ok(boxed(
                    ServiceBuilder::new()
                        .layer(timeouts.clone())
                        .layer(RetryLayer::new(retries.clone()).with_throttle(throttle))
                        .layer(CountAttemptsLayer::new(failures.clone()))
                        .layer(CircuitBreakerLayer::new(registry.clone()))
                        .service(channel),
                ))
            };
            let throttle = || {
                RetryThrottle::new(THROTTLE_MAX_TOKENS, THROTTLE_TOKEN_RATIO)
                    .map_err(|e| config_error("retry throttle", e))
            };
            Ok(Channels {
                command: stack(command, throttle()?)?,
                query: stack(query, throttle()?)?,
                stack: Stack::Resilient,
                failures,
                breakers: Some(breakers),
            })
        }
    }
}

impl Channels {
    /// The stack these channels were built with.
    pub fn stack(&self) -> Stack {
        self.stack
    }

    /// Every breaker, by name (none for plain channels).
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        let Some(breakers) = &self.breakers else {
            return Vec::new();
        };
        let opened = breakers
            .opened_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        breakers
            .registry
            .status()
            .into_iter()
            .map(|(name, state)| {
                let failure_count = match name.as_str() {
                    "command" => self.failures.get(Downstream::Command),
                    "query" => self.failures.get(Downstream::Query),
                    _ => 0,
                };
                let next_probe_in = match (state, opened.get(&name)) {
                    (State::Open, Some(at)) => Some(BREAKER_OPEN_FOR.saturating_sub(at.elapsed())),
                    _ => None,
                };
                BreakerStatus {
                    name,
                    state,
                    failure_count,
                    next_probe_in,
                }
            })
            .collect()
    }

    /// Closes the breaker called `name`, or every breaker for `None`.
    ///
    /// # Errors
    ///
    /// [`UnknownBreaker`] if there is no such breaker (plain channels have
    /// none).
    pub fn reset(&self, name: Option<&str>) -> Result<(), UnknownBreaker> {
        match (&self.breakers, name) {
            (Some(b), Some(name)) => b.registry.reset(name),
            (Some(b), None) => {
                b.registry.reset_all();
                Ok(())
            }
            (None, Some(name)) => Err(UnknownBreaker(name.to_owned())),
            (None, None) => Ok(()),
        }
    }

    /// Every breaker transition from now on (`None` for plain channels).
    pub fn watch(&self) -> Option<broadcast::Receiver<StateChange>> {
        self.breakers.as_ref().map(|b| b.registry.watch())
    }

    /// What shapes these channels' behaviour, with where each value came
    /// from.
    pub fn settings(&self) -> Vec<Setting> {
        const DESIGN: &str = "design config (config/resilience.exs), in channels.rs";
        const CHAOS: &str = "chosen for issue 10's chaos, in channels.rs";
        let ms = |d: Duration| format!("{} ms", d.as_millis());
        if self.stack == Stack::Plain {
            return vec![Setting {
                name: "stack",
                value: "bare tonic channel: no deadline, no retry, no breaker".into(),
                source: "channels.rs, Stack::Plain",
            }];
        }
        vec![
            Setting {
                name: "stack (outermost first)",
                value: "timeout > retry > circuit breaker > channel".into(),
                source: "DESIGN.md, the stack and its order",
            },
            Setting {
                name: "timeouts",
                value: format!(
                    "default {}, ListProducts {}, GetProduct {}, CreateProduct {}",
                    ms(TIMEOUT_DEFAULT),
                    ms(TIMEOUT_LIST_PRODUCTS),
                    ms(TIMEOUT_GET_PRODUCT),
                    ms(TIMEOUT_CREATE_PRODUCT)
                ),
                source: DESIGN,
            },
            Setting {
                name: "retry",
                value: "3 attempts, 100 ms initial, 5000 ms max, x2, ±20% jitter; \
                        CreateProduct with idempotency keys"
                    .into(),
                source: DESIGN,
            },
            Setting {
                name: "retry throttle",
                value: format!(
                    "token bucket per target: {THROTTLE_MAX_TOKENS} tokens, ratio {THROTTLE_TOKEN_RATIO} \
                     (retries stop when most attempts fail)"
                ),
                source: CHAOS,
            },
            Setting {
                name: "circuit breakers",
                value: format!(
                    "`command`, `query`: failure-rate mode, {BREAKER_FAILURE_RATE}% of the last \
                     {BREAKER_WINDOW} attempts (at least {BREAKER_MINIMUM_CALLS}), open {}, \
                     {BREAKER_PROBES} probe(s) in HALF_OPEN",
                    ms(BREAKER_OPEN_FOR)
                ),
                source: CHAOS,
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_values_are_the_designs_and_valid() {
        let timeouts = timeout_policy().unwrap();
        let t = |path| timeouts.timeout_for(path);
        assert_eq!(
            t("/catalog.v1.QueryService/GetProduct"),
            Some(TIMEOUT_GET_PRODUCT)
        );
        assert_eq!(
            t("/catalog.v1.QueryService/ListProducts"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            t("/catalog.v1.CommandService/CreateProduct"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            t("/catalog.v1.CommandService/ImportProducts"),
            Some(TIMEOUT_DEFAULT)
        );
        assert_eq!(TIMEOUT_GET_PRODUCT, Duration::from_secs(3));

        let retries = retry_policies().unwrap();
        let default = RetryPolicy::default();
        assert_eq!(
            retries.policy_for("/catalog.v1.QueryService/GetProduct"),
            Some(&default)
        );
        assert_eq!(
            retries.policy_for("/catalog.v1.CommandService/CreateProduct"),
            Some(&default.non_idempotent().with_idempotency_keys())
        );
        breaker_config().validate().unwrap();
        RetryThrottle::new(THROTTLE_MAX_TOKENS, THROTTLE_TOKEN_RATIO).unwrap();
    }

    #[tokio::test]
    async fn breakers_are_named_per_service_and_reset_closes_them() {
        let targets = Targets {
            command: "http://127.0.0.1:1".into(),
            query: "http://127.0.0.1:2".into(),
        };
        let channels = build(&targets, Stack::Resilient).unwrap();
        let names: Vec<String> = channels.breakers().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["command", "query"]);
        channels.reset(Some("query")).unwrap();
        assert!(channels.reset(Some("nope")).is_err());

        let plain = build(&targets, Stack::Plain).unwrap();
        assert!(plain.breakers().is_empty());
        assert!(plain.watch().is_none());
        assert_eq!(
            plain.reset(Some("query")),
            Err(UnknownBreaker("query".into()))
        );

        let err = build(
            &Targets {
                command: "not a uri".into(),
                query: targets.query.clone(),
            },
            Stack::Resilient,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`not a uri`"), "{err}");
    }
}
