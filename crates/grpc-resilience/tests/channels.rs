//! Named channels: per-channel breakers, one registry, per-target throttles.

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_fault::Fault;
use grpc_resilience::{ResilienceConfig, ResilientChannels, State};
use grpc_resilience_tests::TestServer;
use tonic::Code;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

const TWO_BACKENDS: &str = r#"
[retry.default]
max_attempts = 1
[retry.throttle]
max_tokens = 10
token_ratio = 0.1
[circuit_breakers.query_a]
failure_threshold = 3
[channels.query_a]
services = ["catalog.v1.QueryService"]
breaker = "query_a"
[channels.query_b]
services = ["catalog.v1.QueryService"]
[channels.query_b_again]
services = ["catalog.v1.QueryService"]
"#;

#[tokio::test]
async fn two_backends_of_one_service_do_not_share_a_breaker() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    a.faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let config = ResilienceConfig::from_toml(TWO_BACKENDS).unwrap();
    let channels = ResilientChannels::builder(&config)
        .with_endpoint("query_a", a.endpoint())
        .with_endpoint("query_b", b.endpoint())
        .with_endpoint("query_b_again", b.endpoint())
        .build()
        .unwrap();
    // Every breaker is listed before any call, each channel its own.
    assert_eq!(
        format!("{:?}", channels.circuit_breaker_status()),
        r#"{"query_a": Closed, "query_b": Closed, "query_b_again": Closed}"#
    );
    let mut to_a = QueryServiceClient::new(channels.channel("query_a").unwrap());
    let mut to_b = QueryServiceClient::new(channels.channel("query_b").unwrap());
    for _ in 0..5 {
        assert_eq!(
            to_a.get_product(get()).await.unwrap_err().code(),
            Code::Unavailable
        );
        to_b.get_product(get()).await.unwrap();
    }
    let status = channels.circuit_breaker_status();
    assert_eq!(status["query_a"], State::Open);
    assert_eq!(status["query_b"], State::Closed);
    // The details an operator's page shows: failures, time to next probe.
    let details = channels.circuit_breaker_details();
    assert_eq!(details.len(), 3);
    assert_eq!(details["query_a"].state(), State::Open);
    assert!(details["query_a"].time_to_next_probe().is_some());
    assert_eq!(details["query_b"].failures(), 0);
    assert_eq!(details["query_b"].time_to_next_probe(), None);
    assert_eq!(
        a.faults.stats("GetProduct").unwrap().calls,
        3,
        "refused once open"
    );
    assert_eq!(
        b.faults.stats("GetProduct").unwrap().calls,
        5,
        "the healthy backend got every call"
    );

    // Channels to one target share its throttle; another target has its own.
    let tb = channels.throttle("query_b").unwrap();
    assert!(tb.same_bucket(&channels.throttle("query_b_again").unwrap()));
    assert!(!tb.same_bucket(&channels.throttle("query_a").unwrap()));

    // Operators: reset one, force open, disable, reset all.
    channels.reset("query_a").unwrap();
    assert_eq!(channels.registry().state("query_a"), Some(State::Closed));
    channels.force_open("query_b").unwrap();
    let status = to_b.get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("`query_b`"), "{status:?}");
    channels.disable("query_a").unwrap();
    assert_eq!(
        to_a.get_product(get()).await.unwrap_err().code(),
        Code::Unavailable
    );
    assert_eq!(
        a.faults.stats("GetProduct").unwrap().calls,
        4,
        "disabled: calls flow"
    );
    channels.reset_circuit_breakers();
    assert!(
        channels
            .circuit_breaker_status()
            .values()
            .all(|s| *s == State::Closed)
    );
    assert_eq!(
        channels.reset("nope").unwrap_err().to_string(),
        "no circuit breaker is named `nope`"
    );
}

#[tokio::test]
async fn channels_are_found_by_name_or_service_and_need_an_endpoint() {
    let server = TestServer::start().await;
    let config =
        ResilienceConfig::from_toml("[channels.query]\nservices = [\"catalog.v1.QueryService\"]\n")
            .unwrap();
    let err = ResilientChannels::from_config(&config).unwrap_err();
    assert_eq!(
        err.to_string(),
        "channels.query.endpoint: no endpoint: set it in the file or with `with_endpoint`"
    );
    let err = ResilientChannels::builder(&config)
        .with_channel("qurey", server.channel())
        .build()
        .unwrap_err();
    assert!(
        err.to_string().starts_with("channels.qurey: given in code"),
        "{err}"
    );

    let channels = ResilientChannels::builder(&config)
        .with_channel("query", server.channel())
        .build()
        .unwrap();
    let mut client =
        QueryServiceClient::new(channels.for_service("catalog.v1.QueryService").unwrap());
    client.get_product(get()).await.unwrap();
    assert_eq!(
        channels.channel("command").unwrap_err().to_string(),
        "no channel is named `command` (there are: query)"
    );
    assert!(channels.for_service("catalog.v1.CommandService").is_err());
}

