//! Per-call time of the server-side idempotency layer over a handler that
//! reads a 1 KiB request and answers at once: a method it does not cover,
//! a key seen for the first time (miss: claim, run, record), and a repeated
//! key (hit: replay without running the handler); in memory, and in a
//! `redis-server` on loopback when one is installed.
//!
//! `cargo bench -p grpc-resilience-benches --bench idempotency`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use grpc_idempotency::{IdempotencyLayer, RedisStore};
use grpc_resilience_benches::{Reading, RequestFactory, drive_with, payload_1k};
use grpc_resilience_tests::RedisServer;
use http::HeaderValue;
use tower::Layer;

/// Requests to `GetProduct` with a 1 KiB body and an `idempotency-key`:
/// a fresh key per call, or the same one every time. Every row builds its
/// requests the same way, so they cost the same in each row.
struct Keys {
    requests: RequestFactory,
    payload: Bytes,
    next: AtomicU64,
}

impl Keys {
    fn request(&self, fresh: bool) -> http::Request<tonic::body::Body> {
        let n = if fresh {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        let mut request = self.requests.grpc_request(&self.payload);
        request.headers_mut().insert(
            "idempotency-key",
            HeaderValue::from_str(&format!("{n:032x}")).expect("hex is a valid header value"),
        );
        request
    }
}

fn idempotency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let keys = Keys {
        requests: RequestFactory::default(),
        payload: payload_1k(),
        next: AtomicU64::new(1),
    };
    let mut group = c.benchmark_group("idempotency");

    let mut bare = Reading::default();
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, || keys.request(true), n))
    });

    let covering = |selector: &str| IdempotencyLayer::new([selector]).expect("a valid selector");
    let mut other = covering("ListProducts").layer(Reading::default());
    group.bench_function("memory, method not covered", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut other, || keys.request(true), n))
    });
    let mut memory = covering("GetProduct").layer(Reading::default());
    group.bench_function("memory, miss (new key)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut memory, || keys.request(true), n))
    });
    group.bench_function("memory, hit (replay)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut memory, || keys.request(false), n))
    });

    // Redis rows only where redis-server is installed.
    let redis = if std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok()
    {
        rt.block_on(RedisServer::start())
    } else {
        eprintln!("redis-server is not installed: skipping the Redis rows");
        None
    };
    if let Some(redis) = &redis {
        let store = rt
            .block_on(RedisStore::connect(&redis.url()))
            .expect("connect to the benchmark's redis-server");
        let mut over_redis = covering("GetProduct")
            .with_store(store)
            .with_retention(Duration::from_secs(60))
            .expect("a valid retention")
            .layer(Reading::default());
        group.bench_function("redis, miss (new key)", |b| {
            b.iter_custom(|n| drive_with(&rt, &mut over_redis, || keys.request(true), n))
        });
        group.bench_function("redis, hit (replay)", |b| {
            b.iter_custom(|n| drive_with(&rt, &mut over_redis, || keys.request(false), n))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = idempotency
}
criterion_main!(benches);
