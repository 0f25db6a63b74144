//! The README's quick start, word for word below this comment (the
//! `readme` test checks it). Run it from the repository root.

use catalog_proto::query_service_client::QueryServiceClient;
use grpc_resilience::{ResilienceConfig, ResilientChannels};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = ResilienceConfig::from_file("config/resilience.toml")?;
    let channels = ResilientChannels::from_config(&config)?;
    let _queries = QueryServiceClient::new(channels.channel("query")?);
    println!("{:?}", channels.circuit_breaker_status());
    Ok(())
}
