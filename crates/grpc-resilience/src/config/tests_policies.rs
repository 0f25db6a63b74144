//! The config of budgets, hedging and bulkheads.

use std::time::Duration;

use grpc_resilience_core::CodeSet;

use super::*;

fn error_of(text: &str) -> ConfigError {
    ResilienceConfig::parse(
        text,
        Some(Path::new("bad.toml")),
        std::iter::empty::<&str>(),
    )
    .unwrap_err()
}

fn round_trips(config: &ResilienceConfig) {
    let text = config.to_toml();
    let back = ResilienceConfig::from_toml_with_methods(&text, config.known_methods()).unwrap();
    assert_eq!(&back, config, "{text}");
}

#[test]
fn retry_budget_reads_and_round_trips() {
    let config = ResilienceConfig::from_toml(
        "[retry.budget]\nttl = \"5s\"\nmin_retries_per_second = 3\nretry_ratio = 0.25\n",
    )
    .unwrap();
    let b = config.retry().budget().unwrap();
    assert_eq!(b.ttl(), Some(Duration::from_secs(5)));
    assert_eq!(b.min_retries_per_second(), Some(3));
    assert_eq!(b.retry_ratio(), Some(0.25));
    let budget = b.to_budget().unwrap();
    assert_eq!(budget.retry_ratio(), 0.25);
    round_trips(&config);
    round_trips(&ResilienceConfig::new().with_retry_budget(BudgetSettings::new()));
    round_trips(
        &ResilienceConfig::new().with_retry_budget(BudgetSettings::new().with_retry_ratio(0.1)),
    );
}

#[test]
fn mistake_budget() {
    let e = error_of("[retry.budget]\nttl = \"0s\"\n");
    assert_eq!(e.key(), "retry.budget.ttl");
    assert_eq!(e.line(), Some(2));
    assert!(e.to_string().contains("must be within [1s, 60s]"), "{e}");
    let e = error_of("[retry.budget]\nmin_retries_per_second = 0\nretry_ratio = 0\n");
    assert_eq!(e.key(), "retry.budget.retry_ratio");
    assert!(e.to_string().contains("would allow no retry"), "{e}");
    let e = error_of("[retry.budget]\nratio = 0.2\n");
    assert_eq!(e.key(), "retry.budget.ratio");
    assert!(e.to_string().contains("unknown field `ratio`"), "{e}");
}

const CATALOG: [&str; 2] = [
    "/catalog.v1.QueryService/GetProduct",
    "/catalog.v1.CommandService/CreateProduct",
];

