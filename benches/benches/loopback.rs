//! The loopback harness: a real tonic server on 127.0.0.1 and real stubs,
//! driven through a bare `Channel` and through the full stack (Timeout >
//! Retry > CircuitBreaker), at several concurrencies and under injected
//! faults. Every loop is bounded in time and in count.
//!
//! `cargo bench -p grpc-resilience-benches --bench loopback`
//! (`LOOPBACK_SECONDS` sets each phase's length, default 3;
//! `LOOPBACK_ONLY=budget,tail` runs only the named sections: `throughput`, `cpu`,
//! `faults`, `down`, `outage`, `budget`, `tail`; `LOOPBACK_ROUNDS` sets the
//! `cpu` section's number of alternating rounds, default 3).

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // wall-clock measurements

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, InMemoryCatalog, Product};
use grpc_circuit_breaker::{
    BreakerConfig, BreakerRegistry, CircuitBreaker, CircuitBreakerLayer, FailureRate,
};
use grpc_fault::{Fault, FaultInjector};
use grpc_resilience_core::CodeSet;
use grpc_retry::{
    HedgingPolicy, Retry, RetryBudget, RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle,
};
use grpc_timeout::{Timeout, TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tonic::transport::{Channel, Server};
use tower::ServiceBuilder;

/// Alternating runs per row of the throughput table.
const ROUNDS: usize = 3;

/// Rounds of the CPU section: `LOOPBACK_ROUNDS`, 1 to 30 (default 3).
fn cpu_rounds() -> usize {
    std::env::var("LOOPBACK_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|n| (1..=30).contains(n))
        .unwrap_or(ROUNDS)
}

/// Upper bound on calls per task, whatever the time bound says.
const MAX_CALLS_PER_TASK: u64 = 5_000_000;

struct Server1 {
    addr: std::net::SocketAddr,
    faults: FaultInjector,
}

async fn start_server() -> Server1 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("an address");
    let faults = FaultInjector::with_log_capacity(0);
    let catalog = InMemoryCatalog::with_products(5);
    catalog.insert(Product {
        id: "blob1k".into(),
        name: "1 KiB".into(),
        price_cents: 1,
        blob: vec![42; 1024],
    });
    tokio::spawn(
        Server::builder()
            .layer(faults.layer())
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );
    Server1 { addr, faults }
}

fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a URI")
        .connect_lazy()
}

fn bare(addr: std::net::SocketAddr) -> QueryServiceClient<Channel> {
    QueryServiceClient::new(channel(addr))
}

/// A bare channel whose calls carry the stack's 5 s deadline, as tonic's
/// own `Request::set_timeout` sends it: the `grpc-timeout` header makes the
/// channel and the server each run a timer per call, which any
/// deadline-carrying client pays, with this library or without.
fn bare_with_deadline(addr: std::net::SocketAddr) -> QueryServiceClient<WithDeadline> {
    fn five_seconds(
        mut request: http::Request<tonic::body::Body>,
    ) -> http::Request<tonic::body::Body> {
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("5000000u"));
        request
    }
    QueryServiceClient::new(tower::util::MapRequest::new(channel(addr), five_seconds))
}

type WithDeadline = tower::util::MapRequest<
    Channel,
    fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body>,
>;
type Full = Timeout<Retry<CircuitBreaker<Channel>>>;
type NoBreaker = Timeout<Retry<Channel>>;

fn retry_layer(retry: RetryPolicy, throttle: bool) -> RetryLayer {
    let layer = RetryLayer::new(RetryPolicies::new(retry).expect("a retry policy"));
    if throttle {
        // A token back per two successes: retries flow while fewer than
        // about a third of attempts fail (A6's common 0.1 would stop them
        // at a 20% error rate, which this harness wants to show retried).
        layer.with_throttle(RetryThrottle::new(10.0, 0.5).expect("a throttle"))
    } else {
        layer
    }
}

fn timeout_layer() -> TimeoutLayer {
    TimeoutLayer::new(TimeoutPolicy::new(Duration::from_secs(5)).expect("a timeout policy"))
}

/// The full stack: call deadline, retries with throttling, a breaker per
/// service. The breaker trips on a 50% failure rate over the last 100
/// calls (the seed's count of 5 failures a minute would trip at once under
/// this load at a 20% error rate) and stays open 1 s, so recovery shows
/// within a run.
fn stack(addr: std::net::SocketAddr, retry: RetryPolicy) -> QueryServiceClient<Full> {
    StackLayers::new(retry).client(addr)
}