#[tokio::test]
async fn the_shipped_file_builds_its_connection_set() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/resilience.toml");
    let config = ResilienceConfig::from_file(path).unwrap();
    let channels = ResilientChannels::from_config(&config).unwrap();
    assert_eq!(channels.names(), ["command", "query"]);
    assert_eq!(
        format!("{:?}", channels.circuit_breaker_status()),
        r#"{"command": Closed, "query": Closed}"#
    );
}

#[tokio::test]
async fn a_reload_reaches_every_channel_and_cannot_re_point_one() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    for server in [&a, &b] {
        server
            .faults
            .always("GetProduct", Fault::status(Code::Unavailable))
            .unwrap();
    }
    let file = |attempts: u32, endpoint_b: &str| {
        format!(
            "[retry.default]\nmax_attempts = {attempts}\ninitial_delay = 1\nmax_delay = 1\n\
             [retry.throttle]\nmax_tokens = 100\ntoken_ratio = 1\n\
             [circuit_breakers.a]\nfailure_threshold = 1000\n[circuit_breakers.b]\nfailure_threshold = 1000\n\
             [channels.a]\nendpoint = \"http://{}\"\n[channels.b]\nendpoint = \"{endpoint_b}\"\n",
            a.addr
        )
    };
    let b_uri = format!("http://{}", b.addr);
    let config = ResilienceConfig::from_toml(&file(2, &b_uri)).unwrap();
    let channels = ResilientChannels::from_config(&config).unwrap();
    let throttle_before = channels.throttle("a").unwrap();
    let mut to_a = QueryServiceClient::new(channels.channel("a").unwrap());
    let mut to_b = QueryServiceClient::new(channels.channel("b").unwrap());
    to_a.get_product(get()).await.unwrap_err();
    to_b.get_product(get()).await.unwrap_err();
    assert_eq!(a.faults.stats("GetProduct").unwrap().calls, 2);
    assert_eq!(b.faults.stats("GetProduct").unwrap().calls, 2);

    let report = channels
        .reload(&ResilienceConfig::from_toml(&file(3, &b_uri)).unwrap())
        .unwrap();
    assert_eq!(report.generation(), 1);
    assert!(report.breakers_not_reconfigured().is_empty());
    assert!(
        channels
            .throttle("a")
            .unwrap()
            .same_bucket(&throttle_before),
        "unchanged throttle settings keep the bucket"
    );
    to_a.get_product(get()).await.unwrap_err();
    to_b.get_product(get()).await.unwrap_err();
    assert_eq!(a.faults.stats("GetProduct").unwrap().calls, 2 + 3);
    assert_eq!(b.faults.stats("GetProduct").unwrap().calls, 2 + 3);

    let err = channels
        .reload(&ResilienceConfig::from_toml(&file(4, "http://127.0.0.1:1")).unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "channels.b: channels cannot be added or re-pointed by a reload; restart to change them"
    );
    to_a.get_product(get()).await.unwrap_err();
    assert_eq!(
        a.faults.stats("GetProduct").unwrap().calls,
        2 + 3 + 3,
        "nothing applied"
    );
}

const SHARED_BULKHEAD: &str = r#"
[retry.default]
max_attempts = 1
[timeouts]
default = "10s"
[bulkhead.default]
max_concurrent = 1
max_queue = 0
[channels.query_a]
services = ["catalog.v1.QueryService"]
[channels.query_a_again]
services = ["catalog.v1.QueryService"]
[channels.query_b]
services = ["catalog.v1.QueryService"]
"#;

#[tokio::test]
async fn channels_to_one_target_share_its_bulkhead_and_another_target_has_its_own() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    // Every call to `a` hangs for a while: it holds its slot.
    a.faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(std::time::Duration::from_secs(5)),
        )
        .unwrap();
    let config = ResilienceConfig::from_toml(SHARED_BULKHEAD).unwrap();
    let channels = ResilientChannels::builder(&config)
        .with_endpoint("query_a", a.endpoint())
        .with_endpoint("query_a_again", a.endpoint())
        .with_endpoint("query_b", b.endpoint())
        .build()
        .unwrap();
    let mut first = QueryServiceClient::new(channels.channel("query_a").unwrap());
    let hung = tokio::spawn(async move { first.get_product(get()).await });
    // Wait (bounded) until the hung call holds the target's one slot.
    let in_flight = |name: &str| {
        channels
            .channel(name)
            .unwrap()
            .bulkhead_partitions()
            .iter()
            .map(|p| p.in_flight)
            .sum::<u32>()
    };
    for _ in 0..500 {
        if in_flight("query_a") == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(in_flight("query_a"), 1);
    // The other channel to the same target sees the same partition full.
    assert_eq!(in_flight("query_a_again"), 1);
    let mut again = QueryServiceClient::new(channels.channel("query_a_again").unwrap());
    let refused = again.get_product(get()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        a.faults.stats("GetProduct").unwrap().calls,
        1,
        "the refused call never reached the target"
    );
    // Another target's partition is its own.
    assert_eq!(in_flight("query_b"), 0);
    let mut to_b = QueryServiceClient::new(channels.channel("query_b").unwrap());
    to_b.get_product(get()).await.unwrap();
    hung.abort();
}
