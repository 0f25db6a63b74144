//! The client and server layers over a real loopback connection: the
//! server span is the child of the client's span, its parent id read from
//! the request's metadata.

use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{GetProductRequest, InMemoryCatalog};
use grpc_otel::{ServerTraceLayer, TraceContextLayer};
use opentelemetry::trace::{SpanId, SpanKind, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::net::TcpListener;
use tonic::transport::{Endpoint, Server};
use tower_layer::Layer;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

#[tokio::test(flavor = "current_thread")]
async fn the_server_span_is_the_child_of_the_callers_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // The server runs on this thread too (current-thread runtime).
    let _guard = tracing::subscriber::set_default(subscriber);

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let catalog = InMemoryCatalog::with_products(3);
    let server = tokio::spawn(
        Server::builder()
            .layer(ServerTraceLayer::new())
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // A traced call, and one with a hostile `traceparent` outside any span.
    let mut traced = QueryServiceClient::new(TraceContextLayer::new().layer(channel.clone()));
    let caller = tracing::info_span!("caller");
    traced
        .get_product(GetProductRequest { id: "p1".into() })
        .instrument(caller)
        .await
        .unwrap();
    let mut plain = QueryServiceClient::new(channel);
    let mut request = tonic::Request::new(GetProductRequest {
        id: "missing".into(),
    });
    request
        .metadata_mut()
        .insert("traceparent", "00-zz-not-a-context-01".parse().unwrap());
    let status = plain.get_product(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    server.abort();

    let spans = exporter.get_finished_spans().unwrap();
    let caller = spans
        .iter()
        .find(|s| s.name == "caller")
        .expect("the caller's span");
    let servers: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "catalog.v1.QueryService/GetProduct")
        .collect();
    assert_eq!(servers.len(), 2, "{spans:#?}");
    let child = servers
        .iter()
        .find(|s| s.parent_span_id == caller.span_context.span_id())
        .expect("a server span under the caller's");
    assert_eq!(
        child.span_context.trace_id(),
        caller.span_context.trace_id()
    );
    assert!(child.parent_span_is_remote);
    assert_eq!(child.span_kind, SpanKind::Server);
    assert_eq!(attr(child, "rpc.system"), Some(&Value::from("grpc")));
    assert_eq!(
        attr(child, "rpc.service"),
        Some(&Value::from("catalog.v1.QueryService"))
    );
    assert_eq!(attr(child, "rpc.method"), Some(&Value::from("GetProduct")));
    assert_eq!(attr(child, "rpc.grpc.status_code"), Some(&Value::I64(0)));

    // The hostile header is ignored: a root span of its own trace, with
    // the status; NOT_FOUND is the caller's error, not the server's.
    let root = servers
        .iter()
        .find(|s| s.parent_span_id == SpanId::INVALID)
        .expect("a root server span");
    assert_ne!(root.span_context.trace_id(), caller.span_context.trace_id());
    assert_eq!(
        attr(root, "rpc.grpc.status_code"),
        Some(&Value::I64(tonic::Code::NotFound as i64))
    );
    assert_eq!(root.status, opentelemetry::trace::Status::Unset);
}
