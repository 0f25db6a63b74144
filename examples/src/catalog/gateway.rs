//! The GraphQL gateway: queries and mutations that call the Command and
//! Query services through the channels of [`super::channels`], the
//! operations API (breakers, faults, live numbers) and a subscription of
//! breaker transitions.
//!
//! A gRPC failure reaches the GraphQL client as an error whose
//! `extensions` hold `code` (the gRPC code name, e.g. `UNAVAILABLE`),
//! `grpcCode` (its number), `attempts` (attempts the retry layer made,
//! counted by [`super::attempts`]), `breakerRejected` (whether a circuit
//! breaker refused the call, found as a
//! [`BreakerOpen`] or a
//! [`LocalRejection`] in the
//! error's source chain) and, when it did, `breaker` (its name).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_graphql::{
    Context, Enum, ErrorExtensions, InputObject, Object, Schema, SimpleObject, Subscription,
};
use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, ListProductsRequest};
use futures_util::{Stream, StreamExt};
use grpc_resilience::layers::circuit_breaker::Trigger;
use grpc_resilience::{BreakerOpen, State, StateChange};
use grpc_resilience_core::codes::code_name;
use grpc_resilience_core::error::{LocalRejection, find_error};
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Code, Status};

use super::attempts::{AttemptCounter, Downstream};
use super::backend::Backend;
use super::channels::{BreakerStatus, Channels};
use super::faults::{FaultSettings, code_from_name};
use super::stats::{CallSample, LiveStats, ServiceStats};

/// How many breaker transitions the gateway remembers.
const TRANSITION_LOG: usize = 500;
/// The most products one `products` page holds.
pub const MAX_PAGE: i32 = 100;
/// The most products one `importProducts` takes.
pub const MAX_IMPORT: usize = 1000;

/// The GraphQL schema of the gateway.
pub type GatewaySchema = Schema<QueryRoot, MutationRoot, SubscriptionRoot>;

/// A breaker transition, as remembered and streamed.
#[derive(Clone, Debug, PartialEq, SimpleObject)]
pub struct BreakerTransition {
    /// The breaker: `command` or `query`.
    pub name: String,
    /// The state it left.
    pub from: BreakerState,
    /// The state it entered.
    pub to: BreakerState,
    /// Why, e.g. `failure rate 100% over 40 calls`.
    pub trigger: String,
    /// Wall-clock time, `HH:MM:SS.mmm` UTC.
    pub at: String,
    /// Milliseconds since the gateway started.
    pub since_start_ms: u64,
}

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// Calls are rejected.
    Open,
    /// A few probes test the service.
    HalfOpen,
    /// Held open by an operator.
    ForcedOpen,
    /// Switched off.
    Disabled,
}

impl From<State> for BreakerState {
    fn from(state: State) -> Self {
        match state {
            State::Closed => BreakerState::Closed,
            State::Open => BreakerState::Open,
            State::HalfOpen => BreakerState::HalfOpen,
            State::ForcedOpen => BreakerState::ForcedOpen,
            State::Disabled => BreakerState::Disabled,
        }
    }
}

fn describe_trigger(trigger: &Trigger) -> String {
    match trigger {
        Trigger::Failures(n) => format!("{n} failures"),
        Trigger::FailureRate { percent, calls } => {
            format!("failure rate {percent:.0}% over {calls} calls")
        }
        Trigger::SlowCallRate { percent, calls } => {
            format!("slow-call rate {percent:.0}% over {calls} calls")
        }
        Trigger::ProbeFailed => "a probe failed".into(),
        Trigger::Timeout => "open timeout elapsed".into(),
        Trigger::Probes(1) => "the probe succeeded".into(),
        Trigger::Probes(n) => format!("{n} probes succeeded"),
        Trigger::Reset => "reset by an operator".into(),
        Trigger::ForcedOpen => "forced open".into(),
        Trigger::Disabled => "disabled".into(),
    }
}

