//! RetryLayer and the call's deadline, through real generated stubs
//! against a real server.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience_tests::TestServer;
use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};
use tonic::Code;
use tower::ServiceBuilder;

fn get() -> tonic::Request<GetProductRequest> {
    tonic::Request::new(GetProductRequest { id: "p1".into() })
}

#[tokio::test]
async fn a_retry_abandoned_for_lack_of_time_keeps_the_servers_code_and_says_why() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::status(Code::ResourceExhausted).with_message("quota 100% used"),
        )
        .unwrap();
    // Attempt 1, a 100 ms backoff, attempt 2; the next backoff (200 ms) does
    // not fit in the 250 ms deadline.
    let policy = RetryPolicy::default()
        .with_jitter(Jitter::None)
        .with_max_attempts(5);
    let channel = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicies::new(policy).unwrap()))
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    let mut request = get();
    request.set_timeout(Duration::from_millis(250));
    let status = client.get_product(request).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().starts_with("quota 100% used"),
        "the server's message first: {status:?}"
    );
    assert!(
        status
            .message()
            .contains("retrying stopped: the deadline leaves no time"),
        "{status:?}"
    );
    assert!(
        status.message().contains("next backoff"),
        "names the backoff: {status:?}"
    );
    // A slow machine may spend the budget before attempt 2 is due.
    let calls = server.faults.stats("GetProduct").unwrap().calls;
    assert!((1..=2).contains(&calls), "{calls} attempts");
}

#[tokio::test]
async fn an_expired_deadline_is_never_sent() {
    let server = TestServer::start().await;
    let policies = RetryPolicies::new(RetryPolicy::default())
        .unwrap()
        .without_retry("ListProducts")
        .unwrap();
    let channel = ServiceBuilder::new()
        .layer(RetryLayer::new(policies))
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    let mut request = get();
    request.set_timeout(Duration::ZERO);
    let status = client.get_product(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // A method without a retry policy is not sent either.
    let mut request = tonic::Request::new(catalog_proto::ListProductsRequest {
        limit: 1,
        interval_ms: 0,
    });
    request.set_timeout(Duration::ZERO);
    let status = client.list_products(request).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        server.faults.stats("*").unwrap().calls,
        0,
        "the server saw no call"
    );
    // The same client still works with time to spare.
    let mut request = get();
    request.set_timeout(Duration::from_secs(5));
    assert_eq!(
        client.get_product(request).await.unwrap().into_inner().id,
        "p1"
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 1);
}
