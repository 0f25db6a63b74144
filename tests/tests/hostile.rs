//! A broken or hostile server, played by grpc-fault, seen through the
//! layers and real generated stubs: stream resets keep the code of their
//! HTTP/2 reason, and an invalid `grpc-status-details-bin` cannot panic
//! the caller.

use std::time::Duration;

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, ListProductsRequest};
use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, State};
use grpc_fault::{Fault, ResetReason};
use grpc_resilience_core::CodeSet;
use grpc_resilience_tests::TestServer;
use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};
use grpc_timeout::{TimeoutLayer, TimeoutPolicy};
use tonic::Code;
use tonic::codegen::{Body, Bytes, StdError};
use tonic::transport::Channel;
use tower::ServiceBuilder;

/// What gRPC's HTTP/2 spec (and tonic) say a caller sees for a stream reset
/// with `reason`; written out here rather than asked of the code under test.
fn expected(reason: ResetReason) -> Code {
    match reason {
        ResetReason::Cancel => Code::Cancelled,
        ResetReason::RefusedStream => Code::Unavailable,
        ResetReason::EnhanceYourCalm => Code::ResourceExhausted,
        ResetReason::InadequateSecurity => Code::PermissionDenied,
        ResetReason::StreamClosed | ResetReason::Http11Required | ResetReason::Other(_) => {
            Code::Unknown
        }
        _ => Code::Internal,
    }
}

fn registry() -> BreakerRegistry {
    BreakerRegistry::with_default_config(
        BreakerConfig::default()
            .with_failure_threshold(2)
            .with_timeout(Duration::from_secs(60)),
    )
    .unwrap()
}

fn retry_policies() -> RetryPolicies {
    RetryPolicies::new(
        RetryPolicy::default()
            .with_max_attempts(2)
            .with_initial_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_millis(10))
            .with_jitter(Jitter::None)
            .with_retryable_codes(CodeSet::of(&[Code::Unavailable])),
    )
    .unwrap()
}

/// The whole stack, outermost first: timeout > retry > breaker > channel.
fn stack(
    server: &TestServer,
    registry: &BreakerRegistry,
) -> QueryServiceClient<
    impl tonic::client::GrpcService<
        tonic::body::Body,
        ResponseBody = impl Body<Data = Bytes, Error = impl Into<StdError> + Send> + Send + 'static,
        Error = impl Into<StdError>,
        Future = impl Send,
    > + Clone
    + Send
    + 'static,
> {
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(10)).unwrap(),
        ))
        .layer(RetryLayer::new(retry_policies()))
        .layer(CircuitBreakerLayer::new(registry.clone()))
        .service(server.channel());
    QueryServiceClient::new(channel)
}

fn timeout_only(server: &TestServer) -> QueryServiceClient<grpc_timeout::Timeout<Channel>> {
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(10)).unwrap(),
        ))
        .service(server.channel());
    QueryServiceClient::new(channel)
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn list() -> ListProductsRequest {
    // Paced, so each product is its own message on the wire.
    ListProductsRequest {
        limit: 3,
        interval_ms: 5,
    }
}

fn all_reasons() -> impl Iterator<Item = ResetReason> {
    ResetReason::ALL
        .into_iter()
        .chain([ResetReason::Other(0x99)])
}

#[tokio::test]
async fn a_reset_before_the_response_keeps_the_code_of_its_reason() {
    for reason in all_reasons() {
        let server = TestServer::start().await;
        server
            .faults
            .always("GetProduct", Fault::reset(reason))
            .unwrap();
        let registry = registry();
        let mut client = stack(&server, &registry);
        let status = client.get_product(get()).await.unwrap_err();
        let code = expected(reason);
        assert_eq!(status.code(), code, "{reason:?}: {status:?}");
        // The transport's own error is still there to downcast.
        let h2 = grpc_resilience_core::error::find_error::<h2::Error>(&status)
            .unwrap_or_else(|| panic!("{reason:?}: no h2::Error in {status:?}"));
        assert_eq!(h2.reason().map(u32::from), Some(reason.code()));
        assert!(
            grpc_resilience_core::error::find_error::<tonic::transport::Error>(&status).is_some(),
            "{reason:?}: the channel's own error is kept too"
        );
        // Only UNAVAILABLE is retried (a refused stream), never a CANCEL.
        let calls = server.faults.stats("GetProduct").unwrap().calls;
        let attempts = if code == Code::Unavailable { 2 } else { 1 };
        assert_eq!(calls, attempts, "{reason:?}");
        // Only the breaker's failure codes count against it: two failures
        // open it.
        if attempts == 1 {
            let _ = client.get_product(get()).await.unwrap_err();
        }
        let failure = matches!(
            code,
            Code::Unavailable | Code::Internal | Code::Unknown | Code::ResourceExhausted
        );
        let state = registry.state("query");
        let want = if failure { State::Open } else { State::Closed };
        assert_eq!(state, Some(want), "{reason:?}");
    }
}

