//! Per-call time on the success path, inner service ready at once: each
//! layer against the alternatives, all in one run.
//!
//! `cargo bench -p grpc-resilience-benches --bench overhead`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use grpc_bulkhead::{BulkheadConfig, BulkheadLayer, Gradient};
use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_resilience::ResilientChannel;
use grpc_resilience_benches::{
    Bare, CloneStubRequest, FullRequest, Reading, RequestFactory, alternating, call_once, drive,
    drive_parallel, drive_parallel_with, drive_with, in_turn, paused_runtime, payload_1k, runtime,
    seed_retry,
};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tower::ServiceBuilder;

#[path = "common/stub.rs"]
mod stub;

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

    // Failure-rate mode: every call, success or not, goes into the one
    // shared ring of the last `window` calls, so two threads write the
    // same cache lines on every call. These rows show what that costs.
    let rate = BreakerRegistry::with_default_config(
        grpc_circuit_breaker::BreakerConfig::default()
            .with_failure_rate(grpc_circuit_breaker::FailureRate::default()),
    )
    .expect("a valid breaker config");
    let ours_rate = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(rate))
        .service(Bare);
    let mut svc = ours_rate.clone();
    group.bench_function("grpc_circuit_breaker, failure rate", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });
    group.bench_function("grpc_circuit_breaker, failure rate, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&ours_rate, &requests, n, 2))
    });
    group.finish();
}

/// tower's retry needs a cloneable request: this policy clones it (head
/// and body) for every call, as a tower user must, and never retries a
/// success.
#[derive(Clone, Copy)]
struct CloneEveryCall;

impl<Res, E> tower::retry::Policy<FullRequest, Res, E> for CloneEveryCall {
    type Future = std::future::Ready<()>;

    fn retry(&mut self, _: &mut FullRequest, result: &mut Result<Res, E>) -> Option<Self::Future> {
        result.is_err().then(|| std::future::ready(()))
    }

    fn clone_request(&mut self, req: &FullRequest) -> Option<FullRequest> {
        let mut clone = http::Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.headers_mut() = req.headers().clone();
        Some(clone)
    }
}

fn retry(c: &mut Criterion) {
    let rt = runtime();
    let requests = RequestFactory::default();
    let payload = payload_1k();
    let full = || {
        let (parts, _) = requests.request().into_parts();
        http::Request::from_parts(parts, http_body_util::Full::new(payload.clone()))
    };
    let mut group = c.benchmark_group("retry");

    // Every row: a 1 KiB body that the service reads to its end.
    let mut bare = Reading::default();
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, || requests.grpc_request(&payload), n))
    });
    let mut theirs = tower::retry::Retry::new(CloneEveryCall, Reading::default());
    group.bench_function("tower::retry::Retry (cloned request)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut theirs, full, n))
    });
    let mut ours = ServiceBuilder::new()
        .layer(seed_retry())
        .service(Reading::default());
    group.bench_function("grpc_retry::Retry (success)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut ours, || requests.grpc_request(&payload), n))
    });
    group.finish();
}