/// The layers of [`stack`], made once: clients made from one set share
/// its breakers and throttle, as an application's clients of one
/// downstream service do.
struct StackLayers {
    timeout: TimeoutLayer,
    retry: RetryLayer,
    breaker: CircuitBreakerLayer,
}

impl StackLayers {
    fn new(retry: RetryPolicy) -> Self {
        let rate = FailureRate {
            window: 100,
            minimum_calls: 20,
            failure_rate: 50.0,
            ..FailureRate::default()
        };
        let registry = BreakerRegistry::with_default_config(
            BreakerConfig::default()
                .with_timeout(Duration::from_secs(1))
                .with_failure_rate(rate),
        )
        .expect("a breaker config");
        StackLayers {
            timeout: timeout_layer(),
            retry: retry_layer(retry, true),
            breaker: CircuitBreakerLayer::new(registry),
        }
    }

    /// A client of its own channel to `addr` through these layers.
    fn client(&self, addr: std::net::SocketAddr) -> QueryServiceClient<Full> {
        QueryServiceClient::new(
            ServiceBuilder::new()
                .layer(self.timeout.clone())
                .layer(self.retry.clone())
                .layer(self.breaker.clone())
                .service(channel(addr)),
        )
    }
}

/// Retries without a budget and without a breaker.
fn naive(addr: std::net::SocketAddr, retry: RetryPolicy) -> QueryServiceClient<NoBreaker> {
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(timeout_layer())
            .layer(retry_layer(retry, false))
            .service(channel(addr)),
    )
}

/// Timeout > Retry with `layer` (a throttle, a budget, hedging...).
fn with_layer(addr: std::net::SocketAddr, layer: RetryLayer) -> QueryServiceClient<NoBreaker> {
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(timeout_layer())
            .layer(layer)
            .service(channel(addr)),
    )
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

