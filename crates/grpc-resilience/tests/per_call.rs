//! Per-call control through generated stubs: a call's own retry policy,
//! idempotency and key.

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, Product};
use grpc_fault::Fault;
use grpc_resilience::{CallOptions, ResilienceConfig, ResilientChannel, RetryOverride};
use grpc_resilience_tests::TestServer;
use tonic::Code;

const CONFIG: &str = r#"
[retry.default]
max_attempts = 3
initial_delay = 5
max_delay = 20
[retry.operations.create_product]
idempotent = false
[circuit_breakers.query]
failure_threshold = 1000
[circuit_breakers.command]
failure_threshold = 1000
"#;

fn create() -> tonic::Request<CreateProductRequest> {
    tonic::Request::new(CreateProductRequest {
        product: Some(Product {
            id: "n1".into(),
            name: "new".into(),
            price_cents: 100,
            blob: vec![],
        }),
    })
}

fn get() -> tonic::Request<GetProductRequest> {
    tonic::Request::new(GetProductRequest { id: "p1".into() })
}

async fn setup() -> (TestServer, ResilientChannel<tonic::transport::Channel>) {
    let server = TestServer::start().await;
    let config = ResilienceConfig::from_toml(CONFIG).unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    (server, channel)
}

fn keys_sent(server: &TestServer, method: &str) -> Vec<Option<String>> {
    server
        .faults
        .calls_to(method)
        .unwrap()
        .iter()
        .map(|c| {
            c.headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned())
        })
        .collect()
}

#[tokio::test]
async fn a_callers_idempotency_key_on_a_write_is_permission_to_retry() {
    let (server, channel) = setup().await;
    let mut commands = CommandServiceClient::new(channel);

    // Without a key the write is not retried once the server saw it.
    server
        .faults
        .script("CreateProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let status = commands.create_product(create()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.faults.stats("CreateProduct").unwrap().calls, 1);

    // With the caller's key it is, and every attempt carries that key.
    server.faults.reset_stats();
    server
        .faults
        .script("CreateProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut request = create();
    request.idempotency_key("order-42").unwrap();
    commands.create_product(request).await.unwrap();
    assert_eq!(
        keys_sent(&server, "CreateProduct"),
        [Some("order-42".to_owned()), Some("order-42".to_owned())]
    );
}

#[tokio::test]
async fn a_call_marked_idempotent_is_retried_with_one_key_for_all_attempts() {
    let (server, channel) = setup().await;
    let mut commands = CommandServiceClient::new(channel);
    server
        .faults
        .script("CreateProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let mut request = create();
    request.idempotent(true);
    commands.create_product(request).await.unwrap();
    let keys = keys_sent(&server, "CreateProduct");
    assert_eq!(keys.len(), 2);
    assert!(keys[0].is_some());
    assert_eq!(keys[0], keys[1], "one key per logical call");
}

#[tokio::test]
async fn a_read_marked_non_idempotent_is_not_retried() {
    let (server, channel) = setup().await;
    let mut queries = QueryServiceClient::new(channel);
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let mut request = get();
    request.idempotent(false);
    assert_eq!(
        queries.get_product(request).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 1);
    // The next, unmarked call goes by the config: 3 attempts.
    queries.get_product(get()).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 1 + 3);
    assert_eq!(keys_sent(&server, "GetProduct"), vec![None; 4]);
}

#[tokio::test]
async fn a_call_overrides_its_retry_policy() {
    let (server, channel) = setup().await;
    let mut queries = QueryServiceClient::new(channel);
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let mut request = get();
    request.retry(RetryOverride::disabled());
    queries.get_product(request).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 1);
    let mut request = get();
    request.retry(RetryOverride::new().with_max_attempts(5));
    queries.get_product(request).await.unwrap_err();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 1 + 5);
}
