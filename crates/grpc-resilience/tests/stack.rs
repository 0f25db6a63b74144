//! The facade's stack through real generated stubs against a real server
//! with injected faults.

use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, Product};
use grpc_circuit_breaker::State;
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilienceLayer, ResilientChannel};
use grpc_resilience_tests::TestServer;
use tokio::time::Instant;
use tonic::Code;
use tower::ServiceBuilder;

const CONFIG: &str = r#"
[retry.default]
max_attempts = 3
initial_delay = 10
max_delay = 50
[retry.operations.create_product]
idempotent = false
[circuit_breakers.query]
failure_threshold = 4
timeout = "60s"
[circuit_breakers.command]
[timeouts]
default = 5000
[timeouts.operations]
get_product = 300
"#;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn config() -> ResilienceConfig {
    ResilienceConfig::from_toml(CONFIG).unwrap()
}

#[tokio::test]
async fn retries_through_a_generated_stub_until_success() {
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
    let channel = ResilientChannel::new(server.channel(), &config()).unwrap();
    let mut client = QueryServiceClient::new(channel);
    let product = client.get_product(get()).await.unwrap().into_inner();
    assert_eq!(product.id, "p1");
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 3);
}

#[tokio::test]
async fn the_deadline_bounds_the_whole_call_retries_included() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(5)),
        )
        .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config()).unwrap();
    let mut client = QueryServiceClient::new(channel);
    let start = Instant::now();
    let status = client.get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let calls = server.faults.calls_to("GetProduct").unwrap();
    let sent = calls[0]
        .headers
        .get("grpc-timeout")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let sent = grpc_resilience_core::timeout_header::decode(sent.as_bytes()).unwrap();
    assert!(
        sent <= Duration::from_millis(300) && sent > Duration::from_millis(200),
        "{sent:?}"
    );
}

#[tokio::test]
async fn every_configured_breaker_is_listed_from_the_start_and_opens_per_service() {
    let server = TestServer::start().await;
    let channel = ResilientChannel::new(server.channel(), &config()).unwrap();
    let status = channel.circuit_breaker_status();
    assert_eq!(
        format!("{status:?}"),
        r#"{"command": Closed, "query": Closed}"#
    );
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let mut queries = QueryServiceClient::new(channel.clone());
    let mut commands = CommandServiceClient::new(channel.clone());
    // Two calls of up to 3 attempts: 6 failures reach the breaker, which
    // opens at the 4th; the 5th and 6th attempts are refused, not retried.
    for _ in 0..2 {
        let status = queries.get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
    assert_eq!(channel.registry().state("query"), Some(State::Open));
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 4);
    let status = queries.get_product(get()).await.unwrap_err();
    assert!(
        status.message().contains("circuit breaker `query` is open"),
        "{status:?}"
    );
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        4,
        "refused locally"
    );
    // The other service's breaker is untouched.
    commands
        .create_product(CreateProductRequest {
            product: Some(Product {
                id: "n1".into(),
                name: "new".into(),
                price_cents: 1,
                blob: vec![],
            }),
        })
        .await
        .unwrap();
    assert_eq!(channel.registry().state("command"), Some(State::Closed));
}

#[tokio::test]
async fn a_write_is_not_retried_after_the_server_saw_it() {
    let server = TestServer::start().await;
    server
        .faults
        .always("CreateProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config()).unwrap();
    let mut commands = CommandServiceClient::new(channel);
    let status = commands
        .create_product(CreateProductRequest { product: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(server.faults.stats("CreateProduct").unwrap().calls, 1);
}

#[tokio::test]
async fn the_layer_form_composes_with_service_builder() {
    let server = TestServer::start().await;
    server
        .faults
        .script("GetProduct", [Fault::status(Code::Internal)])
        .unwrap();
    let layer = ResilienceLayer::new(&config()).unwrap();
    let channel = ServiceBuilder::new()
        .concurrency_limit(8)
        .layer(layer.clone())
        .service(server.channel());
    let mut client = QueryServiceClient::new(channel);
    client.get_product(get()).await.unwrap();
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);
    assert_eq!(layer.circuit_breaker_status().len(), 2);
}

#[tokio::test]
async fn a_per_attempt_timeout_cuts_a_hung_attempt_and_the_retry_succeeds() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_secs(5))],
        )
        .unwrap();
    let config = ResilienceConfig::from_toml(
        &CONFIG.replace("default = 5000\n", "default = 5000\nper_attempt = 150\n"),
    )
    .unwrap();
    assert_eq!(
        config.timeouts().per_attempt(),
        Some(Duration::from_millis(150))
    );
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel);
    let start = Instant::now();
    client.get_product(get()).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);
}

