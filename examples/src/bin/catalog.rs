//! `catalog`: the product catalog system (GraphQL gateway, resilient
//! channels, Command and Query services, live dashboard) and its demo.
//!
//! `cargo run --release -p grpc-resilience-examples -- demo`
//! runs the demo; `... -- serve` keeps the system running.

use std::process::ExitCode;

use clap::Parser;
use grpc_resilience_examples::catalog::cli::{Cli, run};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    run(Cli::parse()).await
}
