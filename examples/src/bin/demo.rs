//! The whole system on one machine: a product-catalog server (Query and
//! Command services) with injected faults on 127.0.0.1, and a client whose
//! channel is wrapped once in the resilience stack: call deadline >
//! retries > circuit breakers. Each scenario prints what the caller saw
//! and checks it against what should happen; the process exits non-zero
//! if one does not hold.
//!
//! Run it with `cargo run -p grpc-resilience-examples --bin demo`
//! (`RUST_LOG=info` shows the breakers' transitions too).

use std::process::ExitCode;
use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{
    CreateProductRequest, GetProductRequest, InMemoryCatalog, ListProductsRequest, Product,
};
use grpc_circuit_breaker::{
    BreakerConfig, BreakerRegistry, CircuitBreaker, CircuitBreakerLayer, State,
};
use grpc_fault::{Fault, FaultInjector};
use grpc_resilience_core::timeout_header;
use grpc_retry::{Retry, RetryLayer, RetryPolicies, RetryPolicy, RetryThrottle};
use grpc_timeout::{Timeout, TimeoutLayer, TimeoutPolicy};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Server};
use tower::ServiceBuilder;

type Stack = Timeout<Retry<CircuitBreaker<Channel>>>;

struct Demo {
    faults: FaultInjector,
    catalog: InMemoryCatalog,
    queries: QueryServiceClient<Stack>,
    commands: CommandServiceClient<Stack>,
    failures: usize,
}

impl Demo {
    fn check(&mut self, holds: bool, what: &str) {
        if holds {
            println!("    ok: {what}");
        } else {
            println!("    NOT AS EXPECTED: {what}");
            self.failures += 1;
        }
    }

    fn last_grpc_timeout(&self) -> Option<Duration> {
        let calls = self.faults.calls();
        let value = calls.last()?.headers.get("grpc-timeout")?.clone();
        timeout_header::decode(value.as_bytes()).ok()
    }

    async fn get(
        &mut self,
        caller_timeout: Option<Duration>,
    ) -> (Result<String, tonic::Status>, Duration) {
        let mut request = tonic::Request::new(GetProductRequest { id: "p1".into() });
        if let Some(t) = caller_timeout {
            request.set_timeout(t);
        }
        let start = Instant::now();
        let result = self
            .queries
            .get_product(request)
            .await
            .map(|r| r.into_inner().name);
        (result, start.elapsed())
    }

    fn attempts(&self, selector: &str) -> u64 {
        self.faults.stats(selector).map_or(0, |s| s.calls)
    }
}

fn describe<T: std::fmt::Debug>(result: &Result<T, tonic::Status>, took: Duration) -> String {
    match result {
        Ok(value) => format!("OK {value:?} in {} ms", took.as_millis()),
        Err(status) => format!(
            "{:?} after {} ms: {}",
            status.code(),
            took.as_millis(),
            status.message()
        ),
    }
}

fn is_code<T>(result: &Result<T, tonic::Status>, code: Code) -> bool {
    matches!(result, Err(s) if s.code() == code)
}

