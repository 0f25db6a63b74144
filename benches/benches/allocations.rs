//! Heap allocations per call on the success path, for each layer and the
//! alternatives, counted by a counting global allocator.
//!
//! `cargo bench -p grpc-resilience-benches --bench allocations`

use std::time::Duration;

use grpc_bulkhead::{BulkheadConfig, BulkheadLayer, Gradient};
use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_resilience_benches::{Bare, RequestFactory, call_once, drive, runtime};
use grpc_retry::{RetryLayer, RetryPolicies, RetryPolicy};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tower::{Service, ServiceBuilder};

#[path = "common/stub.rs"]
mod stub;

const CALLS: u64 = 10_000;

/// Allocations per call through `service`, beyond building the request.
/// (The bare service's own response allocates; compare rows with `bare`.)
fn per_call<S, B>(mut service: S) -> f64
where
    S: Service<http::Request<http_body_util::Empty<bytes::Bytes>>, Response = http::Response<B>>,
    B: http_body::Body,
{
    let requests = RequestFactory::default();
    // Warm up: first calls may allocate lazily (maps, timer wheel levels).
    for _ in 0..100 {
        assert!(call_once(&mut service, requests.request()));
    }
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(requests.request());
        }
    });
    let total = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            assert!(call_once(&mut service, requests.request()));
        }
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// Like [`per_call`], for services whose futures must be awaited.
fn per_call_driven<S, B>(mut service: S) -> f64
where
    S: Service<http::Request<http_body_util::Empty<bytes::Bytes>>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let requests = RequestFactory::default();
    drive(&rt, &mut service, &requests, 100);
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(requests.request());
        }
    });
    let total = allocation_counter::measure(|| {
        drive(&rt, &mut service, &requests, CALLS);
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// Allocations per call for tonic-shaped requests with a 1 KiB body,
/// beyond building the request.
fn per_grpc_call<S, B>(mut service: S, payload: &bytes::Bytes) -> f64
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let requests = RequestFactory::default();
    grpc_resilience_benches::drive_with(&rt, &mut service, || requests.grpc_request(payload), 100);
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(requests.grpc_request(payload));
        }
    });
    let total = allocation_counter::measure(|| {
        grpc_resilience_benches::drive_with(
            &rt,
            &mut service,
            || requests.grpc_request(payload),
            CALLS,
        );
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// Allocations per call for tonic-shaped requests with a 1 KiB body and an
/// `idempotency-key` (a fresh one per call, or always the same), beyond
/// building the request.
fn per_keyed_call<S, B>(mut service: S, payload: &bytes::Bytes, fresh: bool) -> f64
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let requests = RequestFactory::default();
    let mut n = 0u64;
    let mut keyed = || {
        if fresh {
            n += 1;
        }
        let mut request = requests.grpc_request(payload);
        request.headers_mut().insert(
            "idempotency-key",
            http::HeaderValue::from_str(&format!("{n:032x}")).expect("hex"),
        );
        request
    };
    grpc_resilience_benches::drive_with(&rt, &mut service, &mut keyed, 100);
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(keyed());
        }
    });
    let total = allocation_counter::measure(|| {
        grpc_resilience_benches::drive_with(&rt, &mut service, &mut keyed, CALLS);
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// Allocations per call for requests exactly as a generated stub sends
/// them (`tonic::GrpcMethod` extension, tonic's encoded unary body),
/// beyond building the request.
fn per_stub_call<S, B>(mut service: S) -> f64
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let stubs = stub::StubRequests::default();
    grpc_resilience_benches::drive_with(&rt, &mut service, || stubs.request(), 100);
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(stubs.request());
        }
    });
    let total = allocation_counter::measure(|| {
        grpc_resilience_benches::drive_with(&rt, &mut service, || stubs.request(), CALLS);
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// The retry rows over stub-shaped requests.
fn retry_stub_rows() -> Vec<(&'static str, f64)> {
    let reading = grpc_resilience_benches::Reading::default;
    let retry = || RetryLayer::new(RetryPolicies::new(RetryPolicy::default()).expect("a policy"));
    vec![
        ("bare (reads the body)", per_stub_call(reading())),
        (
            "grpc_retry::Retry, success",
            per_stub_call(ServiceBuilder::new().layer(retry()).service(reading())),
        ),
        (
            "Timeout > Retry > CircuitBreaker",
            per_stub_call(
                ServiceBuilder::new()
                    .layer(TimeoutLayer::new(
                        TimeoutPolicy::new(Duration::from_secs(5)).expect("a policy"),
                    ))
                    .layer(retry())
                    .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
                    .service(reading()),
            ),
        ),
    ]
}

/// Allocations per call for requests exactly as a generated stub sends
/// them (1 KiB body, `tonic::GrpcMethod` extension), beyond building the
/// request.
fn per_stub_call_1k<S, B>(mut service: S, payload: &bytes::Bytes) -> f64
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let requests = RequestFactory::default();
    let make = || requests.stub_grpc_request(payload);
    grpc_resilience_benches::drive_with(&rt, &mut service, make, 100);
    let baseline = allocation_counter::measure(|| {
        for _ in 0..CALLS {
            std::hint::black_box(make());
        }
    });
    let total = allocation_counter::measure(|| {
        grpc_resilience_benches::drive_with(&rt, &mut service, make, CALLS);
    });
    (total.count_total.saturating_sub(baseline.count_total)) as f64 / CALLS as f64
}

/// Timeout > Retry > CircuitBreaker over `inner`: a 5 s deadline, the
/// default retry policy, a breaker per service.
fn stack<S: Clone>(
    inner: S,
) -> grpc_timeout::Timeout<grpc_retry::Retry<grpc_circuit_breaker::CircuitBreaker<S>>> {
    stack_with(inner, Duration::from_secs(5))
}

/// [`stack`] with a deadline of `deadline`: under 100 ms, `grpc-timeout`
/// counts nanoseconds, so the header a layer above wrote is a few hundred
/// nanoseconds stale by the next layer.
fn stack_with<S: Clone>(
    inner: S,
    deadline: Duration,
) -> grpc_timeout::Timeout<grpc_retry::Retry<grpc_circuit_breaker::CircuitBreaker<S>>> {
    ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(deadline).expect("a policy"),
        ))
        .layer(RetryLayer::new(
            RetryPolicies::new(RetryPolicy::default()).expect("a policy"),
        ))
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(inner)
}

