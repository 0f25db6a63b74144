//! The keys of balanced channels: what they map to, and each mistake
//! named by file, line and key.

use std::path::Path;
use std::time::Duration;

use grpc_balance::{HealthConfig, OutlierConfig, SuccessRate};
use grpc_circuit_breaker::BreakerConfig;

use super::*;

fn error_of(text: &str) -> ConfigError {
    ResilienceConfig::parse(
        text,
        Some(Path::new("bad.toml")),
        std::iter::empty::<&str>(),
    )
    .unwrap_err()
}

const BALANCED: &str = r#"
[channels.query]
endpoints = ["http://127.0.0.1:50051", "http://127.0.0.1:50052", "http://127.0.0.1:50053"]
services = ["catalog.v1.QueryService"]
connect_timeout = "2s"
max_concurrent_per_endpoint = 64

[channels.query.endpoint_breaker]
failure_threshold = 3

[channels.query.outlier]
base_ejection_time = "10s"
max_ejection_time = "60s"
max_ejection_percent = 50
probe_successes = 2
max_probes = 2

[channels.query.outlier.success_rate]
interval = "5s"
minimum_hosts = 3
request_volume = 20
stdev_factor = 1.5

[channels.query.health]
service = "catalog.v1.QueryService"
retry_backoff = "100ms"

[channels.search]
dns = "search.internal:50051"
dns_refresh = "5s"
"#;

#[test]
fn balanced_keys_map_onto_the_balanced_channels_settings() {
    let config = ResilienceConfig::from_toml(BALANCED).unwrap();
    let query = &config.channels()["query"];
    assert!(query.is_balanced());
    assert_eq!(query.endpoints().unwrap().len(), 3);
    let b = query.to_balance_config("query").unwrap();
    assert_eq!(b.name(), "query");
    assert_eq!(
        b.outlier(),
        &OutlierConfig::default()
            .with_base_ejection_time(Duration::from_secs(10))
            .with_max_ejection_time(Duration::from_secs(60))
            .with_max_ejection_percent(50)
            .with_probe_successes(2)
            .with_max_probes(2)
            .with_success_rate(
                SuccessRate::default()
                    .with_interval(Duration::from_secs(5))
                    .with_minimum_hosts(3)
                    .with_request_volume(20)
                    .with_stdev_factor(1.5)
            )
    );
    assert_eq!(
        b.health(),
        Some(
            &HealthConfig::new("catalog.v1.QueryService")
                .with_retry_backoff(Duration::from_millis(100))
        )
    );
    assert_eq!(
        b.endpoint_breaker(),
        &BreakerConfig::default().with_failure_threshold(3)
    );
    // The endpoint breakers' OPEN time and probes are the outlier settings'.
    assert_eq!(
        b.effective_endpoint_breaker(),
        BreakerConfig::default()
            .with_failure_threshold(3)
            .with_timeout(Duration::from_secs(10))
            .with_success_threshold(2)
            .with_half_open_max_calls(2)
    );
    assert_eq!(b.max_concurrent_calls(), Some(64));
    assert_eq!(b.connect_timeout(), Duration::from_secs(2));

    let search = &config.channels()["search"];
    assert_eq!(search.dns(), Some("search.internal:50051"));
    let s = search.to_balance_config("search").unwrap();
    assert_eq!(s.dns_refresh(), Duration::from_secs(5));
    assert_eq!(s.health(), None, "no [health] table: no health checks");
    // `enabled = false` turns them off.
    let off = ResilienceConfig::from_toml(
        "[channels.q]\nendpoints = [\"http://127.0.0.1:1\"]\n[channels.q.health]\nenabled = false\n",
    )
    .unwrap();
    let off = off.channels()["q"].to_balance_config("q").unwrap();
    assert_eq!(off.health(), None);
    // A single endpoint is not balanced.
    let single = ResilienceConfig::from_toml("[channels.q]\nendpoint = \"http://127.0.0.1:1\"\n");
    assert!(!single.unwrap().channels()["q"].is_balanced());
}

#[test]
fn balanced_channels_round_trip_through_toml_and_code() {
    let config = ResilienceConfig::from_toml(BALANCED).unwrap();
    let text = config.to_toml();
    assert_eq!(
        ResilienceConfig::from_toml(&text).unwrap(),
        config,
        "{text}"
    );
    let in_code = ResilienceConfig::new()
        .with_channel(
            "query",
            ChannelSettings::new()
                .with_endpoints([
                    "http://127.0.0.1:50051",
                    "http://127.0.0.1:50052",
                    "http://127.0.0.1:50053",
                ])
                .with_service("catalog.v1.QueryService")
                .with_connect_timeout(Duration::from_secs(2))
                .with_max_concurrent_per_endpoint(64)
                .with_endpoint_breaker(BreakerSettings::new().with_failure_threshold(3))
                .with_outlier(
                    OutlierSettings::new()
                        .with_base_ejection_time(Duration::from_secs(10))
                        .with_max_ejection_time(Duration::from_secs(60))
                        .with_max_ejection_percent(50)
                        .with_probe_successes(2)
                        .with_max_probes(2)
                        .with_success_rate(
                            SuccessRateSettings::new()
                                .with_interval(Duration::from_secs(5))
                                .with_minimum_hosts(3)
                                .with_request_volume(20)
                                .with_stdev_factor(1.5),
                        ),
                )
                .with_health(
                    HealthSettings::new()
                        .with_service("catalog.v1.QueryService")
                        .with_retry_backoff(Duration::from_millis(100)),
                ),
        )
        .with_channel(
            "search",
            ChannelSettings::new()
                .with_dns("search.internal:50051")
                .with_dns_refresh(Duration::from_secs(5)),
        );
    assert_eq!(in_code, config);
}

