//! Every metric of the design, from a scripted fault scenario run through
//! generated stubs. Its own test binary: it installs the global recorder.

use std::collections::BTreeMap;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilientChannel};
use grpc_resilience_tests::TestServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tonic::Code;

fn request(id: &str) -> GetProductRequest {
    GetProductRequest { id: id.into() }
}

#[tokio::test]
async fn every_design_metric_appears_with_its_labels_and_counts() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("the only recorder of this binary");

    let server = TestServer::start().await;
    let config = ResilienceConfig::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/telemetry.toml"
    ))
    .unwrap();
    let channel = ResilientChannel::new(server.channel(), &config).unwrap();
    let mut client = QueryServiceClient::new(channel.clone());

    // A: one failure, then success (1 retry).
    server
        .faults
        .script("GetProduct", [Fault::status(Code::Unavailable)])
        .unwrap();
    client.get_product(request("p1")).await.unwrap();
    // B: NOT_FOUND, not retried, a success for the breaker.
    assert_eq!(
        client
            .get_product(request("missing"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // C: three failures (2 retries). D: the 5th failure opens the breaker,
    // its retry is refused by the breaker and not retried again.
    server
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            client.get_product(request("p1")).await.unwrap_err().code(),
            Code::Unavailable
        );
    }
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        2 + 1 + 3 + 1
    );

    let mut counters = BTreeMap::new();
    let mut histograms = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.key().name(), labels.join(","));
        match value {
            DebugValue::Counter(c) => {
                counters.insert(name, c);
            }
            DebugValue::Histogram(samples) => {
                histograms.insert(
                    name,
                    samples
                        .into_iter()
                        .map(|s| s.into_inner())
                        .collect::<Vec<f64>>(),
                );
            }
            DebugValue::Gauge(_) => {}
        }
    }
    let get = "service=catalog.v1.QueryService,method=GetProduct";
    let counter = |name: &str| {
        counters
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in {counters:#?}"))
    };
    let samples = |name: &str| {
        histograms
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {histograms:#?}"))
    };

    // Logical calls, retries included.
    assert_eq!(
        counter(&format!("grpc.client.call.count{{{get},code=OK}}")),
        1
    );
    assert_eq!(
        counter(&format!("grpc.client.call.count{{{get},code=NOT_FOUND}}")),
        1
    );
    assert_eq!(
        counter(&format!("grpc.client.call.count{{{get},code=UNAVAILABLE}}")),
        2
    );
    let ok = samples(&format!("grpc.client.call.duration{{{get},code=OK}}"));
    assert_eq!(ok.len(), 1);
    assert!(
        ok[0] >= 0.2,
        "the OK call waited 200 ms before its retry: {ok:?}"
    );
    assert_eq!(
        samples(&format!(
            "grpc.client.call.duration{{{get},code=UNAVAILABLE}}"
        ))
        .len(),
        2
    );
    assert_eq!(
        samples(&format!(
            "grpc.client.call.duration{{{get},code=NOT_FOUND}}"
        ))
        .len(),
        1
    );

    // Retries: A 1, C 2, D 1.
    assert_eq!(
        counter(&format!("grpc.retry.count{{{get},code=UNAVAILABLE}}")),
        4
    );
    assert_eq!(samples(&format!("grpc.retry.duration{{{get}}}")).len(), 3);

    // The breaker, per attempt: 2 successes (A's second, B), 5 failures, 1 refusal.
    assert_eq!(
        counter("circuit_breaker.call.count{breaker=query,state=closed,outcome=success}"),
        2
    );
    assert_eq!(
        counter("circuit_breaker.call.count{breaker=query,state=closed,outcome=failure}"),
        5
    );
    assert_eq!(
        samples("circuit_breaker.call.latency{breaker=query}").len(),
        7
    );
    assert_eq!(
        counter("circuit_breaker.rejected.count{breaker=query,state=open}"),
        1
    );
    assert_eq!(
        counter("circuit_breaker.transitions.count{breaker=query,from=closed,to=open}"),
        1
    );
}