/// `HH:MM:SS.mmm` of a wall-clock time, UTC.
pub fn clock(time: SystemTime) -> String {
    let ms = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// The gateway's state: channels, the built-in services (if any), live
/// numbers and the transition log.
#[derive(Debug)]
pub struct Gateway {
    channels: Channels,
    backend: Option<Arc<Backend>>,
    stats: LiveStats,
    transitions: Mutex<VecDeque<BreakerTransition>>,
    started: Instant,
    retries: [AtomicU64; METHODS.len()],
}

/// The methods whose retries the gateway counts.
const METHODS: [&str; 3] = ["GetProduct", "ListProducts", "CreateProduct"];

/// A failed call, with what the GraphQL error's extensions report.
#[derive(Debug)]
pub struct CallError {
    /// The status the stub returned.
    pub status: Status,
    /// Attempts made.
    pub attempts: u32,
    /// The breaker that refused the call, if one did.
    pub breaker: Option<String>,
}

impl CallError {
    /// Whether a circuit breaker (or another local layer) refused the call.
    pub fn rejected(&self) -> bool {
        self.breaker.is_some() || find_error::<LocalRejection>(&self.status).is_some()
    }

    /// The GraphQL error.
    pub fn to_graphql(&self) -> async_graphql::Error {
        let code = self.status.code();
        let rejected = self.rejected();
        let attempts = self.attempts;
        let breaker = self.breaker.clone();
        async_graphql::Error::new(format!("{}: {}", code_name(code), self.status.message()))
            .extend_with(|_, e| {
                e.set("code", code_name(code));
                e.set("grpcCode", code as i32);
                e.set("attempts", attempts);
                e.set("breakerRejected", rejected);
                if let Some(name) = &breaker {
                    e.set("breaker", name.as_str());
                }
            })
    }
}

impl Gateway {
    /// A gateway over `channels`; `backend` is the built-in services, whose
    /// faults the admin mutations then control. Starts a task that logs
    /// breaker transitions (call from within a tokio runtime).
    pub fn new(channels: Channels, backend: Option<Arc<Backend>>) -> Arc<Self> {
        let gateway = Arc::new(Gateway {
            channels,
            backend,
            stats: LiveStats::default(),
            transitions: Mutex::default(),
            started: Instant::now(),
            retries: Default::default(),
        });
        if let Some(mut changes) = gateway.channels.watch() {
            let weak = Arc::downgrade(&gateway);
            tokio::spawn(async move {
                loop {
                    let change = match changes.recv().await {
                        Ok(change) => change,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    };
                    let Some(gateway) = weak.upgrade() else {
                        return;
                    };
                    let transition = gateway.transition(&change);
                    let mut log = gateway
                        .transitions
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if log.len() == TRANSITION_LOG {
                        log.pop_front();
                    }
                    log.push_back(transition);
                }
            });
        }
        gateway
    }

    /// The channels the gateway calls through.
    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// The built-in services, if the gateway runs over them.
    pub fn backend(&self) -> Option<&Arc<Backend>> {
        self.backend.as_ref()
    }

    /// The transitions seen so far, oldest first.
    pub fn transitions(&self) -> Vec<BreakerTransition> {
        self.transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Retries (attempts after the first) of calls to `method`
    /// (`GetProduct`, `ListProducts` or `CreateProduct`) so far.
    pub fn retries(&self, method: &str) -> u64 {
        METHODS
            .iter()
            .position(|m| *m == method)
            .map_or(0, |i| self.retries[i].load(Ordering::Relaxed))
    }

    /// How long the gateway has been running (the clock of
    /// [`BreakerTransition::since_start_ms`]).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The live numbers of `service`.
    pub fn stats(&self, service: Downstream) -> ServiceStats {
        self.stats.snapshot(service)
    }

    fn transition(&self, change: &StateChange) -> BreakerTransition {
        BreakerTransition {
            name: change.breaker.to_string(),
            from: change.from.into(),
            to: change.to.into(),
            trigger: describe_trigger(&change.trigger),
            at: clock(SystemTime::now()),
            since_start_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// Runs one call to `service`, counting its attempts and recording the
    /// live numbers. The call metrics (`grpc.client.call.count`,
    /// `grpc.client.call.duration`) are the resilient channels' own (the
    /// facade's call telemetry); plain channels record none.
    pub async fn call<T, F>(
        &self,
        service: Downstream,
        method: &'static str,
        call: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(AttemptCounter) -> GrpcFuture<T>,
    {
        let counter = AttemptCounter::new();
        let start = Instant::now();
        let result = call(counter.clone()).await;
        let latency = start.elapsed();
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        let breaker = result
            .as_ref()
            .err()
            .and_then(|status| find_error::<BreakerOpen>(status))
            .map(|open| open.breaker().to_owned());
        let rejected = breaker.is_some()
            || result
                .as_ref()
                .err()
                .is_some_and(|s| find_error::<LocalRejection>(s).is_some());
        // The attempt counter sits under the breaker: an attempt the
        // breaker refused never reached it, and is the call's last (a
        // refusal is not retried).
        let refused = u32::from(breaker.is_some());
        let attempts = (counter.get() + refused).max(1);
        if let Some(i) = METHODS.iter().position(|m| *m == method) {
            self.retries[i].fetch_add(u64::from(attempts - 1), Ordering::Relaxed);
        }
        let answered = matches!(
            code,
            Code::Ok | Code::NotFound | Code::InvalidArgument | Code::AlreadyExists
        );
        self.stats.record(
            service,
            CallSample {
                latency,
                ok: answered,
                attempts,
                rejected,
            },
        );
        result.map_err(|status| CallError {
            status,
            attempts,
            breaker,
        })
    }
}

/// A boxed gRPC call (boxing sidesteps a higher-ranked `Send` inference
/// limit of the compiler with generic tonic clients in async resolvers).
pub type GrpcFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send>>;

fn request<T>(message: T, counter: AttemptCounter) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(counter);
    request
}

/// A product.
#[derive(Clone, Debug, SimpleObject)]
pub struct Product {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its price in cents.
    pub price_cents: i64,
}

impl From<catalog_proto::Product> for Product {
    fn from(p: catalog_proto::Product) -> Self {
        Product {
            id: p.id,
            name: p.name,
            price_cents: p.price_cents,
        }
    }
}

/// A page of products.
#[derive(Clone, Debug, SimpleObject)]
pub struct ProductPage {
    /// The products of the page.
    pub nodes: Vec<Product>,
    /// The cursor of the last product (pass it as `after` for the next
    /// page).
    pub end_cursor: Option<String>,
    /// Whether more products follow.
    pub has_next_page: bool,
}

/// A new product.
#[derive(Clone, Debug, InputObject)]
pub struct CreateProductInput {
    /// Its id; one is made up when missing.
    pub id: Option<String>,
    /// Its name.
    pub name: String,
    /// Its price in cents.
    pub price_cents: i64,
}

/// A circuit breaker, for the operations API.
#[derive(Clone, Debug, SimpleObject)]
pub struct CircuitBreaker {
    /// `command` or `query`.
    pub name: String,
    /// Its state.
    pub state: BreakerState,
    /// Failures in its current window (the facade's breaker snapshot: the
    /// last `window` attempts in the failure-rate mode).
    pub failure_count: u64,
    /// While open: milliseconds until it lets probes through.
    pub next_probe_in: Option<u64>,
}

impl From<BreakerStatus> for CircuitBreaker {
    fn from(b: BreakerStatus) -> Self {
        CircuitBreaker {
            name: b.name,
            state: b.state.into(),
            failure_count: b.failure_count,
            next_probe_in: b.next_probe_in.map(|d| d.as_millis() as u64),
        }
    }
}

/// One endpoint of a balanced channel, for the operations API.
#[derive(Clone, Debug, SimpleObject)]
pub struct Endpoint {
    /// Its breaker's name, `<channel>@<host:port>`.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// `active`, `ejected (<reason>)` or `probing`.
    pub status: String,
    /// Out of the balancer now.
    pub ejected: bool,
    /// Its breaker's state.
    pub breaker_state: Option<BreakerState>,
    /// Ejections so far.
    pub ejections: u64,
    /// Its health watch last said it is not serving.
    pub not_serving: bool,
}

impl From<grpc_resilience::EndpointDetails> for Endpoint {
    fn from(d: grpc_resilience::EndpointDetails) -> Self {
        Endpoint {
            ejected: d.is_ejected(),
            status: d.status.to_string(),
            name: d.breaker,
            address: d.key,
            breaker_state: d.breaker_state.map(Into::into),
            ejections: d.ejections,
            not_serving: d.not_serving,
        }
    }
}

/// What a built-in service's `grpc.health.v1` service reports.
#[derive(Clone, Debug, SimpleObject)]
pub struct ServiceHealth {
    /// The service.
    pub service: Service,
    /// `SERVING` or `NOT_SERVING` (during an outage).
    pub status: String,
}

/// A downstream service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Enum)]
pub enum Service {
    /// The Command service (writes).
    Command,
    /// The Query service (reads).
    Query,
}

impl From<Service> for Downstream {
    fn from(s: Service) -> Self {
        match s {
            Service::Command => Downstream::Command,
            Service::Query => Downstream::Query,
        }
    }
}

/// The live numbers of one service, over the last five seconds.
#[derive(Clone, Debug, SimpleObject)]
pub struct ServiceNumbers {
    /// The service.
    pub service: Service,
    /// Logical calls per second.
    pub calls_per_second: f64,
    /// Share of calls that succeeded (0 to 1).
    pub success_rate: f64,
    /// Retries made.
    pub retries: u64,
    /// Calls a breaker rejected.
    pub rejected: u64,
    /// Median latency in ms.
    pub p50_ms: f64,
    /// 99th percentile latency in ms.
    pub p99_ms: f64,
}

/// One injected error code and its rate.
#[derive(Clone, Debug, InputObject, SimpleObject)]
#[graphql(input_name = "ErrorRateInput")]
pub struct ErrorRate {
    /// A gRPC code name (`UNAVAILABLE`) or number.
    pub code: String,
    /// Share of calls, 0 to 1.
    pub rate: f64,
}

/// Faults of one service.
#[derive(Clone, Debug, Default, InputObject)]
pub struct FaultInput {
    /// Every call fails with `UNAVAILABLE`.
    #[graphql(default)]
    pub outage: bool,
    /// Error rates per code.
    #[graphql(default)]
    pub errors: Vec<ErrorRate>,
    /// Share of calls whose response is lost after the handler ran.
    #[graphql(default)]
    pub lost_response_rate: f64,
    /// Milliseconds added to every call.
    #[graphql(default)]
    pub latency_ms: u64,
}

/// The faults a service injects now.
#[derive(Clone, Debug, SimpleObject)]
pub struct FaultState {
    /// The service.
    pub service: Service,
    /// Whether it is down.
    pub outage: bool,
    /// Error rates per code.
    pub errors: Vec<ErrorRate>,
    /// Share of lost responses.
    pub lost_response_rate: f64,
    /// Added latency in ms.
    pub latency_ms: u64,
}

fn fault_state(service: Service, s: &FaultSettings) -> FaultState {
    FaultState {
        service,
        outage: s.outage,
        errors: s
            .errors
            .iter()
            .map(|(code, rate)| ErrorRate {
                code: code_name(*code).to_owned(),
                rate: *rate,
            })
            .collect(),
        lost_response_rate: s.lost_responses,
        latency_ms: s.latency.as_millis() as u64,
    }
}

fn gateway<'a>(ctx: &Context<'a>) -> &'a Arc<Gateway> {
    ctx.data_unchecked::<Arc<Gateway>>()
}

fn backend<'a>(ctx: &Context<'a>) -> async_graphql::Result<&'a Arc<Backend>> {
    gateway(ctx).backend().ok_or_else(|| {
        async_graphql::Error::new(
            "faults can only be injected into the built-in services; this gateway calls external targets",
        )
    })
}

