//! grpc-idempotency end to end: the whole client stack (timeout, retry with
//! idempotency keys, breaker) against real servers whose Command service is
//! behind the layer, with the fault layer losing responses; one server with
//! the in-memory store, and two replicas sharing a real Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, Product};
use grpc_circuit_breaker::{BreakerRegistry, CircuitBreakerLayer};
use grpc_fault::Fault;
use grpc_idempotency::{
    Claim, Entry, Fingerprint, IdempotencyLayer, OnStoreError, Record, RedisStore, Store,
};
use grpc_resilience_tests::{RedisServer, TestServer};
use grpc_retry::{IDEMPOTENCY_KEY, Jitter, RetryLayer, RetryPolicies, RetryPolicy};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tonic::transport::Channel;
use tower::ServiceBuilder;
use tower::util::BoxCloneService;

type Stack = BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    grpc_resilience_core::BoxError,
>;

fn fast() -> RetryPolicy {
    RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_millis(50))
        .with_jitter(Jitter::None)
}

/// The README's stack: deadline, retries (`CreateProduct` retried only
/// with its idempotency key), a breaker per service.
fn client_stack<S>(transport: S) -> Stack
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = grpc_resilience_core::BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let timeouts = TimeoutPolicy::new(Duration::from_secs(5)).unwrap();
    let retries = RetryPolicies::new(fast())
        .unwrap()
        .with_operation(
            "CreateProduct",
            fast().non_idempotent().with_idempotency_keys(),
        )
        .unwrap();
    let stack = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts))
        .layer(RetryLayer::new(retries))
        .layer(CircuitBreakerLayer::new(BreakerRegistry::new()))
        .service(transport);
    BoxCloneService::new(tower::ServiceExt::map_response(
        tower::ServiceExt::map_err(stack, Into::into),
        |r: http::Response<_>| r.map(tonic::body::Body::new),
    ))
}

fn channel_transport(channel: Channel) -> Stack {
    BoxCloneService::new(tower::ServiceExt::map_err(channel, Into::into))
}

fn create(id: &str) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product {
            id: id.into(),
            name: "Lamp".into(),
            price_cents: 4_200,
            blob: Vec::new(),
        }),
    }
}

#[tokio::test]
async fn a_lost_create_is_retried_with_its_key_and_runs_once() {
    let server = TestServer::start().await;
    server
        .faults
        .script("CreateProduct", [Fault::lose_response()])
        .unwrap();
    let mut client = CommandServiceClient::new(client_stack(channel_transport(server.channel())));
    let created = client.create_product(create("lamp")).await.unwrap();
    assert!(
        created.metadata().get("idempotent-replayed").is_some(),
        "the retry got the recorded response"
    );
    assert_eq!(created.into_inner().product.unwrap().id, "lamp");
    let attempts = server.faults.calls_to("CreateProduct").unwrap();
    assert_eq!(attempts.len(), 2, "the lost response was retried");
    assert_eq!(
        attempts[0].headers[IDEMPOTENCY_KEY],
        attempts[1].headers[IDEMPOTENCY_KEY]
    );
    let stats = server.catalog.stats();
    assert_eq!(
        (stats.writes, stats.deduplicated),
        (1, 1),
        "the handler ran once"
    );
    assert_eq!(server.catalog.len(), 6);
}

#[tokio::test]
async fn a_key_reused_for_another_product_is_failed_precondition_end_to_end() {
    let server = TestServer::start().await;
    let mut client = CommandServiceClient::new(server.channel());
    let mut first = tonic::Request::new(create("a"));
    first
        .metadata_mut()
        .insert("idempotency-key", "same".parse().unwrap());
    client.create_product(first).await.unwrap();
    let mut second = tonic::Request::new(create("b"));
    second
        .metadata_mut()
        .insert("idempotency-key", "same".parse().unwrap());
    let status = client.create_product(second).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("`same`"), "{}", status.message());
    assert_eq!(server.catalog.stats().writes, 1);
}

