//! `Fault::early_status`: a server that answers a client stream at once and
//! reads the request on, without resetting the stream.

use std::time::Duration;

use catalog_proto::Product;
use catalog_proto::command_service_client::CommandServiceClient;
use grpc_fault::{Fault, body_digest};
use grpc_resilience_tests::{TestServer, eventually};
use prost::Message;
use tonic::Code;

fn product(i: usize) -> Product {
    Product {
        id: format!("early{i}"),
        name: "Lamp".into(),
        price_cents: 4_200,
        blob: vec![i as u8; 2048],
    }
}

/// The request body as gRPC frames it: a 5-byte prefix per message.
fn framed(products: &[Product]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in products {
        let message = p.encode_to_vec();
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
    }
    body
}

/// Streams `products` one at a time, 20 ms apart, so the answer comes first.
fn slow_stream(
    products: Vec<Product>,
) -> tonic::codegen::tokio_stream::wrappers::ReceiverStream<Product> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for p in products {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if tx.send(p).await.is_err() {
                return;
            }
        }
    });
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tokio::test]
async fn an_early_status_answers_at_once_and_reads_the_whole_request_on() {
    let server = TestServer::start().await;
    server
        .faults
        .script("ImportProducts", [Fault::early_status(Code::Unavailable)])
        .unwrap();
    let mut client = CommandServiceClient::new(server.channel());
    let products: Vec<Product> = (0..10).map(product).collect();
    let expected = framed(&products);
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        client.import_products(slow_stream(products)),
    )
    .await
    .expect("answered")
    .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].fault, "early_status");
    assert!(!calls[0].handler_ran);
    assert!(
        (calls[0].bytes_received as usize) < expected.len(),
        "the answer came before the body's end"
    );
    // The client goes on sending; the server reads every byte.
    let whole = eventually(Duration::from_secs(10), || {
        server.faults.calls_to("ImportProducts").unwrap()[0].bytes_received == expected.len() as u64
    })
    .await;
    let call = &server.faults.calls_to("ImportProducts").unwrap()[0];
    assert!(
        whole,
        "read {} of {} bytes",
        call.bytes_received,
        expected.len()
    );
    assert_eq!(call.body_digest, body_digest(&expected));
    assert_eq!(server.catalog.stats().imported_bytes, 0, "no handler ran");
}

#[tokio::test]
async fn a_plain_status_resets_the_stream_and_reads_nothing() {
    let server = TestServer::start().await;
    server
        .faults
        .script("ImportProducts", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut client = CommandServiceClient::new(server.channel());
    let products: Vec<Product> = (0..10).map(product).collect();
    let status = client
        .import_products(slow_stream(products))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    assert_eq!((calls[0].fault, calls[0].bytes_received), ("status", 0));
}