fn lamp(id: &str) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product {
            id: id.into(),
            name: "Desk lamp".into(),
            price_cents: 4_200,
            blob: vec![],
        }),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,grpc_circuit_breaker=info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    // The Query and Command services on loopback, behind the fault layer.
    let faults = FaultInjector::new();
    let catalog = InMemoryCatalog::with_products(5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        Server::builder()
            .layer(faults.layer())
            .add_service(catalog.query_service())
            .add_service(catalog.command_service())
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );

    // The client: one channel, wrapped once; the stubs are unchanged.
    let timeouts = TimeoutPolicy::new(Duration::from_secs(2))?
        .with_operation("GetProduct", Duration::from_millis(500))?
        .with_operation("ListProducts", Duration::from_millis(1500))?;
    let quick = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(400));
    let retries =
        RetryPolicies::new(quick)?.with_operation("CreateProduct", quick.non_idempotent())?;
    let registry = BreakerRegistry::with_default_config(
        BreakerConfig::default()
            .with_failure_threshold(5)
            .with_timeout(Duration::from_secs(1)),
    )?;
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts))
        .layer(RetryLayer::new(retries).with_throttle(RetryThrottle::new(10.0, 0.5)?))
        .layer(CircuitBreakerLayer::new(registry.clone()))
        .service(channel);
    println!("catalog server on {addr}");
    println!("client stack: deadline (default 2 s, GetProduct 500 ms, ListProducts 1500 ms)");
    println!("              > retry (3 attempts, 50 ms backoff, CreateProduct non-idempotent)");
    println!("              > circuit breaker per service (5 failures, 1 s open)\n");
    let mut demo = Demo {
        faults: faults.clone(),
        catalog: catalog.clone(),
        queries: QueryServiceClient::new(channel.clone()),
        commands: CommandServiceClient::new(channel),
        failures: 0,
    };

    println!("1. A healthy call carries its deadline to the server");
    let (result, took) = demo.get(None).await;
    println!("    {}", describe(&result, took));
    demo.check(result.is_ok(), "the call succeeds");
    let sent = demo.last_grpc_timeout();
    println!("    the server received grpc-timeout = {sent:?}");
    demo.check(
        sent == Some(Duration::from_millis(500)),
        "grpc-timeout is GetProduct's 500 ms",
    );

    println!(
        "\n2. A server that stalls for 5 s: the call ends at its 500 ms deadline, retries included"
    );
    faults.always(
        "GetProduct",
        Fault::pass().with_delay(Duration::from_secs(5)),
    )?;
    let (result, took) = demo.get(None).await;
    faults.clear("GetProduct")?;
    println!("    {}", describe(&result, took));
    demo.check(
        is_code(&result, Code::DeadlineExceeded),
        "the caller sees DEADLINE_EXCEEDED",
    );
    demo.check(
        took < Duration::from_secs(2),
        "well before the server's 5 s",
    );

    println!("\n3. The caller's own shorter deadline (150 ms) wins over the configured 500 ms");
    faults.script(
        "GetProduct",
        [Fault::pass().with_delay(Duration::from_secs(5))],
    )?;
    let (result, took) = demo.get(Some(Duration::from_millis(150))).await;
    println!("    {}", describe(&result, took));
    let sent = demo.last_grpc_timeout();
    println!("    the server received grpc-timeout = {sent:?}");
    demo.check(
        is_code(&result, Code::DeadlineExceeded),
        "DEADLINE_EXCEEDED",
    );
    demo.check(
        sent.is_some_and(|t| t <= Duration::from_millis(150)),
        "grpc-timeout is at most 150 ms",
    );

    println!("\n4. A product stream that would run 10 s is cut at ListProducts' 1500 ms");
    let start = Instant::now();
    let request = ListProductsRequest {
        limit: 100,
        interval_ms: 100,
    };
    let mut stream = demo.queries.list_products(request).await?.into_inner();
    let mut received = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    println!(
        "    {received} products, then {:?} after {} ms",
        end.as_ref().map(tonic::Status::code),
        start.elapsed().as_millis()
    );
    demo.check(
        end.is_some_and(|s| s.code() == Code::DeadlineExceeded) && received > 0,
        "some products arrive, then DEADLINE_EXCEEDED",
    );
    registry.reset_all();

    println!("\n5. UNAVAILABLE twice, then the server answers: retried, the caller sees success");
    faults.reset_stats();
    faults.script(
        "GetProduct",
        [
            Fault::status(Code::Unavailable),
            Fault::status(Code::Unavailable),
        ],
    )?;
    let (result, took) = demo.get(None).await;
    println!("    {}", describe(&result, took));
    println!(
        "    the server saw {} attempts",
        demo.attempts("GetProduct")
    );
    demo.check(result.is_ok(), "the call succeeds");
    demo.check(
        demo.attempts("GetProduct") == 3,
        "three attempts reached the server",
    );

    println!("\n6. A write whose response is lost is not sent twice");
    faults.reset_stats();
    faults.script("CreateProduct", [Fault::lose_response()])?;
    let start = Instant::now();
    let result = demo
        .commands
        .create_product(lamp("lamp-1"))
        .await
        .map(|r| r.into_inner().product.map(|p| p.id));
    println!("    {}", describe(&result, start.elapsed()));
    let writes = demo.catalog.stats().writes;
    println!(
        "    the server wrote {writes} product(s) in {} attempt(s)",
        demo.attempts("CreateProduct")
    );
    demo.check(
        is_code(&result, Code::Unavailable),
        "the caller learns the outcome is unknown (UNAVAILABLE)",
    );
    demo.check(
        writes == 1 && demo.attempts("CreateProduct") == 1,
        "exactly one write",
    );

    println!(
        "\n7. The same write with an idempotency key: retried, and the server's idempotency layer runs it once"
    );
    // A client whose CreateProduct policy sends one key per logical write;
    // the server's Command service is behind grpc-idempotency's layer.
    let keyed = RetryPolicies::new(quick)?.with_operation(
        "CreateProduct",
        quick.non_idempotent().with_idempotency_keys(),
    )?;
    let mut keyed_commands = CommandServiceClient::new(
        ServiceBuilder::new()
            .layer(RetryLayer::new(keyed))
            .service(Channel::from_shared(format!("http://{addr}"))?.connect_lazy()),
    );
    faults.reset_stats();
    faults.script("CreateProduct", [Fault::lose_response()])?;
    let writes_before = demo.catalog.stats().writes;
    let replays_before = demo.catalog.stats().deduplicated;
    let start = Instant::now();
    let result = keyed_commands
        .create_product(lamp("lamp-keyed"))
        .await
        .map(|r| r.into_inner().product.map(|p| p.id));
    println!("    {}", describe(&result, start.elapsed()));
    let stats = demo.catalog.stats();
    let (writes, replays) = (
        stats.writes - writes_before,
        stats.deduplicated - replays_before,
    );
    println!(
        "    {} attempt(s) reached the server; it wrote {writes} product(s) and replayed {replays} recorded response(s)",
        demo.attempts("CreateProduct")
    );
    demo.check(result.is_ok(), "the caller gets OK");
    demo.check(
        writes == 1 && replays == 1 && demo.attempts("CreateProduct") == 2,
        "two attempts, one write: the retry got the recorded response",
    );

    println!(
        "\n8. The Query service goes down: its breaker opens, the Command service's stays closed"
    );
    faults.reset_stats();
    faults.always("GetProduct", Fault::status(Code::Unavailable))?;
    let mut last = None;
    for _ in 0..4 {
        let (result, took) = demo.get(None).await;
        last = Some((result, took));
    }
    let attempts_while_down = demo.attempts("GetProduct");
    let (result, took) = last.expect("four calls");
    println!("    fourth call: {}", describe(&result, took));
    println!("    breakers: {:?}", registry.status());
    demo.check(
        registry.state("query") == Some(State::Open),
        "the query breaker is open",
    );
    demo.check(
        is_code(&result, Code::Unavailable) && took < Duration::from_millis(50),
        "calls are rejected at once with UNAVAILABLE",
    );
    let (more, _) = demo.get(None).await;
    demo.check(
        demo.attempts("GetProduct") == attempts_while_down && more.is_err(),
        "while open, nothing reaches the server",
    );
    let created = demo.commands.create_product(lamp("lamp-2")).await;
    demo.check(created.is_ok(), "the Command service still works");
    demo.check(
        registry.state("command") == Some(State::Closed),
        "the command breaker is closed",
    );

    println!(
        "\n9. The Query service comes back: after 1 s the breaker lets probes through and closes"
    );
    faults.clear_all();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    println!("    breakers after 1.1 s: {:?}", registry.status());
    for _ in 0..2 {
        let (result, took) = demo.get(None).await;
        println!("    probe: {}", describe(&result, took));
    }
    println!("    breakers: {:?}", registry.status());
    demo.check(
        registry.state("query") == Some(State::Closed),
        "the query breaker closed again",
    );

    let stats = faults.stats("*")?;
    println!(
        "\nsince scenario 8 the server saw {} calls and ran its handlers {} times",
        stats.calls, stats.handler_runs
    );
    if demo.failures == 0 {
        println!("every scenario behaved as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} checks did not hold", demo.failures);
        Ok(ExitCode::FAILURE)
    }
}
