//! The ordered stack: [`ResilientChannel`] and [`ResilienceLayer`].

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, Keying, State};
use grpc_resilience_core::{
    BoxError, LastMethod, MethodTable, OnOutcome, Outcome, observe_head, take_ready,
};
use grpc_retry::{ReplayableBody, RetryBudget, RetryLayer, RetryThrottle};
use grpc_timeout::future::Watch;
use grpc_timeout::{Timeout, TimeoutLayer};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::attempt::Attempt;
use crate::config::{BudgetSettings, BulkheadSpec, Compiled, ThrottleSettings};
use crate::guard::{Guard, GuardBody};
use crate::per_call::PerCall;
use crate::telemetry::{CallRecorder, MetricsCache, ServerAddress, SharedMetrics};
use crate::{ConfigError, ResilienceConfig};
use grpc_bulkhead::BulkheadLayer;

/// The layers below telemetry, as built for one config generation.
type Inner<S> = Timeout<PerCall<Guard<S>>>;

/// Which breaker a stack's calls go through.
#[derive(Clone, Debug)]
pub(crate) enum BreakerChoice {
    /// One per gRPC service (`command`, `query`), services listed in a
    /// `[channels]` entry going to that channel's breaker.
    PerService,
    /// The breaker of the named channel: every call through it.
    Channel(String),
}

/// One generation of the config's layers.
#[derive(Debug)]
pub(crate) struct Layers {
    generation: u64,
    deadline: TimeoutLayer,
    retry: RetryLayer,
    retry_keyed: RetryLayer,
    retry_strict: RetryLayer,
    breaker: CircuitBreakerLayer,
    attempt: Option<TimeoutLayer>,
    /// The bulkhead of the target's [`Limiters`].
    bulkhead: Option<BulkheadLayer>,
}

impl Layers {
    /// The call's deadline layer. It keeps its own timer for the
    /// response head even over a tonic `Channel`, whose `grpc-timeout`
    /// timer starts only once a connection is up: a call that waits in the
    /// channel for a connection that never completes (a host that drops
    /// every packet) would otherwise outlive its deadline.
    #[cfg(test)]
    pub(crate) fn deadline(&self) -> &TimeoutLayer {
        &self.deadline
    }

    fn build<S: Clone + 'static>(&self, service: S) -> Inner<S> {
        let service = match &self.attempt {
            Some(layer) => Attempt::On(layer.layer(service)),
            None => Attempt::Off(service),
        };
        let service = Guard::new(
            service,
            self.bulkhead.as_ref().map(BulkheadLayer::gate),
            self.breaker.gate(),
        );
        let service = PerCall {
            normal: self.retry.layer(service.clone()),
            keyed: self.retry_keyed.layer(service.clone()),
            strict: self.retry_strict.layer(service),
        };
        self.deadline.layer(service)
    }
}

/// What reload swaps, and what every clone of a stack shares.
pub(crate) struct StackShared {
    pub(crate) layers: ArcSwap<Layers>,
    // The generation of `layers`, stored after them: a call reads this one
    // atomic, not the `ArcSwap`, to see whether its layers are current.
    generation: AtomicU64,
    config: ArcSwap<ResilienceConfig>,
    registry: BreakerRegistry,
    choice: BreakerChoice,
    limiters: Mutex<Limiters>,
    metrics: MetricsCache,
    // Each method's metric handles, found without a parse or a hash by
    // every clone (backed by `metrics`, which keeps any number of methods).
    methods: MethodTable<Option<SharedMetrics>>,
    reloading: Mutex<()>,
    /// Where the calls go, when known (a named channel's endpoint).
    server: Option<ServerAddress>,
}

impl fmt::Debug for StackShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StackShared")
            .field("generation", &self.layers.load().generation)
            .field("choice", &self.choice)
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    generation: u64,
    breakers_not_reconfigured: Vec<String>,
}

impl ReloadReport {
    pub(crate) fn new(generation: u64, breakers_not_reconfigured: Vec<String>) -> Self {
        ReloadReport {
            generation,
            breakers_not_reconfigured,
        }
    }