#[tokio::test]
async fn the_layer_wraps_a_whole_router_with_server_builder_layer() {
    let catalog = catalog_proto::InMemoryCatalog::with_products(5);
    let layer = IdempotencyLayer::new(["CreateProduct"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(layer.clone())
        .add_service(catalog.query_service())
        .add_service(catalog.command_service_without_idempotency())
        .serve_with_incoming(tokio_stream_incoming(listener));
    let served = tokio::spawn(server);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let mut commands = CommandServiceClient::new(channel.clone());
    for _ in 0..3 {
        let mut request = tonic::Request::new(create("lamp"));
        request
            .metadata_mut()
            .insert("idempotency-key", "k".parse().unwrap());
        let created = commands.create_product(request).await.unwrap();
        assert_eq!(created.into_inner().product.unwrap().id, "lamp");
    }
    let mut queries = QueryServiceClient::new(channel);
    for _ in 0..2 {
        let mut request = tonic::Request::new(GetProductRequest { id: "p1".into() });
        request
            .metadata_mut()
            .insert("idempotency-key", "k".parse().unwrap());
        queries.get_product(request).await.unwrap();
    }
    assert_eq!(catalog.stats().writes, 1);
    let stats = layer.stats();
    assert_eq!(
        (stats.misses, stats.hits, stats.conflicts),
        (1, 2, 0),
        "reads untouched"
    );
    served.abort();
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

/// Sends call n to replica n mod 2: a retry lands on the other replica.
#[derive(Clone)]
struct Alternate {
    replicas: [Channel; 2],
    next: Arc<AtomicUsize>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Alternate {
    type Response = http::Response<tonic::body::Body>;
    type Error = grpc_resilience_core::BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let mut channel = self.replicas[n % 2].clone();
        Box::pin(async move {
            let ready = tower::ServiceExt::ready(&mut channel).await?;
            Ok(tower::Service::call(ready, request).await?)
        })
    }
}

async fn redis_layer(redis: &RedisServer) -> IdempotencyLayer<RedisStore> {
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    IdempotencyLayer::new(["catalog.v1.CommandService/CreateProduct"])
        .unwrap()
        .with_store(store)
        .with_store_timeout(Duration::from_millis(500))
        .unwrap()
}

#[tokio::test]
async fn two_replicas_sharing_redis_run_a_retried_create_once() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let layer_a = redis_layer(&redis).await;
    let layer_b = redis_layer(&redis).await;
    let a = TestServer::start_with(&layer_a).await;
    let b = TestServer::start_with(&layer_b).await;
    a.faults
        .script("CreateProduct", [Fault::lose_response()])
        .unwrap();
    let transport = Alternate {
        replicas: [a.channel(), b.channel()],
        next: Arc::default(),
    };
    let mut client = CommandServiceClient::new(client_stack(BoxCloneService::new(transport)));
    let created = client.create_product(create("lamp")).await.unwrap();
    assert!(created.metadata().get("idempotent-replayed").is_some());
    assert_eq!(created.into_inner().product.unwrap().id, "lamp");
    assert_eq!(a.faults.stats("CreateProduct").unwrap().calls, 1);
    assert_eq!(
        b.faults.stats("CreateProduct").unwrap().calls,
        1,
        "the retry went to B"
    );
    assert_eq!(
        (a.catalog.stats().writes, b.catalog.stats().writes),
        (1, 0),
        "the handler ran once, on A"
    );
    assert_eq!((layer_a.stats().misses, layer_b.stats().hits), (1, 1));

    // A fresh key runs on whichever replica gets it, once.
    client.create_product(create("desk")).await.unwrap();
    assert_eq!(a.catalog.stats().writes + b.catalog.stats().writes, 2);
}

#[tokio::test]
async fn redis_down_mid_run_fails_closed_then_recovers() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let layer = redis_layer(&redis).await;
    let server = TestServer::start_with(&layer).await;
    let mut commands = CommandServiceClient::new(server.channel());
    let keyed = |id: &str, key: &str| {
        let mut request = tonic::Request::new(create(id));
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    commands.create_product(keyed("a", "k1")).await.unwrap();

    redis.stop();
    let status = commands.create_product(keyed("b", "k2")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = commands.create_product(keyed("a", "k1")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        server.catalog.stats().writes,
        1,
        "no write ran without dedup"
    );
    assert!(layer.stats().store_errors >= 2);
    // Reads and unkeyed calls do not touch the store.
    let mut queries = QueryServiceClient::new(server.channel());
    queries
        .get_product(GetProductRequest { id: "p1".into() })
        .await
        .unwrap();

    redis.restart().await;
    let mut recovered = false;
    for attempt in 0..50 {
        match commands
            .create_product(keyed("b", &format!("k3-{attempt}")))
            .await
        {
            Ok(_) => {
                recovered = true;
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(recovered, "the store works again once Redis is back");
    assert_eq!(server.catalog.stats().writes, 2);
}

#[tokio::test]
async fn redis_down_mid_run_runs_unprotected_when_configured() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let layer = redis_layer(&redis)
        .await
        .with_store_failure(OnStoreError::RunUnprotected);
    let server = TestServer::start_with(&layer).await;
    let mut commands = CommandServiceClient::new(server.channel());
    let keyed = |id: &str| {
        let mut request = tonic::Request::new(create(id));
        request
            .metadata_mut()
            .insert("idempotency-key", "k".parse().unwrap());
        request
    };
    commands.create_product(keyed("a")).await.unwrap();
    redis.stop();
    commands.create_product(keyed("b")).await.unwrap();
    assert_eq!(
        server.catalog.stats().writes,
        2,
        "the write ran, undeduplicated"
    );
    let stats = layer.stats();
    assert_eq!(stats.unprotected, 1);
    assert!(stats.store_errors >= 1);
}

#[tokio::test]
async fn a_frozen_redis_times_out_and_fails_closed() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let layer = redis_layer(&redis).await;
    let server = TestServer::start_with(&layer).await;
    let mut commands = CommandServiceClient::new(server.channel());
    let keyed = |id: &str, key: &str| {
        let mut request = tonic::Request::new(create(id));
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        request
    };
    commands.create_product(keyed("a", "k1")).await.unwrap();
    redis.pause();
    let started = tokio::time::Instant::now();
    let status = commands.create_product(keyed("b", "k2")).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        took < Duration::from_secs(3),
        "bounded by the store timeout: {took:?}"
    );
    assert_eq!(server.catalog.stats().writes, 1);
    redis.resume();
    let mut recovered = false;
    for attempt in 0..50 {
        if commands
            .create_product(keyed("c", &format!("k3-{attempt}")))
            .await
            .is_ok()
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the store answers again once Redis thaws");
    // The claim of k2 that timed out reached Redis after the thaw; it must
    // not hold k2 until its lease ends: the caller's retry runs now.
    let retried = commands.create_product(keyed("b", "k2")).await;
    assert!(retried.is_ok(), "{retried:?}");
    assert_eq!(server.catalog.stats().writes, 3);
}

fn record(fingerprint: Fingerprint) -> Record {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    Record::new(
        fingerprint,
        http::StatusCode::OK,
        http::HeaderMap::new(),
        bytes::Bytes::from_static(b"\0\0\0\0\x01x"),
        Some(trailers),
    )
}

#[tokio::test]
async fn the_redis_store_claims_atomically_records_and_expires() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let store = RedisStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix("test:");
    let fp = Fingerprint::of("/a.B/C", b"x");
    // 100 concurrent claims of one key: exactly one wins.
    let claims: Vec<_> = (0..100)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.claim("k", fp, Duration::from_secs(10)).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for claim in claims {
        match claim.await.unwrap().unwrap() {
            Claim::Claimed(token) => tokens.push(token),
            Claim::Existing(entry) => {
                assert_eq!(entry, Entry::InProgress { fingerprint: fp })
            }
        }
    }
    assert_eq!(tokens.len(), 1);
    let token = tokens[0];
    assert!(
        store
            .complete("k", token, record(fp), Duration::from_secs(10))
            .await
            .unwrap()
    );
    match store.fetch("k").await.unwrap() {
        Some(Entry::Completed(got)) => assert_eq!(*got, record(fp)),
        other => panic!("{other:?}"),
    }

    // A stale token neither completes nor releases; the owner releases.
    let Claim::Claimed(owner) = store.claim("r", fp, Duration::from_secs(10)).await.unwrap() else {
        panic!("a free key");
    };
    store.release("r", token).await.unwrap();
    assert!(store.fetch("r").await.unwrap().is_some());
    assert!(
        !store
            .complete("r", token, record(fp), Duration::from_secs(10))
            .await
            .unwrap()
    );
    store.release("r", owner).await.unwrap();
    assert_eq!(store.fetch("r").await.unwrap(), None);

    // Leases and records expire in Redis itself.
    let Claim::Claimed(_) = store
        .claim("e", fp, Duration::from_millis(50))
        .await
        .unwrap()
    else {
        panic!("a free key");
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.fetch("e").await.unwrap(), None);
    assert!(matches!(
        store.claim("e", fp, Duration::from_secs(1)).await.unwrap(),
        Claim::Claimed(_)
    ));
}
