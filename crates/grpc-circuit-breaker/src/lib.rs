//! gRPC-aware circuit breakers for tonic channels.
//!
//! [`CircuitBreakerLayer`] wraps a tonic `Channel` (or any
//! `Service<http::Request<B>>` that speaks gRPC) with one breaker per
//! downstream gRPC service, so a channel that carries the Command and the
//! Query service has two independent breakers, `command` and `query`:
//!
//! * **CLOSED → OPEN** after `failure_threshold` failures within
//!   `reset_timeout` (older failures are forgotten), or, in the
//!   failure-rate mode, when the failure or slow-call rate over a sliding
//!   window of calls reaches its threshold (as resilience4j);
//! * **OPEN → HALF_OPEN** after `timeout`; **HALF_OPEN** admits at most
//!   `half_open_max_calls` probes; `success_threshold` successes close it,
//!   any failure opens it again.
//!
//! What a failure is comes from the gRPC status, read from Trailers-Only
//! headers or from the trailers at the end of a streamed body, not from
//! `Result::is_err`: over a tonic channel most failures are HTTP 200
//! responses. By default `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`,
//! `UNKNOWN`, `RESOURCE_EXHAUSTED`, `DATA_LOSS` and transport errors are
//! failures; client errors are successes (the service answered); a caller's
//! cancellation counts as nothing, unless the call's `grpc-timeout` deadline
//! had passed (a deadline set above the breaker ended a slow call).
//!
//! While open, calls are rejected at once from the call's future (not from
//! `poll_ready`) with [`BreakerOpen`], which a stub's caller sees as
//! `Code::Unavailable` naming the breaker.
//!
//! Every outcome carries the generation of the state that admitted it: a
//! late result from an earlier state changes nothing. A probe whose future
//! or body is dropped gives its slot back. The closed-state path is
//! lock-free: atomics only, no allocation.
//!
//! # Example
//!
//! ```
//! use catalog_proto::command_service_client::CommandServiceClient;
//! use catalog_proto::query_service_client::QueryServiceClient;
//! use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer};
//! use tonic::transport::Channel;
//! use tower::ServiceBuilder;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = BreakerRegistry::new();
//! registry.configure("query", BreakerConfig::default().with_failure_threshold(3))?;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new(registry.clone()))
//!     .service(channel);
//!
//! // Both stubs share the channel; each service has its own breaker.
//! let commands = CommandServiceClient::new(channel.clone());
//! let queries = QueryServiceClient::new(channel);
//! # let _ = (commands, queries);
//!
//! // Later, for an admin endpoint or an alert:
//! for (name, state) in registry.status() {
//!     println!("{name}: {state}");
//! }
//! registry.subscribe(|change| eprintln!("{} went {} -> {}", change.breaker, change.from, change.to));
//! # Ok(())
//! # }
//! ```
//!
//! # Telemetry
//!
//! Per breaker, registered once when the breaker is made (install the
//! `metrics` recorder first):
//! `circuit_breaker.call.count` (labels `breaker`, `state`, `outcome` =
//! success, failure or ignored), `circuit_breaker.call.latency` (seconds),
//! `circuit_breaker.rejected.count` (`breaker`, `state`),
//! `circuit_breaker.state` (a gauge per state: 1 for the current one, 0 for
//! the others) and `circuit_breaker.transitions.count` (`breaker`, `from`,
//! `to`). Transitions are logged through `tracing`: WARN `Circuit breaker
//! opening after 5 failures`, INFO on half-open and on close.

mod config;
mod error;
mod events;
pub mod future;
mod layer;
mod registry;
mod state;

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use grpc_resilience_core::{BoxError, MethodId, timeout_header};
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tower_service::Service;

pub use config::{BreakerConfig, BreakerConfigError, DEFAULT_FAILURE_CODES, FailureRate};
pub use error::BreakerOpen;
pub use events::{StateChange, Trigger};
pub use layer::CircuitBreakerLayer;
pub use registry::{BreakerRegistry, UnknownBreaker};
pub use state::State;

use future::{Permit, ResponseBody, ResponseFuture, Stripe};
use state::Core;

/// A function choosing a breaker for a request from its URI and headers;
/// `None` sends the call without a breaker.
pub type KeyFn =
    Arc<dyn for<'a> Fn(&'a http::Uri, &'a http::HeaderMap) -> Option<&'a str> + Send + Sync>;

/// Which breaker a call goes through.
#[derive(Clone)]
pub enum Keying {
    /// One breaker per gRPC service (the default).
    PerService,
    /// One breaker, with this name, for every call.
    Single(String),
    /// The breaker named by a function of the request.
    Custom(KeyFn),
}

impl fmt::Debug for Keying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keying::PerService => f.write_str("PerService"),
            Keying::Single(name) => f.debug_tuple("Single").field(name).finish(),
            Keying::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The breaker name a service gets: its name without package and without a