    /// The config generation now in force (the first config is 0).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Breakers whose new settings the registry refused, which keep their
    /// old ones. The registry validates a config again when it applies it;
    /// a config the facade validated whole passes, so this is empty unless
    /// the two validations ever disagree. A live breaker takes its new
    /// thresholds at once and keeps its state.
    pub fn breakers_not_reconfigured(&self) -> &[String] {
        &self.breakers_not_reconfigured
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A throttle for `settings`: `current` when it already has them (its
/// bucket is kept), else a new one.
pub(crate) fn throttle_for(
    current: Option<&RetryThrottle>,
    settings: Option<&ThrottleSettings>,
) -> Result<Option<RetryThrottle>, ConfigError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let fresh = settings.to_throttle()?;
    Ok(Some(match current {
        Some(t)
            if t.max_tokens() == fresh.max_tokens() && t.token_ratio() == fresh.token_ratio() =>
        {
            t.clone()
        }
        _ => fresh,
    }))
}

/// What limits a downstream target's load, shared by every channel to it:
/// the retry throttle and budget (a retry is sent only when both allow it)
/// and the bulkhead (its partitions count every call to the target, so two
/// channels to one backend cannot each fill a limit meant for both).
#[derive(Clone, Debug, Default)]
pub(crate) struct Limiters {
    pub(crate) throttle: Option<RetryThrottle>,
    pub(crate) budget: Option<RetryBudget>,
    /// The bulkhead and the spec it was built from (kept by a reload that
    /// does not change it, so its partitions and their calls in flight
    /// stay).
    pub(crate) bulkhead: Option<(BulkheadSpec, BulkheadLayer)>,
}

impl Limiters {
    /// The limiters `compiled` asks for, keeping those of `current` whose
    /// settings stay (their state is kept).
    pub(crate) fn for_config(
        current: Option<&Limiters>,
        compiled: &Compiled,
    ) -> Result<Limiters, ConfigError> {
        Ok(Limiters {
            throttle: throttle_for(
                current.and_then(|l| l.throttle.as_ref()),
                compiled.throttle.as_ref(),
            )?,
            budget: budget_for(
                current.and_then(|l| l.budget.as_ref()),
                compiled.budget.as_ref(),
            )?,
            bulkhead: bulkhead_for(
                current.and_then(|l| l.bulkhead.as_ref()),
                compiled.bulkhead.as_ref(),
            )?,
        })
    }
}

/// A budget for `settings`: `current` when it already has them (its
/// deposits are kept), else a new one.
pub(crate) fn budget_for(
    current: Option<&RetryBudget>,
    settings: Option<&BudgetSettings>,
) -> Result<Option<RetryBudget>, ConfigError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let fresh = settings.to_budget()?;
    Ok(Some(match current {
        Some(b)
            if b.ttl() == fresh.ttl()
                && b.min_retries_per_second() == fresh.min_retries_per_second()
                && b.retry_ratio() == fresh.retry_ratio() =>
        {
            b.clone()
        }
        _ => fresh,
    }))
}

/// A bulkhead for `spec`: `current` when it was built from the same spec
/// (its partitions and their calls in flight are kept), else a new one.
fn bulkhead_for(
    current: Option<&(BulkheadSpec, BulkheadLayer)>,
    spec: Option<&BulkheadSpec>,
) -> Result<Option<(BulkheadSpec, BulkheadLayer)>, ConfigError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    Ok(Some(match current {
        Some((old, layer)) if old == spec => (spec.clone(), layer.clone()),
        _ => {
            let layer = spec
                .to_layer()
                .map_err(|e| ConfigError::new("bulkhead", None, e.to_string()))?;
            (spec.clone(), layer)
        }
    }))
}

/// Registers each breaker with its config before any call, so the
/// registry's status lists them all from the start. Returns the breakers
/// that already existed with other settings.
pub(crate) fn configure_breakers(
    registry: &BreakerRegistry,
    breakers: &BTreeMap<String, BreakerConfig>,
) -> Vec<String> {
    let mut not_applied = Vec::new();
    for (name, config) in breakers {
        match registry.config(name) {
            Some(current) if &current == config => {}
            // New or changed: `configure` makes the breaker now (so status
            // lists it) or applies the change to the live one, keeping its
            // state.
            _ => {
                if registry.configure(name, config.clone()).is_err() {
                    not_applied.push(name.clone());
                }
            }
        }
    }
    not_applied
}

