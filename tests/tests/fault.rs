//! The fault-injection layer seen from real generated stubs.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, ListProductsRequest, Product};
use grpc_fault::{Fault, ResetReason};
use grpc_resilience_tests::TestServer;
use tonic::Code;

fn get(id: &str) -> GetProductRequest {
    GetProductRequest { id: id.into() }
}

fn new_product(id: &str) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product {
            id: id.into(),
            name: "Lamp".into(),
            price_cents: 4_200,
            blob: vec![],
        }),
    }
}

#[tokio::test]
async fn a_scripted_status_reaches_the_stub_with_its_pushback() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [Fault::status(Code::Unavailable).with_pushback(Duration::from_millis(120))],
        )
        .unwrap();
    let mut client = QueryServiceClient::new(server.channel());
    let status = client.get_product(get("p1")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        status.metadata().get("grpc-retry-pushback-ms").unwrap(),
        "120"
    );
    assert_eq!(
        client.get_product(get("p1")).await.unwrap().into_inner().id,
        "p1"
    );
    let stats = server.faults.stats("GetProduct").unwrap();
    assert_eq!((stats.calls, stats.handler_runs), (2, 1));
}

#[tokio::test]
async fn a_committed_failure_arrives_after_messages() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "ListProducts",
            Fault::status_after_messages(2, Code::Internal),
        )
        .unwrap();
    let mut client = QueryServiceClient::new(server.channel());
    // Paced, so each product is its own message on the wire.
    let request = ListProductsRequest {
        limit: 5,
        interval_ms: 5,
    };
    let mut stream = client.list_products(request).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().id, "p1");
    assert_eq!(stream.message().await.unwrap().unwrap().id, "p2");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
}

#[tokio::test]
async fn a_lost_response_still_wrote() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::lose_response()])
        .unwrap();
    let mut client = CommandServiceClient::new(server.channel());
    let status = client
        .create_product(new_product("lamp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.catalog.stats().writes, 1, "the write happened");
    // A naive retry writes again and hits the duplicate.
    let status = client
        .create_product(new_product("lamp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
}

#[tokio::test]
async fn a_refused_stream_is_unavailable_and_never_ran() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::reset(ResetReason::RefusedStream)])
        .unwrap();
    let mut client = CommandServiceClient::new(server.channel());
    let status = client
        .create_product(new_product("lamp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(server.catalog.stats().writes, 0);
    assert_eq!(
        server.faults.stats("CreateProduct").unwrap().handler_runs,
        0
    );
    // The connection survives a stream reset.
    client.create_product(new_product("lamp")).await.unwrap();
}

#[tokio::test]
async fn a_dropped_connection_fails_the_call_and_the_channel_reconnects() {
    let server = TestServer::start().await;
    server
        .faults
        .script("GetProduct", [Fault::drop_connection()])
        .unwrap();
    let mut client = QueryServiceClient::new(server.channel());
    let status = client.get_product(get("p1")).await.unwrap_err();
    // A bare tonic channel reports a reset connection as UNKNOWN "transport
    // error" (the resilience layers report it as UNAVAILABLE).
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable),
        "{status:?}"
    );
    assert!(
        std::error::Error::source(&status).is_some(),
        "a transport error: {status:?}"
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().handler_runs, 0);
    // tonic's channel reconnects on the next call.
    let mut ok = false;
    for _ in 0..20 {
        if client.get_product(get("p1")).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the channel should reconnect after the drop");
}

#[tokio::test]
async fn client_streaming_bytes_are_counted() {
    let server = TestServer::start().await;
    let mut client = CommandServiceClient::new(server.channel());
    let products: Vec<Product> = (0..8)
        .map(|i| Product {
            id: format!("bulk{i}"),
            name: "Bulk".into(),
            price_cents: 1,
            blob: vec![i as u8; 4096],
        })
        .collect();
    let response = client
        .import_products(tokio_stream_iter(products))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.imported, response.blob_bytes), (8, 8 * 4096));
    let stats = server.faults.stats("ImportProducts").unwrap();
    // Framing and the other fields come on top of the blobs.
    assert!(stats.bytes_received > 8 * 4096, "{stats:?}");
    assert_eq!(
        server.faults.calls()[0].bytes_received,
        stats.bytes_received
    );
}

fn tokio_stream_iter(
    products: Vec<Product>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = Product> {
    tonic::codegen::tokio_stream::iter(products)
}

#[tokio::test]
async fn seeded_random_faults_repeat_through_the_network() {
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let server = TestServer::start().await;
        server
            .faults
            .random(
                "GetProduct",
                2024,
                [(0.3, Fault::status(Code::Unavailable))],
            )
            .unwrap();
        let mut client = QueryServiceClient::new(server.channel());
        let mut run = Vec::new();
        for _ in 0..40 {
            run.push(client.get_product(get("p1")).await.is_ok());
        }
        outcomes.push(run);
    }
    assert_eq!(outcomes[0], outcomes[1]);
    let failures = outcomes[0].iter().filter(|ok| !**ok).count();
    assert!((1..40).contains(&failures), "{failures}");
}
