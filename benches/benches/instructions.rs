//! Instructions per call, for a profiler: runs a fixed number of calls of
//! one row of the `stub` or `retry_stub` group (the same services and
//! stub-shaped requests as in `overhead`), with only those calls inside
//! `measured`, so that callgrind counts exactly them. Instruction counts
//! do not move with the machine's load, so they show what a change saved
//! where timings on a shared machine cannot, and callgrind's per-function
//! figures show where each row's cost goes.
//!
//! ```text
//! cargo bench -p grpc-resilience-benches --bench instructions --no-run
//! valgrind --tool=callgrind --toggle-collect='*measured*' \
//!     target/release/deps/instructions-<hash> stub/grpc_timeout::Timeout
//! ```
//!
//! Instructions per call = the collected total divided by [`CALLS`];
//! compare each row with its group's `bare`. Without a row it lists the
//! rows; `all` runs each once, as a smoke test.
//!
//! Code that reads the clock could take another path under valgrind, which
//! runs it about fifty times slower: until the `grpc-timeout` check
//! accepted a header within a millisecond, the retry layer found the
//! deadline layer's header a few microseconds stale and rewrote it, which
//! a native call does not (about 610 instructions in the stack and facade
//! rows; BENCHMARKS.md, "What a profiler sees"). Keep a check on the clock
//! coarser than valgrind's slowdown, or these rows stop counting the
//! native path.

use std::time::Duration;

use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_resilience::ResilientChannel;
use grpc_resilience_benches::{
    Bare, CloneStubRequest, Reading, RequestFactory, alternating, drive_with, in_turn, payload_1k,
    runtime, seed_retry,
};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use http::{Request, Response};
use http_body::Body;
use tower::{Service, ServiceBuilder};

#[path = "common/stub.rs"]
mod stub;

/// Calls counted per run.
const CALLS: u64 = 10_000;

const ROWS: &[&str] = &[
    "stub/bare",
    "stub/tower::timeout::Timeout",
    "stub/grpc_timeout::Timeout",
    "stub/tower-resilience breaker",
    "stub/grpc_circuit_breaker",
    "stub/grpc_circuit_breaker, latency_metric off",
    "stub/Timeout > Retry > CircuitBreaker",
    "stub/grpc_resilience::ResilientChannel",
    "stub/grpc_resilience::ResilientChannel, bulkhead and per-attempt timeout",
    "stub/bare, 2 methods alternating",
    "stub/Timeout > Retry > CircuitBreaker, 2 methods alternating",
    "stub/grpc_resilience::ResilientChannel, 2 methods alternating",
    "stub/bare, 6 methods in turn",
    "stub/Timeout > Retry > CircuitBreaker, 6 methods in turn",
    "stub/grpc_resilience::ResilientChannel, 6 methods in turn",
    "retry_stub/bare",
    "retry_stub/tower::retry::Retry (cloned request)",
    "retry_stub/grpc_retry::Retry (success)",
];

/// The counted calls: callgrind collects only inside this function.
#[inline(never)]
fn measured<S, R, B>(
    rt: &tokio::runtime::Runtime,
    service: &mut S,
    make: impl FnMut() -> Request<R>,
    calls: u64,
) -> Duration
where
    S: Service<Request<R>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    drive_with(rt, service, make, calls)
}

/// Warms `service` up (lazy maps, the timer wheel), then counts.
fn run<S, R, B>(service: &mut S, mut make: impl FnMut() -> Request<R>, calls: u64) -> Duration
where
    S: Service<Request<R>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    let _guard = rt.enter();
    drive_with(&rt, service, &mut make, 100);
    measured(&rt, service, make, calls)
}

/// Timeout > Retry > CircuitBreaker over [`Bare`], as the stack rows
/// build it.
fn stack() -> impl Service<
    Request<tonic::body::Body>,
    Response = Response<impl Body<Error: std::fmt::Debug>>,
    Error: std::fmt::Debug,
> {
    ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(5)).expect("a valid policy"),
        ))
        .layer(seed_retry())
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(Bare)
}