#[tokio::test]
async fn a_grpc_service_config_drives_the_stack() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [
                Fault::status(Code::Unavailable),
                Fault::status(Code::Unavailable),
                Fault::status(Code::Unavailable),
            ],
        )
        .unwrap();
    let (config, warnings) = ResilienceConfig::from_grpc_service_config(
        r#"{
          "methodConfig": [{
            "name": [{"service": "catalog.v1.QueryService"}],
            "timeout": "2s",
            "retryPolicy": {
              "maxAttempts": 4, "initialBackoff": "0.01s", "maxBackoff": "0.05s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
            }
          }]
        }"#,
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel);
    client.get_product(get()).await.unwrap();
    let calls = server.faults.calls_to("GetProduct").unwrap();
    assert_eq!(calls.len(), 4, "3 failures and the success");
    let sent = calls[0].headers["grpc-timeout"].to_str().unwrap();
    let sent = grpc_resilience_core::timeout_header::decode(sent.as_bytes()).unwrap();
    assert!(
        sent <= Duration::from_secs(2) && sent > Duration::from_millis(1900),
        "{sent:?}"
    );
}

/// A stalled server: the call fails with DEADLINE_EXCEEDED at the
/// deadline, reported as the facade's own expiry (whichever of its timer
/// and the channel's `grpc-timeout` timer fires first), and the server
/// sees the call cancelled.
#[tokio::test]
async fn a_stalled_server_gets_deadline_exceeded_at_the_deadline() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let config = ResilienceConfig::from_toml(
        "[timeouts]\ndefault = 5000\n[timeouts.operations]\nget_product = 300\n",
    )
    .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel);
    let start = Instant::now();
    let status = client.get_product(get()).await.unwrap_err();
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("GetProduct") && status.message().contains("deadline"),
        "{status:?}"
    );
    // At the deadline (the header is rounded down by under a microsecond),
    // not at the server's 30 s.
    assert!(took >= Duration::from_millis(299), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(
        grpc_resilience_tests::eventually(Duration::from_secs(5), || server
            .faults
            .stats("GetProduct")
            .unwrap()
            .cancelled
            == 1)
        .await,
        "the server should see the call cancelled"
    );
}