/// Reads.
#[derive(Debug, Default)]
pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// The product with this id, or null.
    async fn product(
        &self,
        ctx: &Context<'_>,
        id: String,
    ) -> async_graphql::Result<Option<Product>> {
        let gw = gateway(ctx);
        let mut client = QueryServiceClient::new(gw.channels.query.clone());
        let result = gw
            .call(Downstream::Query, "GetProduct", |counter| {
                Box::pin(async move {
                    client
                        .get_product(request(GetProductRequest { id }, counter))
                        .await
                })
            })
            .await;
        match result {
            Ok(response) => Ok(Some(response.into_inner().into())),
            Err(e) if e.status.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e.to_graphql()),
        }
    }

    /// A page of products: the first `first` (at most 100) after the
    /// product whose id is `after`.
    async fn products(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 10)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<ProductPage> {
        if !(1..=MAX_PAGE).contains(&first) {
            return Err(async_graphql::Error::new(format!(
                "`first` is {first}: it must be within 1 and {MAX_PAGE}"
            )));
        }
        let gw = gateway(ctx);
        let mut client = QueryServiceClient::new(gw.channels.query.clone());
        let wanted = first as usize;
        let after_id = after.clone();
        let page = gw
            .call(Downstream::Query, "ListProducts", |counter| {
                Box::pin(async move {
                    let mut stream = client
                        .list_products(request(
                            ListProductsRequest {
                                limit: 0,
                                interval_ms: 0,
                            },
                            counter,
                        ))
                        .await?
                        .into_inner();
                    let mut skipping = after_id.is_some();
                    let mut nodes = Vec::with_capacity(wanted);
                    let mut more = false;
                    while let Some(product) = stream.message().await? {
                        if skipping {
                            skipping = Some(&product.id) != after_id.as_ref();
                            continue;
                        }
                        if nodes.len() == wanted {
                            more = true;
                            break;
                        }
                        nodes.push(Product::from(product));
                    }
                    if skipping {
                        return Err(Status::invalid_argument(format!(
                            "no product `{}` to page after",
                            after_id.unwrap_or_default()
                        )));
                    }
                    Ok((nodes, more))
                })
            })
            .await;
        match page {
            Ok((nodes, has_next_page)) => Ok(ProductPage {
                end_cursor: nodes.last().map(|p| p.id.clone()),
                nodes,
                has_next_page,
            }),
            Err(e) => Err(e.to_graphql()),
        }
    }

    /// Every circuit breaker (none when the gateway runs plain channels).
    async fn circuit_breakers(&self, ctx: &Context<'_>) -> Vec<CircuitBreaker> {
        gateway(ctx)
            .channels
            .breakers()
            .into_iter()
            .map(Into::into)
            .collect()
    }

    /// The breaker transitions seen so far, oldest first.
    async fn breaker_transitions(&self, ctx: &Context<'_>) -> Vec<BreakerTransition> {
        gateway(ctx).transitions()
    }

    /// Live numbers per service.
    async fn services(&self, ctx: &Context<'_>) -> Vec<ServiceNumbers> {
        let gw = gateway(ctx);
        [Service::Command, Service::Query]
            .into_iter()
            .map(|service| {
                let s = gw.stats(service.into());
                ServiceNumbers {
                    service,
                    calls_per_second: s.calls_per_second,
                    success_rate: s.success_rate,
                    retries: s.retries,
                    rejected: s.rejected,
                    p50_ms: s.p50_ms,
                    p99_ms: s.p99_ms,
                }
            })
            .collect()
    }

    /// The faults the built-in services inject (empty with external
    /// targets).
    async fn faults(&self, ctx: &Context<'_>) -> Vec<FaultState> {
        let Some(backend) = gateway(ctx).backend() else {
            return Vec::new();
        };
        [Service::Command, Service::Query]
            .into_iter()
            .map(|s| fault_state(s, &backend.faults(s.into())))
            .collect()
    }

    /// Every endpoint of the balanced channels (none for channels with one
    /// endpoint).
    async fn endpoints(&self, ctx: &Context<'_>) -> Vec<Endpoint> {
        gateway(ctx)
            .channels
            .endpoints()
            .into_iter()
            .map(Into::into)
            .collect()
    }

    /// The health status each built-in service reports (empty with
    /// external targets).
    async fn service_health(&self, ctx: &Context<'_>) -> Vec<ServiceHealth> {
        let Some(backend) = gateway(ctx).backend() else {
            return Vec::new();
        };
        [Service::Command, Service::Query]
            .into_iter()
            .map(|service| ServiceHealth {
                service,
                status: tonic_health::pb::health_check_response::ServingStatus::from(
                    backend.health(service.into()),
                )
                .as_str_name()
                .to_owned(),
            })
            .collect()
    }

    /// Which stack the gateway's channels have: `resilient` or `plain`.
    async fn stack(&self, ctx: &Context<'_>) -> &'static str {
        gateway(ctx).channels.stack().as_str()
    }
}