/// Prints one table of rows, each with its difference from the first
/// row's (the group's bare service).
fn print_table(title: &str, rows: &[(&str, f64)]) {
    let bare = rows.first().map_or(0.0, |r| r.1);
    println!("{title:<44} {:>18} {:>12}", "allocations/call", "vs bare");
    for (name, allocs) in rows {
        println!("{name:<44} {allocs:>18.2} {:>+12.2}", allocs - bare);
    }
}

/// Calls counted per loopback row.
const LOOPBACK_CALLS: u64 = 2_000;

/// Allocations per call of a generated stub's `GetProduct` against a real
/// tonic server on 127.0.0.1, client and server on one current-thread
/// runtime, so every allocation of the call (stub, layers, channel, h2 on
/// both ends, the server's handler) is counted on this thread. Compare the
/// rows with the bare channel's: the difference is what the layers cost a
/// call on the wire, where a body has to wait and timers are armed, which
/// the in-process rows above never do.
fn loopback_rows() -> Vec<(&'static str, f64)> {
    use catalog_proto::query_service_client::QueryServiceClient;
    use catalog_proto::{GetProductRequest, InMemoryCatalog};
    use tonic::transport::{Channel, Server};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("an address");
        let catalog = InMemoryCatalog::with_products(5);
        tokio::spawn(
            Server::builder()
                .add_service(catalog.query_service())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    });
    let channel = || {
        Channel::from_shared(format!("http://{addr}"))
            .expect("a URI")
            .connect_lazy()
    };
    // Counts `LOOPBACK_CALLS` sequential calls, after a warm-up that
    // connects and fills the lazy maps.
    macro_rules! count {
        ($client:expr) => {{
            let mut client = $client;
            let mut calls = |n: u64| {
                rt.block_on(async {
                    for _ in 0..n {
                        let request = GetProductRequest { id: "p1".into() };
                        client.get_product(request).await.expect("a product");
                    }
                })
            };
            calls(200);
            let total = allocation_counter::measure(|| calls(LOOPBACK_CALLS));
            total.count_total as f64 / LOOPBACK_CALLS as f64
        }};
    }
    let _guard = rt.enter();
    vec![
        ("bare Channel", count!(QueryServiceClient::new(channel()))),
        (
            "bare Channel, 5 s grpc-timeout",
            count!(QueryServiceClient::with_interceptor(
                channel(),
                |mut request: tonic::Request<()>| {
                    request.set_timeout(Duration::from_secs(5));
                    Ok(request)
                },
            )),
        ),
        (
            "grpc_timeout::Timeout",
            count!(QueryServiceClient::new(
                ServiceBuilder::new()
                    .layer(TimeoutLayer::new(
                        TimeoutPolicy::new(Duration::from_secs(5)).expect("a policy"),
                    ))
                    .service(channel())
            )),
        ),
        (
            "grpc_retry::Retry, success",
            count!(QueryServiceClient::new(
                ServiceBuilder::new()
                    .layer(RetryLayer::new(
                        RetryPolicies::new(RetryPolicy::default()).expect("a policy"),
                    ))
                    .service(channel())
            )),
        ),
        (
            "grpc_circuit_breaker (closed)",
            count!(QueryServiceClient::new(
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
                    .service(channel())
            )),
        ),
        (
            "Timeout > Retry > CircuitBreaker",
            count!(QueryServiceClient::new(stack(channel()))),
        ),
        (
            "grpc_resilience::ResilientChannel",
            count!(QueryServiceClient::new(
                grpc_resilience::ResilientChannel::new(
                    channel(),
                    &grpc_resilience_benches::facade_config(),
                )
                .expect("a config")
            )),
        ),
    ]
}

