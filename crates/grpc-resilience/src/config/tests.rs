use std::time::Duration;

use grpc_resilience_core::CodeSet;
use grpc_retry::Jitter;
use proptest::prelude::*;
use tonic::Code;

use super::*;

const CATALOG: [&str; 4] = [
    "/catalog.v1.QueryService/GetProduct",
    "/catalog.v1.QueryService/ListProducts",
    "/catalog.v1.CommandService/CreateProduct",
    "/catalog.v1.CommandService/ImportProducts",
];

fn shipped_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/resilience.toml")
}

#[test]
fn the_shipped_file_holds_the_designs_values_and_breakers_that_beat_a_bare_channel() {
    let config = ResilienceConfig::from_file_with_methods(shipped_path(), CATALOG).unwrap();
    let compiled = config.compile().unwrap();
    // Failure-rate breakers that open only on a service as good as down
    // (80 % of the last 100, at least 40), probe once a second with one
    // call: the design's count mode opens at once under random faults.
    for name in ["command", "query"] {
        let b = &config.breakers()[name];
        assert_eq!(b.failure_threshold(), None, "{name}: count mode is off");
        assert_eq!(b.success_threshold(), None);
        assert_eq!(b.reset_timeout(), None);
        assert_eq!(b.timeout(), Some(Duration::from_secs(1)));
        assert_eq!(b.half_open_max_calls(), Some(1));
        assert_eq!(
            compiled.breakers[name],
            BreakerConfig::default()
                .with_timeout(Duration::from_secs(1))
                .with_half_open_max_calls(1)
                .with_failure_rate(FailureRate {
                    window: 100,
                    minimum_calls: 40,
                    failure_rate: 80.0,
                    ..FailureRate::default()
                })
        );
    }
    let t = &compiled.timeouts;
    assert_eq!(
        t.timeout_for("/catalog.v1.QueryService/ListProducts"),
        Some(Duration::from_millis(10_000))
    );
    assert_eq!(
        t.timeout_for("/catalog.v1.QueryService/GetProduct"),
        Some(Duration::from_millis(3000))
    );
    assert_eq!(
        t.timeout_for("/catalog.v1.CommandService/CreateProduct"),
        Some(Duration::from_millis(5000))
    );
    assert_eq!(
        t.timeout_for("/catalog.v1.CommandService/ImportProducts"),
        Some(Duration::from_millis(5000))
    );
    let expected = RetryPolicy::default()
        .with_max_attempts(3)
        .with_initial_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_millis(5000))
        .with_multiplier(2.0)
        .with_jitter(Jitter::Proportional(0.2))
        .with_retryable_codes(CodeSet::of(&[
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
        ]));
    assert_eq!(
        compiled
            .retry
            .normal
            .policy_for("/catalog.v1.QueryService/GetProduct"),
        Some(&expected)
    );
    assert_eq!(
        compiled
            .retry
            .normal
            .policy_for("/catalog.v1.CommandService/CreateProduct"),
        Some(&expected.non_idempotent())
    );
    let throttle = config.retry().throttle().unwrap();
    assert_eq!((throttle.max_tokens(), throttle.token_ratio()), (20.0, 1.0));
    assert_eq!(
        config.channels()["query"].services(),
        ["catalog.v1.QueryService"]
    );
    assert_eq!(
        config.channels()["query"].connect_timeout(),
        Some(Duration::from_secs(2))
    );
    assert_eq!(compiled.channel_breakers["command"], "command");
    // And without the method list, short names match in any service.
    ResilienceConfig::from_file(shipped_path()).unwrap();
}

/// Parses `text` as if from `bad.toml` and returns the error's text.
fn error_of(text: &str) -> ConfigError {
    ResilienceConfig::parse(text, Some(Path::new("bad.toml")), CATALOG).unwrap_err()
}

#[test]
fn mistake_unknown_key() {
    let e = error_of("[retry.default]\nmax_attempts = 3\nmax_atempts = 4\n");
    assert_eq!(e.line(), Some(3));
    assert_eq!(e.key(), "retry.default.max_atempts");
    assert!(
        e.to_string()
            .starts_with("bad.toml:3: retry.default.max_atempts: unknown field `max_atempts`"),
        "{e}"
    );
    let e = error_of("[retri.default]\n");
    assert_eq!(e.line(), Some(1));
    assert!(e.to_string().contains("unknown field `retri`"), "{e}");
}