#[test]
fn hedging_reads_inherits_and_round_trips() {
    let config = ResilienceConfig::from_toml_with_methods(
        "[retry.default]\nmax_attempts = 3\n\
         [hedging.operations.get_product]\nmax_attempts = 2\nhedging_delay = \"20ms\"\n\
         non_fatal_codes = [\"UNAVAILABLE\"]\nmax_pushback = \"1s\"\n\
         [hedging.operations.create_product]\nidempotent = false\nidempotency_keys = true\n",
        CATALOG,
    )
    .unwrap();
    let compiled = config.compile().unwrap();
    let get = "/catalog.v1.QueryService/GetProduct";
    let create = "/catalog.v1.CommandService/CreateProduct";
    let hedge = compiled.retry.normal.hedging_policy_for(get).unwrap();
    assert_eq!(hedge.max_attempts(), 2);
    assert_eq!(hedge.hedging_delay(), Duration::from_millis(20));
    assert_eq!(
        hedge.non_fatal_codes(),
        CodeSet::of(&[tonic::Code::Unavailable])
    );
    assert_eq!(hedge.max_pushback(), Duration::from_secs(1));
    assert_eq!(
        compiled.retry.normal.policy_for(get),
        None,
        "hedged, not retried"
    );
    // Other methods keep [retry.default].
    assert!(
        compiled
            .retry
            .normal
            .policy_for("/catalog.v1.QueryService/ListProducts")
            .is_some()
    );
    // A write with keys may be hedged.
    let write = compiled.retry.normal.hedging_policy_for(create).unwrap();
    assert!(!write.is_idempotent() && write.sends_idempotency_keys());
    // A call marked idempotent sends keys; one marked non-idempotent is sent once.
    assert!(
        compiled
            .retry
            .keyed
            .hedging_policy_for(get)
            .unwrap()
            .sends_idempotency_keys()
    );
    assert_eq!(compiled.retry.strict.hedging_policy_for(get), None);
    assert_eq!(compiled.retry.strict.policy_for(get), None);
    round_trips(&config);

    // Operations inherit [hedging.default].
    let config = ResilienceConfig::from_toml(
        "[hedging.default]\nmax_attempts = 4\nhedging_delay = 30\n\
         [hedging.operations.\"catalog.v1.QueryService/GetProduct\"]\nhedging_delay = 10\n",
    )
    .unwrap();
    let policies = config.retry_policies().unwrap();
    let op = policies.hedging_policy_for(get).unwrap();
    assert_eq!(
        (op.max_attempts(), op.hedging_delay()),
        (4, Duration::from_millis(10))
    );
    let other = policies.hedging_policy_for(create).unwrap();
    assert_eq!(
        (other.max_attempts(), other.hedging_delay()),
        (4, Duration::from_millis(30))
    );
    round_trips(&config);
    round_trips(
        &ResilienceConfig::new().with_hedging_operation(
            "catalog.v1.QueryService",
            HedgingSettings::new()
                .with_max_attempts(3)
                .with_hedging_delay(Duration::ZERO)
                .with_non_fatal_codes(CodeSet::of(&[tonic::Code::Internal]))
                .with_idempotent(true)
                .with_idempotency_keys(false)
                .with_max_pushback(Duration::from_millis(500)),
        ),
    );
}

#[test]
fn mistake_hedging_a_write_without_keys() {
    let e = error_of("[hedging.operations.CreateProduct]\nidempotent = false\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: hedging.operations.CreateProduct.idempotent = false: \
         a non-idempotent method may only be hedged with idempotency keys"
    );
}

#[test]
fn mistake_hedging_values() {
    let e = error_of("[hedging.default]\nmax_attempts = 1\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: hedging.default.max_attempts = 1: must be within [2, 100]"
    );
    let e = error_of("[hedging.default]\nnon_fatal_codes = [\"OK\"]\n");
    assert_eq!(e.key(), "hedging.default.non_fatal_codes");
    assert!(e.to_string().contains("OK is not a failure"), "{e}");
    let e = error_of("[hedging.default]\nnon_fatal_codes = [\"NOPE\"]\n");
    assert_eq!(e.line(), Some(2));
    let e = error_of("[hedging.default]\ndelay = 5\n");
    assert_eq!(e.key(), "hedging.default.delay");
    assert!(e.to_string().contains("unknown field `delay`"), "{e}");
}

#[test]
fn mistake_a_method_both_retried_and_hedged() {
    let e = error_of("[retry.default]\n[hedging.default]\n");
    assert_eq!(e.key(), "hedging.default");
    assert!(e.reason().contains("either retried or hedged"), "{e}");
    let e = error_of(
        "[retry.operations.get_product]\nmax_attempts = 2\n[hedging.operations.get_product]\n",
    );
    assert_eq!(e.key(), "hedging.operations.get_product");
    assert_eq!(e.line(), Some(3));
    assert!(
        e.reason()
            .contains("[retry.operations.\"get_product\"] names the same methods"),
        "{e}"
    );
}

