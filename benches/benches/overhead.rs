//! Per-call time on the success path, inner service ready at once: each
//! layer against the alternatives, all in one run.
//!
//! `cargo bench -p grpc-resilience-benches --bench overhead`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_resilience_benches::{Bare, RequestFactory, call_once, drive, drive_parallel, runtime};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tower::ServiceBuilder;

fn timeout(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let requests = RequestFactory::default();
    let mut group = c.benchmark_group("timeout");

    let mut bare = Bare;
    group.bench_function("bare", |b| {
        b.iter(|| call_once(&mut bare, requests.request()))
    });

    let mut tower_timeout = ServiceBuilder::new()
        .timeout(Duration::from_secs(3))
        .service(Bare);
    group.bench_function("tower::timeout::Timeout", |b| {
        b.iter(|| call_once(&mut tower_timeout, requests.request()))
    });

    let policy = TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
        .expect("a valid policy");
    let mut ours = ServiceBuilder::new()
        .layer(TimeoutLayer::new(policy))
        .service(Bare);
    group.bench_function("grpc_timeout::Timeout", |b| {
        b.iter(|| call_once(&mut ours, requests.request()))
    });
    group.finish();
}

fn breaker(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let requests = RequestFactory::default();
    let mut group = c.benchmark_group("breaker");

    let mut bare = Bare;
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive(&rt, &mut bare, &requests, n))
    });

    let theirs = ServiceBuilder::new()
        .layer(
            tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                .build()
                .expect("a breaker"),
        )
        .service(Bare);
    let ours = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(Bare);

    let mut svc = theirs.clone();
    group.bench_function("tower-resilience", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });
    let mut svc = ours.clone();
    group.bench_function("grpc_circuit_breaker", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });

    // Two threads, each with its own clone of one shared breaker.
    group.bench_function("bare, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&Bare, &requests, n, 2))
    });
    group.bench_function("tower-resilience, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&theirs, &requests, n, 2))
    });
    group.bench_function("grpc_circuit_breaker, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&ours, &requests, n, 2))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = timeout, breaker
}
criterion_main!(benches);