impl StackShared {
    pub(crate) fn new(
        config: &ResilienceConfig,
        compiled: &Compiled,
        registry: BreakerRegistry,
        choice: BreakerChoice,
        limiters: Limiters,
    ) -> Self {
        let layers = Self::layers(compiled, &registry, &choice, &limiters, 0);
        StackShared {
            layers: ArcSwap::from_pointee(layers),
            generation: AtomicU64::new(0),
            config: ArcSwap::from_pointee(config.clone()),
            registry,
            choice,
            limiters: Mutex::new(limiters),
            metrics: MetricsCache::default(),
            methods: MethodTable::default(),
            reloading: Mutex::new(()),
            server: None,
        }
    }

    fn layers(
        compiled: &Compiled,
        registry: &BreakerRegistry,
        choice: &BreakerChoice,
        limiters: &Limiters,
        generation: u64,
    ) -> Layers {
        let retry_layer = |policies: &grpc_retry::RetryPolicies| {
            let mut layer = RetryLayer::new(policies.clone());
            if let Some(t) = &limiters.throttle {
                layer = layer.with_throttle(t.clone());
            }
            if let Some(b) = &limiters.budget {
                layer = layer.with_budget(b.clone());
            }
            layer
        };
        let retry = retry_layer(&compiled.retry.normal);
        let retry_keyed = retry_layer(&compiled.retry.keyed);
        let retry_strict = retry_layer(&compiled.retry.strict);
        let breaker = match choice {
            BreakerChoice::PerService => {
                let mut layer = CircuitBreakerLayer::new(registry.clone());
                for (channel, settings) in &compiled.channel_services {
                    let breaker = &compiled.channel_breakers[channel];
                    for service in settings {
                        layer = layer.with_service_name(service, breaker);
                    }
                }
                layer
            }
            BreakerChoice::Channel(channel) => {
                let name = compiled
                    .channel_breakers
                    .get(channel)
                    .cloned()
                    .unwrap_or_else(|| channel.clone());
                CircuitBreakerLayer::with_keying(registry.clone(), Keying::Single(name))
            }
        };
        Layers {
            generation,
            deadline: TimeoutLayer::new(compiled.timeouts.clone()),
            retry,
            retry_keyed,
            retry_strict,
            breaker,
            attempt: compiled
                .per_attempt
                .clone()
                .map(|p| TimeoutLayer::new(p).per_attempt()),
            bulkhead: limiters.bulkhead.as_ref().map(|(_, layer)| layer.clone()),
        }
    }

    /// Names where the calls go, for the call spans.
    pub(crate) fn with_server(mut self, uri: &http::Uri) -> Self {
        self.server = ServerAddress::of_uri(uri);
        self
    }

    /// Swaps in a new generation built from `compiled`, with `limiters`.
    pub(crate) fn swap(
        &self,
        config: &ResilienceConfig,
        compiled: &Compiled,
        limiters: Limiters,
    ) -> u64 {
        let previous = self.layers.load();
        let generation = previous.generation + 1;
        let layers = Self::layers(
            compiled,
            &self.registry,
            &self.choice,
            &limiters,
            generation,
        );
        *lock(&self.limiters) = limiters;
        self.config.store(Arc::new(config.clone()));
        self.layers.store(Arc::new(layers));
        self.generation.store(generation, Ordering::Release);
        generation
    }

    /// Validates `config` whole, then swaps it in for new calls.
    pub(crate) fn reload(&self, config: &ResilienceConfig) -> Result<ReloadReport, ConfigError> {
        let _one_at_a_time = lock(&self.reloading);
        let compiled = config.compile()?;
        let current = lock(&self.limiters).clone();
        let limiters = Limiters::for_config(Some(&current), &compiled)?;
        let generation = self.swap(config, &compiled, limiters);
        let breakers_not_reconfigured = configure_breakers(&self.registry, &compiled.breakers);
        Ok(ReloadReport {
            generation,
            breakers_not_reconfigured,
        })
    }

    pub(crate) fn reload_file(&self, path: &Path) -> Result<ReloadReport, ConfigError> {
        crate::reload::reload_file(&self.config.load(), path, |c| self.reload(c))
    }

    pub(crate) fn registry(&self) -> &BreakerRegistry {
        &self.registry
    }

    pub(crate) fn throttle(&self) -> Option<RetryThrottle> {
        lock(&self.limiters).throttle.clone()
    }

    pub(crate) fn budget(&self) -> Option<RetryBudget> {
        lock(&self.limiters).budget.clone()
    }

    pub(crate) fn bulkhead_partitions(&self) -> Vec<grpc_bulkhead::PartitionStatus> {
        match &self.layers.load().bulkhead {
            Some(layer) => layer.partitions(),
            None => Vec::new(),
        }
    }
}