/// `Service` suffix, in snake case. `catalog.v1.CommandService` →
/// `command`, `shop.ProductCatalogService` → `product_catalog`.
pub fn service_breaker_name(service: &str) -> String {
    let short = service.rsplit('.').next().unwrap_or(service);
    let base = match short.strip_suffix("Service") {
        Some(base) if !base.is_empty() => base,
        _ => short,
    };
    let mut name = String::with_capacity(base.len() + 4);
    for (i, c) in base.char_indices() {
        if c.is_uppercase() {
            if i > 0 && !name.ends_with('_') {
                name.push('_');
            }
            name.extend(c.to_lowercase());
        } else {
            name.push(c);
        }
    }
    name
}

const STRIPES: usize = 8;

/// A breaker with the handles calls take.
#[derive(Debug)]
struct Entry {
    key: Box<str>,
    stripes: [Arc<Stripe>; STRIPES],
}

impl Entry {
    fn new(key: &str, core: Arc<Core>) -> Self {
        Entry {
            key: key.into(),
            stripes: std::array::from_fn(|_| Arc::new(Stripe(core.clone()))),
        }
    }

    #[inline]
    fn stripe(&self) -> &Arc<Stripe> {
        &self.stripes[stripe_index()]
    }
}

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

/// What every clone of a layer's services shares.
#[derive(Debug)]
pub(crate) struct Shared {
    registry: BreakerRegistry,
    keying: Keying,
    names: FxHashMap<String, String>,
    // Key (service or custom key) to breaker; copied on write, read without
    // locks.
    entries: ArcSwap<FxHashMap<Box<str>, Arc<Entry>>>,
    single: Option<Entry>,
}

impl Shared {
    fn new(registry: BreakerRegistry, keying: Keying, names: FxHashMap<String, String>) -> Self {
        let single = match &keying {
            Keying::Single(name) => Some(Entry::new(name, registry.core(name))),
            _ => None,
        };
        Shared {
            registry,
            keying,
            names,
            entries: ArcSwap::default(),
            single,
        }
    }

    /// The breaker for a key, from the shared map.
    fn lookup(&self, key: &str) -> Arc<Entry> {
        match self.entries.load().get(key) {
            Some(entry) => entry.clone(),
            None => self.insert(key),
        }
    }

    #[cold]
    fn insert(&self, key: &str) -> Arc<Entry> {
        let name = match &self.keying {
            Keying::PerService => self
                .names
                .get(key)
                .cloned()
                .unwrap_or_else(|| service_breaker_name(key)),
            _ => key.to_owned(),
        };
        let entry = Arc::new(Entry::new(key, self.registry.core(&name)));
        self.entries.rcu(|map| {
            let mut map = FxHashMap::clone(map);
            map.entry(key.into()).or_insert_with(|| entry.clone());
            map
        });
        self.entries.load().get(key).cloned().unwrap_or(entry)
    }
}

/// How many keys each service clone remembers, so the usual call finds
/// its breaker without touching shared memory.
const LOCAL_KEYS: usize = 4;

/// Circuit breakers for gRPC calls; see the [crate docs](crate).
#[derive(Clone, Debug)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
    local: [Option<Arc<Entry>>; LOCAL_KEYS],
}

impl<S> CircuitBreaker<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        CircuitBreaker {
            inner,
            shared,
            local: Default::default(),
        }
    }

    /// The handle of the breaker for this request, if one applies.
    #[inline]
    fn stripe<B>(&mut self, request: &http::Request<B>) -> Option<Arc<Stripe>> {
        let key = match &self.shared.keying {
            Keying::Single(_) => return self.shared.single.as_ref().map(|e| e.stripe().clone()),
            Keying::PerService => MethodId::from_request(request).ok()?.service(),
            Keying::Custom(f) => f(request.uri(), request.headers())?,
        };
        if let Some(entry) = self.local.iter().flatten().find(|e| &*e.key == key) {
            return Some(entry.stripe().clone());
        }
        let entry = self.shared.lookup(key);
        let stripe = entry.stripe().clone();
        // Remember it, evicting the oldest.
        self.local.rotate_right(1);
        self.local[0] = Some(entry);
        Some(stripe)
    }

    /// Wraps `inner` with one breaker per gRPC service from `registry`.
    pub fn new(inner: S, registry: BreakerRegistry) -> Self {
        tower_layer::Layer::layer(&CircuitBreakerLayer::new(registry), inner)
    }

    /// The registry of this service's breakers.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.shared.registry
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for CircuitBreaker<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never rejects here: tonic stubs would report UNKNOWN. Rejections
        // come from the call's future.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(stripe) = self.stripe(&request) else {
            return ResponseFuture::called(self.inner.call(request), None);
        };
        let core = &stripe.0;
        match core.admit(Instant::now) {
            Err(state) => ResponseFuture::rejected(BreakerOpen::new(core.name().clone(), state)),
            Ok(admission) => {
                let start = Instant::now();
                let deadline = match timeout_header::from_headers(request.headers()) {
                    Ok(Some(timeout)) => start.checked_add(timeout),
                    _ => None,
                };
                let permit = Permit::new(stripe, admission, start, deadline);
                ResponseFuture::called(self.inner.call(request), Some(permit))
            }
        }
    }
}

#[cfg(test)]
mod tests;
