//! The built-in services' `grpc.health.v1` status follows the outage: each
//! server reports `NOT_SERVING` while its outage is set and `SERVING` again
//! when it ends, over the real Health service (which the faults leave
//! alone), and the operations API shows it.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_resilience_examples::catalog::attempts::Downstream;
use grpc_resilience_examples::catalog::client::GraphqlClient;
use grpc_resilience_examples::catalog::faults::FaultSettings;
use grpc_resilience_examples::catalog::system::{System, SystemOptions};
use serde_json::json;
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