#[test]
fn mistake_two_sources_of_endpoints() {
    let e = error_of(
        "[channels.query]\nendpoint = \"http://127.0.0.1:1\"\n\
         endpoints = [\"http://127.0.0.1:2\"]\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:3: channels.query.endpoints: a channel has one source of endpoints: \
         `endpoint` is set too (choose endpoint, endpoints or dns)"
    );
    let e = error_of("[channels.query]\nendpoints = [\"http://a:1\"]\ndns = \"a:1\"\n");
    assert_eq!((e.line(), e.key()), (Some(3), "channels.query.dns"));
}

#[test]
fn mistake_bad_endpoints() {
    let e = error_of("[channels.query]\nendpoints = []\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: channels.query.endpoints = []: must list at least one endpoint"
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\n  \"http://127.0.0.1:1\",\n  \"not a uri\",\n]\n",
    );
    assert_eq!(e.key(), "channels.query.endpoints.1");
    assert_eq!(e.value(), Some("\"not a uri\""));
    assert!(e.reason().starts_with("not a valid URI"), "{e}");
    assert!(e.to_string().starts_with("bad.toml:"), "{e}");
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://127.0.0.1:1\", \"http://127.0.0.1:1/\"]\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:2: channels.query.endpoints.1 = \"http://127.0.0.1:1/\": \
         the same endpoint as endpoints[0]"
    );
    let e = error_of("[channels.query]\nendpoints = [\"127.0.0.1:1\"]\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: channels.query.endpoints.0 = \"127.0.0.1:1\": \
         an endpoint is written `http://host:port`"
    );
    let e = error_of("[channels.query]\nendpoints = \"http://127.0.0.1:1\"\n");
    assert_eq!((e.line(), e.key()), (Some(2), "channels.query.endpoints"));
    assert!(e.reason().contains("expected a sequence"), "{e}");
}

#[test]
fn mistake_bad_dns_name() {
    for bad in [
        "query.internal",
        "http://query.internal:50051",
        ":50051",
        "q:port",
    ] {
        let e = error_of(&format!("[channels.query]\n\ndns = \"{bad}\"\n"));
        assert_eq!(
            e.to_string(),
            format!(
                "bad.toml:3: channels.query.dns = \"{bad}\": a DNS name is written `host:port`, \
                 e.g. `query.internal:50051`"
            )
        );
    }
    let e = error_of("[channels.query]\ndns = \"q:1\"\ndns_refresh = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: channels.query.dns_refresh = 0ms: must be greater than zero"
    );
}

#[test]
fn mistake_outlier_and_health_values() {
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.outlier]\n\
         max_ejection_percent = 101\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:4: channels.query.outlier.max_ejection_percent = 101: must be within 0 and 100"
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.outlier]\n\
         max_ejection_percent = 300\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), "channels.query.outlier.max_ejection_percent")
    );
    assert!(e.reason().contains("u8"), "{e}");
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.outlier]\n\
         base_ejection_time = \"10s\"\nmax_ejection_time = \"5s\"\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:5: channels.query.outlier.max_ejection_time = 5000ms: \
         must be at least base_ejection_time"
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n\
         [channels.query.outlier.success_rate]\nminimum_hosts = 1\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), "channels.query.outlier.success_rate.minimum_hosts")
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.health]\n\
         servce = \"catalog.v1.QueryService\"\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), "channels.query.health.servce")
    );
    assert!(e.reason().contains("unknown field `servce`"), "{e}");
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.health]\n\
         retry_backoff = \"2s\"\nmax_retry_backoff = \"1s\"\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(5), "channels.query.health.max_retry_backoff")
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\nmax_concurrent_per_endpoint = 0\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:3: channels.query.max_concurrent_per_endpoint = 0: must be at least 1"
    );
}

#[test]
fn mistake_endpoint_breaker() {
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.endpoint_breaker]\n\
         failure_threshold = 0\n",
    );
    assert_eq!(
        e.to_string(),
        "bad.toml:4: channels.query.endpoint_breaker.failure_threshold = 0: must be at least 1"
    );
    let e = error_of(
        "[channels.query]\nendpoints = [\"http://a:1\"]\n[channels.query.endpoint_breaker]\n\
         timeout = \"5s\"\n",
    );
    assert_eq!(
        (e.line(), e.key()),
        (Some(4), "channels.query.endpoint_breaker.timeout")
    );
    assert!(
        e.reason()
            .contains("set `[channels.query.outlier] base_ejection_time` instead"),
        "{e}"
    );
}

#[test]
fn mistake_balanced_keys_on_one_endpoint_or_a_bad_name() {
    let e = error_of(
        "[channels.query]\nendpoint = \"http://a:1\"\n[channels.query.outlier]\n\
         max_ejection_percent = 50\n",
    );
    assert_eq!(e.key(), "channels.query.outlier");
    assert_eq!(e.line(), Some(3));
    assert!(
        e.reason()
            .starts_with("applies to a balanced channel: list its endpoints"),
        "{e}"
    );
    let e = error_of("[channels.\"q@1\"]\nendpoints = [\"http://a:1\"]\n");
    assert_eq!(e.key(), "channels.\"q@1\"");
    assert!(e.reason().contains("must not contain `@`"), "{e}");
}
