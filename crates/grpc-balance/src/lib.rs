//! A resilient balanced channel for tonic: failures are judged per
//! endpoint, the way Envoy's outlier detection and Linkerd's failure
//! accrual do, and the standard gRPC health protocol feeds the decisions.
//!
//! [`BalancedChannel`] balances calls over several endpoints (replicas of
//! one backend) with tower's power-of-two-choices balancer (least pending
//! calls of two picked at random). Each endpoint has its own tonic channel
//! and its own circuit breaker from
//! [`grpc_circuit_breaker`], named `<name>@<host:port>` (e.g.
//! `query@127.0.0.1:50052`) in the [`BreakerRegistry`] you give, so the
//! registry's status shows every endpoint.
//!
//! With [`BalanceConfig::with_max_concurrent_calls`] each endpoint also has
//! its own bulkhead: a full endpoint reads not-ready and the balancer picks
//! another.
//!
//! From a config file: `grpc-resilience`'s named channels make one of a
//! `[channels.<name>]` entry with `endpoints = [...]` or `dns = "host:port"`,
//! with its `outlier`, `health` and `endpoint_breaker` tables.
//!
//! Endpoints come from a static list ([`BalancedChannel::from_endpoints`]),
//! a DNS name resolved again every `dns_refresh`
//! ([`BalancedChannel::from_dns`]), or your own stream of
//! `Change`s ([`BalancedChannel::from_discover`]).
//!
//! # Outlier ejection
//!
//! An endpoint is **ejected** (out of the balancer's ready set: the
//! balancer picks among the others) when
//!
//! * its breaker opens (or is forced open),
//! * its success rate over an interval is below `mean - stdev_factor *
//!   stdev` of the endpoints with at least `request_volume` calls, when
//!   [`SuccessRate`] is on and at least `minimum_hosts` endpoints qualify,
//! * its health watch reports anything but `SERVING`.
//!
//! The n-th ejection in a row lasts `base_ejection_time * n`, at most
//! `max_ejection_time` (the count starts again once the endpoint has stayed
//! in for `max_ejection_time`). Then the endpoint takes `max_probes` calls
//! at a time (its breaker is HALF_OPEN: the endpoint breakers' OPEN
//! timeout *is* `base_ejection_time`) until `probe_successes` succeed, and
//! is back; a failed probe ejects it again for longer. An ejection for
//! health lasts until the endpoint reports `SERVING`, which lets probes
//! through at once (resetting its breaker if it had opened) instead of
//! waiting out the ejection.
//!
//! **`max_ejection_percent`** caps how many endpoints are out at once
//! (ejected or probing): `floor(endpoints * percent / 100)`. With three
//! endpoints and 50%, at most one is out. An endpoint beyond the cap stays
//! in the ready set: its own breaker still rejects calls at once while
//! open and probes it when half-open, and it is ejected as soon as another
//! endpoint comes back. With 0% nothing is ever ejected; with 100% every
//! endpoint may be, and calls then wait in the buffer until one comes back
//! (see [Deadlines](#deadlines)).
//!
//! A call that fails makes its endpoint step aside for the next pick (it
//! reads not-ready once), so a retry above the channel goes to another
//! endpoint when one is ready: p2c alone would not do it, since a failing
//! endpoint answers fast and looks the least loaded.
//!
//! # Deadlines
//!
//! A call waits in the channel's buffer while no endpoint is ready (all at
//! their `max_concurrent_calls`, ejected, or not yet connected). Its
//! deadline (the [`CallDeadline`] a
//! layer above recorded, else the caller's `grpc-timeout`, read as the
//! call enters the buffer) counts that wait: when an endpoint is ready, a
//! call whose deadline has passed is refused with `DEADLINE_EXCEEDED` and
//! never sent, and any other is sent with `grpc-timeout` rewritten to the
//! time it has left. The caller is answered at its deadline only if a
//! deadline layer above times the call (`grpc_timeout`, as the
//! `grpc-resilience` stack does); the channel alone answers when an
//! endpoint is ready, as tonic's own balanced channel does. Time a caller
//! spends in `poll_ready` waiting for room in a full buffer, before its
//! call, counts only if a layer above recorded the deadline before it
//! (tower's services are made ready before they are called).
//!
//! # Health checks
//!
//! With [`BalanceConfig::with_health`] each endpoint is watched with the
//! standard `grpc.health.v1.Health/Watch` stream for one service name
//! (`""` for the whole server). A watch that breaks falls back to passive
//! detection (breakers, success rate) and is opened again with exponential
//! backoff; a server without the health service is watched passively only.
//!
//! # Stacking
//!
//! The per-service breaker still guards against "the whole service is
//! down"; the order, from the stub down:
//!
//! ```text
//! retry -> per-service breaker -> BalancedChannel -> per-endpoint breaker -> endpoint
//! ```
//!
//! The retry sits on top so each attempt is balanced anew (and avoids the
//! endpoint that just failed); the per-service breaker opens only when
//! calls fail across endpoints, which ejection makes rare while some
//! endpoint is healthy. Give the per-service breaker the failure-rate mode
//! ([`FailureRate`](grpc_circuit_breaker::FailureRate), e.g. 50% over the
//! last 100 calls): with a count of failures, the few failures one bad
//! endpoint causes before its ejection (and its failed probes) would open
//! it for the whole service.
//!
//! # Example
//!
//! ```
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_balance::{BalanceConfig, BalancedChannel, OutlierConfig};
//! use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer};
//! use std::time::Duration;
//! use tonic::transport::Endpoint;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = BreakerRegistry::new();
//! let config = BalanceConfig::new("query")
//!     .with_endpoint_breaker(BreakerConfig::default().with_failure_threshold(3))
//!     .with_outlier(
//!         OutlierConfig::default()
//!             .with_base_ejection_time(Duration::from_secs(10))
//!             .with_max_ejection_percent(50),
//!     );
//! let endpoints = ["http://127.0.0.1:50051", "http://127.0.0.1:50052", "http://127.0.0.1:50053"]
//!     .into_iter()
//!     .map(Endpoint::from_static);
//! let channel = BalancedChannel::from_endpoints(config, registry.clone(), endpoints)?;
//!
//! // A per-service breaker above the balancer, as for a plain channel.
//! let channel = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(registry.clone()))
//!     .service(channel);
//! let client = QueryServiceClient::new(channel);
//! # let _ = client;
//!
//! // `query@127.0.0.1:50051: closed`, ...
//! for (name, state) in registry.status() {
//!     println!("{name}: {state}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Telemetry
//!
//! Besides the endpoint breakers' own metrics (label `breaker` =
//! `<name>@<host:port>`):
//!
//! * `outlier.ejections.count`, counter, labels `endpoint` (the breaker
//!   name) and `reason` (`breaker`, `probe_failed`, `success_rate`,
//!   `health`): one per ejection;
//! * `outlier.ejected`, gauge, label `balancer` (the config's name): how
//!   many endpoints are ejected now (probing ones not counted).
//!
//! Ejections are logged at WARN (`endpoint ejected`, with the endpoint,
//! reason and ejections in a row), returns at INFO.
//! [`BalancedChannel::endpoints`] reports each endpoint's standing.