struct Run {
    calls: u64,
    ok: u64,
    failed: u64,
    rejected: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// `concurrency` tasks calling `GetProduct("blob1k")` for `length`
/// through `client` (a macro, so each client type is spelled out where
/// the tasks are spawned).
macro_rules! drive {
    ($client:expr, $concurrency:expr, $length:expr) => {{
        let tally = Arc::new(Tally::default());
        let start = Instant::now();
        let end = start + $length;
        let tasks: Vec<_> = (0..$concurrency)
            .map(|_| {
                let mut client = $client.clone();
                let tally = tally.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for _ in 0..MAX_CALLS_PER_TASK {
                        if Instant::now() >= end {
                            break;
                        }
                        let t = Instant::now();
                        let result = client
                            .get_product(GetProductRequest {
                                id: "blob1k".into(),
                            })
                            .await;
                        latencies.push(t.elapsed());
                        match result {
                            Ok(_) => tally.ok.fetch_add(1, Ordering::Relaxed),
                            Err(s)
                                if s.code() == Code::Unavailable
                                    && s.message().contains("circuit breaker") =>
                            {
                                tally.rejected.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(_) => tally.failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.expect("a load task"));
        }
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        let (ok, failed, rejected) = (
            tally.ok.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            tally.rejected.load(Ordering::Relaxed),
        );
        Run {
            calls: ok + failed + rejected,
            ok,
            failed,
            rejected,
            elapsed,
            latencies,
        }
    }};
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let seconds: u64 = std::env::var("LOOPBACK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| (1..=60).contains(s))
        .unwrap_or(3);
    let length = Duration::from_secs(seconds);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let only = std::env::var("LOOPBACK_ONLY").unwrap_or_default();
    let runs = move |section: &str| only.is_empty() || only.split(',').any(|s| s.trim() == section);
    rt.block_on(async move {
        let server = start_server().await;
        let seed = RetryPolicy::default();
        if runs("budget") {
            budget_section(&server, length).await;
        }
        if runs("tail") {
            tail_section(&server, length).await;
        }
        if runs("throughput") {
        println!("## Throughput and latency, healthy server (medians of {ROUNDS} alternating {seconds} s runs each)\n");
        println!("| concurrency | bare calls/s | stack calls/s | stack/bare | bare p50 µs | stack p50 µs | bare p99 µs | stack p99 µs | p99 added |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for concurrency in [1, 16, 64, 256] {
            // Alternate bare and stack runs, three each, and take medians:
            // the machine is shared and noisy.
            let (mut b_runs, mut s_runs) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                b_runs.push(drive!(bare(server.addr), concurrency, length));
                s_runs.push(drive!(stack(server.addr, seed), concurrency, length));
            }
            assert!(
                b_runs.iter().chain(&s_runs).all(|r| r.failed == 0),
                "a healthy server answers every call"
            );
            let median = |runs: &[Run], f: &dyn Fn(&Run) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let tput = |r: &Run| r.throughput();
            let p50 = |r: &Run| us(r.percentile(0.5));
            let p99 = |r: &Run| us(r.percentile(0.99));
            let (bt, st) = (median(&b_runs, &tput), median(&s_runs, &tput));
            let (b99, s99) = (median(&b_runs, &p99), median(&s_runs, &p99));
            println!(
                "| {concurrency} | {bt:.0} | {st:.0} | {:.3} | {:.0} | {:.0} | {b99:.0} | {s99:.0} | {:+.1}% |",
                st / bt,
                median(&b_runs, &p50),
                median(&s_runs, &p50),
                (s99 / b99 - 1.0) * 100.0,
            );
        }

        }

        if runs("cpu") {
            cpu_section(&server, length, cpu_rounds()).await;
        }

        if runs("faults") {
        println!("\n## 20% UNAVAILABLE (seeded), concurrency 16\n");
        println!("| client | calls | succeeded | success rate | server attempts per call |");
        println!("|---|---|---|---|---|");
        let twenty_percent = || {
            server.faults.reset_stats();
            server
                .faults
                .random("GetProduct", 20_261_128, [(0.2, Fault::status(Code::Unavailable))])
                .expect("a fault plan");
        };
        let report = |name: &str, run: &Run| {
            let attempts = server.faults.stats("GetProduct").expect("stats").calls;
            println!(
                "| {name} | {} | {} | {:.1}% | {:.2} |",
                run.calls,
                run.ok,
                run.ok as f64 * 100.0 / run.calls as f64,
                attempts as f64 / run.calls as f64
            );
        };
        twenty_percent();
        let run = drive!(bare(server.addr), 16, length);
        report("bare channel", &run);
        twenty_percent();
        let run = drive!(stack(server.addr, seed), 16, length);
        report("full stack", &run);
        server.faults.clear_all();

        }

        if runs("down") {
        println!("\n## Server hard down (every call UNAVAILABLE), concurrency 16\n");
        println!("| client | logical calls | server attempts | attempts per call | rejected by breaker |");
        println!("|---|---|---|---|---|");
        let quick = seed.with_initial_delay(Duration::from_millis(1)).with_max_delay(Duration::from_millis(5));
        let hard_down = || {
            server.faults.reset_stats();
            server.faults.always("GetProduct", Fault::status(Code::Unavailable)).expect("a fault plan");
        };
        let report = |name: &str, run: &Run| {
            let attempts = server.faults.stats("GetProduct").expect("stats").calls;
            println!(
                "| {name} | {} | {attempts} | {:.2} | {} |",
                run.calls,
                attempts as f64 / run.calls as f64,
                run.rejected
            );
        };
        hard_down();
        let run = drive!(naive(server.addr, quick), 16, length);
        report("naive retries (3 attempts, no budget, no breaker)", &run);
        hard_down();
        let run = drive!(stack(server.addr, quick), 16, length);
        report("our stack (throttle + breaker)", &run);
        server.faults.clear_all();

        }

        if runs("outage") {
        println!("\n## A 5 s outage in the middle of steady load (2 s up, 5 s down, 5 s up), concurrency 16, breaker open 1 s\n");
        let client = stack(server.addr, seed);
        server.faults.reset_stats();
        let outage = Duration::from_secs(5);
        let before = Duration::from_secs(2);
        let after = Duration::from_secs(5);
        let faults = server.faults.clone();
        let switcher = tokio::spawn(async move {
            tokio::time::sleep(before).await;
            faults.always("GetProduct", Fault::status(Code::Unavailable)).expect("a fault plan");
            let down = Instant::now();
            tokio::time::sleep(outage).await;
            faults.clear_all();
            (down, Instant::now())
        });
        let load_client = client.clone();
        let load = tokio::spawn(async move { drive!(load_client, 16, before + outage + after) });
        let (_down, up) = switcher.await.expect("the switcher");
        // Probe for the first success after the server came back.
        let mut probe = client.clone();
        let mut recovered = None;
        for _ in 0..10_000 {
            if probe.get_product(GetProductRequest { id: "p1".into() }).await.is_ok() {
                recovered = Some(up.elapsed());
                break;
            }
            if up.elapsed() > after {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let run = load.await.expect("the load");
        println!("| calls | succeeded | failed | rejected fast by the breaker | server attempts | time to first success after recovery |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            run.calls,
            run.ok,
            run.failed,
            run.rejected,
            server.faults.stats("GetProduct").expect("stats").calls,
            recovered.map_or("not within the run".to_string(), |d| format!("{} ms", d.as_millis())),
        );
        }
    });
}

/// Retries under random faults and under overload: gRFC A6's token bucket
/// against a retry budget.
async fn budget_section(server: &Server1, length: Duration) {
    let quick = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(5));
    let a6 = || {
        RetryLayer::new(RetryPolicies::new(quick).expect("a policy"))
            .with_throttle(RetryThrottle::new(10.0, 0.5).expect("a throttle"))
    };
    let budget = || {
        RetryLayer::new(RetryPolicies::new(quick).expect("a policy"))
            .with_budget(RetryBudget::new(Duration::from_secs(10), 10, 0.15).expect("a budget"))
    };
    let report = |name: &str, run: &Run| {
        let attempts = server.faults.stats("GetProduct").expect("stats").calls;
        println!(
            "| {name} | {} | {:.1}% | {:.2} |",
            run.calls,
            run.ok as f64 * 100.0 / run.calls as f64,
            attempts as f64 / run.calls as f64
        );
    };

    println!(
        "\n## Random faults: 30% UNAVAILABLE + 10% lost responses (seeded), concurrency 16, {} s\n",
        length.as_secs()
    );
    println!("| client | calls | success rate | server attempts per call |");
    println!("|---|---|---|---|");
    let random = || {
        server.faults.reset_stats();
        server
            .faults
            .random(
                "GetProduct",
                20_261_129,
                [
                    (0.3, Fault::status(Code::Unavailable)),
                    (0.1, Fault::lose_response()),
                ],
            )
            .expect("a fault plan");
    };
    random();
    let client = bare(server.addr);
    let run = drive!(client, 16, length);
    report("bare channel", &run);
    random();
    let client = with_layer(server.addr, a6());
    let run = drive!(client, 16, length);
    report("retry, A6 throttle (10 tokens, ratio 0.5)", &run);
    random();
    let client = with_layer(server.addr, budget());
    let run = drive!(client, 16, length);
    report(
        "retry, budget (0.15: one retry per 6 calls, + 10/s over 10 s)",
        &run,
    );

    println!(
        "\n## Overload: every call UNAVAILABLE, concurrency 16, {} s\n",
        length.as_secs()
    );
    println!("| client | calls | success rate | server attempts per call |");
    println!("|---|---|---|---|");
    let overload = || {
        server.faults.reset_stats();
        server
            .faults
            .always("GetProduct", Fault::status(Code::Unavailable))
            .expect("a fault plan");
    };
    overload();
    let client = naive(server.addr, quick);
    let run = drive!(client, 16, length);
    report("retry, no throttle, no budget", &run);
    overload();
    let client = with_layer(server.addr, a6());
    let run = drive!(client, 16, length);
    report("retry, A6 throttle (10 tokens, ratio 0.5)", &run);
    overload();
    let client = with_layer(server.addr, budget());
    let run = drive!(client, 16, length);
    report(
        "retry, budget (0.15: one retry per 6 calls, + 10/s over 10 s)",
        &run,
    );
    server.faults.clear_all();
}

/// A heavy-tailed server (5% of calls take 500 ms): latency percentiles
/// and extra load of a bare channel, plain retries, our hedging and
/// tower's `Hedge`.
async fn tail_section(server: &Server1, length: Duration) {
    println!(
        "\n## Heavy tail: 5% of calls take 500 ms (seeded), concurrency 16, {} s\n",
        length.as_secs()
    );
    println!("| client | calls | calls/s | p50 µs | p99 µs | p99.9 µs | server calls per call |");
    println!("|---|---|---|---|---|---|---|");
    let tail = || {
        server.faults.reset_stats();
        server
            .faults
            .random(
                "GetProduct",
                20_261_130,
                [(0.05, Fault::pass().with_delay(Duration::from_millis(500)))],
            )
            .expect("a fault plan");
    };
    let report = |name: &str, run: &Run| {
        let attempts = server.faults.stats("GetProduct").expect("stats").calls;
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} |",
            run.calls,
            run.throughput(),
            us(run.percentile(0.5)),
            us(run.percentile(0.99)),
            us(run.percentile(0.999)),
            attempts as f64 / run.calls as f64
        );
    };
    tail();
    let client = bare(server.addr);
    let run = drive!(client, 16, length);
    report("bare channel", &run);
    tail();
    let client = naive(server.addr, RetryPolicy::default());
    let run = drive!(client, 16, length);
    report("plain retries (default policy)", &run);
    for (attempts, delay_ms) in [(2, 1), (2, 10), (3, 10), (2, 50)] {
        let policy = HedgingPolicy::default()
            .with_max_attempts(attempts)
            .with_hedging_delay(Duration::from_millis(delay_ms))
            .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable]));
        let layer = RetryLayer::new(
            RetryPolicies::none()
                .with_hedging("*", policy)
                .expect("a policy"),
        );
        tail();
        let client = with_layer(server.addr, layer.clone());
        let run = drive!(client, 16, length);
        report(
            &format!("hedged: {attempts} attempts, {delay_ms} ms delay"),
            &run,
        );
    }
    // tower's `Hedge`, the nearest peer: it needs a request it can clone,
    // so tonic's streaming body is collected first (what a user of it has
    // to do), and it hedges once after the observed latency percentile
    // rather than after a fixed delay. It is not Clone: a `Buffer` shares
    // it between the tasks.
    for percentile in [0.9_f32, 0.95] {
        tail();
        let client = tower_hedge(server.addr, percentile);
        let run = drive!(client, 16, length);
        report(
            &format!(
                "tower `Hedge`, p{:.0} latency, body buffered",
                percentile * 100.0
            ),
            &run,
        );
    }
    server.faults.clear_all();
}