fn row(name: &str, calls: u64) -> Option<Duration> {
    let requests = RequestFactory::default();
    let payload = payload_1k();
    let stubs = stub::StubRequests::default();
    let make = || requests.stub_grpc_request(&payload);
    let full = || {
        let (parts, _) = stubs.request().into_parts();
        Request::from_parts(parts, http_body_util::Full::new(payload.clone()))
    };
    let timeouts = || {
        TimeoutPolicy::new(Duration::from_secs(5))
            .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
            .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
            .expect("a valid policy")
    };
    Some(match name {
        "stub/bare" => run(&mut Bare, make, calls),
        "stub/tower::timeout::Timeout" => run(
            &mut ServiceBuilder::new()
                .timeout(Duration::from_secs(3))
                .service(Bare),
            make,
            calls,
        ),
        "stub/grpc_timeout::Timeout" => run(
            &mut ServiceBuilder::new()
                .layer(TimeoutLayer::new(timeouts()))
                .service(Bare),
            make,
            calls,
        ),
        "stub/tower-resilience breaker" => run(
            &mut ServiceBuilder::new()
                .layer(
                    tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
                        .build()
                        .expect("a breaker"),
                )
                .service(Bare),
            make,
            calls,
        ),
        "stub/grpc_circuit_breaker" => run(
            &mut ServiceBuilder::new()
                .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
                .service(Bare),
            make,
            calls,
        ),
        "stub/grpc_circuit_breaker, latency_metric off" => run(
            &mut ServiceBuilder::new()
                .layer(CircuitBreakerLayer::new(
                    BreakerRegistry::with_default_config(
                        grpc_circuit_breaker::BreakerConfig::default().with_latency_metric(false),
                    )
                    .expect("a breaker config"),
                ))
                .service(Bare),
            make,
            calls,
        ),
        "stub/Timeout > Retry > CircuitBreaker" => run(&mut stack(), make, calls),
        "stub/grpc_resilience::ResilientChannel" => run(
            &mut ResilientChannel::new(Bare, &grpc_resilience_benches::facade_config())
                .expect("a config"),
            make,
            calls,
        ),
        "stub/grpc_resilience::ResilientChannel, bulkhead and per-attempt timeout" => run(
            &mut ResilientChannel::new(Bare, &grpc_resilience_benches::guarded_facade_config())
                .expect("a config"),
            make,
            calls,
        ),
        "stub/bare, 2 methods alternating" => run(&mut Bare, alternating(), calls),
        "stub/Timeout > Retry > CircuitBreaker, 2 methods alternating" => {
            run(&mut stack(), alternating(), calls)
        }
        "stub/grpc_resilience::ResilientChannel, 2 methods alternating" => run(
            &mut ResilientChannel::new(Bare, &grpc_resilience_benches::facade_config())
                .expect("a config"),
            alternating(),
            calls,
        ),
        "stub/bare, 6 methods in turn" => run(&mut Bare, in_turn(6), calls),
        "stub/Timeout > Retry > CircuitBreaker, 6 methods in turn" => {
            run(&mut stack(), in_turn(6), calls)
        }
        "stub/grpc_resilience::ResilientChannel, 6 methods in turn" => run(
            &mut ResilientChannel::new(Bare, &grpc_resilience_benches::facade_config())
                .expect("a config"),
            in_turn(6),
            calls,
        ),
        "retry_stub/bare" => run(&mut Reading::default(), || stubs.request(), calls),
        "retry_stub/tower::retry::Retry (cloned request)" => run(
            &mut tower::retry::Retry::new(CloneStubRequest, Reading::default()),
            full,
            calls,
        ),
        "retry_stub/grpc_retry::Retry (success)" => run(
            &mut ServiceBuilder::new()
                .layer(seed_retry())
                .service(Reading::default()),
            || stubs.request(),
            calls,
        ),
        _ => return None,
    })
}

fn main() {
    // `cargo bench` passes `--bench`; a row is any other argument.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match wanted.first().map(String::as_str) {
        None => {
            println!("rows (pass one; run it under callgrind, see the file's docs):");
            for name in ROWS {
                println!("  {name}");
            }
        }
        Some("all") => {
            for name in ROWS {
                let took = row(name, 100).expect("a listed row");
                println!("{name}: 100 calls in {took:?}");
            }
        }
        Some(name) => match row(name, CALLS) {
            Some(took) => println!("{name}: {CALLS} calls in {took:?}"),
            None => {
                eprintln!("no row {name:?}; run without arguments for the list");
                std::process::exit(2);
            }
        },
    }
}
