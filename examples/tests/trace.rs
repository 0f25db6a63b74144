//! One trace from a GraphQL request to each server attempt: the gateway's
//! span is the root, the gRPC call its child, one span per attempt under
//! the call, and each server span the child of the attempt that reached it
//! across the loopback connection (W3C Trace Context in the metadata).
//!
//! One test in this file: it installs the process's global subscriber.

use std::time::Duration;

use grpc_fault::Fault;
use grpc_resilience_examples::catalog::client::GraphqlClient;
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use grpc_resilience_examples::catalog::traces;
use opentelemetry::trace::{SpanId, SpanKind};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use tokio::time::Instant;
use tonic::Code;
use tracing_subscriber::layer::SubscriberExt;

const GET_PRODUCT: &str = "/catalog.v1.QueryService/GetProduct";

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

fn int(span: &SpanData, key: &str) -> i64 {
    match attr(span, key) {
        Some(Value::I64(n)) => *n,
        other => panic!("{key} of {} is {other:?}: {span:#?}", span.name),
    }
}

fn text(span: &SpanData, key: &str) -> String {
    match attr(span, key) {
        Some(value) => value.as_str().into_owned(),
        None => panic!("no {key} on {}: {span:#?}", span.name),
    }
}

/// The spans once all six of the request have ended, at most 10 s.
async fn spans_of_the_request(
    exporter: &InMemorySpanExporter,
    provider: &opentelemetry_sdk::trace::SdkTracerProvider,
) -> Vec<SpanData> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        provider.force_flush().expect("the spans are flushed");
        let spans = exporter.get_finished_spans().expect("the exporter's spans");
        if spans.len() >= 6 || Instant::now() > end {
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_graphql_request_is_one_trace_across_the_wire() {
    let exporter = InMemorySpanExporter::default();
    let provider = traces::provider(exporter.clone());
    let subscriber = tracing_subscriber::registry().with(traces::layer(&provider));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let system = System::start(SystemOptions::default())
        .await
        .expect("the system starts");
    let backend = system.backend.clone().expect("the built-in services");
    // The first attempt fails with UNAVAILABLE, the second succeeds.
    backend
        .query_faults
        .script(GET_PRODUCT, [Fault::status(Code::Unavailable)])
        .expect("a valid selector");
    let client = GraphqlClient::new(system.graphql_url(), Duration::from_secs(15));
    let started = Instant::now();
    let r = client
        .query(r#"{ product(id: "p1") { id } }"#)
        .await
        .expect("a GraphQL response");
    assert_eq!(r.data()["product"], json!({"id": "p1"}), "{:?}", r.body);
    assert_eq!(
        backend.query_faults.stats(GET_PRODUCT).unwrap().calls,
        2,
        "two attempts reached the server"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let spans = spans_of_the_request(&exporter, &provider).await;
    let named =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    let gateway = named("graphql");
    let calls = named("grpc_call");
    let mut attempts = named("grpc_attempt");
    let servers = named("catalog.v1.QueryService/GetProduct");
    assert_eq!(
        (gateway.len(), calls.len(), attempts.len(), servers.len()),
        (1, 1, 2, 2),
        "{:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let (gateway, call) = (gateway[0], calls[0]);
    attempts.sort_by_key(|a| int(a, "attempt"));

    // One trace, rooted at the gateway.
    let trace = gateway.span_context.trace_id();
    for span in &spans {
        assert_eq!(span.span_context.trace_id(), trace, "{span:#?}");
    }
    assert_eq!(gateway.parent_span_id, SpanId::INVALID);
    assert_eq!(gateway.span_kind, SpanKind::Server);
    assert_eq!(int(gateway, "http.response.status_code"), 200);

    // The logical call under the gateway's span.
    assert_eq!(call.parent_span_id, gateway.span_context.span_id());
    assert_eq!(text(call, "rpc.system"), "grpc");
    assert_eq!(text(call, "rpc.service"), "catalog.v1.QueryService");
    assert_eq!(text(call, "rpc.method"), "GetProduct");
    assert_eq!(int(call, "rpc.grpc.status_code"), 0);
    assert_eq!(text(call, "server.address"), "127.0.0.1");
    assert_eq!(
        int(call, "server.port"),
        i64::from(backend.query_addr.port())
    );

    // Two attempts under the call.
    for (n, attempt) in attempts.iter().enumerate() {
        assert_eq!(attempt.parent_span_id, call.span_context.span_id());
        assert_eq!(attempt.span_kind, SpanKind::Client);
        assert_eq!(int(attempt, "attempt"), n as i64 + 1);
        assert_eq!(text(attempt, "rpc.system"), "grpc");
        assert_eq!(text(attempt, "rpc.service"), "catalog.v1.QueryService");
        assert_eq!(text(attempt, "rpc.method"), "GetProduct");
        assert_eq!(text(attempt, "breaker.state"), "closed");
        assert!(int(attempt, "deadline_remaining_ms") > 0);
        assert_eq!(attr(attempt, "hedge"), Some(&Value::Bool(false)));
    }
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(int(first, "rpc.grpc.status_code"), Code::Unavailable as i64);
    assert!(attr(first, "backoff_ms").is_none());
    // The retry waited its backoff (catalog.toml: 100 ms, jitter ±20 %).
    assert!(
        (80..=120).contains(&int(second, "backoff_ms")),
        "{second:#?}"
    );
    assert_eq!(attr(second, "transparent"), Some(&Value::Bool(false)));

    // Each server span is the child of the attempt that reached it, its
    // parent id read from the request's metadata.
    for (attempt, code) in [(first, Code::Unavailable), (second, Code::Ok)] {
        let server = servers
            .iter()
            .find(|s| s.parent_span_id == attempt.span_context.span_id())
            .unwrap_or_else(|| panic!("no server span under attempt {attempt:#?}: {servers:#?}"));
        assert!(server.parent_span_is_remote);
        assert_eq!(server.span_kind, SpanKind::Server);
        assert_eq!(text(server, "rpc.system"), "grpc");
        assert_eq!(text(server, "rpc.service"), "catalog.v1.QueryService");
        assert_eq!(text(server, "rpc.method"), "GetProduct");
        assert_eq!(int(server, "rpc.grpc.status_code"), code as i64);
    }
    drop(system);
}
