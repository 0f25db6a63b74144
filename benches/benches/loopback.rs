//! The loopback harness: a real tonic server on 127.0.0.1 and real stubs,
//! driven through a bare `Channel` and through the full stack (Timeout >
//! Retry > CircuitBreaker), at several concurrencies and under injected
//! faults. Every loop is bounded in time and in count.
//!
//! `cargo bench -p grpc-resilience-benches --bench loopback`
//! (`LOOPBACK_SECONDS` sets each phase's length, default 3).

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
use grpc_retry::{Retry, RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle};
use grpc_timeout::{Timeout, TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tonic::transport::{Channel, Server};
use tower::ServiceBuilder;

/// Alternating runs per row of the throughput table.
const ROUNDS: usize = 3;

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
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(timeout_layer())
            .layer(retry_layer(retry, true))
            .layer(CircuitBreakerLayer::new(registry))
            .service(channel(addr)),
    )
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
    rt.block_on(async move {
        let server = start_server().await;
        let seed = RetryPolicy::default();

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
    });
}
