//! Deadlines at the edges, through real generated stubs: a call whose
//! deadline has passed is not sent, and a malformed `grpc-timeout` from
//! the caller is not forwarded.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_resilience_tests::TestServer;
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tower::ServiceBuilder;

fn client(
    server: &TestServer,
    policy: TimeoutPolicy,
) -> QueryServiceClient<grpc_timeout::Timeout<tonic::transport::Channel>> {
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(TimeoutLayer::new(policy))
            .service(server.channel()),
    )
}

fn get() -> tonic::Request<GetProductRequest> {
    tonic::Request::new(GetProductRequest { id: "p1".into() })
}

#[tokio::test]
async fn a_call_whose_deadline_has_passed_is_not_sent() {
    let server = TestServer::start().await;
    for policy in [
        TimeoutPolicy::empty(),
        TimeoutPolicy::new(Duration::from_secs(5)).unwrap(),
    ] {
        let mut client = client(&server, policy);
        // A caller with no time left (sent as grpc-timeout: 0n).
        let mut request = get();
        request.set_timeout(Duration::ZERO);
        let status = client.get_product(request).await.unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    // Give a call that did leave time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 0);
}

#[tokio::test]
async fn a_malformed_caller_timeout_is_not_forwarded() {
    let server = TestServer::start().await;
    let mut client = client(&server, TimeoutPolicy::empty());
    let mut request = get();
    request
        .metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    let product = client.get_product(request).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert_eq!(calls.len(), 1);
    assert!(
        calls[0].headers.get("grpc-timeout").is_none(),
        "{:?}",
        calls[0].headers
    );
}