fn main() {
    // `cargo bench` passes `--bench`; this binary takes no other options.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    let _guard = rt.enter();

    let policy = TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
        .expect("a valid policy");
    let rows = [
        ("bare", per_call(Bare)),
        // A control: boxing the response future costs exactly one
        // allocation per call, so this row proves the counter counts.
        (
            "control: BoxService<bare>",
            per_call(tower::util::BoxService::new(Bare)),
        ),
        (
            "tower::timeout::Timeout",
            per_call(
                ServiceBuilder::new()
                    .timeout(Duration::from_secs(3))
                    .service(Bare),
            ),
        ),
        (
            "grpc_timeout::Timeout",
            per_call(
                ServiceBuilder::new()
                    .layer(TimeoutLayer::new(policy))
                    .service(Bare),
            ),
        ),
        (
            "tower-resilience circuit breaker",
            per_call_driven(
                ServiceBuilder::new()
                    .layer(
                        tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                            .build()
                            .expect("a breaker"),
                    )
                    .service(Bare),
            ),
        ),
        (
            "grpc_circuit_breaker (closed)",
            per_call(
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
                    .service(Bare),
            ),
        ),
        (
            "tower::limit::ConcurrencyLimit",
            per_call(ServiceBuilder::new().concurrency_limit(64).service(Bare)),
        ),
        (
            "grpc_bulkhead, fixed",
            per_call(
                ServiceBuilder::new()
                    .layer(BulkheadLayer::new(
                        BulkheadConfig::builder()
                            .max_concurrent(64)
                            .build()
                            .expect("a config"),
                    ))
                    .service(Bare),
            ),
        ),
        (
            "grpc_bulkhead, adaptive (gradient)",
            per_call(
                ServiceBuilder::new()
                    .layer(BulkheadLayer::new(
                        BulkheadConfig::builder()
                            .gradient(Gradient {
                                initial_limit: 64,
                                ..Gradient::default()
                            })
                            .build()
                            .expect("a config"),
                    ))
                    .service(Bare),
            ),
        ),
    ];
    let payload = grpc_resilience_benches::payload_1k();
    let retry_rows = [
        (
            "bare (reads a 1 KiB body)",
            per_grpc_call(grpc_resilience_benches::Reading::default(), &payload),
        ),
        (
            "grpc_retry::Retry, success",
            per_grpc_call(
                ServiceBuilder::new()
                    .layer(RetryLayer::new(
                        RetryPolicies::new(RetryPolicy::default()).expect("a policy"),
                    ))
                    .service(grpc_resilience_benches::Reading::default()),
                &payload,
            ),
        ),
        (
            "grpc_retry::Retry, method without policy",
            per_grpc_call(
                ServiceBuilder::new()
                    .layer(RetryLayer::new(RetryPolicies::none()))
                    .service(grpc_resilience_benches::Reading::default()),
                &payload,
            ),
        ),
        (
            "Timeout > Retry > CircuitBreaker",
            per_grpc_call(stack(grpc_resilience_benches::Reading::default()), &payload),
        ),
        (
            "grpc_resilience::ResilientChannel",
            per_grpc_call(
                grpc_resilience::ResilientChannel::new(
                    grpc_resilience_benches::Reading::default(),
                    &grpc_resilience_benches::facade_config(),
                )
                .expect("a config"),
                &payload,
            ),
        ),
    ];
    let covering = |selector: &str| {
        grpc_idempotency::IdempotencyLayer::new([selector]).expect("a valid selector")
    };
    let reading = grpc_resilience_benches::Reading::default;
    let idempotency_rows = [
        (
            "bare (reads a 1 KiB body), keyed requests",
            per_keyed_call(reading(), &payload, true),
        ),
        (
            "IdempotencyLayer, method not covered",
            per_keyed_call(
                tower::Layer::layer(&covering("ListProducts"), reading()),
                &payload,
                true,
            ),
        ),
        (
            "IdempotencyLayer, covered, no key",
            per_grpc_call(
                tower::Layer::layer(&covering("GetProduct"), reading()),
                &payload,
            ),
        ),
        (
            "IdempotencyLayer (memory), miss",
            per_keyed_call(
                tower::Layer::layer(&covering("GetProduct"), reading()),
                &payload,
                true,
            ),
        ),
        (
            "IdempotencyLayer (memory), hit",
            per_keyed_call(
                tower::Layer::layer(&covering("GetProduct"), reading()),
                &payload,
                false,
            ),
        ),
    ];
    print_table("service", &rows);
    println!();
    print_table("service (1 KiB request body)", &retry_rows);
    println!();
    print_table("server side, 1 KiB request", &idempotency_rows);
    println!();
    let stub_rows = retry_stub_rows();
    print_table("stub-shaped request (GrpcMethod, ~1 KiB)", &stub_rows);
    println!();
    let stub_1k_rows = [
        ("bare", per_stub_call_1k(Bare, &payload)),
        (
            "tower::timeout::Timeout",
            per_stub_call_1k(
                ServiceBuilder::new()
                    .timeout(Duration::from_secs(3))
                    .service(Bare),
                &payload,
            ),
        ),
        (
            "grpc_timeout::Timeout",
            per_stub_call_1k(
                ServiceBuilder::new()
                    .layer(TimeoutLayer::new(
                        TimeoutPolicy::new(Duration::from_secs(5)).expect("a policy"),
                    ))
                    .service(Bare),
                &payload,
            ),
        ),
        (
            "tower-resilience circuit breaker",
            per_stub_call_1k(
                ServiceBuilder::new()
                    .layer(
                        tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                            .build()
                            .expect("a breaker"),
                    )
                    .service(Bare),
                &payload,
            ),
        ),
        (
            "grpc_circuit_breaker (closed)",
            per_stub_call_1k(
                ServiceBuilder::new()
                    .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
                    .service(Bare),
                &payload,
            ),
        ),
        (
            "Timeout > Retry > CircuitBreaker",
            per_stub_call_1k(stack(Bare), &payload),
        ),
        (
            "Timeout > Retry > CircuitBreaker, 50 ms",
            per_stub_call_1k(stack_with(Bare, Duration::from_millis(50)), &payload),
        ),
        (
            "grpc_resilience::ResilientChannel",
            per_stub_call_1k(
                grpc_resilience::ResilientChannel::new(
                    Bare,
                    &grpc_resilience_benches::facade_config(),
                )
                .expect("a config"),
                &payload,
            ),
        ),
        (
            "ResilientChannel, bulkhead, per-try timeout",
            per_stub_call_1k(
                grpc_resilience::ResilientChannel::new(
                    Bare,
                    &grpc_resilience_benches::guarded_facade_config(),
                )
                .expect("a config"),
                &payload,
            ),
        ),
    ];
    print_table(
        "as a generated stub sends (GrpcMethod, 1 KiB)",
        &stub_1k_rows,
    );
    println!();
    let loopback = loopback_rows();
    print_table("loopback: stub, tonic server, one thread", &loopback);
}