#[test]
fn mistake_unknown_status_code() {
    let e = error_of("[retry.default]\n\nretryable_codes = [\"unavailable\", \"UNAVAILIBLE\"]\n");
    assert_eq!(e.line(), Some(3));
    assert_eq!(e.key(), "retry.default.retryable_codes.1");
    assert_eq!(e.value(), Some("\"UNAVAILIBLE\""));
    assert!(
        e.reason()
            .contains("`UNAVAILIBLE` is not a gRPC status code name"),
        "{e}"
    );
    let e = error_of("[circuit_breakers.query]\nfailure_codes = [99]\n");
    assert!(
        e.to_string()
            .contains("99 is not a gRPC status code number"),
        "{e}"
    );
}

#[test]
fn mistake_invalid_value() {
    let e = error_of("[retry.default]\nmultiplier = 2.0\nmax_attempts = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: retry.default.max_attempts = 0: must be at least 1 (1 means no retry)"
    );
    let e = error_of("[retry.default]\ninitial_delay = \"2s\"\nmax_delay = 1000\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: retry.default.max_delay = 1s: must not be less than initial_delay"
    );
    let e = error_of("[retry.operations.get_product]\njitter = 1.5\n");
    assert_eq!(e.key(), "retry.operations.get_product.jitter");
    assert_eq!(e.line(), Some(2));
    assert!(e.reason().contains("within [0, 1]"), "{e}");
}

#[test]
fn mistake_wrong_type() {
    let e = error_of("[retry.default]\nmax_attempts = \"three\"\n");
    assert_eq!(e.line(), Some(2));
    assert_eq!(e.key(), "retry.default.max_attempts");
    assert_eq!(e.value(), Some("\"three\""));
    assert!(e.reason().contains("expected u32"), "{e}");
}

#[test]
fn mistake_bad_duration() {
    let e = error_of("[timeouts]\ndefault = \"5 parsecs\"\n");
    assert_eq!((e.line(), e.key()), (Some(2), "timeouts.default"));
    assert!(e.reason().contains("invalid duration `5 parsecs`"), "{e}");
    let e = error_of("[timeouts]\ndefault = -5\n");
    assert!(e.reason().contains("cannot be negative"), "{e}");
    let e = error_of("[timeouts]\ndefault = 1.5\n");
    assert!(e.reason().contains("must be an integer"), "{e}");
    let e = error_of("[timeouts]\ndefault = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: timeouts.default = 0ns: a timeout must be greater than zero"
    );
}

#[test]
fn mistake_breaker_settings() {
    let e = error_of("[circuit_breakers.query]\ntimeout = \"30s\"\nfailure_threshold = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: circuit_breakers.query.failure_threshold = 0: must be at least 1"
    );
    let e = error_of("[circuit_breakers.query.failure_rate]\nwindow = 10\nminimum_calls = 20\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: circuit_breakers.query.failure_rate.minimum_calls = 20: must be within 1 and the window size"
    );
}

#[test]
fn mistake_throttle() {
    let e = error_of("[retry.throttle]\nmax_tokens = 10\ntoken_ratio = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:3: retry.throttle.token_ratio = 0: must be above 0 and at most max_tokens"
    );
    let e = error_of("[retry.throttle]\nmax_tokens = 10\n");
    assert!(e.reason().contains("missing field `token_ratio`"), "{e}");
}

#[test]
fn mistake_selectors() {
    let e = ResilienceConfig::from_toml_with_methods(
        "[timeouts.operations]\nget_product = 100\n",
        ["/a.v1.Query/GetProduct", "/a.v2.Query/GetProduct"],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: timeouts.operations.get_product: `get_product` is ambiguous: it matches \
         a.v1.Query/GetProduct, a.v2.Query/GetProduct; write `package.Service/Method` to pick one"
    );
    let e = error_of("[timeouts.operations]\nget_prodcut = 100\n");
    assert!(
        e.reason()
            .starts_with("`get_prodcut` names no known method"),
        "{e}"
    );
    let e = error_of("[timeouts.operations]\n\"Get Product\" = 100\n");
    assert_eq!(e.key(), "timeouts.operations.\"Get Product\"");
    assert_eq!(e.line(), Some(2));
    let e = error_of("[timeouts.operations]\nget_product = 100\nGetProduct = 200\n");
    assert!(e.reason().contains("names the same methods as"), "{e}");
}

#[test]
fn mistake_channels() {
    let e = error_of("[channels.query]\nbreaker = \"qeury\"\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: channels.query.breaker = \"qeury\": there is no [circuit_breakers.qeury] section"
    );
    let e = error_of("[channels.query]\nendpoint = \"not a uri\"\n");
    assert_eq!(e.key(), "channels.query.endpoint");
    assert!(e.reason().starts_with("not a valid URI"), "{e}");
    let e = error_of("[channels.query]\nservices = [\"catalog.v1.QueryService/GetProduct\"]\n");
    assert_eq!(e.key(), "channels.query.services.0");
}