/// The whole stack as a [`tower_layer::Layer`], for users composing their
/// own `ServiceBuilder`: `layer(channel)` gives a [`ResilientChannel`].
/// Clones share the breakers, the throttle and reloads.
///
/// ```
/// use catalog_proto::query_service_client::QueryServiceClient;
/// use grpc_resilience::{ResilienceConfig, ResilienceLayer};
/// use tonic::transport::Channel;
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ResilienceConfig::from_toml("[timeouts]\ndefault = \"5s\"\n[retry.default]\n")?;
/// let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
/// let channel = ServiceBuilder::new()
///     .layer(ResilienceLayer::new(&config)?)
///     .service(channel);
/// let client = QueryServiceClient::new(channel);
/// # drop(client);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct ResilienceLayer {
    shared: Arc<StackShared>,
}

impl ResilienceLayer {
    /// The stack `config` describes, with a new breaker registry: one
    /// breaker per gRPC service (`catalog.v1.QueryService` → `query`), the
    /// services a `[channels]` entry lists going to that channel's breaker;
    /// every breaker the config names is listed by
    /// [`ResilienceLayer::circuit_breaker_status`] from the start.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid.
    pub fn new(config: &ResilienceConfig) -> Result<Self, ConfigError> {
        Self::with_registry(config, BreakerRegistry::new())
    }

    /// Like [`ResilienceLayer::new`], with breakers kept in `registry`
    /// (shared with other stacks).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid.
    pub fn with_registry(
        config: &ResilienceConfig,
        registry: BreakerRegistry,
    ) -> Result<Self, ConfigError> {
        let compiled = config.compile()?;
        let limiters = Limiters::for_config(None, &compiled)?;
        configure_breakers(&registry, &compiled.breakers);
        let shared = StackShared::new(
            config,
            &compiled,
            registry,
            BreakerChoice::PerService,
            limiters,
        );
        Ok(ResilienceLayer {
            shared: Arc::new(shared),
        })
    }

    pub(crate) fn from_shared(shared: Arc<StackShared>) -> Self {
        ResilienceLayer { shared }
    }

    /// Applies `config` to new calls of every channel made by this layer;
    /// see [`ResilientChannel::reload`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid; the old one stays.
    pub fn reload(&self, config: &ResilienceConfig) -> Result<ReloadReport, ConfigError> {
        self.shared.reload(config)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<ResilienceConfig> {
        self.shared.config.load_full()
    }

    /// Reads the config file at `path` and applies it as
    /// [`ResilienceLayer::reload`] does.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, line, key and why; the old config
    /// stays.
    pub fn reload_file(&self, path: impl AsRef<Path>) -> Result<ReloadReport, ConfigError> {
        self.shared.reload_file(path.as_ref())
    }

    /// Reloads the config file at `path` whenever it changes; see
    /// [`ConfigWatcher`](crate::ConfigWatcher).
    #[cfg(feature = "watch")]
    pub fn watch_file(
        &self,
        path: impl Into<std::path::PathBuf>,
        interval: std::time::Duration,
    ) -> crate::ConfigWatcher {
        let shared = self.shared.clone();
        crate::ConfigWatcher::spawn(path, interval, move |p| shared.reload_file(p))
    }

    /// The breaker registry.
    pub fn registry(&self) -> &BreakerRegistry {
        self.shared.registry()
    }

    /// The retry throttle, if the config has one.
    pub fn throttle(&self) -> Option<RetryThrottle> {
        self.shared.throttle()
    }

    /// The retry budget, if the config has one.
    pub fn budget(&self) -> Option<RetryBudget> {
        self.shared.budget()
    }

    /// The bulkhead's partitions made so far (calls in flight, limit);
    /// empty without a `[bulkhead]` section.
    pub fn bulkhead_partitions(&self) -> Vec<grpc_bulkhead::PartitionStatus> {
        self.shared.bulkhead_partitions()
    }

    /// Every breaker's state, by name.
    pub fn circuit_breaker_status(&self) -> BTreeMap<String, State> {
        self.shared.registry().status()
    }
}

impl<S: Clone + 'static> Layer<S> for ResilienceLayer {
    type Service = ResilientChannel<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResilientChannel::from_parts(inner, self.shared.clone())
    }
}