/// The retry rows over requests exactly as a generated stub sends them
/// (`tonic::GrpcMethod` extension, tonic's encoded unary body), with
/// `bare` and tower's `Retry` in the same group so each ratio comes from
/// one run.
fn retry_stub(c: &mut Criterion) {
    let rt = runtime();
    let stubs = stub::StubRequests::default();
    let payload = payload_1k();
    let full = || {
        let (parts, _) = stubs.request().into_parts();
        http::Request::from_parts(parts, http_body_util::Full::new(payload.clone()))
    };
    let mut group = c.benchmark_group("retry_stub");

    let mut bare = Reading::default();
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, || stubs.request(), n))
    });
    let mut theirs = tower::retry::Retry::new(CloneStubRequest, Reading::default());
    group.bench_function("tower::retry::Retry (cloned request)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut theirs, full, n))
    });
    let mut ours = ServiceBuilder::new()
        .layer(seed_retry())
        .service(Reading::default());
    group.bench_function("grpc_retry::Retry (success)", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut ours, || stubs.request(), n))
    });
    // The same over a `tower::buffer::Buffer`, which is what a tonic
    // `Channel` is: cloning one allocates, and so does a fresh clone's
    // first readiness check. tower's `Retry` clones its service for every
    // call; ours only when a retry is due.
    {
        let _entered = rt.enter();
        let mut bare = tower::buffer::Buffer::new(Reading::default(), 1024);
        group.bench_function("bare over a Buffer", |b| {
            b.iter_custom(|n| drive_with(&rt, &mut bare, || stubs.request(), n))
        });
        let mut theirs = tower::retry::Retry::new(
            CloneStubRequest,
            tower::buffer::Buffer::new(Reading::default(), 1024),
        );
        group.bench_function("tower::retry::Retry (cloned request) over a Buffer", |b| {
            b.iter_custom(|n| drive_with(&rt, &mut theirs, full, n))
        });
        let mut ours = ServiceBuilder::new()
            .layer(seed_retry())
            .service(tower::buffer::Buffer::new(Reading::default(), 1024));
        group.bench_function("grpc_retry::Retry (success) over a Buffer", |b| {
            b.iter_custom(|n| drive_with(&rt, &mut ours, || stubs.request(), n))
        });
    }
    // Two threads, each with its own clone of one layer: what the layer's
    // shared state (its policies' handle, the replay memory count) costs
    // when two cores call through it at once.
    let stubs = &stubs;
    let make = || move || stubs.request();
    // Each thread clones its own payload: threads sharing one would bounce
    // its reference count, which no real caller's threads do.
    let full = || {
        let payload = bytes::Bytes::copy_from_slice(&payload);
        move || {
            let (parts, _) = stubs.request().into_parts();
            http::Request::from_parts(parts, http_body_util::Full::new(payload.clone()))
        }
    };
    two_threads(&mut group, "bare, 2 threads", &bare, make);
    two_threads(
        &mut group,
        "tower::retry::Retry (cloned request), 2 threads",
        &theirs,
        full,
    );
    two_threads(
        &mut group,
        "grpc_retry::Retry (success), 2 threads",
        &ours,
        make,
    );
    group.finish();
}

/// The replay cost: every call fails once and is retried, on a paused
/// clock so the 1 ms backoff costs its bookkeeping, not its wait. These
/// rows run last: once any runtime has paused its clock, tokio's
/// `test-util` build takes the clock's mutex on every `Instant::now()` in
/// the process, which would inflate every later row's clock reads (a
/// build without `test-util`, as users run, never does).
fn retried(c: &mut Criterion) {
    let paused = paused_runtime();
    let requests = RequestFactory::default();
    let payload = payload_1k();
    let mut group = c.benchmark_group("retry");
    let mut retried = ServiceBuilder::new()
        .layer(seed_retry())
        .service(Reading { fail_first: true });
    group.bench_function("grpc_retry::Retry (retried once)", |b| {
        b.iter_custom(|n| drive_with(&paused, &mut retried, || requests.grpc_request(&payload), n))
    });
    group.finish();
    let stubs = stub::StubRequests::default();
    let mut group = c.benchmark_group("retry_stub");
    let mut retried = ServiceBuilder::new()
        .layer(seed_retry())
        .service(Reading { fail_first: true });
    group.bench_function("grpc_retry::Retry (retried once)", |b| {
        b.iter_custom(|n| drive_with(&paused, &mut retried, || stubs.request(), n))
    });
    group.finish();
}

fn bulkhead_layer(adaptive: bool) -> BulkheadLayer {
    let config = if adaptive {
        BulkheadConfig::builder().gradient(Gradient {
            initial_limit: 64,
            ..Gradient::default()
        })
    } else {
        BulkheadConfig::builder().max_concurrent(64)
    };
    BulkheadLayer::new(config.build().expect("a valid config"))
}

fn bulkhead(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let requests = RequestFactory::default();
    let mut group = c.benchmark_group("bulkhead");

    let mut bare = Bare;
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive(&rt, &mut bare, &requests, n))
    });
    let theirs = ServiceBuilder::new().concurrency_limit(64).service(Bare);
    let fixed = ServiceBuilder::new()
        .layer(bulkhead_layer(false))
        .service(Bare);
    let adaptive = ServiceBuilder::new()
        .layer(bulkhead_layer(true))
        .service(Bare);
    let mut svc = theirs.clone();
    group.bench_function("tower::limit::ConcurrencyLimit", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });
    let mut svc = fixed.clone();
    group.bench_function("grpc_bulkhead fixed", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });
    let mut svc = adaptive.clone();
    group.bench_function("grpc_bulkhead adaptive (gradient)", |b| {
        b.iter_custom(|n| drive(&rt, &mut svc, &requests, n))
    });

    // Two threads, each with its own clone of one shared limit.
    group.bench_function("bare, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&Bare, &requests, n, 2))
    });
    group.bench_function("tower::limit::ConcurrencyLimit, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&theirs, &requests, n, 2))
    });
    group.bench_function("grpc_bulkhead fixed, 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&fixed, &requests, n, 2))
    });
    group.bench_function("grpc_bulkhead adaptive (gradient), 2 threads", |b| {
        b.iter_custom(|n| drive_parallel(&adaptive, &requests, n, 2))
    });
    group.finish();
}

