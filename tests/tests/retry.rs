//! RetryLayer through real generated stubs against a real server.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, ListProductsRequest, Product};
use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, State};
use grpc_fault::{Fault, ResetReason, body_digest};
use grpc_resilience_core::timeout_header;
use grpc_resilience_tests::TestServer;
use grpc_retry::{IDEMPOTENCY_KEY, Jitter, Retry, RetryLayer, RetryPolicies, RetryPolicy};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;

fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(50))
        .with_jitter(Jitter::None)
}

fn retrying(server: &TestServer, policies: RetryPolicies) -> Retry<Channel> {
    ServiceBuilder::new()
        .layer(RetryLayer::new(policies))
        .service(server.channel())
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn product(id: &str, blob: usize) -> Product {
    Product {
        id: id.into(),
        name: "Lamp".into(),
        price_cents: 4_200,
        blob: vec![7; blob],
    }
}

fn create(id: &str) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(product(id, 0)),
    }
}

#[tokio::test]
async fn unavailable_twice_then_ok_succeeds_on_the_third_attempt() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [
                Fault::status(Code::Unavailable),
                Fault::status(Code::Unavailable),
            ],
        )
        .unwrap();
    let mut client =
        QueryServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    let product = client.get_product(get()).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    let stats = server.faults.stats("GetProduct").unwrap();
    assert_eq!((stats.calls, stats.handler_runs), (3, 1));
    let attempts: Vec<Option<String>> = server
        .faults
        .calls()
        .iter()
        .map(|c| {
            c.headers
                .get("grpc-previous-rpc-attempts")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(attempts, [None, Some("1".into()), Some("2".into())]);
}

#[tokio::test]
async fn committed_failures_and_not_found_are_not_retried() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [Fault::status_after_messages(0, Code::Unavailable)],
        )
        .unwrap();
    let mut client =
        QueryServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    let status = client.get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        1,
        "committed: one attempt"
    );

    let status = client
        .get_product(GetProductRequest {
            id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        2,
        "NOT_FOUND: one attempt"
    );
}

#[tokio::test]
async fn server_streams_are_retried_before_their_headers() {
    let server = TestServer::start().await;
    server
        .faults
        .script("ListProducts", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut client =
        QueryServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    let mut stream = client
        .list_products(ListProductsRequest {
            limit: 5,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(p) = stream.message().await.unwrap() {
        ids.push(p.id);
    }
    assert_eq!(ids, ["p1", "p2", "p3", "p4", "p5"]);
    assert_eq!(server.faults.stats("ListProducts").unwrap().calls, 2);
}

#[tokio::test]
async fn client_streams_are_replayed_byte_for_byte() {
    let server = TestServer::start().await;
    // The handler reads the whole body, then the response is lost.
    server
        .faults
        .script("ImportProducts", [Fault::lose_response()])
        .unwrap();
    let mut client =
        CommandServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    let products: Vec<Product> = (0..8).map(|i| product(&format!("bulk{i}"), 4096)).collect();
    let response = client
        .import_products(tonic::codegen::tokio_stream::iter(products))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.imported, response.blob_bytes), (8, 8 * 4096));
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.handler_ran));
    assert!(calls[0].bytes_received > 8 * 4096);
    assert_eq!(calls[0].bytes_received, calls[1].bytes_received);
    assert_eq!(
        calls[0].body_digest, calls[1].body_digest,
        "the replay is byte-identical"
    );
    assert_ne!(calls[0].body_digest, body_digest(b""));
}