#[test]
fn grpc_service_config_imports_hedging_policy() {
    // As gRFC A6 writes a hedging policy.
    let (config, warnings) = ResilienceConfig::from_grpc_service_config(
        r#"{
          "methodConfig": [
            {
              "name": [{"service": "catalog.v1.QueryService", "method": "GetProduct"}],
              "hedgingPolicy": {
                "maxAttempts": 3,
                "hedgingDelay": "0.02s",
                "nonFatalStatusCodes": ["UNAVAILABLE", 13]
              }
            },
            {
              "name": [{"service": "catalog.v1.QueryService", "method": "ListProducts"}],
              "hedgingPolicy": {"maxAttempts": 7}
            },
            {
              "name": [{}],
              "retryPolicy": {
                "maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "1s",
                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]
              }
            }
          ]
        }"#,
    )
    .unwrap();
    assert_eq!(
        warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["methodConfig[1].hedgingPolicy.maxAttempts: 7 is treated as 5, as gRPC does (gRFC A6)"]
    );
    let policies = config.retry_policies().unwrap();
    let get = policies
        .hedging_policy_for("/catalog.v1.QueryService/GetProduct")
        .unwrap();
    assert_eq!(get.max_attempts(), 3);
    assert_eq!(get.hedging_delay(), Duration::from_millis(20));
    assert_eq!(
        get.non_fatal_codes(),
        CodeSet::of(&[tonic::Code::Unavailable, tonic::Code::Internal])
    );
    let list = policies
        .hedging_policy_for("/catalog.v1.QueryService/ListProducts")
        .unwrap();
    assert_eq!(
        (list.max_attempts(), list.hedging_delay()),
        (5, Duration::ZERO)
    );
    assert!(
        policies
            .policy_for("/catalog.v1.CommandService/CreateProduct")
            .is_some()
    );
    round_trips(&config);
}

#[test]
fn grpc_service_config_hedging_mistakes_are_named() {
    let mistake = |json: &str| ResilienceConfig::from_grpc_service_config(json).unwrap_err();
    let e =
        mistake(r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"hedgingDelay": "1s"}}]}"#);
    assert_eq!(e.key(), "methodConfig[0].hedgingPolicy");
    assert!(e.reason().contains("`maxAttempts` is required"), "{e}");
    let e = mistake(
        r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "soon"}}]}"#,
    );
    assert_eq!(e.key(), "methodConfig[0].hedgingPolicy.hedgingDelay");
    let e = mistake(
        r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2},
            "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s", "maxBackoff": "1s",
            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
    );
    assert_eq!(e.key(), "methodConfig[0]");
    assert!(e.reason().contains("only one of"), "{e}");
}

#[test]
fn bulkhead_reads_inherits_and_round_trips() {
    let config = ResilienceConfig::from_toml_with_methods(
        "[bulkhead.default]\nmax_concurrent = 32\nmax_queue = 16\nmax_wait = \"50ms\"\n\
         [bulkhead.operations.get_product.aimd]\ninitial_limit = 10\nmin_limit = 2\nmax_limit = 50\n\
         backoff_ratio = 0.8\nlatency_threshold = \"1s\"\n\
         [bulkhead.operations.\"catalog.v1.CommandService\"]\nmax_queue = 0\n\
         [bulkhead.operations.\"catalog.v1.CommandService\".gradient]\ninitial_limit = 5\n\
         min_limit = 1\nmax_limit = 100\nsmoothing = 0.5\ntolerance = 2.0\nqueue_allowance = 3.0\n\
         short_window = 20\nmin_rtt_window = \"10s\"\n",
        CATALOG,
    )
    .unwrap();
    let spec = config.compile().unwrap().bulkhead.unwrap();
    let per_service = spec.per_service.as_ref().unwrap();
    assert_eq!(per_service.limit(), &grpc_bulkhead::Limit::Fixed(32));
    assert_eq!(per_service.max_queue(), 16);
    assert_eq!(per_service.max_wait(), Duration::from_millis(50));
    let parts: BTreeMap<_, _> = spec.partitions.iter().cloned().collect();
    let command = &parts["catalog.v1.CommandService/*"];
    assert_eq!(command.max_queue(), 0, "its own");
    assert_eq!(command.max_wait(), Duration::from_millis(50), "inherited");
    assert_eq!(
        command.limit(),
        &grpc_bulkhead::Limit::Gradient(Gradient {
            initial_limit: 5,
            min_limit: 1,
            max_limit: 100,
            smoothing: 0.5,
            tolerance: 2.0,
            queue_allowance: 3.0,
            short_window: 20,
            min_rtt_window: Duration::from_secs(10),
        })
    );
    let get = &parts["catalog.v1.QueryService/GetProduct"];
    assert_eq!(
        get.limit(),
        &grpc_bulkhead::Limit::Aimd(Aimd {
            initial_limit: 10,
            min_limit: 2,
            max_limit: 50,
            backoff_ratio: 0.8,
            latency_threshold: Duration::from_secs(1),
        })
    );
    assert_eq!(get.max_queue(), 16, "inherited");
    round_trips(&config);
    round_trips(
        &ResilienceConfig::new()
            .with_bulkhead_operation("*", BulkheadSettings::new().with_max_concurrent(3))
            .with_bulkhead_default(
                BulkheadSettings::new().with_aimd(AimdSettings::new().with_max_limit(90)),
            ),
    );
    // No section: no bulkhead.
    assert!(
        ResilienceConfig::new()
            .compile()
            .unwrap()
            .bulkhead
            .is_none()
    );
}