fn stack(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let requests = RequestFactory::default();
    let payload = payload_1k();
    let mut group = c.benchmark_group("stack");

    let mut bare = Bare;
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, || requests.grpc_request(&payload), n))
    });
    let mut theirs = ServiceBuilder::new()
        .layer(
            tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                .build()
                .expect("a breaker"),
        )
        .service(Bare);
    group.bench_function("tower-resilience breaker alone", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut theirs, || requests.grpc_request(&payload), n))
    });
    let timeouts = TimeoutPolicy::new(Duration::from_secs(5)).expect("a valid policy");
    let mut ours = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts))
        .layer(seed_retry())
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(Bare);
    group.bench_function("Timeout > Retry > CircuitBreaker", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut ours, || requests.grpc_request(&payload), n))
    });
    // The same three layers from a config, with the facade's call
    // telemetry in front (no recorder or subscriber installed).
    let mut facade =
        ResilientChannel::new(Bare, &grpc_resilience_benches::facade_config()).expect("a config");
    // Without the benches' default `opentelemetry` feature the facade is
    // built without its own: this row is then the feature off; with it, the
    // feature compiled in but no subscriber (each attempt checks the
    // current span, finds none, writes nothing).
    let facade_row = if cfg!(feature = "opentelemetry") {
        "grpc_resilience::ResilientChannel (opentelemetry feature, no subscriber)"
    } else {
        "grpc_resilience::ResilientChannel"
    };
    group.bench_function(facade_row, |b| {
        b.iter_custom(|n| drive_with(&rt, &mut facade, || requests.grpc_request(&payload), n))
    });
    #[cfg(feature = "opentelemetry")]
    tracing_rows(&mut group, &rt, &requests, &payload, &mut facade);
    group.finish();
}

/// The facade with tracing on (feature compiled in), on this thread only:
/// a plain `tracing` registry (the call and attempt spans exist, nothing
/// reads them), then a `tracing-opentelemetry` layer whose provider has no
/// exporter (every span is also an OpenTelemetry span, sampled and
/// dropped at its end, and each attempt writes `traceparent`).
#[cfg(feature = "opentelemetry")]
fn tracing_rows(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    requests: &RequestFactory,
    payload: &bytes::Bytes,
    facade: &mut ResilientChannel<Bare>,
) {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    // The attempt spans are DEBUG, the call spans INFO: let both through.
    let spans = tracing_subscriber::filter::LevelFilter::DEBUG;
    let registry = tracing_subscriber::registry().with(spans);
    tracing::subscriber::with_default(registry, || {
        group.bench_function(
            "grpc_resilience::ResilientChannel (tracing spans, no OpenTelemetry layer)",
            |b| b.iter_custom(|n| drive_with(rt, facade, || requests.grpc_request(payload), n)),
        );
    });
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let otel = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("bench")))
        .with(spans);
    tracing::subscriber::with_default(otel, || {
        group.bench_function(
            "grpc_resilience::ResilientChannel (tracing-opentelemetry layer, no exporter)",
            |b| b.iter_custom(|n| drive_with(rt, facade, || requests.grpc_request(payload), n)),
        );
    });
}