/// A host that drops every packet: tonic's channel waits for the
/// connection before its own `grpc-timeout` timer starts (that timer sits
/// below its buffer, per connection), so the call's deadline must still be
/// kept by the facade's own timer.
#[tokio::test]
async fn a_connection_that_never_completes_still_fails_at_the_deadline() {
    let never = tower::service_fn(|_: http::Uri| {
        std::future::pending::<Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>, std::io::Error>>(
        )
    });
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
        .connect_with_connector_lazy(never);
    let config = ResilienceConfig::from_toml(
        "[timeouts]\ndefault = 5000\n[timeouts.operations]\nget_product = 300\n",
    )
    .unwrap();
    let mut client = QueryServiceClient::new(ResilientChannel::new(channel, &config).unwrap());
    let start = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), client.get_product(get()))
        .await
        .expect("the call must end at its deadline, not wait for the connection")
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(took >= Duration::from_millis(299), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn the_server_sees_the_stubs_headers_and_only_what_the_stack_adds_on_purpose() {
    // What a stub sends without the stack.
    let server = TestServer::start().await;
    let mut bare = QueryServiceClient::new(server.channel());
    bare.get_product(get()).await.unwrap();
    let sent = server.header_names().remove(0);

    // Through the facade: a first attempt that fails, and its retry. Each
    // carries the stub's headers plus the deadline; the retry also says
    // how many attempts came before. Nothing else (an exact body size made
    // hyper add `content-length` to every attempt once).
    let server = TestServer::start().await;
    server
        .faults
        .script("GetProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config()).unwrap();
    let mut client = QueryServiceClient::new(channel);
    client.get_product(get()).await.unwrap();
    let with = |extra: &[&str]| {
        let mut names = sent.clone();
        names.extend(extra.iter().map(|s| (*s).to_owned()));
        names.sort();
        names
    };
    // No tracing subscriber is installed here, and no `traceparent` was
    // seen: the expected lists do not name it.
    assert_eq!(
        server.header_names(),
        [
            with(&["grpc-timeout"]),
            with(&["grpc-previous-rpc-attempts", "grpc-timeout"]),
        ]
    );
}

/// The facade's config, with a per-attempt timeout or without: the
/// answer's one body wrapper is made with the attempt's deadline or with
/// none, and gets the call's deadline added either way.
fn configs() -> [(&'static str, ResilienceConfig); 2] {
    let per_attempt = CONFIG.replace(
        "[timeouts]\ndefault = 5000\n",
        "[timeouts]\ndefault = 5000\nper_attempt = 2000\n",
    );
    assert_ne!(per_attempt, CONFIG);
    [
        ("no per-attempt timeout", config()),
        (
            "per-attempt timeout",
            ResilienceConfig::from_toml(&per_attempt).unwrap(),
        ),
    ]
}

/// Runs `call` in its own task, so that a panic is seen as one.
async fn no_panic<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(call).await {
        Ok(value) => value,
        Err(err) => panic!("the caller's task panicked: {err}"),
    }
}

fn list() -> catalog_proto::ListProductsRequest {
    catalog_proto::ListProductsRequest {
        limit: 3,
        interval_ms: 5,
    }
}

// The facade's response has one body wrapper, the answering attempt's,
// with the call's reports added to it: a hostile peer's undecodable status
// details (tonic panics on them) and its stream resets must still come out
// as statuses, in the head, in the trailers and mid-stream.
#[tokio::test]
async fn invalid_details_cannot_panic_a_caller_of_the_facade() {
    let server = TestServer::start().await;
    for (what, config) in configs() {
        server
            .faults
            .always(
                "GetProduct",
                Fault::status(Code::NotFound).with_raw_details("not base64!"),
            )
            .unwrap();
        let mut client =
            QueryServiceClient::new(ResilientChannel::new(server.channel(), &config).unwrap());
        let status = no_panic(async move { client.get_product(get()).await })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::NotFound,
            "{what}, Trailers-Only: {status:?}"
        );

        server
            .faults
            .always(
                "*",
                Fault::status_after_messages(1, Code::DataLoss).with_raw_details("not base64!"),
            )
            .unwrap();
        let mut client =
            QueryServiceClient::new(ResilientChannel::new(server.channel(), &config).unwrap());
        let status = no_panic(async move {
            let mut stream = client.list_products(list()).await?.into_inner();
            assert_eq!(stream.message().await?.unwrap().id, "p1");
            stream.message().await.map(|_| ())
        })
        .await
        .unwrap_err();
        assert_eq!(
            status.code(),
            Code::DataLoss,
            "{what}, trailers: {status:?}"
        );
        server.faults.clear_all();
    }
}

#[tokio::test]
async fn a_reset_mid_stream_keeps_the_code_of_its_reason_through_the_facade() {
    use grpc_fault::ResetReason;
    let server = TestServer::start().await;
    for (what, config) in configs() {
        for (reason, want) in [
            (ResetReason::Cancel, Code::Cancelled),
            (ResetReason::EnhanceYourCalm, Code::ResourceExhausted),
            (ResetReason::InternalError, Code::Internal),
        ] {
            server
                .faults
                .always("ListProducts", Fault::reset_after_messages(1, reason))
                .unwrap();
            let mut client =
                QueryServiceClient::new(ResilientChannel::new(server.channel(), &config).unwrap());
            let status = tokio::time::timeout(
                Duration::from_secs(5),
                no_panic(async move {
                    let mut stream = client.list_products(list()).await?.into_inner();
                    assert_eq!(stream.message().await?.unwrap().id, "p1");
                    stream.message().await.map(|_| ())
                }),
            )
            .await
            .unwrap_or_else(|_| panic!("{what}, {reason:?}: the call hung"))
            .unwrap_err();
            assert_eq!(status.code(), want, "{what}, {reason:?}: {status:?}");
        }
    }
}
