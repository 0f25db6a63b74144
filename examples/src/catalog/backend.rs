//! The built-in Command and Query services: two tonic servers on
//! 127.0.0.1 over one in-memory catalog (writes through Command, reads
//! through Query), each behind its own fault-injection layer, and each
//! call in a `grpc_server` span, the child of the caller's attempt
//! ([`grpc_otel::ServerTraceLayer`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use catalog_proto::InMemoryCatalog;
use grpc_fault::FaultInjector;
use grpc_otel::ServerTraceLayer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use super::attempts::Downstream;
use super::channels::Targets;
use super::faults::{FaultSettings, FaultSettingsError};

/// How many products the built-in catalog starts with (`p1` to `p20`).
pub const SEED_PRODUCTS: usize = 20;

/// The running built-in services.
#[derive(Debug)]
pub struct Backend {
    /// The catalog both services serve.
    pub catalog: InMemoryCatalog,
    /// The Command service's faults and counters.
    pub command_faults: FaultInjector,
    /// The Query service's faults and counters.
    pub query_faults: FaultInjector,
    /// Where the Command service listens.
    pub command_addr: SocketAddr,
    /// Where the Query service listens.
    pub query_addr: SocketAddr,
    settings: Mutex<[FaultSettings; 2]>,
    seed: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Backend {
    /// Starts both services on 127.0.0.1 (port 0 picks a free port); the
    /// fault plans draw from `seed`.
    ///
    /// # Errors
    ///
    /// The I/O error of a port that cannot be bound.
    pub async fn start(
        command_port: u16,
        query_port: u16,
        seed: u64,
    ) -> std::io::Result<Arc<Self>> {
        let catalog = InMemoryCatalog::with_products(SEED_PRODUCTS);
        let command_faults = FaultInjector::with_log_capacity(0);
        let query_faults = FaultInjector::with_log_capacity(0);
        let command = TcpListener::bind(("127.0.0.1", command_port)).await?;
        let query = TcpListener::bind(("127.0.0.1", query_port)).await?;
        let command_addr = command.local_addr()?;
        let query_addr = query.local_addr()?;
        // The trace layer outermost: a call the faults refuse has its span.
        let serve_command = Server::builder()
            .layer(ServerTraceLayer::new())
            .layer(command_faults.layer())
            .add_service(catalog.command_service())
            .serve_with_incoming(grpc_fault::incoming(command));
        let serve_query = Server::builder()
            .layer(ServerTraceLayer::new())
            .layer(query_faults.layer())
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(query));
        let tasks = vec![
            tokio::spawn(async move {
                if let Err(e) = serve_command.await {
                    tracing::error!(error = %e, "the Command service stopped");
                }
            }),
            tokio::spawn(async move {
                if let Err(e) = serve_query.await {
                    tracing::error!(error = %e, "the Query service stopped");
                }
            }),
        ];
        Ok(Arc::new(Backend {
            catalog,
            command_faults,
            query_faults,
            command_addr,
            query_addr,
            settings: Mutex::default(),
            seed,
            tasks,
        }))
    }

    /// The services' addresses as channel targets.
    pub fn targets(&self) -> Targets {
        Targets {
            command: format!("http://{}", self.command_addr),
            query: format!("http://{}", self.query_addr),
        }
    }

    fn injector(&self, service: Downstream) -> &FaultInjector {
        match service {
            Downstream::Command => &self.command_faults,
            Downstream::Query => &self.query_faults,
        }
    }

    /// Gives `service` these fault settings from now on.
    ///
    /// # Errors
    ///
    /// [`FaultSettingsError`] if a value is invalid; nothing changes then.
    pub fn set_faults(
        &self,
        service: Downstream,
        settings: FaultSettings,
    ) -> Result<(), FaultSettingsError> {
        let mut all = self.settings.lock().unwrap_or_else(PoisonError::into_inner);
        let seed = self.seed.wrapping_add(service as u64);
        settings.apply(self.injector(service), seed)?;
        all[service as usize] = settings;
        Ok(())
    }

    /// The fault settings of `service`.
    pub fn faults(&self, service: Downstream) -> FaultSettings {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)[service as usize].clone()
    }
}
