//! The README's quick start is the quickstart example, word for word, and
//! prints what the README says it prints.

const README: &str = include_str!("../../../README.md");
const EXAMPLE: &str = include_str!("../examples/quickstart.rs");

fn quick_start_block() -> &'static str {
    let section = &README[README.find("## Quick start").expect("a quick start")..];
    let start = section.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let end = start + section[start..].find("```").expect("the block's end");
    &section[start..end]
}

/// The example without its leading `//!` comment.
fn example_code() -> &'static str {
    let start = EXAMPLE.find("\nuse ").expect("the example's code") + 1;
    &EXAMPLE[start..]
}

#[test]
fn the_readme_quick_start_is_the_example() {
    assert_eq!(quick_start_block(), example_code());
}

#[tokio::test]
async fn it_prints_what_the_readme_says() {
    // The example's lines, with the file path from this test's directory.
    use catalog_proto::query_service_client::QueryServiceClient;
    use grpc_resilience::{ResilienceConfig, ResilientChannels};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/resilience.toml");
    let config = ResilienceConfig::from_file(path).unwrap();
    let channels = ResilientChannels::from_config(&config).unwrap();
    let _queries = QueryServiceClient::new(channels.channel("query").unwrap());
    let printed = format!("{:?}", channels.circuit_breaker_status());
    assert!(
        README.contains(&format!("It prints `{printed}`")),
        "the README should say it prints {printed}"
    );
    assert!(EXAMPLE.contains("println!(\"{:?}\", channels.circuit_breaker_status());"));
}
