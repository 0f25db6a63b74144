//! CircuitBreakerLayer through real generated stubs against a real server.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, ListProductsRequest, Product};
use grpc_circuit_breaker::{
    BreakerConfig, BreakerRegistry, CircuitBreaker, CircuitBreakerLayer, State,
};
use grpc_fault::Fault;
use grpc_resilience_tests::TestServer;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;

fn breaker_channel(server: &TestServer, registry: &BreakerRegistry) -> CircuitBreaker<Channel> {
    ServiceBuilder::new()
        .layer(CircuitBreakerLayer::new(registry.clone()))
        .service(server.channel())
}

fn registry(timeout: Duration) -> BreakerRegistry {
    BreakerRegistry::with_default_config(
        BreakerConfig::default()
            .with_failure_threshold(3)
            .with_timeout(timeout),
    )
    .unwrap()
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

#[tokio::test]
async fn trailers_only_errors_open_it_and_the_server_sees_no_more_calls() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let registry = registry(Duration::from_secs(60));
    let mut client = QueryServiceClient::new(breaker_channel(&server, &registry));

    for _ in 0..3 {
        let status = client.get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(registry.state("query"), Some(State::Open));
    for _ in 0..10 {
        let start = Instant::now();
        let status = client.get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("circuit breaker `query` is open"),
            "{status:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "rejected at once");
    }
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        3,
        "nothing reached the server while open"
    );
}

#[tokio::test]
async fn errors_in_trailers_after_streamed_messages_count() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "ListProducts",
            Fault::status_after_messages(2, Code::Internal),
        )
        .unwrap();
    let registry = registry(Duration::from_secs(60));
    let mut client = QueryServiceClient::new(breaker_channel(&server, &registry));
    for _ in 0..3 {
        let request = ListProductsRequest {
            limit: 5,
            interval_ms: 2,
        };
        let mut stream = client.list_products(request).await.unwrap().into_inner();
        let mut received = 0;
        let status = loop {
            match stream.message().await {
                Ok(Some(_)) => received += 1,
                Ok(None) => panic!("the stream should fail"),
                Err(status) => break status,
            }
        };
        assert_eq!((received, status.code()), (2, Code::Internal));
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}

#[tokio::test]
async fn not_found_does_not_count() {
    let server = TestServer::start().await;
    let registry = registry(Duration::from_secs(60));
    let mut client = QueryServiceClient::new(breaker_channel(&server, &registry));
    for _ in 0..10 {
        let status = client
            .get_product(GetProductRequest {
                id: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }
    assert_eq!(registry.state("query"), Some(State::Closed));
}

#[tokio::test]
async fn recovery_closes_the_breaker() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            std::iter::repeat_n(Fault::status(Code::Unavailable), 3),
        )
        .unwrap();
    let registry = registry(Duration::from_millis(200));
    let mut client = QueryServiceClient::new(breaker_channel(&server, &registry));
    for _ in 0..3 {
        client.get_product(get()).await.unwrap_err();
    }
    assert_eq!(registry.state("query"), Some(State::Open));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(registry.state("query"), Some(State::HalfOpen));
    client.get_product(get()).await.unwrap();
    client.get_product(get()).await.unwrap();
    assert_eq!(registry.state("query"), Some(State::Closed));
    assert_eq!(server.faults.stats("GetProduct").unwrap().handler_runs, 2);
}

#[tokio::test]
async fn two_services_on_one_channel_have_independent_breakers() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Internal))
        .unwrap();
    let registry = registry(Duration::from_secs(60));
    let channel = breaker_channel(&server, &registry);
    let mut queries = QueryServiceClient::new(channel.clone());
    let mut commands = CommandServiceClient::new(channel);
    for _ in 0..3 {
        queries.get_product(get()).await.unwrap_err();
    }
    let product = Product {
        id: "lamp".into(),
        name: "Lamp".into(),
        price_cents: 1,
        blob: vec![],
    };
    commands
        .create_product(CreateProductRequest {
            product: Some(product),
        })
        .await
        .unwrap();
    let status = registry.status();
    assert_eq!(status["query"], State::Open);
    assert_eq!(status["command"], State::Closed);
}

/// Slow means slow to answer: a server stream that answers at once and
/// then streams for a while is not a slow call; a late answer is.
#[tokio::test]
async fn a_long_server_stream_is_not_a_slow_call() {
    let server = TestServer::start().await;
    let config = BreakerConfig::default().with_failure_rate(grpc_circuit_breaker::FailureRate {
        window: 3,
        minimum_calls: 3,
        failure_rate: 100.0,
        slow_call_duration: Some(Duration::from_millis(150)),
        slow_call_rate: 100.0,
    });
    let registry = BreakerRegistry::with_default_config(config).unwrap();
    let mut client = QueryServiceClient::new(breaker_channel(&server, &registry));
    let list = || ListProductsRequest {
        limit: 5,
        interval_ms: 60,
    };
    for _ in 0..3 {
        let start = Instant::now();
        let mut stream = client.list_products(list()).await.unwrap().into_inner();
        let mut received = 0;
        while stream.message().await.unwrap().is_some() {
            received += 1;
        }
        assert_eq!(received, 5);
        assert!(
            start.elapsed() >= Duration::from_millis(200),
            "a long stream"
        );
    }
    assert_eq!(registry.state("query"), Some(State::Closed));

    server
        .faults
        .always(
            "ListProducts",
            Fault::pass().with_delay(Duration::from_millis(200)),
        )
        .unwrap();
    for _ in 0..3 {
        let mut stream = client.list_products(list()).await.unwrap().into_inner();
        while stream.message().await.unwrap().is_some() {}
    }
    assert_eq!(registry.state("query"), Some(State::Open));
}
