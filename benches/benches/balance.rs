//! The balanced channel against tonic's own `Channel::balance_list` on the
//! same three loopback replicas: throughput and latency percentiles at a
//! few concurrencies, runs alternating. Every loop is bounded in time and
//! in count.
//!
//! `LOOPBACK_SECONDS=2 cargo bench -p grpc-resilience-benches --bench balance`

#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // wall-clock measurements

use std::time::{Duration, Instant};

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, InMemoryCatalog, Product};
use grpc_balance::{BalanceConfig, BalancedChannel, OutlierConfig};
use grpc_circuit_breaker::BreakerRegistry;
use tonic::transport::{Channel, Endpoint, Server};

const ROUNDS: usize = 2;

/// Calls, seconds, p50s, p99s, failures of one client over the rounds.
type Row = (u64, f64, Vec<f64>, Vec<f64>, u64);
const MAX_CALLS_PER_TASK: u64 = 5_000_000;

async fn start_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("an address");
    let catalog = InMemoryCatalog::with_products(5);
    catalog.insert(Product {
        id: "blob1k".into(),
        name: "1 KiB".into(),
        price_cents: 1,
        blob: vec![42; 1024],
    });
    tokio::spawn(
        Server::builder()
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );
    addr
}

struct Run {
    calls: u64,
    failed: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1e6
    }
}

macro_rules! drive {
    ($client:expr, $concurrency:expr, $length:expr) => {{
        let start = Instant::now();
        let end = start + $length;
        let tasks: Vec<_> = (0..$concurrency)
            .map(|_| {
                let mut client = $client.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut failed = 0u64;
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
                        failed += u64::from(result.is_err());
                    }
                    (latencies, failed)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        let mut failed = 0;
        for t in tasks {
            let (l, f) = t.await.expect("a load task");
            latencies.extend(l);
            failed += f;
        }
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        Run {
            calls: latencies.len() as u64,
            failed,
            elapsed,
            latencies,
        }
    }};
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
    rt.block_on(async {
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(start_server().await);
        }
        let endpoints = || {
            addrs
                .iter()
                .map(|a| {
                    Endpoint::from_shared(format!("http://{a}"))
                        .expect("a URI")
                        .tcp_nodelay(true)
                })
                .collect::<Vec<_>>()
        };
        let tonic_client = QueryServiceClient::new(Channel::balance_list(endpoints().into_iter()));
        let config = BalanceConfig::new("query").with_outlier(OutlierConfig::default());
        let ours = BalancedChannel::from_endpoints(config, BreakerRegistry::new(), endpoints())
            .expect("a balanced channel");
        let our_client = QueryServiceClient::new(ours);
        // Warm both (connections up).
        drive!(tonic_client, 4, Duration::from_millis(300));
        drive!(our_client, 4, Duration::from_millis(300));

        println!("| concurrency | channel | calls/s | p50 (us) | p99 (us) | failed |");
        println!("|---|---|---|---|---|---|");
        for concurrency in [1usize, 16, 64] {
            let mut rows: [Row; 2] = Default::default();
            for _ in 0..ROUNDS {
                for (i, run) in [
                    drive!(tonic_client, concurrency, length),
                    drive!(our_client, concurrency, length),
                ]
                .into_iter()
                .enumerate()
                {
                    rows[i].0 += run.calls;
                    rows[i].1 += run.elapsed.as_secs_f64();
                    rows[i].2.push(run.percentile(0.5));
                    rows[i].3.push(run.percentile(0.99));
                    rows[i].4 += run.failed;
                }
            }
            for (name, row) in ["tonic `Channel::balance_list`", "`BalancedChannel`"]
                .iter()
                .zip(rows)
            {
                let median = |mut v: Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                println!(
                    "| {concurrency} | {name} | {:.0} | {:.0} | {:.0} | {} |",
                    row.0 as f64 / row.1,
                    median(row.2),
                    median(row.3),
                    row.4
                );
            }
        }
    });
}
