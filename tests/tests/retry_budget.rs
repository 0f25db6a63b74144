//! The retry budget through real generated stubs against a real server.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience_tests::TestServer;
use grpc_retry::{Jitter, Retry, RetryBudget, RetryLayer, RetryPolicies, RetryPolicy};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;

fn quick() -> RetryPolicy {
    RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(2))
        .with_jitter(Jitter::None)
}

fn budgeted(server: &TestServer, budget: RetryBudget) -> QueryServiceClient<Retry<Channel>> {
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(RetryLayer::new(RetryPolicies::new(quick()).unwrap()).with_budget(budget))
            .service(server.channel()),
    )
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

#[tokio::test]
async fn an_overloaded_server_gets_at_most_the_budgets_share_of_retries() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    // One retry per 10 calls, no minimum rate.
    let mut client = budgeted(
        &server,
        RetryBudget::new(Duration::from_secs(10), 0, 0.1).unwrap(),
    );
    for _ in 0..100 {
        let status = client.get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    let attempts = server.faults.stats("GetProduct").unwrap().calls;
    // 3 attempts per call without a budget: 300.
    assert!(
        (101..=110).contains(&attempts),
        "{attempts} server attempts for 100 calls"
    );
}

#[tokio::test]
async fn random_faults_are_retried_within_the_budget() {
    let server = TestServer::start().await;
    server
        .faults
        .random(
            "GetProduct",
            2026,
            [(0.3, Fault::status(Code::Unavailable))],
        )
        .unwrap();
    let mut client = budgeted(
        &server,
        RetryBudget::new(Duration::from_secs(10), 10, 0.5).unwrap(),
    );
    let mut ok = 0;
    for _ in 0..100 {
        if client.get_product(get()).await.is_ok() {
            ok += 1;
        }
    }
    let attempts = server.faults.stats("GetProduct").unwrap().calls;
    // About 30 first attempts fail; nearly all are retried (a retry fails
    // again 30% of the time, and is retried once more).
    assert!(
        ok >= 95,
        "{ok} of 100 calls succeeded ({attempts} attempts)"
    );
    assert!(
        attempts > 115,
        "the faults were retried: {attempts} attempts"
    );
}
