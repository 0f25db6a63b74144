//! The built-in Command and Query services: two tonic servers on
//! 127.0.0.1 over one in-memory catalog (writes through Command, reads
//! through Query), each behind its own fault-injection layer, and each
//! call in a `grpc_server` span, the child of the caller's attempt
//! ([`grpc_otel::ServerTraceLayer`]).
//!
//! Each server also serves the standard `grpc.health.v1.Health` service
//! (untouched by the faults): its catalog service (and the whole server,
//! `""`) reports `SERVING`, and `NOT_SERVING` while an outage is set, so a
//! balanced channel with health checks ejects it before a call fails.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use catalog_proto::InMemoryCatalog;
use grpc_fault::FaultInjector;
use grpc_otel::ServerTraceLayer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

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
    health: [watch::Sender<ServingStatus>; 2],
    seed: u64,
    tasks: Vec<JoinHandle<()>>,
}

/// The fully qualified gRPC service name of `service`, as the health
/// protocol and the fault selectors name it.
pub fn grpc_service(service: Downstream) -> &'static str {
    match service {
        Downstream::Command => "catalog.v1.CommandService",
        Downstream::Query => "catalog.v1.QueryService",
    }
}

/// Serves `service`'s health from `reporter`, applying every status sent
/// on `rx` in order (the last one wins), to the whole server (`""`) and to
/// the service.
fn health_task(
    reporter: HealthReporter,
    service: Downstream,
    mut rx: watch::Receiver<ServingStatus>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let status = *rx.borrow_and_update();
            // The server first: a watcher of the service that sees the
            // change knows the server's status has it too.
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(grpc_service(service), status)
                .await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
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
        let (command_health, command_health_service) = tonic_health::server::health_reporter();
        let (query_health, query_health_service) = tonic_health::server::health_reporter();
        // The faults name the catalog services only (see `set_faults`), so
        // the health service answers through an outage. The trace layer
        // outermost: a call the faults refuse has its span.
        let serve_command = Server::builder()
            .layer(ServerTraceLayer::new())
            .layer(command_faults.layer())
            .add_service(command_health_service)
            .add_service(catalog.command_service())
            .serve_with_incoming(grpc_fault::incoming(command));
        let serve_query = Server::builder()
            .layer(ServerTraceLayer::new())
            .layer(query_faults.layer())
            .add_service(query_health_service)
            .add_service(catalog.query_service())
            .serve_with_incoming(grpc_fault::incoming(query));
        let (command_tx, command_rx) = watch::channel(ServingStatus::Serving);
        let (query_tx, query_rx) = watch::channel(ServingStatus::Serving);
        let tasks = vec![
            health_task(command_health, Downstream::Command, command_rx),
            health_task(query_health, Downstream::Query, query_rx),
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
            health: [command_tx, query_tx],
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

    /// Gives `service` these fault settings from now on. An outage makes
    /// its health service report `NOT_SERVING` (for the service and the
    /// whole server) until settings without one are given.
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
        let selector = format!("{}/*", grpc_service(service));
        settings.apply_to(self.injector(service), &selector, seed)?;
        let status = if settings.outage {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        self.health[service as usize].send_replace(status);
        all[service as usize] = settings;
        Ok(())
    }

    /// What `service`'s health service reports (or is about to: the
    /// change reaches the server's watchers within a moment).
    pub fn health(&self, service: Downstream) -> ServingStatus {
        *self.health[service as usize].borrow()
    }

    /// The fault settings of `service`.
    pub fn faults(&self, service: Downstream) -> FaultSettings {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)[service as usize].clone()
    }
}
