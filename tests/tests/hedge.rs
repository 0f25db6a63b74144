//! Hedging (gRFC A6 `hedgingPolicy`) through real generated stubs against a
//! real server.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, Product};
use grpc_fault::{Fault, body_digest};
use grpc_resilience_core::CodeSet;
use grpc_resilience_tests::{TestServer, eventually};
use grpc_retry::{HedgingPolicy, Retry, RetryLayer, RetryPolicies};
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;

fn hedged(server: &TestServer, selector: &str, policy: HedgingPolicy) -> Retry<Channel> {
    let policies = RetryPolicies::none()
        .with_hedging(selector, policy)
        .unwrap();
    ServiceBuilder::new()
        .layer(RetryLayer::new(policies))
        .service(server.channel())
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn hedge_number(call: &grpc_fault::RecordedCall) -> Option<u32> {
    call.headers
        .get("grpc-previous-rpc-attempts")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

#[tokio::test]
async fn hedging_cuts_a_heavy_tail_to_near_the_hedging_delay() {
    let server = TestServer::start().await;
    // 5% of calls take 500 ms; the rest answer at once.
    server
        .faults
        .random(
            "GetProduct",
            7,
            [(0.05, Fault::pass().with_delay(Duration::from_millis(500)))],
        )
        .unwrap();
    let delay = Duration::from_millis(30);
    let mut client = QueryServiceClient::new(hedged(
        &server,
        "GetProduct",
        HedgingPolicy::default()
            .with_max_attempts(3)
            .with_hedging_delay(delay),
    ));
    client.get_product(get()).await.unwrap(); // connect
    server.faults.reset_stats();
    const CALLS: usize = 200;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let t = Instant::now();
        let product = client.get_product(get()).await.unwrap().into_inner();
        assert_eq!(product.id, "p1");
        latencies.push(t.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bounded in time"
        );
    }
    latencies.sort();
    let p50 = latencies[CALLS / 2];
    let p99 = latencies[CALLS * 99 / 100];
    let calls = server.faults.calls_to("GetProduct").unwrap();
    let hedges = calls.iter().filter(|c| hedge_number(c).is_some()).count();
    let extra = calls.len() as f64 / CALLS as f64 - 1.0;
    println!(
        "hedged: p50 {p50:?}, p99 {p99:?}, max {:?}; {} server calls for {CALLS} ({:.1}% extra load), {hedges} hedges",
        latencies[CALLS - 1],
        calls.len(),
        extra * 100.0
    );
    // The tail was there: slow first attempts were hedged.
    assert!(
        hedges >= 3,
        "only {hedges} hedges: the tail was not exercised"
    );
    // Without hedging p99 would be 500 ms; with it, near 30 ms + normal
    // latency (a generous margin for a loaded machine).
    assert!(p99 < Duration::from_millis(250), "p99 {p99:?}");
    // The extra load is about the share of slow calls (5%), bounded here.
    assert!(extra < 0.2, "extra load {:.1}%", extra * 100.0);
}

#[tokio::test]
async fn a_hedge_that_lost_is_seen_cancelled_by_the_server() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_secs(3))],
        )
        .unwrap();
    let mut client = QueryServiceClient::new(hedged(
        &server,
        "GetProduct",
        HedgingPolicy::default()
            .with_max_attempts(2)
            .with_hedging_delay(Duration::from_millis(50)),
    ));
    let start = Instant::now();
    let product = client.get_product(get()).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the hedge answered"
    );
    let cancelled = eventually(Duration::from_secs(5), || {
        server
            .faults
            .calls_to("GetProduct")
            .unwrap()
            .first()
            .is_some_and(|c| c.cancelled)
    })
    .await;
    assert!(cancelled, "the server saw the slow first attempt cancelled");
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(hedge_number(&calls[1]), Some(1));
    assert!(!calls[1].cancelled);
    assert!(server.faults.stats("GetProduct").unwrap().cancelled >= 1);
}

#[tokio::test]
async fn a_hedged_client_stream_sends_byte_identical_bodies() {
    let server = TestServer::start().await;
    // The first attempt reads the whole stream, then its answer is lost
    // (UNAVAILABLE, non-fatal); the hedge, started mid-stream, is read by
    // its handler a little later (so the first surely ends first) and
    // answers.
    server
        .faults
        .script(
            "ImportProducts",
            [
                Fault::lose_response(),
                Fault::pass().with_delay(Duration::from_millis(300)),
            ],
        )
        .unwrap();
    let mut client = CommandServiceClient::new(hedged(
        &server,
        "ImportProducts",
        HedgingPolicy::default()
            .with_max_attempts(2)
            .with_hedging_delay(Duration::from_millis(20))
            .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable])),
    ));
    let (tx, rx) = tokio::sync::mpsc::channel::<Product>(1);
    tokio::spawn(async move {
        for i in 0..8 {
            let product = Product {
                id: format!("bulk{i}"),
                name: "Lamp".into(),
                price_cents: 4_200,
                blob: vec![i as u8; 4096],
            };
            if tx.send(product).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let response = client.import_products(stream).await.unwrap().into_inner();
    assert_eq!((response.imported, response.blob_bytes), (8, 8 * 4096));
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    assert_eq!(calls.len(), 2, "the first attempt and one hedge");
    assert_eq!(hedge_number(&calls[1]), Some(1));
    assert!(calls.iter().all(|c| c.handler_ran));
    assert!(calls[0].bytes_received > 8 * 4096);
    assert_eq!(calls[0].bytes_received, calls[1].bytes_received);
    assert_eq!(
        calls[0].body_digest, calls[1].body_digest,
        "the hedge is byte-identical"
    );
    assert_ne!(calls[0].body_digest, body_digest(b""));
}
