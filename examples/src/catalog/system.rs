//! Everything in one process: the built-in services (or external
//! targets), the channels, the gateway and its HTTP server.

use std::net::SocketAddr;
use std::sync::Arc;

use grpc_resilience_core::BoxError;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::attempts::Downstream;
use super::backend::Backend;
use super::channels::{self, CatalogConfig, Stack, Targets};
use super::faults::FaultSettings;
use super::gateway::{self, Gateway};
use super::{telemetry, web};

/// How to start a system.
#[derive(Clone, Debug)]
pub struct SystemOptions {
    /// The channels' stack.
    pub stack: Stack,
    /// The gateway's HTTP port on 127.0.0.1 (0: any free port).
    pub http_port: u16,
    /// The built-in Command service's port (0: any free port).
    pub command_port: u16,
    /// The built-in Query service's port (0: any free port).
    pub query_port: u16,
    /// External services to call instead of the built-in ones.
    pub targets: Option<Targets>,
    /// The seed of the fault plans.
    pub seed: u64,
    /// Faults of the built-in Command service from the start.
    pub command_faults: FaultSettings,
    /// Faults of the built-in Query service from the start.
    pub query_faults: FaultSettings,
    /// The resilient channels' config (default: the built-in
    /// `examples/config/catalog.toml`).
    pub config: CatalogConfig,
}

impl Default for SystemOptions {
    fn default() -> Self {
        SystemOptions {
            stack: Stack::Resilient,
            http_port: 0,
            command_port: 0,
            query_port: 0,
            targets: None,
            seed: 7,
            command_faults: FaultSettings::none(),
            query_faults: FaultSettings::none(),
            config: CatalogConfig::built_in(),
        }
    }
}

/// A running system; dropping it stops its servers.
#[derive(Debug)]
pub struct System {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The built-in services, unless external targets are used.
    pub backend: Option<Arc<Backend>>,
    /// Where the gateway's HTTP server listens.
    pub http_addr: SocketAddr,
    server: JoinHandle<()>,
}

impl Drop for System {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl System {
    /// Installs the metrics recorder (once per process), starts the
    /// services, builds the channels and serves the gateway.
    ///
    /// # Errors
    ///
    /// A port that cannot be bound, a bad target or a bad setting.
    pub async fn start(options: SystemOptions) -> Result<System, BoxError> {
        // First: the layers register their metrics when they are built.
        let metrics = telemetry::install()?;
        let (backend, targets) = match &options.targets {
            Some(targets) => (None, targets.clone()),
            None => {
                let backend =
                    Backend::start(options.command_port, options.query_port, options.seed).await?;
                backend.set_faults(Downstream::Command, options.command_faults.clone())?;
                backend.set_faults(Downstream::Query, options.query_faults.clone())?;
                let targets = backend.targets();
                (Some(backend), targets)
            }
        };
        let channels = channels::build(&targets, options.stack, &options.config)?;
        let gateway = Gateway::new(channels, backend.clone());
        let router = web::router(gateway::schema(gateway.clone()), metrics);
        let listener = TcpListener::bind(("127.0.0.1", options.http_port)).await?;
        let http_addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "the gateway's HTTP server stopped");
            }
        });
        Ok(System {
            gateway,
            backend,
            http_addr,
            server,
        })
    }

    /// The dashboard's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.http_addr)
    }

    /// The GraphQL endpoint's URL.
    pub fn graphql_url(&self) -> String {
        format!("http://{}{}", self.http_addr, web::GRAPHQL_PATH)
    }

    /// The GraphQL subscriptions' URL.
    pub fn graphql_ws_url(&self) -> String {
        format!("ws://{}{}", self.http_addr, web::GRAPHQL_WS_PATH)
    }

    /// The metrics' URL.
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.http_addr)
    }
}