/// Every layer against its peers with requests exactly as a generated
/// stub sends them (a 1 KiB body and the `tonic::GrpcMethod` extension),
/// all awaited on a current-thread runtime, in one group so that every
/// ratio is from the same run.
fn stub(c: &mut Criterion) {
    let rt = runtime();
    let _guard = rt.enter();
    let requests = RequestFactory::default();
    let payload = payload_1k();
    let make = || requests.stub_grpc_request(&payload);
    let mut group = c.benchmark_group("stub");

    let mut bare = Bare;
    group.bench_function("bare", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, make, n))
    });
    let mut tower_timeout = ServiceBuilder::new()
        .timeout(Duration::from_secs(3))
        .service(Bare);
    group.bench_function("tower::timeout::Timeout", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut tower_timeout, make, n))
    });
    let policy = TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
        .expect("a valid policy");
    let mut timeout = ServiceBuilder::new()
        .layer(TimeoutLayer::new(policy))
        .service(Bare);
    group.bench_function("grpc_timeout::Timeout", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut timeout, make, n))
    });
    let mut theirs = ServiceBuilder::new()
        .layer(
            tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                .build()
                .expect("a breaker"),
        )
        .service(Bare);
    group.bench_function("tower-resilience breaker", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut theirs, make, n))
    });
    let mut breaker = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(Bare);
    group.bench_function("grpc_circuit_breaker", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut breaker, make, n))
    });
    let mut untimed = ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(
            BreakerRegistry::with_default_config(
                grpc_circuit_breaker::BreakerConfig::default().with_latency_metric(false),
            )
            .expect("a breaker config"),
        ))
        .service(Bare);
    group.bench_function("grpc_circuit_breaker, latency_metric off", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut untimed, make, n))
    });
    let timeouts = TimeoutPolicy::new(Duration::from_secs(5)).expect("a valid policy");
    let mut ours = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts))
        .layer(seed_retry())
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(Bare);
    group.bench_function("Timeout > Retry > CircuitBreaker", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut ours, make, n))
    });
    // The same three layers from a config, with the facade's call
    // telemetry in front (no recorder or subscriber installed).
    let mut facade =
        ResilientChannel::new(Bare, &grpc_resilience_benches::facade_config()).expect("a config");
    group.bench_function("grpc_resilience::ResilientChannel", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut facade, make, n))
    });
    // A client that calls two methods in turn: each layer works out a
    // method's facts once, not on every call.
    let mut alternate = alternating();
    group.bench_function("bare, 2 methods alternating", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, &mut alternate, n))
    });
    group.bench_function(
        "Timeout > Retry > CircuitBreaker, 2 methods alternating",
        |b| b.iter_custom(|n| drive_with(&rt, &mut ours, &mut alternate, n)),
    );
    group.bench_function(
        "grpc_resilience::ResilientChannel, 2 methods alternating",
        |b| b.iter_custom(|n| drive_with(&rt, &mut facade, &mut alternate, n)),
    );
    // Six methods in turn: more than a memory of the last method holds,
    // and more than the four (layer, path) pairs the breaker's per-thread
    // memory held before it kept eight.
    let mut six = in_turn(6);
    group.bench_function("bare, 6 methods in turn", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut bare, &mut six, n))
    });
    group.bench_function("Timeout > Retry > CircuitBreaker, 6 methods in turn", |b| {
        b.iter_custom(|n| drive_with(&rt, &mut ours, &mut six, n))
    });
    group.bench_function(
        "grpc_resilience::ResilientChannel, 6 methods in turn",
        |b| b.iter_custom(|n| drive_with(&rt, &mut facade, &mut six, n)),
    );
    // Two threads, each with its own clone: what shared state costs when
    // two cores call through one stack at once. Each thread has its own
    // payload: threads sharing one would bounce its reference count, which
    // no real caller's threads do.
    let per_thread = || {
        let payload = bytes::Bytes::copy_from_slice(&payload);
        let requests = requests.clone();
        move || requests.stub_grpc_request(&payload)
    };
    two_threads(&mut group, "bare, 2 threads", &bare, per_thread);
    let stack = "Timeout > Retry > CircuitBreaker, 2 threads";
    two_threads(&mut group, stack, &ours, per_thread);
    let channel = "grpc_resilience::ResilientChannel, 2 threads";
    two_threads(&mut group, channel, &facade, per_thread);
    group.finish();
}

/// A row that calls `service` on two threads at once, each with its own
/// clone and its own request maker from `per_thread`.
fn two_threads<S, R, B, M>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    service: &S,
    per_thread: impl Fn() -> M + Sync + Copy,
) where
    S: tower::Service<http::Request<R>, Response = http::Response<B>> + Clone + Send,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
    M: FnMut() -> http::Request<R>,
{
    group.bench_function(name, |b| {
        b.iter_custom(|n| drive_parallel_with(service, per_thread, n, 2))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = timeout, breaker, retry, retry_stub, bulkhead, stack, stub, retried
}
criterion_main!(benches);
