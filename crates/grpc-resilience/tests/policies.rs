//! Bulkheads and hedging configured from the file, through real generated
//! stubs against a real server with injected faults.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, Product};
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilienceLayer};
use grpc_resilience_tests::{TestServer, eventually};
use tokio::time::Instant;
use tonic::Code;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

#[tokio::test]
async fn a_full_bulkhead_refuses_the_excess_with_resource_exhausted() {
    let server = TestServer::start().await;
    // Every GetProduct hangs 2 s; CreateProduct is served at once.
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(2)),
        )
        .unwrap();
    let config = ResilienceConfig::from_toml(
        "[retry.default]\nmax_attempts = 3\ninitial_delay = 1\nmax_delay = 1\n\
         retryable_codes = [\"RESOURCE_EXHAUSTED\", \"UNAVAILABLE\"]\n\
         [bulkhead.default]\nmax_concurrent = 2\n",
    )
    .unwrap();
    let layer = ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, server.channel());
    let queries = QueryServiceClient::new(channel.clone());
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut q = queries.clone();
            tokio::spawn(async move { q.get_product(get()).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || {
            server.faults.stats("GetProduct").unwrap().calls == 2
        })
        .await,
        "both slow calls reached the server"
    );

    // The third is refused at once, locally, and not retried.
    let started = Instant::now();
    let status = queries.clone().get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);
    let partitions = layer.bulkhead_partitions();
    let query = partitions
        .iter()
        .find(|p| p.name == "catalog.v1.QueryService")
        .expect("the Query service's partition");
    assert_eq!((query.in_flight, query.limit), (2, 2));

    // The Command service has its own partition: served while Query is full.
    CommandServiceClient::new(channel)
        .create_product(CreateProductRequest {
            product: Some(Product {
                id: "n1".into(),
                name: "new".into(),
                price_cents: 1,
                blob: vec![],
            }),
        })
        .await
        .unwrap();

    for call in slow {
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_hedged_method_sends_a_hedge_to_a_slow_server_and_cancels_the_loser() {
    let server = TestServer::start().await;
    // The first attempt is slow; any later one is served at once.
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_secs(3))],
        )
        .unwrap();
    let config = ResilienceConfig::from_toml(
        "[retry.default]\nmax_attempts = 3\n\
         [hedging.operations.get_product]\nmax_attempts = 2\nhedging_delay = \"50ms\"\n\
         [timeouts]\ndefault = \"10s\"\n",
    )
    .unwrap();
    let channel =
        tower_layer::Layer::layer(&ResilienceLayer::new(&config).unwrap(), server.channel());
    let mut queries = QueryServiceClient::new(channel);
    let started = Instant::now();
    let product = queries.get_product(get()).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the hedge answered, not the slow first attempt ({:?})",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let stats = server.faults.stats("GetProduct").unwrap();
            stats.calls == 2 && stats.cancelled == 1
        })
        .await,
        "the server saw 2 calls, one cancelled: {:?}",
        server.faults.stats("GetProduct").unwrap()
    );
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert_eq!(
        calls[1]
            .headers
            .get("grpc-previous-rpc-attempts")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("1".to_owned()),
        "the hedge says it is one"
    );
}