#[tokio::test]
async fn a_body_over_the_cap_is_sent_once_and_whole() {
    let server = TestServer::start().await;
    server
        .faults
        .script("ImportProducts", [Fault::lose_response()])
        .unwrap();
    let layer = RetryLayer::new(RetryPolicies::new(fast()).unwrap())
        .with_buffer_limits(1024, 1 << 20)
        .unwrap();
    let mut client =
        CommandServiceClient::new(ServiceBuilder::new().layer(layer).service(server.channel()));
    let products: Vec<Product> = (0..8).map(|i| product(&format!("big{i}"), 4096)).collect();
    let status = client
        .import_products(tonic::codegen::tokio_stream::iter(products))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let calls = server.faults.calls_to("ImportProducts").unwrap();
    assert_eq!(calls.len(), 1, "over the cap: no retry");
    assert_eq!(
        server.catalog.stats().imported_bytes,
        8 * 4096,
        "every byte arrived"
    );
}

#[tokio::test]
async fn a_lost_write_is_not_repeated() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::lose_response()])
        .unwrap();
    let policies = RetryPolicies::new(fast())
        .unwrap()
        .with_operation("CreateProduct", fast().non_idempotent())
        .unwrap();
    let mut client = CommandServiceClient::new(retrying(&server, policies));
    let status = client.create_product(create("lamp")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.faults.stats("CreateProduct").unwrap().handler_runs,
        1
    );
    assert_eq!(server.catalog.stats().writes, 1);
}

#[tokio::test]
async fn idempotency_keys_let_a_lost_write_be_retried_once_in_effect() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::lose_response()])
        .unwrap();
    let policies = RetryPolicies::new(fast())
        .unwrap()
        .with_operation(
            "CreateProduct",
            fast().non_idempotent().with_idempotency_keys(),
        )
        .unwrap();
    let mut client = CommandServiceClient::new(retrying(&server, policies));
    let created = client
        .create_product(create("lamp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.product.unwrap().id, "lamp");
    let calls = server.faults.calls_to("CreateProduct").unwrap();
    assert_eq!(calls.len(), 2);
    let keys: Vec<_> = calls
        .iter()
        .map(|c| c.headers[IDEMPOTENCY_KEY].clone())
        .collect();
    assert_eq!(keys[0], keys[1], "the same key on every attempt");
    let stats = server.catalog.stats();
    assert_eq!(
        (stats.writes, stats.deduplicated),
        (1, 1),
        "the server wrote once"
    );
}

#[tokio::test]
async fn a_refused_stream_is_retried_even_for_a_write() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::reset(ResetReason::RefusedStream)])
        .unwrap();
    let policies = RetryPolicies::new(fast())
        .unwrap()
        .with_operation("CreateProduct", fast().non_idempotent())
        .unwrap();
    let mut client = CommandServiceClient::new(retrying(&server, policies));
    client.create_product(create("lamp")).await.unwrap();
    assert_eq!(server.faults.stats("CreateProduct").unwrap().calls, 2);
    assert_eq!(server.catalog.stats().writes, 1);
}

#[tokio::test]
async fn the_call_deadline_covers_every_attempt() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::status(Code::Unavailable).with_pushback(Duration::from_millis(300)),
        )
        .unwrap();
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_millis(800)).unwrap(),
        ))
        .layer(RetryLayer::new(
            RetryPolicies::new(fast().with_max_attempts(10)).unwrap(),
        ))
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    let status = client.get_product(get()).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the server's last answer: {status:?}"
    );
    // Attempts at 0, 300 and 600 ms; the next would start past 800 ms. (A
    // slow machine may delay attempt 2 so much that attempt 3 no longer
    // fits: then there are two.)
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert!((2..=3).contains(&calls.len()), "{} attempts", calls.len());
    let timeouts: Vec<Duration> = calls
        .iter()
        .map(|c| timeout_header::decode(c.headers["grpc-timeout"].as_bytes()).unwrap())
        .collect();
    for (i, t) in timeouts.iter().enumerate() {
        // Each attempt gets what is left after the pushbacks before it.
        let most = Duration::from_millis(800 - 300 * i as u64);
        assert!(
            *t <= most,
            "attempt {}: {t:?} > {most:?} ({timeouts:?})",
            i + 1
        );
    }
}

