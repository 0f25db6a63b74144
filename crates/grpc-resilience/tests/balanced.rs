//! Balanced named channels from a config file, through the facade, over
//! three real replicas on loopback: one failing replica is ejected and the
//! calls succeed on the others; its per-endpoint breaker and ejections show
//! in the status API; a NOT_SERVING replica is ejected by its health watch.

use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience::{EndpointStatus, Reason, ResilienceConfig, ResilientChannels, State};
use grpc_resilience_tests::{QUERY_SERVICE, TestServer, eventually};
use tonic::Code;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

async fn three() -> Vec<TestServer> {
    vec![
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
    ]
}

fn calls(server: &TestServer) -> u64 {
    server
        .faults
        .stats("GetProduct")
        .map(|s| s.calls)
        .unwrap_or(0)
}

/// The config file of the test: the three replicas as `endpoints`.
fn config_file(servers: &[TestServer], extra: &str) -> std::path::PathBuf {
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| format!("\"http://{}\"", s.addr))
        .collect();
    let text = format!(
        r#"
[retry.default]
max_attempts = 3
initial_delay = "5ms"
max_delay = "20ms"
jitter = false

[circuit_breakers.query.failure_rate]
window = 100
minimum_calls = 20
failure_rate = 50

[timeouts]
default = "5s"

[channels.query]
endpoints = [{}]
services = ["catalog.v1.QueryService"]
connect_timeout = "1s"

[channels.query.endpoint_breaker]
failure_threshold = 3

[channels.query.outlier]
base_ejection_time = "30s"
max_ejection_percent = 50
{extra}
"#,
        endpoints.join(", ")
    );
    let path = std::env::temp_dir().join(format!(
        "grpc-resilience-balanced-{}-{}.toml",
        std::process::id(),
        servers[0].addr.port()
    ));
    std::fs::write(&path, text).expect("write the test's config file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_ejected_and_calls_succeed_on_the_others() {
    let servers = three().await;
    servers[0]
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let path = config_file(&servers, "");
    let config = ResilienceConfig::from_file(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let channels = ResilientChannels::from_config(&config).unwrap();
    let bad = format!("query@{}", servers[0].addr);

    // Every endpoint breaker is listed from the start, with the channel's.
    let status = channels.circuit_breaker_status();
    let names: Vec<&String> = status.keys().collect();
    let mut expected = vec!["query".to_owned()];
    expected.extend(servers.iter().map(|s| format!("query@{}", s.addr)));
    expected.sort();
    assert_eq!(names, expected.iter().collect::<Vec<_>>());
    assert!(status.values().all(|s| *s == State::Closed));
    let endpoints = channels.endpoint_status();
    assert_eq!(endpoints.len(), 3);
    assert!(
        endpoints
            .values()
            .all(|e| e.status == EndpointStatus::Active && e.ejections == 0)
    );

    let mut client = QueryServiceClient::new(channels.channel("query").unwrap());
    for i in 0..60 {
        let reply = client.get_product(get()).await;
        assert!(reply.is_ok(), "call {i}: {reply:?}");
    }

    let endpoints = channels.endpoint_status();
    let failing = &endpoints[&bad];
    assert_eq!(failing.status, EndpointStatus::Ejected(Reason::Breaker));
    assert_eq!(failing.breaker_state, Some(State::Open));
    assert_eq!(failing.ejections, 1);
    assert_eq!(failing.key, servers[0].addr.to_string());
    for server in &servers[1..] {
        let ok = &endpoints[&format!("query@{}", server.addr)];
        assert_eq!(
            (ok.status, ok.breaker_state, ok.ejections),
            (EndpointStatus::Active, Some(State::Closed), 0)
        );
    }
    let status = channels.circuit_breaker_status();
    assert_eq!(status[&bad], State::Open);
    assert_eq!(
        status["query"],
        State::Closed,
        "one bad replica does not open the channel's breaker"
    );
    assert_eq!(
        calls(&servers[0]),
        3,
        "the failing replica got calls until its breaker opened"
    );
    assert_eq!(calls(&servers[1]) + calls(&servers[2]), 60);
    assert!(calls(&servers[1]) > 10 && calls(&servers[2]) > 10);

    // An operator's reset brings it back at once.
    servers[0].faults.clear_all();
    channels.reset(&bad).unwrap();
    assert_eq!(
        channels.endpoint_status()[&bad].status,
        EndpointStatus::Active
    );
    let before = calls(&servers[0]);
    for _ in 0..60 {
        client.get_product(get()).await.unwrap();
    }
    assert!(calls(&servers[0]) > before, "the replica gets calls again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_serving_replica_is_ejected_by_the_health_check_from_the_file() {
    let servers = three().await;
    let path = config_file(
        &servers,
        &format!("[channels.query.health]\nservice = \"{QUERY_SERVICE}\"\n"),
    );
    let config = ResilienceConfig::from_file(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let channels = ResilientChannels::from_config(&config).unwrap();
    let mut client = QueryServiceClient::new(channels.channel("query").unwrap());
    for _ in 0..10 {
        client.get_product(get()).await.unwrap();
    }
    let down = format!("query@{}", servers[1].addr);
    servers[1]
        .health
        .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let ejected = eventually(Duration::from_secs(5), || {
        channels.endpoint_status()[&down].status == EndpointStatus::Ejected(Reason::Health)
    })
    .await;
    assert!(ejected, "{:?}", channels.endpoint_status());
    let details = &channels.endpoint_status()[&down];
    assert!(details.not_serving && details.ejections == 1);
    assert_eq!(details.breaker_state, Some(State::Closed));
    let before = calls(&servers[1]);
    for _ in 0..30 {
        client.get_product(get()).await.unwrap();
    }
    assert_eq!(
        calls(&servers[1]),
        before,
        "no call to the NOT_SERVING replica"
    );

    servers[1]
        .health
        .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let back = eventually(Duration::from_secs(5), || {
        !channels.endpoint_status()[&down].is_ejected()
    })
    .await;
    assert!(back, "{:?}", channels.endpoint_status());
    assert!(!channels.endpoint_status()[&down].not_serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_in_the_file_resolves_to_the_replica() {
    let server = TestServer::start().await;
    // An address is its own DNS answer (`localhost` may also give `::1`,
    // where nothing listens).
    let config = ResilienceConfig::from_toml(&format!(
        "[channels.query]\ndns = \"127.0.0.1:{}\"\ndns_refresh = \"1s\"\n\
         [retry.default]\nmax_attempts = 3\ninitial_delay = \"5ms\"\n",
        server.addr.port()
    ))
    .unwrap();
    let channels = ResilientChannels::from_config(&config).unwrap();
    let key = format!("query@{}", server.addr);
    let found = eventually(Duration::from_secs(5), || {
        channels.endpoint_status().contains_key(&key)
    })
    .await;
    assert!(found, "{:?}", channels.endpoint_status());
    let mut client = QueryServiceClient::new(channels.channel("query").unwrap());
    for _ in 0..5 {
        client.get_product(get()).await.unwrap();
    }
    assert!(channels.balanced("query").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_given_in_code_make_a_balanced_channel_and_reload_keeps_them() {
    let servers = three().await;
    let text = "[channels.query]\nservices = [\"catalog.v1.QueryService\"]\n\
                [channels.query.outlier]\nmax_ejection_percent = 50\n";
    let config = ResilienceConfig::from_toml(text).unwrap();
    let channels = ResilientChannels::builder(&config)
        .with_endpoints("query", servers.iter().map(TestServer::endpoint))
        .build()
        .unwrap();
    assert_eq!(channels.endpoint_status().len(), 3);
    let mut client = QueryServiceClient::new(channels.channel("query").unwrap());
    for _ in 0..30 {
        client.get_product(get()).await.unwrap();
    }
    assert!(servers.iter().all(|s| calls(s) > 0), "every replica served");

    // A reload may change the policies, not the balancing.
    let retuned = format!("{text}[retry.default]\nmax_attempts = 2\n");
    channels
        .reload(&ResilienceConfig::from_toml(&retuned).unwrap())
        .unwrap();
    let changed = text.replace("50", "100");
    let err = channels
        .reload(&ResilienceConfig::from_toml(&changed).unwrap())
        .unwrap_err();
    assert_eq!(err.key(), "channels.query");
    assert_eq!(
        err.reason(),
        "a balanced channel's outlier, health and endpoint breaker settings cannot change by a reload; restart to change them"
    );

    // A single endpoint given in code to a channel without balanced keys
    // stays a plain channel.
    let plain = ResilienceConfig::from_toml("[channels.query]\n").unwrap();
    let channels = ResilientChannels::builder(&plain)
        .with_endpoint("query", servers[0].endpoint())
        .build()
        .unwrap();
    assert!(channels.balanced("query").is_none());
    assert!(channels.endpoint_status().is_empty());
}