mod config;
mod discover;
pub mod endpoint;
mod health;
mod on_time;
mod outlier;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use grpc_resilience_core::{BoxError, CallDeadline};
use tonic::transport::Endpoint;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower_service::Service;

pub use config::{BalanceConfig, ConfigError, HealthConfig, OutlierConfig, SuccessRate};
pub use discover::{Discovery, EndpointStack};
pub use grpc_circuit_breaker::BreakerRegistry;
pub use outlier::{EndpointDetails, EndpointStatus, Reason};

use on_time::OnTime;
use outlier::Controller;

type Request = http::Request<tonic::body::Body>;
type Balancer = OnTime<Balance<Discovery, Request>>;

/// The response body of a [`BalancedChannel`] call.
pub type BalancedBody =
    endpoint::ResponseBody<grpc_circuit_breaker::future::ResponseBody<tonic::body::Body>>;

/// Why a [`BalancedChannel`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// A setting is invalid.
    Config(ConfigError),
    /// Built outside a tokio runtime: the channel needs one for its tasks.
    NoRuntime,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Config(err) => err.fmt(f),
            BuildError::NoRuntime => {
                f.write_str("a balanced channel must be built inside a tokio runtime")
            }
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Config(err) => Some(err),
            BuildError::NoRuntime => None,
        }
    }
}

impl From<ConfigError> for BuildError {
    fn from(err: ConfigError) -> Self {
        BuildError::Config(err)
    }
}

/// A balanced channel over several endpoints with per-endpoint breakers,
/// outlier ejection and health checks; see the [crate docs](crate).
///
/// Cheap to clone: clones share the balancer (behind a buffer, as tonic's
/// own balanced channel) and the endpoints. Its tasks (buffer worker,
/// health watches, timers, DNS refresh) end when the last clone is
/// dropped.
///
/// The endpoint breakers live in the registry you give: they outlive a
/// removed endpoint (a re-added one finds its breaker as it was), and each
/// channel leaves one small state-change subscriber in the registry, inert
/// once the channel is gone. Endpoint breakers are configured from
/// [`BalanceConfig::effective_endpoint_breaker`] when first made.
#[derive(Clone)]
pub struct BalancedChannel {
    inner: Buffer<Request, <Balancer as Service<Request>>::Future>,
    controller: Arc<Controller>,
}

impl fmt::Debug for BalancedChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalancedChannel")
            .field("name", &self.controller.config.name())
            .field("endpoints", &self.controller.status())
            .finish()
    }
}

impl BalancedChannel {
    fn build(
        config: BalanceConfig,
        registry: BreakerRegistry,
    ) -> Result<(Self, discover::Sender), BuildError> {
        config.validate()?;
        let handle = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let capacity = config.buffer_capacity();
        let controller = Controller::new(config, registry, handle.clone());
        let (tx, discovery) = discover::channel();
        let (inner, worker) = Buffer::pair(OnTime::new(Balance::new(discovery)), capacity);
        handle.spawn(worker);
        Ok((BalancedChannel { inner, controller }, tx))
    }

