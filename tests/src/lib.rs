//! A real catalog server on loopback with the fault-injection layer in
//! front, and a real `redis-server` on loopback, for the end-to-end tests
//! in `tests/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use catalog_proto::{IdempotentCommandService, InMemoryCatalog};
use grpc_fault::FaultInjector;
use grpc_idempotency::{IdempotencyLayer, Store};
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
    /// Starts a server holding products `p1` to `p5`; its Command service
    /// deduplicates `CreateProduct` by key in memory.
    pub async fn start() -> Self {
        let catalog = InMemoryCatalog::with_products(5);
        let command = catalog.command_service();
        Self::serve(catalog, command).await
    }

    /// Starts a server whose Command service is behind `idempotency` (a
    /// Redis store shared with other replicas, other options).
    pub async fn start_with<St: Store>(idempotency: &IdempotencyLayer<St>) -> Self {
        let catalog = InMemoryCatalog::with_products(5);
        let command = catalog.command_service_with(idempotency);
        Self::serve(catalog, command).await
    }

    async fn serve<St: Store>(
        catalog: InMemoryCatalog,
        command: IdempotentCommandService<St>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("a local address");
        let faults = FaultInjector::new();
        let (shutdown, stop) = oneshot::channel::<()>();
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::Serving)
            .await;
        let server = Server::builder()
            .layer(faults.layer())
            .add_service(health_service)
            .add_service(catalog.query_service())
            .add_service(command)
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

    /// The header names each call so far carried, sorted, in the order
    /// the calls came: what a test compares to see that a layer added (or
    /// dropped) nothing it should not have.
    pub fn header_names(&self) -> Vec<Vec<String>> {
        self.faults
            .calls()
            .iter()
            .map(|c| {
                let mut names: Vec<String> =
                    c.headers.keys().map(|k| k.as_str().to_owned()).collect();
                names.sort();
                names
            })
            .collect()
    }
}

impl TestServer {
    /// The `grpc-timeout` of each call to the methods `selector` names
    /// (`package.Service/Method`) that carried one, in the order the calls
    /// came: what the server was told of each call's deadline.
    pub fn timeouts_seen(&self, selector: &str) -> Vec<std::time::Duration> {
        self.faults
            .calls_to(selector)
            .expect("a valid selector")
            .iter()
            .filter_map(|c| c.headers.get("grpc-timeout"))
            .map(|v| {
                grpc_resilience_core::timeout_header::decode(v.as_bytes())
                    .expect("a valid grpc-timeout")
            })
            .collect()
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

/// A `redis-server` on a free `127.0.0.1` port, with no persistence, in a
/// directory of its own; killed (by its PID) when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// Set to `1` to skip the Redis tests on a machine without `redis-server`
/// (they fail otherwise, saying how to install it).
pub const SKIP_REDIS: &str = "GRPC_IDEMPOTENCY_SKIP_REDIS";

impl RedisServer {
    /// Starts `redis-server` and waits until it accepts connections.
    ///
    /// Returns `None` only when `redis-server` is not installed and
    /// [`SKIP_REDIS`] is `1`; without that variable a missing server is a
    /// test failure.
    pub async fn start() -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            if std::env::var(SKIP_REDIS).as_deref() == Ok("1") {
                eprintln!(
                    "redis-server is not installed and {SKIP_REDIS}=1: skipping this Redis test"
                );
                return None;
            }
            panic!(
                "redis-server is not installed: the Redis tests need it \
                 (`apt-get install -y redis-server`), or set {SKIP_REDIS}=1 to skip them"
            );
        }
        for _ in 0..5 {
            let port = free_port().await;
            if let Some(server) = Self::start_on(port).await {
                return Some(server);
            }
        }
        panic!("redis-server did not start on a free loopback port (5 tries)");
    }

    /// Starts `redis-server` on `port`; `None` if it does not come up
    /// within 5 s.
    async fn start_on(port: u16) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!(
            "grpc-idempotency-redis-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory for redis-server");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let mut server = RedisServer {
            child: Some(child),
            port,
            dir,
        };
        let up = eventually_async(Duration::from_secs(5), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        if !up || server.has_exited() {
            server.stop();
            return None;
        }
        Some(server)
    }

    fn has_exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The URL to connect to it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it (by its PID) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (`SIGSTOP`): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws it after [`RedisServer::pause`] (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("a running redis-server");
        let status = Command::new("kill")
            .arg(signal)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", child.id());
    }

    /// Starts it again on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        let port = self.port;
        let mut again = None;
        for _ in 0..5 {
            again = Self::start_on(port).await;
            if again.is_some() {
                break;
            }
        }
        let mut again = again.expect("redis-server restarts on its port");
        self.child = again.child.take();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Thawed first, in case a test froze it and panicked.
        if self.child.is_some() {
            self.resume();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    listener.local_addr().expect("a local address").port()
}

/// Waits, up to `limit`, for the async `condition` to hold; returns whether
/// it did.
pub async fn eventually_async<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
