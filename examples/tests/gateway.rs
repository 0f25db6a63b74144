//! The gateway over real HTTP: GraphQL queries and mutations, error
//! extensions, the operations API, the subscription and `/metrics`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use grpc_resilience_examples::catalog::client::{GraphqlClient, Response};
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn start() -> (System, GraphqlClient) {
    let system = System::start(SystemOptions::default())
        .await
        .expect("the system starts");
    let client = GraphqlClient::new(system.graphql_url(), Duration::from_secs(15));
    (system, client)
}

async fn run(client: &GraphqlClient, query: &str) -> Response {
    client.query(query).await.expect("a GraphQL response")
}

async fn breaker_state(client: &GraphqlClient, name: &str) -> String {
    let r = run(client, "{ circuitBreakers { name state } }").await;
    r.data()["circuitBreakers"]
        .as_array()
        .expect("a list of breakers")
        .iter()
        .find(|b| b["name"] == name)
        .map(|b| b["state"].as_str().unwrap_or_default().to_owned())
        .expect("the breaker is listed")
}

/// Sends GetProduct calls until the query breaker rejects one; returns
/// that response. At most 300 calls and 30 s.
async fn drive_until_rejected(client: &GraphqlClient) -> Response {
    let end = Instant::now() + Duration::from_secs(30);
    for _ in 0..300 {
        let r = run(client, r#"{ product(id: "p1") { id } }"#).await;
        if r.extension("breakerRejected") == Some(&json!(true)) {
            return r;
        }
        assert!(Instant::now() < end, "the query breaker never opened");
    }
    panic!("the query breaker did not open within 300 calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_mutations_reach_the_services() {
    let (_system, client) = start().await;

    let r = run(&client, r#"{ product(id: "p1") { id name priceCents } }"#).await;
    assert_eq!(
        r.data()["product"],
        json!({"id": "p1", "name": "Product 1", "priceCents": 100}),
        "{:?}",
        r.body
    );

    let r = run(&client, r#"{ product(id: "missing") { id } }"#).await;
    assert_eq!(r.data()["product"], Value::Null);
    assert!(
        r.error().is_none(),
        "NOT_FOUND is null, not an error: {:?}",
        r.body
    );

    let r = run(
        &client,
        "{ products(first: 3) { nodes { id } endCursor hasNextPage } }",
    )
    .await;
    assert_eq!(
        r.data()["products"],
        json!({"nodes": [{"id": "p1"}, {"id": "p2"}, {"id": "p3"}], "endCursor": "p3", "hasNextPage": true})
    );
    let r = run(
        &client,
        r#"{ products(first: 2, after: "p3") { nodes { id } endCursor } }"#,
    )
    .await;
    assert_eq!(
        r.data()["products"],
        json!({"nodes": [{"id": "p4"}, {"id": "p5"}], "endCursor": "p5"})
    );
    let r = run(&client, "{ products(first: 0) { nodes { id } } }").await;
    let message = r.error().expect("first: 0 is refused")["message"].to_string();
    assert!(message.contains("`first` is 0"), "{message}");

    let r = client
        .execute(
            "mutation($input: CreateProductInput!) { createProduct(input: $input) { id name priceCents } }",
            json!({"input": {"id": "new-1", "name": "Lamp", "priceCents": 4200}}),
        )
        .await
        .unwrap();
    assert_eq!(
        r.data()["createProduct"],
        json!({"id": "new-1", "name": "Lamp", "priceCents": 4200}),
        "{:?}",
        r.body
    );
    let r = run(&client, r#"{ product(id: "new-1") { name } }"#).await;
    assert_eq!(
        r.data()["product"]["name"],
        "Lamp",
        "written through Command, read through Query"
    );

    // A client stream of products.
    let r = run(
        &client,
        r#"mutation { importProducts(products: [{id: "i1", name: "A", priceCents: 1}, {id: "i2", name: "B", priceCents: 2}, {name: "C", priceCents: 3}]) }"#,
    )
    .await;
    assert_eq!(r.data()["importProducts"], 3, "{:?}", r.body);
    let r = run(&client, r#"{ product(id: "i2") { name } }"#).await;
    assert_eq!(r.data()["product"]["name"], "B");

    // The same id again: the service answers ALREADY_EXISTS, not retried.
    let r = run(
        &client,
        r#"mutation { createProduct(input: {id: "new-1", name: "Lamp", priceCents: 1}) { id } }"#,
    )
    .await;
    assert_eq!(
        r.extension("code"),
        Some(&json!("ALREADY_EXISTS")),
        "{:?}",
        r.body
    );
    assert_eq!(r.extension("attempts"), Some(&json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_code_attempts_and_breaker_and_reset_closes_it() {
    let (_system, client) = start().await;
    let r = run(
        &client,
        r#"mutation { setFaults(service: QUERY, faults: {errors: [{code: "UNAVAILABLE", rate: 1.0}]}) { errors { code rate } } }"#,
    )
    .await;
    assert!(r.error().is_none(), "{:?}", r.body);

    let r = run(&client, r#"{ product(id: "p1") { id } }"#).await;
    let ext = &r.error().expect("an error")["extensions"];
    assert_eq!(ext["code"], "UNAVAILABLE", "{:?}", r.body);
    assert_eq!(ext["grpcCode"], 14);
    assert_eq!(
        ext["attempts"], 3,
        "three attempts: the design's max_attempts"
    );
    assert_eq!(ext["breakerRejected"], false);

    let r = drive_until_rejected(&client).await;
    let ext = &r.error().expect("an error")["extensions"];
    assert_eq!(ext["code"], "UNAVAILABLE");
    assert_eq!(ext["breaker"], "query");
    assert_eq!(ext["attempts"], 1, "a rejected call is not retried");

    let r = run(
        &client,
        "{ circuitBreakers { name state failureCount nextProbeIn } }",
    )
    .await;
    let query = r.data()["circuitBreakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "query")
        .unwrap()
        .clone();
    assert_eq!(query["state"], "OPEN", "{:?}", r.body);
    assert!(query["failureCount"].as_u64().unwrap() >= 40, "{query}");
    let next = query["nextProbeIn"]
        .as_u64()
        .expect("an open breaker has a next probe");
    assert!(
        next <= 1000,
        "open for 1 s (examples/config/catalog.toml): {next}"
    );
    assert_eq!(breaker_state(&client, "command").await, "CLOSED");

    let r = run(
        &client,
        r#"mutation { resetCircuitBreaker(name: "query") { name state failureCount } }"#,
    )
    .await;
    assert_eq!(
        r.data()["resetCircuitBreaker"],
        json!({"name": "query", "state": "CLOSED", "failureCount": 0}),
        "{:?}",
        r.body
    );
    let r = run(
        &client,
        r#"mutation { resetCircuitBreaker(name: "nope") { name } }"#,
    )
    .await;
    let message = r.error().expect("an unknown breaker is an error")["message"].to_string();
    assert!(message.contains("nope"), "{message}");

    drive_until_rejected(&client).await;
    let r = run(&client, "mutation { resetCircuitBreakers { name state } }").await;
    assert_eq!(
        r.data()["resetCircuitBreakers"],
        json!([{"name": "command", "state": "CLOSED"}, {"name": "query", "state": "CLOSED"}])
    );

    // A bad fault setting names the value.
    let r = run(
        &client,
        r#"mutation { setFaults(service: QUERY, faults: {lostResponseRate: 1.5}) { outage } }"#,
    )
    .await;
    let message = r.error().expect("1.5 is refused")["message"].to_string();
    assert!(message.contains("lostResponseRate is 1.5"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_delivers_breaker_transitions() {
    let (system, client) = start().await;
    let mut request = system.graphql_ws_url().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the WebSocket opens");
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "connection_init"})))
        .await
        .unwrap();
    let ack = timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an ack in time")
        .expect("a message")
        .unwrap();
    assert!(ack.to_text().unwrap().contains("connection_ack"), "{ack:?}");
    ws.send(send(json!({
        "id": "1",
        "type": "subscribe",
        "payload": {"query": "subscription { breakerTransitions { name from to trigger at sinceStartMs } }"}
    })))
    .await
    .unwrap();

    run(
        &client,
        r#"mutation { setFaults(service: QUERY, faults: {outage: true}) { outage } }"#,
    )
    .await;
    drive_until_rejected(&client).await;

    let message = timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a transition in time")
        .expect("a message")
        .unwrap();
    let value: Value = serde_json::from_str(message.to_text().unwrap()).unwrap();
    assert_eq!(value["type"], "next", "{value}");
    let t = &value["payload"]["data"]["breakerTransitions"];
    assert_eq!(t["name"], "query", "{value}");
    assert_eq!(t["from"], "CLOSED");
    assert_eq!(t["to"], "OPEN");
    assert!(
        t["trigger"].as_str().unwrap().contains("failure rate"),
        "{t}"
    );
}

/// The metric names of the design, as Prometheus renders them (dots become
/// underscores; the exporter adds no `_total`).
const DESIGN_METRICS: &[&str] = &[
    "grpc_retry_count",
    "grpc_retry_duration",
    "circuit_breaker_call_count",
    "circuit_breaker_call_latency",
    "grpc_client_call_count",
    "grpc_client_call_duration",
    "circuit_breaker_state",
    "circuit_breaker_transitions_count",
    "circuit_breaker_rejected_count",
    "grpc_retry_throttled",
    "grpc_timeout_count",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_every_design_metric_after_traffic() {
    let (system, client) = start().await;
    // A slow GetProduct runs into its 3 s deadline.
    run(
        &client,
        r#"mutation { setFaults(service: QUERY, faults: {latencyMs: 3200}) { latencyMs } }"#,
    )
    .await;
    let r = run(&client, r#"{ product(id: "p1") { id } }"#).await;
    assert_eq!(
        r.extension("code"),
        Some(&json!("DEADLINE_EXCEEDED")),
        "{:?}",
        r.body
    );
    // Failures, retries, throttling, an open breaker, rejections.
    run(
        &client,
        r#"mutation { setFaults(service: QUERY, faults: {outage: true}) { outage } }"#,
    )
    .await;
    drive_until_rejected(&client).await;

    let text = reqwest::get(system.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let missing: Vec<&str> = DESIGN_METRICS
        .iter()
        .copied()
        .filter(|name| !text.lines().any(|l| l.starts_with(&format!("{name}{{"))))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} in:\n{text}");
    assert!(
        text.contains(
            r#"circuit_breaker_transitions_count{breaker="query",from="closed",to="open"}"#
        ),
        "{text}"
    );
}
