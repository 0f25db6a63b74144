//! A real catalog server on loopback with the fault-injection layer in
//! front, for the end-to-end tests in `tests/`.

use std::net::SocketAddr;
use std::time::Duration;

use catalog_proto::InMemoryCatalog;
use grpc_fault::FaultInjector;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Server};

/// The query service's full name, as the health protocol names services.
pub const QUERY_SERVICE: &str = "catalog.v1.QueryService";

/// A catalog server on `127.0.0.1`, stopped when dropped.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its fault plans and counters.
    pub faults: FaultInjector,
    /// Its handlers' state.
    pub catalog: InMemoryCatalog,
    /// Its `grpc.health.v1` statuses: the server (`""`) and
    /// [`QUERY_SERVICE`] start SERVING.
    pub health: tonic_health::server::HealthReporter,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Starts a server holding products `p1` to `p5`.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a local address");
        let faults = FaultInjector::new();
        let catalog = InMemoryCatalog::with_products(5);
        let (shutdown, stop) = oneshot::channel::<()>();
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::Serving)
            .await;
        let server = Server::builder()
            .layer(faults.layer())
            .add_service(health_service)
            .add_service(catalog.query_service())
            .add_service(catalog.command_service())
            .serve_with_incoming_shutdown(grpc_fault::incoming(listener), async {
                let _ = stop.await;
            });
        tokio::spawn(async move {
            if let Err(err) = server.await {
                eprintln!("test server failed: {err}");
            }
        });
        TestServer {
            addr,
            faults,
            catalog,
            health,
            shutdown: Some(shutdown),
        }
    }

    /// An endpoint for this server.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect_timeout(Duration::from_secs(5))
    }

    /// A channel to this server that connects on first use.
    pub fn channel(&self) -> Channel {
        self.endpoint().connect_lazy()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Waits, up to `limit`, for `condition` to hold; returns whether it did.
/// For effects that cross the network (the server noticing a reset).
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