type Buffered = http::Request<http_body_util::Full<bytes::Bytes>>;
type TowerHedge = tower::buffer::Buffer<
    Buffered,
    <tower::hedge::Hedge<ToChannel, ClonePolicy> as tower::Service<Buffered>>::Future,
>;

/// A stub over tower's `Hedge` (2 attempts, the second sent once the
/// first has taken longer than the `percentile` of recent latencies).
fn tower_hedge(addr: std::net::SocketAddr, percentile: f32) -> QueryServiceClient<CollectBody> {
    let hedge = tower::hedge::Hedge::new::<Buffered>(
        ToChannel(channel(addr)),
        ClonePolicy,
        10,
        percentile,
        Duration::from_secs(1),
    );
    QueryServiceClient::new(CollectBody(tower::buffer::Buffer::new(hedge, 1024)))
}

/// Clones a buffered request (`http::Request` is not `Clone`).
#[derive(Clone, Copy)]
struct ClonePolicy;

impl tower::hedge::Policy<Buffered> for ClonePolicy {
    fn clone_request(&self, req: &Buffered) -> Option<Buffered> {
        let mut out = http::Request::new(req.body().clone());
        *out.method_mut() = req.method().clone();
        *out.uri_mut() = req.uri().clone();
        *out.version_mut() = req.version();
        *out.headers_mut() = req.headers().clone();
        Some(out)
    }