#[test]
fn mistake_syntax_and_missing_file() {
    let e = error_of("[retry.default\nmax_attempts = 3\n");
    assert_eq!(e.line(), Some(1));
    assert!(e.to_string().starts_with("bad.toml:1: "), "{e}");
    let e = ResilienceConfig::from_file("/nonexistent/resilience.toml").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/resilience.toml: cannot read the file"),
        "{e}"
    );
}

#[test]
fn operations_inherit_the_default_and_can_turn_retry_off() {
    let config = ResilienceConfig::from_toml(
        "[retry.default]\nmax_attempts = 4\n[retry.operations.ListProducts]\nenabled = false\n\
         [retry.operations.\"catalog.v1.CommandService\"]\ninitial_delay = \"250ms\"\n",
    )
    .unwrap();
    let p = config.retry_policies().unwrap();
    assert!(
        p.policy_for("/catalog.v1.QueryService/ListProducts")
            .is_none()
    );
    assert_eq!(
        p.policy_for("/catalog.v1.CommandService/CreateProduct"),
        Some(
            &RetryPolicy::default()
                .with_max_attempts(4)
                .with_initial_delay(Duration::from_millis(250))
        )
    );
}

#[test]
fn toml_round_trip_of_the_shipped_file() {
    let config = ResilienceConfig::from_file(shipped_path()).unwrap();
    let text = config.to_toml();
    assert_eq!(
        ResilienceConfig::from_toml(&text).unwrap(),
        config,
        "{text}"
    );
}

fn arb_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..100_000).prop_map(Duration::from_millis),
        (1u64..3600).prop_map(Duration::from_secs),
        (1u64..1_000_000).prop_map(Duration::from_micros),
    ]
}

fn arb_codes() -> impl Strategy<Value = CodeSet> {
    proptest::collection::vec(1i32..17, 1..5)
        .prop_map(|v| v.into_iter().map(Code::from_i32).collect())
}

fn arb_retry() -> impl Strategy<Value = RetrySettings> {
    (
        proptest::option::of(1u32..10),
        proptest::option::of(arb_duration()),
        proptest::option::of(prop_oneof![
            Just(Jitter::None),
            Just(Jitter::Full),
            Just(Jitter::Proportional(0.2)),
            Just(Jitter::Proportional(0.5))
        ]),
        proptest::option::of(arb_codes()),
        proptest::option::of(any::<bool>()),
        proptest::option::of(1.0f64..4.0),
    )
        .prop_map(|(n, d, j, c, i, m)| RetrySettings {
            max_attempts: n,
            initial_delay: d,
            jitter: j,
            retryable_codes: c,
            idempotent: i,
            multiplier: m,
            ..RetrySettings::default()
        })
}

proptest! {
    #[test]
    fn any_config_round_trips_through_toml(
        default in proptest::option::of(arb_retry()),
        op in arb_retry(),
        timeout in proptest::option::of(arb_duration()),
        op_timeout in proptest::option::of(arb_duration()),
        threshold in proptest::option::of(1u32..20),
        window in proptest::option::of(1u32..200),
        breaker_timeout in proptest::option::of(arb_duration()),
    ) {
        let mut config = ResilienceConfig::new()
            .with_retry_operation("catalog.v1.QueryService/GetProduct", op)
            .with_retry_throttle(ThrottleSettings::new(10.0, 0.5))
            .with_breaker("query", BreakerSettings {
                failure_threshold: threshold,
                timeout: breaker_timeout,
                failure_rate: window.map(|w| FailureRateSettings::new().with_window(w)),
                ..BreakerSettings::default()
            })
            .with_channel("query", ChannelSettings::new()
                .with_endpoint("http://127.0.0.1:1")
                .with_service("catalog.v1.QueryService")
                .with_connect_timeout(Duration::from_secs(1)));
        if let Some(d) = default {
            config = config.with_retry_default(d);
        }
        if let Some(t) = timeout {
            config = config.with_timeout_default(t);
        }
        config = match op_timeout {
            Some(t) => config.with_timeout_operation("list_products", t),
            None => config.without_timeout("list_products"),
        };
        let text = config.to_toml();
        let back: ResilienceConfig = toml::from_str(&text).unwrap();
        prop_assert_eq!(back, config, "{}", text);
    }

    #[test]
    fn parsing_never_panics(text in "[\\[\\]a-z_.=\" 0-9\n]{0,80}") {
        let _ = ResilienceConfig::from_toml(&text);
    }
}