/// A channel (or any `Service<http::Request<B>>`) with the whole stack in
/// front, in this order: call telemetry → deadline → retry → bulkhead
/// (with a `[bulkhead]` section) → circuit breaker → per-attempt timeout
/// (with `per_attempt`) → the channel. See the
/// [crate docs](crate) for why that order.
///
/// It is `Clone` and works with any generated client:
/// `QueryServiceClient::new(resilient)`. Clones share breakers, throttle,
/// metrics and reloads.
pub struct ResilientChannel<S> {
    base: S,
    shared: Arc<StackShared>,
    local: Inner<S>,
    generation: u64,
    // The metric handles of the method last called through this clone, so
    // the usual call finds them without touching shared memory.
    last_method: LastMethod<Option<SharedMetrics>>,
}

impl<S: Clone> Clone for ResilientChannel<S> {
    fn clone(&self) -> Self {
        ResilientChannel {
            base: self.base.clone(),
            shared: self.shared.clone(),
            local: self.local.clone(),
            generation: self.generation,
            last_method: self.last_method.clone(),
        }
    }
}

impl<S> fmt::Debug for ResilientChannel<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResilientChannel")
            .field("generation", &self.generation)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

impl<S: Clone + 'static> ResilientChannel<S> {
    /// `inner` with the stack `config` describes; see
    /// [`ResilienceLayer::new`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid.
    pub fn new(inner: S, config: &ResilienceConfig) -> Result<Self, ConfigError> {
        Ok(ResilienceLayer::new(config)?.layer(inner))
    }

    pub(crate) fn from_parts(base: S, shared: Arc<StackShared>) -> Self {
        let layers = shared.layers.load();
        ResilientChannel {
            local: layers.build(base.clone()),
            generation: layers.generation,
            base,
            shared,
            last_method: LastMethod::default(),
        }
    }
}

impl<S> ResilientChannel<S> {
    /// Applies `config` to new calls, atomically: a call started after
    /// this returns sees all of the new timeouts, retry policies and
    /// throttle, a call started before finishes under the old ones. Breakers
    /// keep their state. An invalid config is rejected whole (the error
    /// says why) and the old one stays.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the config is invalid.
    pub fn reload(&self, config: &ResilienceConfig) -> Result<ReloadReport, ConfigError> {
        self.shared.reload(config)
    }

    /// The config in force.
    pub fn config(&self) -> Arc<ResilienceConfig> {
        self.shared.config.load_full()
    }

    /// Reads the config file at `path` and applies it as
    /// [`ResilientChannel::reload`] does.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, line, key and why; the old config
    /// stays.
    pub fn reload_file(&self, path: impl AsRef<Path>) -> Result<ReloadReport, ConfigError> {
        self.shared.reload_file(path.as_ref())
    }

    /// Reloads the config file at `path` whenever it changes; see
    /// [`ConfigWatcher`](crate::ConfigWatcher).
    #[cfg(feature = "watch")]
    pub fn watch_file(
        &self,
        path: impl Into<std::path::PathBuf>,
        interval: std::time::Duration,
    ) -> crate::ConfigWatcher {
        let shared = self.shared.clone();
        crate::ConfigWatcher::spawn(path, interval, move |p| shared.reload_file(p))
    }

    /// The layer that made this channel (to wrap another channel with the
    /// same breakers, throttle and reloads).
    pub fn layer(&self) -> ResilienceLayer {
        ResilienceLayer::from_shared(self.shared.clone())
    }

    /// The breaker registry.
    pub fn registry(&self) -> &BreakerRegistry {
        self.shared.registry()
    }

    /// Every breaker's state, by name.
    pub fn circuit_breaker_status(&self) -> BTreeMap<String, State> {
        self.shared.registry().status()
    }

    /// The bulkhead's partitions made so far (calls in flight, limit,
    /// queue); empty without a `[bulkhead]` section. Channels of
    /// [`ResilientChannels`](crate::ResilientChannels) to one target share
    /// their partitions, so each of them reports the target's.
    pub fn bulkhead_partitions(&self) -> Vec<grpc_bulkhead::PartitionStatus> {
        self.shared.bulkhead_partitions()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.base
    }

    pub(crate) fn shared(&self) -> &StackShared {
        &self.shared
    }
}