    /// Balances over a fixed list of endpoints, each keyed (and its breaker
    /// named) by its URI's `host:port`.
    ///
    /// # Errors
    ///
    /// [`BuildError`] if `config` is invalid or no tokio runtime is running.
    pub fn from_endpoints(
        config: BalanceConfig,
        registry: BreakerRegistry,
        endpoints: impl IntoIterator<Item = Endpoint>,
    ) -> Result<Self, BuildError> {
        let (channel, tx) = Self::build(config, registry)?;
        for endpoint in endpoints {
            let uri = endpoint.uri();
            let key: Arc<str> = match uri.authority() {
                Some(authority) => authority.as_str().into(),
                None => uri.to_string().into(),
            };
            channel.controller.add(&tx, key, endpoint);
        }
        Ok(channel)
    }

    /// Balances over the addresses of `host_port` (e.g.
    /// `backend.internal:50051`), resolved at once and again every
    /// `dns_refresh`: new addresses are added, vanished ones removed.
    /// Endpoints are `http://<ip:port>` with the config's
    /// `connect_timeout`. A failed or empty lookup keeps the endpoints.
    ///
    /// # Errors
    ///
    /// [`BuildError`] if `config` is invalid, `host_port` has no port, or
    /// no tokio runtime is running.
    pub fn from_dns(
        config: BalanceConfig,
        registry: BreakerRegistry,
        host_port: &str,
    ) -> Result<Self, BuildError> {
        Self::from_dns_with(config, registry, host_port, |endpoint| endpoint)
    }

    /// As [`BalancedChannel::from_dns`], with `configure` applied to each
    /// endpoint found (after the config's `connect_timeout`): keepalive,
    /// window sizes, TLS.
    ///
    /// # Errors
    ///
    /// As [`BalancedChannel::from_dns`].
    pub fn from_dns_with<F>(
        config: BalanceConfig,
        registry: BreakerRegistry,
        host_port: &str,
        configure: F,
    ) -> Result<Self, BuildError>
    where
        F: Fn(Endpoint) -> Endpoint + Send + 'static,
    {
        let port_ok = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            return Err(ConfigError::new("dns", host_port, "must be host:port").into());
        }
        let (channel, tx) = Self::build(config, registry)?;
        let weak = Arc::downgrade(&channel.controller);
        channel
            .controller
            .handle
            .spawn(discover::dns(host_port.to_owned(), weak, tx, configure));
        Ok(channel)
    }

    /// Balances over the endpoints of your own stream of changes: each
    /// `Insert(key, endpoint)` adds (or replaces) the endpoint `key` (its
    /// breaker is `<name>@<key>`), each `Remove(key)` removes it. Stream
    /// errors are logged and skipped; when the stream ends the endpoints
    /// stay.
    ///
    /// # Errors
    ///
    /// [`BuildError`] if `config` is invalid or no tokio runtime is running.
    pub fn from_discover<D, K, E>(
        config: BalanceConfig,
        registry: BreakerRegistry,
        discover: D,
    ) -> Result<Self, BuildError>
    where
        D: Stream<Item = Result<Change<K, Endpoint>, E>> + Send + 'static,
        K: fmt::Display + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let (channel, tx) = Self::build(config, registry)?;
        let weak = Arc::downgrade(&channel.controller);
        channel
            .controller
            .handle
            .spawn(discover::forward(discover, weak, tx));
        Ok(channel)
    }

    /// Each endpoint's standing, by key (`host:port`).
    pub fn endpoints(&self) -> BTreeMap<String, EndpointStatus> {
        self.controller.status()
    }

    /// Each endpoint's standing, breaker state and ejection counts, by key
    /// (`host:port`).
    pub fn endpoint_details(&self) -> BTreeMap<String, EndpointDetails> {
        self.controller.details()
    }

    /// The breaker name of the endpoint `key` (`<name>@<key>`).
    pub fn breaker_name(&self, key: &str) -> String {
        self.controller.breaker_name(key)
    }

    /// The registry holding the endpoints' breakers.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.controller.registry
    }

    /// The settings this channel runs with.
    pub fn config(&self) -> &BalanceConfig {
        &self.controller.config
    }
}

impl Service<Request> for BalancedChannel {
    type Response = http::Response<BalancedBody>;
    type Error = BoxError;
    type Future = tower::buffer::future::ResponseFuture<
        futures_util::future::Either<
            <Balance<Discovery, Request> as Service<Request>>::Future,
            futures_util::future::Ready<Result<http::Response<BalancedBody>, BoxError>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        // The call may wait in the buffer for a ready endpoint: its
        // deadline is recorded now, so that the time it waits counts
        // (see `OnTime`).
        CallDeadline::get_or_insert(&mut request);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests;
