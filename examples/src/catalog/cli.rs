//! The `catalog` command line: `serve` and `demo`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tonic::Code;

use super::channels::{CatalogConfig, Stack, Targets};
use super::faults::{FaultSettings, code_from_name};
use super::system::{System, SystemOptions};

/// The product catalog system: a GraphQL gateway calling a Command and a
/// Query service through resilient gRPC channels, with a live dashboard.
#[derive(Debug, Parser)]
#[command(name = "catalog", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Export traces over OTLP/gRPC to this endpoint (e.g.
    /// http://127.0.0.1:4317); default: the OTEL_EXPORTER_OTLP_ENDPOINT
    /// environment variable; with neither, traces are not exported.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the gateway (and, unless targets are given, the Command and
    /// Query services) on 127.0.0.1 until Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Runs a bounded scenario (steady traffic, errors, an outage,
    /// recovery, slow responses, lost write responses) through resilient
    /// and plain channels side by side, and prints a report. Exits with 0
    /// only if the resilient run met its expectations.
    Demo(DemoArgs),
}

/// `catalog serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The gateway's HTTP port (dashboard, GraphQL, metrics).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// The built-in Command service's gRPC port.
    #[arg(long, default_value_t = 50051)]
    pub command_port: u16,
    /// The built-in Query service's gRPC port.
    #[arg(long, default_value_t = 50052)]
    pub query_port: u16,
    /// One server serving both services (`http://host:port`), instead of
    /// the built-in ones.
    #[arg(long, conflicts_with_all = ["target_command", "target_query"])]
    pub target: Option<String>,
    /// Your Command service (`http://host:port`); needs `--target-query`.
    #[arg(long, requires = "target_query")]
    pub target_command: Option<String>,
    /// Your Query service (`http://host:port`); needs `--target-command`.
    #[arg(long, requires = "target_command")]
    pub target_query: Option<String>,
    /// Bare channels: no deadline, retry or breaker.
    #[arg(long)]
    pub plain: bool,
    /// The resilience config of the gateway's channels (the format of
    /// `config/resilience.toml`, with `[channels.command]` and
    /// `[channels.query]`); default: the built-in
    /// `examples/config/catalog.toml`.
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
    /// The seed of the injected faults.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Faults of the built-in Command service at start.
    #[command(flatten)]
    pub command_faults: CommandFaultArgs,
    /// Faults of the built-in Query service at start.
    #[command(flatten)]
    pub query_faults: QueryFaultArgs,
}

macro_rules! fault_args {
    ($name:ident, $service:literal, $outage:ident, $rate:ident, $code:ident, $lost:ident, $latency:ident) => {
        #[doc = concat!("Startup faults of the ", $service, " service.")]
        #[derive(Debug, Args)]
        pub struct $name {
            #[doc = concat!("The ", $service, " service starts down (every call UNAVAILABLE).")]
            #[arg(long)]
            pub $outage: bool,
            #[doc = concat!("Share of ", $service, " calls (0 to 1) failing with the error code.")]
            #[arg(long, default_value_t = 0.0)]
            pub $rate: f64,
            #[doc = concat!("The code of the ", $service, " service's injected errors.")]
            #[arg(long, default_value = "UNAVAILABLE")]
            pub $code: String,
            #[doc = concat!("Share of ", $service, " calls whose response is lost after the write.")]
            #[arg(long, default_value_t = 0.0)]
            pub $lost: f64,
            #[doc = concat!("Milliseconds added to every ", $service, " call.")]
            #[arg(long, default_value_t = 0)]
            pub $latency: u64,
        }

        impl $name {
            fn settings(&self) -> Result<FaultSettings, String> {
                let code: Code = code_from_name(&self.$code).map_err(|e| e.to_string())?;
                let errors = if self.$rate > 0.0 {
                    vec![(code, self.$rate)]
                } else {
                    Vec::new()
                };
                let settings = FaultSettings {
                    outage: self.$outage,
                    errors,
                    lost_responses: self.$lost,
                    latency: Duration::from_millis(self.$latency),
                };
                settings.validate().map_err(|e| e.to_string())?;
                Ok(settings)
            }
        }
    };
}

fault_args!(
    CommandFaultArgs,
    "Command",
    command_outage,
    command_error_rate,
    command_error_code,
    command_lost_responses,
    command_latency_ms
);
fault_args!(
    QueryFaultArgs,
    "Query",
    query_outage,
    query_error_rate,
    query_error_code,
    query_lost_responses,
    query_latency_ms
);

/// `catalog demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// A shorter scenario (about half the time).
    #[arg(long)]
    pub quick: bool,
    /// No progress bars (for logs and CI).
    #[arg(long)]
    pub no_progress: bool,
}

/// Runs the command line.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => match serve(*args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("catalog serve: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => super::demo::run_cli(args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<(), grpc_resilience_core::BoxError> {
    let targets = match (&args.target, &args.target_command, &args.target_query) {
        (Some(both), _, _) => Some(Targets {
            command: both.clone(),
            query: both.clone(),
        }),
        (None, Some(command), Some(query)) => Some(Targets {
            command: command.clone(),
            query: query.clone(),
        }),
        _ => None,
    };
    let external = targets.clone();
    let options = SystemOptions {
        stack: if args.plain {
            Stack::Plain
        } else {
            Stack::Resilient
        },
        http_port: args.http_port,
        command_port: args.command_port,
        query_port: args.query_port,
        targets,
        seed: args.seed,
        command_faults: args.command_faults.settings()?,
        query_faults: args.query_faults.settings()?,
        config: match &args.config {
            Some(path) => CatalogConfig::from_file(path)?,
            None => CatalogConfig::built_in(),
        },
    };
    let system = System::start(options).await?;
    println!(
        "catalog: gateway running ({} channels)",
        system.gateway.channels().stack().as_str()
    );
    println!("  dashboard  {}", system.url());
    println!("  GraphiQL   {}", system.graphql_url());
    println!("  metrics    {}", system.metrics_url());
    println!("  websocket  {}", system.graphql_ws_url());
    match &system.backend {
        Some(backend) => {
            println!("  Command    grpc://{}", backend.command_addr);
            println!("  Query      grpc://{}", backend.query_addr);
        }
        None => {
            if let Some(targets) = &external {
                println!("  Command    {} (yours)", targets.command);
                println!("  Query      {} (yours)", targets.query);
            }
            println!("  (faults can only be injected into the built-in services)");
        }
    }
    println!("What shapes the channels:");
    for s in system.gateway.channels().settings() {
        println!("  {}: {} [{}]", s.name, s.value, s.source);
    }
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
