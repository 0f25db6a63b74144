//! The layered channel works from spawned tasks on a multi-threaded
//! runtime: futures and bodies are `Send`, and the stubs' generic bounds
//! hold for the whole stack (a compile-time property this test pins down,
//! plus a real call).

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_resilience_tests::TestServer;
use grpc_retry::{RetryLayer, RetryPolicies, RetryPolicy};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tower::ServiceBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_stack_serves_spawned_tasks() {
    let server = TestServer::start().await;
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(5)).unwrap(),
        ))
        .layer(RetryLayer::new(
            RetryPolicies::new(RetryPolicy::default()).unwrap(),
        ))
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(server.channel());
    let client = QueryServiceClient::new(channel);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .get_product(GetProductRequest { id: "p1".into() })
                    .await
                    .map(|r| r.into_inner().id)
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), "p1");
    }
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 8);
}