#[tokio::test]
async fn a_reset_after_messages_keeps_the_code_of_its_reason() {
    for reason in all_reasons() {
        let server = TestServer::start().await;
        server
            .faults
            .always("ListProducts", Fault::reset_after_messages(1, reason))
            .unwrap();
        let registry = registry();
        let mut client = stack(&server, &registry);
        // hyper reads RST_STREAM(NO_ERROR) after response headers as an
        // early but clean end of the body (RFC 9113, section 8.1), so the
        // caller sees what tonic says of a stream without a status.
        let code = match reason {
            ResetReason::NoError => Code::Unknown,
            _ => expected(reason),
        };
        for _ in 0..2 {
            let mut stream = client.list_products(list()).await.unwrap().into_inner();
            // The message and the reset travel together; h2 may drop a
            // message still buffered when the reset arrives.
            let status = match stream.message().await {
                Ok(first) => {
                    assert_eq!(first.unwrap().id, "p1");
                    stream.message().await.unwrap_err()
                }
                Err(status) => status,
            };
            assert_eq!(status.code(), code, "{reason:?}: {status:?}");
        }
        // The breaker judged the two calls by that code too.
        let failure = matches!(
            code,
            Code::Unavailable | Code::Internal | Code::Unknown | Code::ResourceExhausted
        );
        let want = if failure { State::Open } else { State::Closed };
        assert_eq!(registry.state("query"), Some(want), "{reason:?}");
    }
}

#[tokio::test]
async fn the_timeout_layer_alone_keeps_the_code_of_a_reset() {
    for reason in [ResetReason::Cancel, ResetReason::EnhanceYourCalm] {
        let server = TestServer::start().await;
        server
            .faults
            .always("GetProduct", Fault::reset(reason))
            .unwrap();
        let status = timeout_only(&server).get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), expected(reason), "{reason:?}: {status:?}");
    }
}

const NOT_BASE64: &str = "not base64!";

/// Runs `call` in its own task, so that a panic is seen as one.
async fn no_panic<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(call).await {
        Ok(value) => value,
        Err(err) => panic!("the caller's task panicked: {err}"),
    }
}

#[tokio::test]
async fn invalid_details_in_a_trailers_only_answer_cannot_panic_the_caller() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::status(Code::NotFound).with_raw_details(NOT_BASE64),
        )
        .unwrap();
    let mut client = timeout_only(&server);
    let status = no_panic(async move { client.get_product(get()).await })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.details().is_empty());

    let registry = registry();
    let mut client = stack(&server, &registry);
    let status = no_panic(async move { client.get_product(get()).await })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn invalid_details_in_trailers_cannot_panic_the_caller() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "*",
            Fault::status_after_messages(1, Code::DataLoss).with_raw_details(NOT_BASE64),
        )
        .unwrap();
    let registry = registry();
    for full_stack in [false, true] {
        // Unary: the message, then the trailers.
        let status = if full_stack {
            let mut client = stack(&server, &registry);
            no_panic(async move { client.get_product(get()).await.map(|_| ()) }).await
        } else {
            let mut client = timeout_only(&server);
            no_panic(async move { client.get_product(get()).await.map(|_| ()) }).await
        }
        .unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");

        // Server streaming: one product, then the trailers.
        let status = if full_stack {
            let mut client = stack(&server, &registry);
            no_panic(async move {
                let mut stream = client.list_products(list()).await?.into_inner();
                assert_eq!(stream.message().await?.unwrap().id, "p1");
                stream.message().await.map(|_| ())
            })
            .await
        } else {
            let mut client = timeout_only(&server);
            no_panic(async move {
                let mut stream = client.list_products(list()).await?.into_inner();
                assert_eq!(stream.message().await?.unwrap().id, "p1");
                stream.message().await.map(|_| ())
            })
            .await
        }
        .unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    }
}

/// Why the layers must guard: tonic 0.14 itself panics on this header. If
/// this starts failing, tonic has fixed it and the guard is belt and braces.
#[tokio::test]
async fn a_bare_channel_panics_on_invalid_details() {
    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::status(Code::NotFound).with_raw_details(NOT_BASE64),
        )
        .unwrap();
    let mut client = QueryServiceClient::new(server.channel());
    let joined = tokio::spawn(async move { client.get_product(get()).await }).await;
    let err = joined.expect_err("tonic 0.14 panics on invalid base64 details");
    assert!(err.is_panic());
}

#[tokio::test]
async fn hostile_status_headers_read_as_a_status_through_the_stack() {
    let server = TestServer::start().await;
    let cases: Vec<(Fault, Option<Code>)> = vec![
        (Fault::raw_status("abc"), Some(Code::Unknown)),
        (Fault::raw_status("99999"), Some(Code::Unknown)),
        (Fault::raw_status(""), Some(Code::Unknown)),
        // Repeated: the first value counts, in tonic and in the layers.
        (
            Fault::status(Code::NotFound).with_header("grpc-status", "0"),
            Some(Code::NotFound),
        ),
        (
            Fault::status(Code::NotFound).with_raw_message("%zz\u{e9}"),
            Some(Code::NotFound),
        ),
        // 1 MiB of grpc-message: past what the client accepts in a header
        // block; whatever the transport makes of it, it is a status.
        (
            Fault::status(Code::NotFound).with_message("m".repeat(1 << 20)),
            None,
        ),
    ];
    for (fault, want) in cases {
        let name = format!("{fault:?}").chars().take(120).collect::<String>();
        server.faults.always("GetProduct", fault).unwrap();
        let registry = registry();
        let mut client = stack(&server, &registry);
        let call = async move { client.get_product(get()).await };
        let result = tokio::time::timeout(Duration::from_secs(5), no_panic(call))
            .await
            .unwrap_or_else(|_| panic!("{name}: the call hung"));
        let status = result.unwrap_err();
        if let Some(want) = want {
            assert_eq!(status.code(), want, "{name}: {status:?}");
        }
    }
}