#[tokio::test]
async fn an_open_breaker_below_is_not_retried() {
    let server = TestServer::start().await;
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let registry = BreakerRegistry::with_default_config(
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    let channel = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicies::new(fast()).unwrap()))
        .layer(CircuitBreakerLayer::new(registry.clone()))
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    let status = client.get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("circuit breaker `query`"),
        "{status:?}"
    );
    assert_eq!(registry.state("query"), Some(State::Open));
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        2,
        "the third attempt was rejected, not sent"
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried_even_for_a_write_and_reads_unavailable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    // A port with nothing listening: every attempt's connection is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    // Count the attempts that reach the channel.
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let policies = RetryPolicies::none()
        .with_operation("CreateProduct", fast().non_idempotent())
        .unwrap();
    let channel = ServiceBuilder::new()
        .layer(RetryLayer::new(policies))
        .map_request(move |r: http::Request<tonic::body::Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            r
        })
        .service(channel);
    let mut client = CommandServiceClient::new(channel);
    let status = client.create_product(create("lamp")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "never sent, so retried although a write"
    );
}

#[tokio::test]
async fn a_per_attempt_timeout_below_the_retry_layer_lets_the_next_attempt_run() {
    let server = TestServer::start().await;
    // The first attempt hangs; the second answers at once.
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_secs(30))],
        )
        .unwrap();
    let per_attempt = TimeoutPolicy::new(Duration::from_millis(200)).unwrap();
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(5)).unwrap(),
        ))
        .layer(RetryLayer::new(RetryPolicies::new(fast()).unwrap()))
        .layer(TimeoutLayer::new(per_attempt).per_attempt())
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    let start = tokio::time::Instant::now();
    let product = client.get_product(get()).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[0].cancelled,
        "the hung attempt was cancelled at its 200 ms"
    );
}

#[tokio::test]
async fn an_early_answer_to_a_client_stream_still_replays_every_message() {
    let server = TestServer::start().await;
    // The first attempt is refused at once, while the client is still
    // streaming; the retry must replay what was sent and read on.
    server
        .faults
        .script("ImportProducts", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut client =
        CommandServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for i in 0..8 {
            tokio::time::sleep(Duration::from_millis(15)).await;
            if tx.send(product(&format!("slow{i}"), 1024)).await.is_err() {
                return;
            }
        }
    });
    let stream = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let response = tokio::time::timeout(Duration::from_secs(10), client.import_products(stream))
        .await
        .expect("no hang")
        .unwrap()
        .into_inner();
    assert_eq!(
        (response.imported, response.blob_bytes),
        (8, 8 * 1024),
        "nothing lost, nothing doubled"
    );
    assert_eq!(server.faults.stats("ImportProducts").unwrap().calls, 2);
}

#[tokio::test]
async fn every_attempt_carries_the_headers_the_stub_sent_and_no_others() {
    // Without the layer: what a stub sends.
    let server = TestServer::start().await;
    let mut bare = QueryServiceClient::new(server.channel());
    bare.get_product(get()).await.unwrap();
    let sent = server.header_names();
    assert_eq!(sent.len(), 1);
    assert!(
        !sent[0].iter().any(|n| n == "content-length"),
        "a stub's request has no content-length: {sent:?}"
    );

    // Through the layer, first attempt and retry alike. A replayed body
    // that claimed an exact size made hyper add `content-length`: bytes and
    // allocations on both ends that the caller never asked for.
    let server = TestServer::start().await;
    server
        .faults
        .script("GetProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut client =
        QueryServiceClient::new(retrying(&server, RetryPolicies::new(fast()).unwrap()));
    client.get_product(get()).await.unwrap();
    let mut retried = sent[0].clone();
    retried.push("grpc-previous-rpc-attempts".to_owned());
    retried.sort();
    assert_eq!(server.header_names(), [sent[0].clone(), retried]);
}
