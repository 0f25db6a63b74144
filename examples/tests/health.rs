//! The built-in services' `grpc.health.v1` status follows the outage: each
//! server reports `NOT_SERVING` while its outage is set and `SERVING` again
//! when it ends, over the real Health service (which the faults leave
//! alone), and the operations API shows it.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_resilience_examples::catalog::attempts::Downstream;
use grpc_resilience_examples::catalog::channels::{BUILT_IN_CONFIG, CatalogConfig};
use grpc_resilience_examples::catalog::client::GraphqlClient;
use grpc_resilience_examples::catalog::faults::FaultSettings;
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const QUERY: &str = "catalog.v1.QueryService";
const COMMAND: &str = "catalog.v1.CommandService";

async fn status(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    let reply = client
        .check(request)
        .await
        .expect("the health service answers");
    ServingStatus::try_from(reply.into_inner().status).expect("a known status")
}

fn outage() -> FaultSettings {
    FaultSettings {
        outage: true,
        ..FaultSettings::none()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outage_flips_health_to_not_serving_and_back() {
    let system = System::start(SystemOptions::default())
        .await
        .expect("the system starts");
    let backend = system.backend.clone().expect("built-in services");
    let query = Channel::from_shared(format!("http://{}", backend.query_addr))
        .unwrap()
        .connect_lazy();
    let command = Channel::from_shared(format!("http://{}", backend.command_addr))
        .unwrap()
        .connect_lazy();
    let mut health = HealthClient::new(query.clone());
    let mut command_health = HealthClient::new(command);
    assert_eq!(status(&mut health, QUERY).await, ServingStatus::Serving);
    assert_eq!(status(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        status(&mut command_health, COMMAND).await,
        ServingStatus::Serving
    );

    // A watcher sees every change, in order, as a balanced channel would.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: QUERY.to_owned(),
        })
        .await
        .expect("the watch opens")
        .into_inner();
    let mut next = async || {
        let message = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a status within 5 s")
            .expect("the watch stays open")
            .expect("a message");
        ServingStatus::try_from(message.status).expect("a known status")
    };
    assert_eq!(next().await, ServingStatus::Serving);

    // The outage, as the demo and the dashboard set it.
    let client = GraphqlClient::new(system.graphql_url(), Duration::from_secs(15));
    let r = client
        .execute(
            "mutation($f: FaultInput!) { setFaults(service: QUERY, faults: $f) { outage } }",
            json!({"f": {"outage": true}}),
        )
        .await
        .expect("a GraphQL response");
    assert_eq!(r.data()["setFaults"]["outage"], json!(true), "{:?}", r.body);
    assert_eq!(next().await, ServingStatus::NotServing);
    assert_eq!(status(&mut health, QUERY).await, ServingStatus::NotServing);
    assert_eq!(status(&mut health, "").await, ServingStatus::NotServing);
    assert_eq!(
        status(&mut command_health, COMMAND).await,
        ServingStatus::Serving,
        "the other service is not down"
    );
    // The catalog service is down; the health service still answers.
    let down = QueryServiceClient::new(query.clone())
        .get_product(GetProductRequest { id: "p1".into() })
        .await
        .unwrap_err();
    assert_eq!(down.code(), tonic::Code::Unavailable);
    let r = client
        .query("{ serviceHealth { service status } }")
        .await
        .unwrap();
    assert_eq!(
        r.data()["serviceHealth"],
        json!([
            {"service": "COMMAND", "status": "SERVING"},
            {"service": "QUERY", "status": "NOT_SERVING"},
        ])
    );

    // The outage ends: SERVING again, and calls succeed.
    backend
        .set_faults(Downstream::Query, FaultSettings::none())
        .unwrap();
    assert_eq!(next().await, ServingStatus::Serving);
    assert_eq!(status(&mut health, QUERY).await, ServingStatus::Serving);
    QueryServiceClient::new(query)
        .get_product(GetProductRequest { id: "p1".into() })
        .await
        .expect("the service is back");

    // Random faults are not an outage: the service stays SERVING.
    backend
        .set_faults(
            Downstream::Query,
            FaultSettings {
                errors: vec![(tonic::Code::Unavailable, 0.5)],
                ..FaultSettings::none()
            },
        )
        .unwrap();
    backend.set_faults(Downstream::Command, outage()).unwrap();
    assert_eq!(
        backend.health(Downstream::Command),
        tonic_health::ServingStatus::NotServing
    );
    assert_eq!(
        backend.health(Downstream::Query),
        tonic_health::ServingStatus::Serving
    );
    assert_eq!(status(&mut health, QUERY).await, ServingStatus::Serving);
}

/// The built-in config with the `query` channel made a balanced channel
/// (over the one built-in replica the example gives it) with health checks.
fn balanced_query_config() -> CatalogConfig {
    let text = format!(
        "{BUILT_IN_CONFIG}\n\
         [channels.query.health]\n\
         service = \"{QUERY}\"\n\
         [channels.query.outlier]\n\
         max_ejection_percent = 100\n\
         base_ejection_time = \"1s\"\n"
    );
    CatalogConfig::from_toml(&text, "balanced.toml").expect("a valid config")
}

async fn endpoints(client: &GraphqlClient) -> Value {
    let r = client
        .query("{ endpoints { name address status ejected breakerState ejections notServing } }")
        .await
        .expect("a GraphQL response");
    r.data()["endpoints"].clone()
}

/// Polls the operations API until `check` holds (at most 5 s).
async fn endpoints_until(client: &GraphqlClient, check: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let now = endpoints(client).await;
        if check(&now) || Instant::now() >= end {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balanced_channel_in_the_config_ejects_the_not_serving_endpoint_and_the_api_shows_it() {
    let system = System::start(SystemOptions {
        config: balanced_query_config(),
        ..SystemOptions::default()
    })
    .await
    .expect("the system starts");
    let backend = system.backend.clone().expect("built-in services");
    let client = GraphqlClient::new(system.graphql_url(), Duration::from_secs(15));
    let name = format!("query@{}", backend.query_addr);
    let address = backend.query_addr.to_string();
    assert_eq!(
        endpoints(&client).await,
        json!([{
            "name": name, "address": address, "status": "active", "ejected": false,
            "breakerState": "CLOSED", "ejections": 0, "notServing": false,
        }])
    );
    let r = client
        .query(r#"{ product(id: "p1") { id } }"#)
        .await
        .unwrap();
    assert_eq!(r.data()["product"]["id"], json!("p1"), "{:?}", r.body);

    backend.set_faults(Downstream::Query, outage()).unwrap();
    let out = endpoints_until(&client, |e| e[0]["status"] == json!("ejected (health)")).await;
    assert_eq!(out[0]["status"], json!("ejected (health)"), "{out}");
    assert_eq!(
        (
            &out[0]["ejected"],
            &out[0]["notServing"],
            &out[0]["ejections"]
        ),
        (&json!(true), &json!(true), &json!(1))
    );

    backend
        .set_faults(Downstream::Query, FaultSettings::none())
        .unwrap();
    let back = endpoints_until(&client, |e| e[0]["ejected"] == json!(false)).await;
    assert_eq!(back[0]["ejected"], json!(false), "{back}");
    assert_eq!(back[0]["notServing"], json!(false), "{back}");
    let r = client
        .query(r#"{ product(id: "p1") { id } }"#)
        .await
        .unwrap();
    assert_eq!(r.data()["product"]["id"], json!("p1"), "{:?}", r.body);
    let r = client.query("{ circuitBreakers { name } }").await.unwrap();
    assert_eq!(
        r.data()["circuitBreakers"],
        json!([{"name": "command"}, {"name": "query"}, {"name": name}]),
        "the endpoint's breaker is listed beside the channels'"
    );
}