    fn can_retry(&self, _: &Buffered) -> bool {
        true
    }
}

/// A channel taking buffered bodies.
#[derive(Clone)]
struct ToChannel(Channel);

impl tower::Service<Buffered> for ToChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = <Channel as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, req: Buffered) -> Self::Future {
        tower::Service::call(&mut self.0, req.map(tonic::body::Body::new))
    }
}

/// Collects the stub's body, then calls tower's `Hedge` (through its
/// `Buffer`).
#[derive(Clone)]
struct CollectBody(TowerHedge);

impl tower::Service<http::Request<tonic::body::Body>> for CollectBody {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The ready clone goes with the call.
        let fresh = self.0.clone();
        let mut ready = std::mem::replace(&mut self.0, fresh);
        Box::pin(async move {
            use http_body_util::BodyExt;
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let req = http::Request::from_parts(parts, http_body_util::Full::new(bytes));
            tower::Service::call(&mut ready, req).await
        })
    }
}

/// CPU time of this whole process (client and server), user and system,
/// from `/proc/self/stat`; `None` where there is no such file.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field, utime the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // The kernel's USER_HZ, 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU per call (process CPU time / calls), throughput and p99 at
/// concurrency 64: bare channel (also with a deadline on every call, as
/// tonic sends one itself), the three layers, and the facade over the
/// channel, in `rounds` alternating rounds. Each row's ratios to bare are
/// taken round by round (the rounds next to each other share the machine's
/// state), and bare's own spread across rounds is printed beside them, so
/// an effect can be read against the noise.
async fn cpu_section(server: &Server1, length: Duration, rounds: usize) {
    const CONCURRENCY: usize = 64;
    let seconds = length.as_secs();
    println!(
        "\n## CPU per call, healthy server, concurrency {CONCURRENCY} ({rounds} alternating {seconds} s rounds; client and server share the process, so compare with bare)\n"
    );
    // Like `bare` and `stack`, a channel per task.
    let facade = |addr| {
        QueryServiceClient::new(
            grpc_resilience::ResilientChannel::new(
                channel(addr),
                &grpc_resilience_benches::facade_config(),
            )
            .expect("a config"),
        )
    };
    // Per round: CPU µs per call, calls/s, p99 µs. The first stack and
    // facade rows build a whole stack per task (its own breakers, throttle
    // and metric handles); the "shared" rows make the layers once per
    // run and give each task a client of its own channel through them, as
    // an application with one stack per downstream service does.
    let mut rows: [(&str, Vec<[f64; 3]>); 6] = [
        ("bare channel", Vec::new()),
        ("bare channel, calls with a 5 s `grpc-timeout`", Vec::new()),
        ("Timeout > Retry > CircuitBreaker", Vec::new()),
        ("`ResilientChannel` (telemetry)", Vec::new()),
        (
            "Timeout > Retry > CircuitBreaker, layers shared",
            Vec::new(),
        ),
        ("`ResilientChannel`, layer shared", Vec::new()),
    ];
    for _ in 0..rounds {
        for (i, row) in rows.iter_mut().enumerate() {
            let Some(before) = process_cpu() else {
                println!("(no /proc/self/stat: CPU time not measured)");
                return;
            };
            let run = match i {
                0 => drive!(bare(server.addr), CONCURRENCY, length),
                1 => drive!(bare_with_deadline(server.addr), CONCURRENCY, length),
                2 => drive!(
                    stack(server.addr, RetryPolicy::default()),
                    CONCURRENCY,
                    length
                ),
                3 => drive!(facade(server.addr), CONCURRENCY, length),
                4 => {
                    let layers = StackLayers::new(RetryPolicy::default());
                    drive!(layers.client(server.addr), CONCURRENCY, length)
                }
                _ => {
                    let layer = grpc_resilience::ResilienceLayer::new(
                        &grpc_resilience_benches::facade_config(),
                    )
                    .expect("a config");
                    drive!(
                        QueryServiceClient::new(tower::Layer::layer(&layer, channel(server.addr))),
                        CONCURRENCY,
                        length
                    )
                }
            };
            let cpu = process_cpu().unwrap_or(before).saturating_sub(before);
            assert_eq!(run.failed, 0, "a healthy server answers every call");
            let per_call_us = us(cpu) / run.calls.max(1) as f64;
            row.1
                .push([per_call_us, run.throughput(), us(run.percentile(0.99))]);
        }
    }
    let median = |mut x: Vec<f64>| {
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let range = |x: &[f64]| {
        let (lo, hi) = x
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        format!("{lo:.3} to {hi:.3}")
    };
    let column = |runs: &[[f64; 3]], k: usize| runs.iter().map(|r| r[k]).collect::<Vec<_>>();
    let bare = rows[0].1.clone();
    let bare_cpu = column(&bare, 0);
    let (lo, hi) = bare_cpu
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    let bare_median = median(bare_cpu.clone());
    println!(
        "bare's CPU per call across rounds: {lo:.1} to {hi:.1} µs (median {bare_median:.1}; spread {:.1}% of the median)\n",
        (hi - lo) / bare_median * 100.0
    );
    println!(
        "| client | CPU µs per call | over bare | calls/s vs bare (median; range over rounds) | p99 µs | p99 vs bare (median; range) |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, runs) in &rows {
        // Round by round against bare's run of the same round.
        let per_round =
            |k: usize| -> Vec<f64> { runs.iter().zip(&bare).map(|(r, b)| r[k] / b[k]).collect() };
        let (tput, p99) = (per_round(1), per_round(2));
        println!(
            "| {name} | {:.1} | {:+.1} | {:.3}; {} | {:.0} | {:.3}; {} |",
            median(column(runs, 0)),
            median(column(runs, 0)) - bare_median,
            median(tput.clone()),
            range(&tput),
            median(column(runs, 2)),
            median(p99.clone()),
            range(&p99),
        );
    }
}
