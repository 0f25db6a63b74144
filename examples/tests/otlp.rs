//! `catalog serve` exports its traces over OTLP/gRPC to the endpoint in
//! `OTEL_EXPORTER_OTLP_ENDPOINT`: a collector on loopback receives one
//! linked trace per GraphQL request, the last batch on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use grpc_resilience_examples::catalog::client::GraphqlClient;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use tokio::net::TcpListener;

/// A collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The child, killed by its PID when dropped.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exports_each_request_as_one_trace_to_the_otlp_endpoint() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(grpc_fault::incoming(listener)),
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_catalog"))
        .args([
            "serve",
            "--http-port",
            "0",
            "--command-port",
            "0",
            "--query-port",
            "0",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("catalog serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut serve = Serve(child);
    let lines = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            BufReader::new(stdout)
                .lines()
                .take(100)
                .map_while(Result::ok)
                .take_while(|l| !l.starts_with("Ctrl-C"))
                .collect::<Vec<_>>()
        }),
    )
    .await
    .expect("catalog serve prints its URLs within 30 s")
    .unwrap();
    let graphql = lines
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("GraphiQL")
                .map(|u| u.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no GraphiQL line in {lines:?}"));

    let client = GraphqlClient::new(graphql, Duration::from_secs(10));
    let r = client
        .query(r#"{ product(id: "p2") { id } }"#)
        .await
        .unwrap();
    assert_eq!(r.data()["product"], json!({"id": "p2"}), "{:?}", r.body);

    // Ctrl-C: the binary flushes its last batch before it exits.
    let pid = serve.0.id().to_string();
    let signalled = Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(signalled.success());
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while serve.0.try_wait().unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < end,
            "catalog serve did not exit within 20 s of Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();

    let spans = collector.0.lock().unwrap();
    let named = |name: &str| {
        spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} span in {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let gateway = named("graphql");
    let call = named("grpc_call");
    let attempt = named("grpc_attempt");
    let server = named("catalog.v1.QueryService/GetProduct");
    assert!(
        gateway.parent_span_id.is_empty(),
        "the gateway's span is the root"
    );
    assert_eq!(call.parent_span_id, gateway.span_id);
    assert_eq!(attempt.parent_span_id, call.span_id);
    assert_eq!(server.parent_span_id, attempt.span_id);
    for span in [call, attempt, server] {
        assert_eq!(span.trace_id, gateway.trace_id);
    }
}
