//! The whole system on one machine: a product-catalog server with injected
//! faults on 127.0.0.1, and a client whose channel is wrapped in the
//! resilience layers. Each scenario prints what the caller saw and checks
//! it against what should happen; the process exits non-zero if one does
//! not hold.
//!
//! Run it with `cargo run -p grpc-resilience-examples --bin demo`.

use std::process::ExitCode;
use std::time::Duration;

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, InMemoryCatalog, ListProductsRequest};
use grpc_fault::{Fault, FaultInjector};
use grpc_resilience_core::timeout_header;
use grpc_timeout::{Timeout, TimeoutLayer, TimeoutPolicy};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Server};
use tower::ServiceBuilder;

type Client = QueryServiceClient<Timeout<Channel>>;

struct Demo {
    faults: FaultInjector,
    client: Client,
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
            .client
            .get_product(request)
            .await
            .map(|r| r.into_inner().name);
        (result, start.elapsed())
    }
}

fn describe(result: &Result<String, tonic::Status>, took: Duration) -> String {
    match result {
        Ok(name) => format!("OK `{name}` in {} ms", took.as_millis()),
        Err(status) => format!(
            "{:?} after {} ms: {}",
            status.code(),
            took.as_millis(),
            status.message()
        ),
    }
}

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    // The Query service on loopback, behind the fault-injection layer.
    let faults = FaultInjector::new();
    let catalog = InMemoryCatalog::with_products(5);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        Server::builder()
            .layer(faults.layer())
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );

    // The client: the generated stub over a channel wrapped once.
    let policy = TimeoutPolicy::new(Duration::from_secs(2))?
        .with_operation("GetProduct", Duration::from_millis(500))?
        .with_operation("ListProducts", Duration::from_millis(1500))?;
    println!(
        "catalog server on {addr}; timeouts: default 2 s, GetProduct 500 ms, ListProducts 1500 ms\n"
    );
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect_lazy();
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(policy))
        .service(channel);
    let mut demo = Demo {
        faults: faults.clone(),
        client: QueryServiceClient::new(channel),
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

    println!("\n2. A server that stalls for 5 s: the call ends at its 500 ms deadline");
    faults.script(
        "GetProduct",
        [Fault::pass().with_delay(Duration::from_secs(5))],
    )?;
    let (result, took) = demo.get(None).await;
    println!("    {}", describe(&result, took));
    demo.check(
        matches!(&result, Err(s) if s.code() == Code::DeadlineExceeded),
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
        matches!(&result, Err(s) if s.code() == Code::DeadlineExceeded),
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
    let mut stream = demo.client.list_products(request).await?.into_inner();
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

    println!("\n5. Server errors keep their code (UNAVAILABLE injected once)");
    faults.script("GetProduct", [Fault::status(Code::Unavailable)])?;
    let (result, took) = demo.get(None).await;
    println!("    {}", describe(&result, took));
    demo.check(
        matches!(&result, Err(s) if s.code() == Code::Unavailable),
        "UNAVAILABLE",
    );
    let (result, took) = demo.get(None).await;
    println!("    next call: {}", describe(&result, took));
    demo.check(result.is_ok(), "the next call succeeds");

    let stats = faults.stats("*")?;
    println!(
        "\nthe server saw {} calls, ran its handlers {} times, and saw {} calls cancelled",
        stats.calls, stats.handler_runs, stats.cancelled
    );
    if demo.failures == 0 {
        println!("every scenario behaved as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} checks did not hold", demo.failures);
        Ok(ExitCode::FAILURE)
    }
}