/// Writes and operations.
#[derive(Debug, Default)]
pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Creates a product through the Command service. Retried with one
    /// idempotency key, so it is written once.
    async fn create_product(
        &self,
        ctx: &Context<'_>,
        input: CreateProductInput,
    ) -> async_graphql::Result<Product> {
        let gw = gateway(ctx);
        let id = match input.id {
            Some(id) if id.is_empty() => {
                return Err(async_graphql::Error::new("`id` must not be empty"));
            }
            Some(id) => id,
            None => format!("g{:016x}", rand_id()),
        };
        let product = catalog_proto::Product {
            id,
            name: input.name,
            price_cents: input.price_cents,
            blob: Vec::new(),
        };
        let mut client = CommandServiceClient::new(gw.channels.command.clone());
        gw.call(Downstream::Command, "CreateProduct", |counter| {
            Box::pin(async move {
                client
                    .create_product(request(
                        CreateProductRequest {
                            product: Some(product),
                        },
                        counter,
                    ))
                    .await
            })
        })
        .await
        .map_err(|e| e.to_graphql())
        .and_then(|r| {
            r.into_inner()
                .product
                .map(Product::from)
                .ok_or_else(|| async_graphql::Error::new("the Command service returned no product"))
        })
    }

    /// Imports products in one client-streaming `ImportProducts` call (at
    /// most 1000). The call is a write without idempotency key: the retry
    /// layer replays its recorded stream only when the server provably
    /// never saw it.
    async fn import_products(
        &self,
        ctx: &Context<'_>,
        products: Vec<CreateProductInput>,
    ) -> async_graphql::Result<u32> {
        if products.len() > MAX_IMPORT {
            return Err(async_graphql::Error::new(format!(
                "{} products: one import takes at most {MAX_IMPORT}",
                products.len()
            )));
        }
        let mut stream = Vec::with_capacity(products.len());
        for input in products {
            let id = match input.id {
                Some(id) if id.is_empty() => {
                    return Err(async_graphql::Error::new("`id` must not be empty"));
                }
                Some(id) => id,
                None => format!("g{:016x}", rand_id()),
            };
            stream.push(catalog_proto::Product {
                id,
                name: input.name,
                price_cents: input.price_cents,
                blob: Vec::new(),
            });
        }
        let gw = gateway(ctx);
        let mut client = CommandServiceClient::new(gw.channels.command.clone());
        gw.call(Downstream::Command, "ImportProducts", |counter| {
            Box::pin(async move {
                client
                    .import_products(request(tokio_stream::iter(stream), counter))
                    .await
            })
        })
        .await
        .map(|r| r.into_inner().imported)
        .map_err(|e| e.to_graphql())
    }

    /// Closes every circuit breaker.
    async fn reset_circuit_breakers(&self, ctx: &Context<'_>) -> Vec<CircuitBreaker> {
        let gw = gateway(ctx);
        let _ = gw.channels.reset(None);
        gw.channels.breakers().into_iter().map(Into::into).collect()
    }

    /// Closes the circuit breaker called `name`.
    async fn reset_circuit_breaker(
        &self,
        ctx: &Context<'_>,
        name: String,
    ) -> async_graphql::Result<CircuitBreaker> {
        let gw = gateway(ctx);
        gw.channels
            .reset(Some(&name))
            .map_err(|e| async_graphql::Error::new(e.to_string()))?;
        gw.channels
            .breakers()
            .into_iter()
            .find(|b| b.name == name)
            .map(Into::into)
            .ok_or_else(|| {
                async_graphql::Error::new(format!("no circuit breaker is named `{name}`"))
            })
    }

    /// Sets the faults a built-in service injects (replacing the earlier
    /// ones).
    async fn set_faults(
        &self,
        ctx: &Context<'_>,
        service: Service,
        faults: FaultInput,
    ) -> async_graphql::Result<FaultState> {
        let backend = backend(ctx)?;
        let errors = faults
            .errors
            .iter()
            .map(|e| code_from_name(&e.code).map(|code| (code, e.rate)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| async_graphql::Error::new(e.to_string()))?;
        let settings = FaultSettings {
            outage: faults.outage,
            errors,
            lost_responses: faults.lost_response_rate,
            latency: Duration::from_millis(faults.latency_ms),
        };
        backend
            .set_faults(service.into(), settings.clone())
            .map_err(|e| async_graphql::Error::new(e.to_string()))?;
        Ok(fault_state(service, &settings))
    }

    /// Removes every fault of both built-in services.
    async fn clear_faults(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<FaultState>> {
        let backend = backend(ctx)?;
        let mut states = Vec::new();
        for service in [Service::Command, Service::Query] {
            backend
                .set_faults(service.into(), FaultSettings::none())
                .map_err(|e| async_graphql::Error::new(e.to_string()))?;
            states.push(fault_state(service, &FaultSettings::none()));
        }
        Ok(states)
    }
}

/// Streams.
#[derive(Debug, Default)]
pub struct SubscriptionRoot;

#[Subscription]
impl SubscriptionRoot {
    /// Every breaker transition from now on.
    async fn breaker_transitions(
        &self,
        ctx: &Context<'_>,
    ) -> impl Stream<Item = BreakerTransition> + use<> {
        let gw = gateway(ctx).clone();
        let changes = gw.channels.watch();
        futures_util::stream::iter(changes)
            .flat_map(BroadcastStream::new)
            .filter_map(move |change| {
                let t = change.ok().map(|c| gw.transition(&c));
                async move { t }
            })
    }
}

fn rand_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    t ^ n.rotate_left(32)
}

/// The schema over `gateway`.
pub fn schema(gateway: Arc<Gateway>) -> GatewaySchema {
    Schema::build(QueryRoot, MutationRoot, SubscriptionRoot)
        .data(gateway)
        .finish()
}
