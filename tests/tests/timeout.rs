//! TimeoutLayer through real generated stubs against a real server.

use std::time::Duration;

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, ListProductsRequest};
use grpc_fault::Fault;
use grpc_resilience_core::timeout_header;
use grpc_resilience_tests::{TestServer, eventually};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tokio::time::Instant;
use tonic::Code;
use tower::ServiceBuilder;

fn seed_policy() -> TimeoutPolicy {
    TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
        .and_then(|p| p.with_operation("CreateProduct", Duration::from_secs(5)))
        .unwrap()
}

fn client(
    server: &TestServer,
    policy: TimeoutPolicy,
) -> QueryServiceClient<grpc_timeout::Timeout<tonic::transport::Channel>> {
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(policy))
        .service(server.channel());
    QueryServiceClient::new(channel)
}

/// The `grpc-timeout` the server received on its last `GetProduct` call.
fn received_timeout(server: &TestServer) -> Option<Duration> {
    let calls = server.faults.calls_to("GetProduct").unwrap();
    let value = calls.last()?.headers.get("grpc-timeout")?.clone();
    Some(timeout_header::decode(value.as_bytes()).expect("a well-formed grpc-timeout"))
}

fn get(id: &str, caller_timeout: Option<Duration>) -> tonic::Request<GetProductRequest> {
    let mut request = tonic::Request::new(GetProductRequest { id: id.into() });
    if let Some(t) = caller_timeout {
        request.set_timeout(t);
    }
    request
}

#[tokio::test]
async fn the_configured_timeout_reaches_the_server() {
    let server = TestServer::start().await;
    let mut client = client(&server, seed_policy());
    let product = client
        .get_product(get("p1", None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(product.id, "p1");
    assert_eq!(received_timeout(&server), Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn a_shorter_caller_deadline_reaches_the_server() {
    let server = TestServer::start().await;
    let mut client = client(&server, seed_policy());
    client
        .get_product(get("p1", Some(Duration::from_secs(1))))
        .await
        .unwrap();
    let sent = received_timeout(&server).unwrap();
    assert!(
        sent <= Duration::from_secs(1) && sent > Duration::from_millis(500),
        "{sent:?}"
    );
}

#[tokio::test]
async fn a_longer_caller_deadline_is_cut_to_the_configured_one() {
    let server = TestServer::start().await;
    let mut client = client(&server, seed_policy());
    client
        .get_product(get("p1", Some(Duration::from_secs(60))))
        .await
        .unwrap();
    assert_eq!(received_timeout(&server), Some(Duration::from_secs(3)));
}

#[tokio::test]
async fn a_slow_server_gets_deadline_exceeded_at_the_configured_time() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let policy = TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("GetProduct", Duration::from_millis(300)))
        .unwrap();
    let mut client = client(&server, policy);

    let start = Instant::now();
    let status = client.get_product(get("p1", None)).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("GetProduct"), "{status:?}");
    // Generous margins: the point is "at the deadline, not at 30 s".
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // The server saw the call go away.
    assert!(
        eventually(Duration::from_secs(5), || server
            .faults
            .stats("GetProduct")
            .unwrap()
            .cancelled
            == 1)
        .await,
        "the server should see the call cancelled"
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().handler_runs, 0);
}

#[tokio::test]
async fn a_long_server_stream_is_cut_at_the_deadline() {
    let server = TestServer::start().await;
    let policy = TimeoutPolicy::new(Duration::from_secs(5))
        .and_then(|p| p.with_operation("ListProducts", Duration::from_millis(400)))
        .unwrap();
    let mut client = client(&server, policy);

    let start = Instant::now();
    // 10,000 products, one every 10 ms: far longer than the deadline.
    let request = ListProductsRequest {
        limit: 10_000,
        interval_ms: 10,
    };
    let mut stream = client.list_products(request).await.unwrap().into_inner();
    let mut received = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the stream ended normally after {received} products"),
            Err(status) => break status,
        }
    };
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(received > 0, "some products arrive before the deadline");
    assert!(received < 10_000);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(10),
        "{took:?}"
    );
    drop(stream);
    assert!(
        eventually(Duration::from_secs(5), || server
            .catalog
            .stats()
            .streams_cancelled
            == 1)
        .await,
        "the server's stream should see the client go away"
    );
}

#[tokio::test]
async fn server_errors_keep_their_code() {
    let server = TestServer::start().await;
    let mut client = client(&server, seed_policy());
    let status = client.get_product(get("nope", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    server
        .faults
        .script("GetProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let status = client.get_product(get("p1", None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test]
async fn without_the_layer_a_slow_server_is_waited_for() {
    // The baseline the layer fixes: over a bare channel a caller deadline
    // is only sent, not enforced; the call ends when tonic's server-side
    // timeout answers, and then as CANCELLED, not DEADLINE_EXCEEDED.
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let mut client = QueryServiceClient::new(server.channel());
    let status = client
        .get_product(get("p1", Some(Duration::from_millis(200))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
}