#[test]
fn mistake_bulkhead_two_limits() {
    let e = error_of("[bulkhead.default]\nmax_concurrent = 3\n[bulkhead.default.aimd]\n");
    assert_eq!(e.key(), "bulkhead.default.aimd");
    assert!(
        e.reason()
            .contains("one limit: `max_concurrent` is set too"),
        "{e}"
    );
}

#[test]
fn mistake_bulkhead_values() {
    let e = error_of("[bulkhead.default]\nmax_concurrent = 0\n");
    assert_eq!(
        e.to_string(),
        "bad.toml:2: bulkhead.default.max_concurrent = 0: must be at least 1"
    );
    let e = error_of("[bulkhead.operations.GetProduct.gradient]\ntolerance = 0.5\n");
    assert_eq!(e.key(), "bulkhead.operations.GetProduct.gradient.tolerance");
    assert_eq!(e.value(), Some("0.5"));
    assert_eq!(e.line(), Some(2));
    let e = error_of("[bulkhead.default.aimd]\nbackof_ratio = 0.5\n");
    assert_eq!(e.key(), "bulkhead.default.aimd.backof_ratio");
    assert!(
        e.to_string().contains("unknown field `backof_ratio`"),
        "{e}"
    );
    let e = error_of("[bulkhead]\nmax_concurrent = 3\n");
    assert!(
        e.to_string().contains("unknown field `max_concurrent`"),
        "{e}"
    );
}

#[test]
fn the_shipped_files_commented_examples_are_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/resilience.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let examples: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("#   "))
        .map(|l| format!("{l}\n"))
        .collect();
    for section in [
        "[retry.budget]",
        "[hedging.operations.get_product]",
        "[bulkhead.default]",
        "[bulkhead.operations.list_products.gradient]",
        "[circuit_breakers.admin]",
        "[circuit_breakers.query.failure_rate]",
    ] {
        assert!(examples.contains(section), "{section} is shown");
    }
    let config = ResilienceConfig::from_toml_with_methods(
        &examples,
        [
            "/catalog.v1.QueryService/GetProduct",
            "/catalog.v1.QueryService/ListProducts",
            "/catalog.v1.CommandService/CreateProduct",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}\n{examples}"));
    assert!(config.compile().unwrap().bulkhead.is_some());
    // And the file itself, examples commented out, has none of them.
    let shipped = ResilienceConfig::from_toml(&text).unwrap();
    assert!(shipped.retry().budget().is_none());
    assert!(shipped.hedging().operations().is_empty());
    assert!(shipped.bulkhead().default_settings().is_none());
}
