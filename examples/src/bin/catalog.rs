//! `catalog`: the product catalog system (GraphQL gateway, resilient
//! channels, Command and Query services, live dashboard) and its demo.
//!
//! `cargo run --release -p grpc-resilience-examples -- demo`
//! runs the demo; `... -- serve` keeps the system running. With
//! `--otlp-endpoint URL` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) the traces go
//! to that OTLP collector.

use std::process::ExitCode;

use clap::Parser;
use grpc_resilience_examples::catalog::cli::{Cli, run};
use grpc_resilience_examples::catalog::traces;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let provider = match traces::otlp_endpoint(cli.otlp_endpoint.as_deref()) {
        Some(endpoint) => match traces::otlp_provider(&endpoint) {
            Ok(provider) => Some(provider),
            Err(e) => {
                eprintln!("catalog: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")));
    tracing_subscriber::registry()
        .with(logs)
        .with(provider.as_ref().map(traces::layer))
        .init();
    let code = run(cli).await;
    if let Some(provider) = provider {
        // Sends the spans still in the batch.
        if let Err(e) = provider.shutdown() {
            eprintln!("catalog: exporting the last traces failed: {e}");
        }
    }
    code
}