const A6_EXAMPLE: &str = r#"{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [
    {
      "name": [{"service": "catalog.v1.QueryService", "method": "GetProduct"}],
      "timeout": "3s",
      "waitForReady": true,
      "retryPolicy": {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", 4]
      }
    },
    {
      "name": [{"service": "catalog.v1.CommandService"}],
      "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.5s", "nonFatalStatusCodes": ["UNAVAILABLE"]}
    },
    {
      "name": [{}],
      "timeout": "5s",
      "retryPolicy": {
        "MaxAttempts": 7,
        "InitialBackoff": ".01s",
        "MaxBackoff": ".01s",
        "BackoffMultiplier": 1.0,
        "RetryableStatusCodes": ["UNAVAILABLE"]
      }
    }
  ],
  "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}
}"#;

#[test]
fn grpc_service_config_maps_to_the_same_policies() {
    let (config, warnings) = ResilienceConfig::from_grpc_service_config(A6_EXAMPLE).unwrap();
    let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "loadBalancingConfig: not supported; ignored",
            "methodConfig[0].waitForReady: not supported; ignored",
            "methodConfig[2].retryPolicy.MaxAttempts: 7 is treated as 5, as gRPC does (gRFC A6)",
        ]
    );
    let compiled = config.compile().unwrap();
    assert_eq!(
        compiled
            .retry
            .normal
            .policy_for("/catalog.v1.QueryService/GetProduct"),
        Some(
            &RetryPolicy::default()
                .with_max_attempts(4)
                .with_initial_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(1))
                .with_multiplier(2.0)
                .with_jitter(Jitter::Full)
                .with_retryable_codes(CodeSet::of(&[Code::Unavailable, Code::DeadlineExceeded]))
        )
    );
    assert_eq!(
        compiled.retry.normal.policy_for("/other.Svc/Call"),
        Some(
            &RetryPolicy::default()
                .with_max_attempts(5)
                .with_initial_delay(Duration::from_millis(10))
                .with_max_delay(Duration::from_millis(10))
                .with_multiplier(1.0)
                .with_jitter(Jitter::Full)
                .with_retryable_codes(CodeSet::of(&[Code::Unavailable]))
        )
    );
    assert_eq!(
        compiled
            .timeouts
            .timeout_for("/catalog.v1.QueryService/GetProduct"),
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        compiled.timeouts.timeout_for("/other.Svc/Call"),
        Some(Duration::from_secs(5))
    );
    assert_eq!(
        compiled
            .retry
            .normal
            .hedging_policy_for("/catalog.v1.CommandService/CreateProduct"),
        Some(
            &grpc_retry::HedgingPolicy::default()
                .with_max_attempts(3)
                .with_hedging_delay(Duration::from_millis(500))
                .with_non_fatal_codes(CodeSet::of(&[Code::Unavailable]))
        )
    );
    assert_eq!(
        config.retry().throttle(),
        Some(&ThrottleSettings::new(10.0, 0.1))
    );
    // The import reads back as our own file.
    assert_eq!(
        ResilienceConfig::from_toml(&config.to_toml()).unwrap(),
        config
    );
}

#[test]
fn grpc_service_config_mistakes_are_named() {
    for (json, expected) in [
        ("{", "not valid JSON"),
        (
            r#"{"methodConfig": [{"name": [{}], "timeout": "1"}]}"#,
            "methodConfig[0].timeout = \"1\": a duration is decimal seconds",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
            "methodConfig[0].retryPolicy.maxAttempts = 1: must be at least 2",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2}}]}"#,
            "`initialBackoff` is required",
        ),
        (
            r#"{"methodConfig": [{"name": [{"method": "Get"}]}]}"#,
            "must name its service",
        ),
        (
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["NOPE"]}}]}"#,
            "retryableStatusCodes[0] = \"NOPE\": `NOPE` is not a gRPC status code name",
        ),
        (
            r#"{"retryThrottling": {"maxTokens": 0, "tokenRatio": 0.1}}"#,
            "retry.throttle.max_tokens = 0",
        ),
    ] {
        let err = ResilienceConfig::from_grpc_service_config(json).unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{err} should contain {expected}"
        );
    }
}

#[test]
fn a_breaker_can_go_without_its_latency_metric() {
    let text = "[circuit_breakers.query]\nlatency_metric = false\n";
    let config = ResilienceConfig::from_toml(text).unwrap();
    assert_eq!(config.breakers()["query"].latency_metric(), Some(false));
    assert_eq!(
        config.compile().unwrap().breakers["query"],
        BreakerConfig::default().with_latency_metric(false)
    );
    assert_eq!(
        ResilienceConfig::from_toml(&config.to_toml()).unwrap(),
        config
    );
    assert_eq!(
        error_of("[circuit_breakers.query]\nlatency_metric = \"no\"\n").to_string(),
        "bad.toml:2: circuit_breakers.query.latency_metric = \"no\": invalid type: string \"no\", expected a boolean"
    );
}