impl<S, B, R> Service<http::Request<B>> for ResilientChannel<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Body + Send + 'static,
    R::Error: Into<BoxError>,
{
    type Response = http::Response<ResilientBody<R>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.shared.generation.load(Ordering::Acquire) != self.generation {
            let layers = self.shared.layers.load();
            self.local = layers.build(self.base.clone());
            self.generation = layers.generation;
        }
        self.local.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The method's metrics: the last method's, else from the table
        // every clone shares.
        let StackShared {
            metrics, methods, ..
        } = &*self.shared;
        let metrics = self
            .last_method
            .get_or_insert_from(request.uri(), methods, |id| id.map(|id| metrics.get(&id)))
            .as_ref()
            .map(|m| m.handle().clone());
        let recorder = metrics.map(|m| {
            let span = m.call_span(self.shared.server.as_ref());
            CallRecorder::new(m, span)
        });
        // The deadline layer's work and the retry layer's in one future
        // (see `ResponseFuture`), made in the call's span.
        let entered = recorder
            .as_ref()
            .and_then(OnOutcome::span)
            .map(tracing::Span::enter);
        match self.local.prepare(&mut request) {
            Ok(deadline) => {
                let head_timer = deadline.is_some() && self.local.times_the_head();
                let retry = self.local.get_mut().call(request);
                drop(entered);
                ResponseFuture {
                    watch: Watch::new(deadline, head_timer, recorder),
                    retry: Some(retry),
                }
            }
            Err(expired) => {
                drop(entered);
                // Not sent: the ready service below gives back what its
                // readiness reserved (a caller that backs off must not
                // keep it).
                drop(take_ready(self.local.get_mut()));
                ResponseFuture {
                    watch: Watch::expired(expired, recorder),
                    retry: None,
                }
            }
        }
    }
}

/// The response body of a [`ResilientChannel`] call: the channel's body
/// with the deadline and outcome tracking of the whole stack, in one
/// wrapper (see [`ResponseFuture`]).
pub type ResilientBody<R> = GuardBody<R>;

pin_project! {
    /// The future of a [`ResilientChannel`] call: the deadline layer's work
    /// (its head timer, the call's telemetry) and the retry layer's in one
    /// future. The answering attempt's body (see [`GuardBody`]) becomes the
    /// caller's, with the call's deadline, the retry throttle's refill and
    /// the telemetry added to it rather than wrapped around it.
    pub struct ResponseFuture<S, B, R>
    where
        Guard<S>: Service<http::Request<B>>,
    {
        // Before `retry`: a dropped call's recorder hears of it before the
        // attempt's permits do, as when the layers were nested.
        #[pin]
        watch: Watch<CallRecorder>,
        // `None` for a call whose deadline passed before it was sent.
        #[pin]
        retry: Option<RetryFuture<S, B, R>>,
    }
}

type RetryFuture<S, B, R> = grpc_retry::future::ResponseFuture<Guard<S>, B, GuardBody<R>>;

impl<S, B, R> fmt::Debug for ResponseFuture<S, B, R>
where
    Guard<S>: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: ReplayableBody,
    R: Body + Send + 'static,
    R::Error: Into<BoxError>,
{
    type Output = Result<http::Response<ResilientBody<R>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let watch = this.watch;
        let Some(retry) = this.retry.as_pin_mut() else {
            return Poll::Ready(Err(watch.unsent()));
        };
        // The retry layer's throttle, owed by a committed call's trailers.
        let mut refill = None;
        // The response stays in this one place while each layer's work is
        // done on it (every move of it is a copy of some 400 bytes).
        let Poll::Ready(mut result) = watch
            .as_ref()
            .get_ref()
            .in_span(|| retry.poll_answer(cx, &mut refill))
        else {
            return watch.poll_deadline(cx).map(Err);
        };
        if let Some((deadline, recorder)) = watch.settle(&mut result)
            && let Ok(response) = &mut result
        {
            let recorder = recorder.and_then(|r| observe_head(response, r));
            let body = response.body_mut();
            if let Some(deadline) = deadline {
                body.bound_by(deadline);
            }
            match body.observer_mut() {
                Some(reports) => reports.answer(refill, recorder),
                // The attempt's body was told the outcome from the same
                // head, so the recorder was too: a committed response
                // (the only kind that owes a refill) keeps its reports.
                None => {
                    debug_assert!(recorder.is_none() && refill.is_none());
                    // Were the two ever to disagree, the call is still
                    // recorded (a refill, at worst, is not given back).
                    if let Some(recorder) = recorder {
                        recorder.on_outcome(Outcome::Status(tonic::Code::Unknown));
                    }
                }
            }
        }
        Poll::Ready(result)
    }
}
