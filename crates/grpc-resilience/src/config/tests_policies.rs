//! The config of budgets, hedging and bulkheads.

use std::time::Duration;

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
    let back = ResilienceConfig::from_toml(&text).unwrap();
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
