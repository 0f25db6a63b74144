//! BulkheadLayer through real generated stubs against real servers on
//! loopback: a hung service does not take the other's capacity, and an
//! adaptive limit keeps a loaded server near its no-load latency.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use catalog_proto::command_service_client::CommandServiceClient;
use catalog_proto::query_service_client::QueryServiceClient;
use catalog_proto::{CreateProductRequest, GetProductRequest, InMemoryCatalog, Product};
use grpc_bulkhead::{Aimd, Bulkhead, BulkheadConfig, BulkheadLayer, Gradient};
use grpc_fault::Fault;
use grpc_resilience_tests::{TestServer, eventually};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::{Channel, Server};
use tower::ServiceBuilder;

fn fixed(limit: u32) -> BulkheadConfig {
    BulkheadConfig::builder()
        .max_concurrent(limit)
        .build()
        .unwrap()
}

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

fn create(id: String) -> CreateProductRequest {
    CreateProductRequest {
        product: Some(Product {
            id,
            name: "widget".into(),
            price_cents: 100,
            blob: Vec::new(),
        }),
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    assert!(!values.is_empty(), "no samples");
    values.sort();
    values[values.len() / 2]
}

/// `calls` CreateProduct calls, `concurrency` at a time; every latency and
/// every failure code.
async fn command_round(
    channel: &Bulkhead<Channel>,
    prefix: &str,
    calls: usize,
    concurrency: usize,
) -> (Vec<Duration>, Vec<Code>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = CommandServiceClient::new(channel.clone());
            let next = next.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= calls {
                        break;
                    }
                    let start = Instant::now();
                    match client.create_product(create(format!("{prefix}-{i}"))).await {
                        Ok(_) => latencies.push(start.elapsed()),
                        Err(status) => failures.push(status.code()),
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    for worker in workers {
        let (l, f) = worker.await.unwrap();
        latencies.extend(l);
        failures.extend(f);
    }
    (latencies, failures, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_query_service_leaves_the_command_service_its_throughput() {
    let server = TestServer::start().await;
    let layer = BulkheadLayer::new(fixed(4));
    let channel = ServiceBuilder::new()
        .layer(layer.clone())
        .service(server.channel());

    // Warm up the connection, then Command's throughput with nothing else
    // going on.
    let (_, failures, _) = command_round(&channel, "warm", 8, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    let (before, failures, before_took) = command_round(&channel, "before", 200, 4).await;
    assert!(failures.is_empty(), "{failures:?}");

    // Query hangs: four calls fill its partition.
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let hung: Vec<_> = (0..4)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move { client.get_product(get()).await })
        })
        .collect();
    let full = eventually(Duration::from_secs(5), || {
        layer
            .partitions()
            .iter()
            .any(|p| p.name == "catalog.v1.QueryService" && p.in_flight == 4)
    })
    .await;
    assert!(
        full,
        "four Query calls hold the partition: {:?}",
        layer.partitions()
    );

    // Query's excess calls are refused at once, and never sent.
    let mut queries = QueryServiceClient::new(channel.clone());
    for _ in 0..10 {
        let start = Instant::now();
        let status = queries.get_product(get()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains("bulkhead `catalog.v1.QueryService`"),
            "{status:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "refused at once");
    }

    // Command keeps its full throughput and latency.
    let (during, failures, during_took) = command_round(&channel, "during", 200, 4).await;
    assert!(
        failures.is_empty(),
        "every Command call succeeds: {failures:?}"
    );
    assert_eq!(during.len(), 200);
    let (before_median, during_median) = (median(before), median(during));
    assert!(
        during_median <= before_median * 4 + Duration::from_millis(5),
        "Command's latency kept: {during_median:?} during vs {before_median:?} before"
    );
    assert!(
        during_took <= before_took * 4 + Duration::from_millis(500),
        "Command's throughput kept: 200 calls in {during_took:?} during vs {before_took:?} before"
    );
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        4,
        "only the admitted Query calls reached the server"
    );
    for call in hung {
        call.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_for_every_service_lets_the_hung_one_block_the_other() {
    // The control for the test above: with one partition for all calls,
    // the hung Query calls take every slot and Command is refused.
    let server = TestServer::start().await;
    let layer = BulkheadLayer::empty()
        .with_partition("*", fixed(4))
        .unwrap();
    let channel = ServiceBuilder::new()
        .layer(layer.clone())
        .service(server.channel());
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let hung: Vec<_> = (0..4)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move { client.get_product(get()).await })
        })
        .collect();
    let full = eventually(Duration::from_secs(5), || {
        layer.partitions().iter().any(|p| p.in_flight == 4)
    })
    .await;
    assert!(full, "{:?}", layer.partitions());
    let (ok, failures, _) = command_round(&channel, "blocked", 20, 4).await;
    assert!(ok.is_empty());
    assert_eq!(failures, vec![Code::ResourceExhausted; 20]);
    for call in hung {
        call.abort();
    }
}

/// A server-side layer: each call waits `base` while at most `knee` calls
/// are in flight, and proportionally longer beyond (as a server with
/// `knee` workers queues), so the server's capacity is `knee / base`
/// calls per second whatever the concurrency.
#[derive(Clone)]
struct LoadLatency<S> {
    inner: S,
    in_flight: Arc<AtomicUsize>,
    base: Duration,
    knee: u32,
}

#[derive(Clone)]
struct LoadLatencyLayer {
    in_flight: Arc<AtomicUsize>,
    base: Duration,
    knee: u32,
}

impl<S> tower::Layer<S> for LoadLatencyLayer {
    type Service = LoadLatency<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LoadLatency {
            inner,
            in_flight: self.in_flight.clone(),
            base: self.base,
            knee: self.knee,
        }
    }
}

struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for LoadLatency<S>
where
    S: tower::Service<http::Request<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let guard = InFlight(self.in_flight.clone());
        let n = u32::try_from(n).unwrap_or(u32::MAX).max(self.knee);
        let delay = self.base * n / self.knee;
        let response = self.inner.call(request);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let result = response.await;
            drop(guard);
            result
        })
    }
}

struct LoadedServer {
    addr: std::net::SocketAddr,
    _shutdown: oneshot::Sender<()>,
}

async fn loaded_server(base: Duration, knee: u32) -> LoadedServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let catalog = InMemoryCatalog::with_products(5);
    let (shutdown, stop) = oneshot::channel::<()>();
    let layer = LoadLatencyLayer {
        in_flight: Arc::default(),
        base,
        knee,
    };
    let server = Server::builder()
        .layer(layer)
        .add_service(catalog.query_service())
        .serve_with_incoming_shutdown(grpc_fault::incoming(listener), async {
            let _ = stop.await;
        });
    tokio::spawn(server);
    LoadedServer {
        addr,
        _shutdown: shutdown,
    }
}

/// What a load run measured.
#[derive(Debug)]
struct Run {
    median: Duration,
    ok_per_second: f64,
    rejected: usize,
}

/// `workers` callers in a closed loop for `length`, through `layer` on a
/// new connection; a refused caller pauses 5 ms. Latencies of calls that
/// end in the last two thirds of the run (after the limit has found its
/// level) count.
async fn load(
    addr: std::net::SocketAddr,
    layer: BulkheadLayer,
    workers: usize,
    length: Duration,
) -> Run {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let channel = ServiceBuilder::new().layer(layer).service(channel);
    let start = Instant::now();
    let counted_from = start + length / 3;
    let end = start + length;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let (mut latencies, mut rejected) = (Vec::new(), 0);
                while Instant::now() < end {
                    let sent = Instant::now();
                    match client.get_product(get()).await {
                        Ok(_) => {
                            if sent >= counted_from {
                                latencies.push(sent.elapsed());
                            }
                        }
                        Err(status) => {
                            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                            rejected += 1;
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (latencies, rejected)
            })
        })
        .collect();
    let (mut latencies, mut rejected) = (Vec::new(), 0);
    for task in tasks {
        let (l, r) = task.await.unwrap();
        latencies.extend(l);
        rejected += r;
    }
    let counted = (length - length / 3).as_secs_f64();
    Run {
        ok_per_second: latencies.len() as f64 / counted,
        median: median(latencies),
        rejected,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_keeps_latency_near_no_load_at_the_servers_capacity() {
    // 20 ms per call up to 8 at once: a capacity of 400 calls/s.
    let server = loaded_server(Duration::from_millis(20), 8).await;
    let length = Duration::from_millis(1500);

    let unloaded = load(
        server.addr,
        BulkheadLayer::new(fixed(64)),
        1,
        Duration::from_millis(600),
    )
    .await;
    // 48 callers through a limit too high to protect anything: every call
    // is sent, and they queue at the server.
    let fixed_run = load(server.addr, BulkheadLayer::new(fixed(64)), 48, length).await;
    let adaptive = BulkheadConfig::builder()
        .gradient(Gradient {
            initial_limit: 4,
            ..Gradient::default()
        })
        .build()
        .unwrap();
    let adaptive_run = load(server.addr, BulkheadLayer::new(adaptive), 48, length).await;
    // AIMD, told that 50 ms (2.5 times the no-load latency) means trouble.
    let aimd = BulkheadConfig::builder()
        .aimd(Aimd {
            initial_limit: 4,
            latency_threshold: Duration::from_millis(50),
            ..Aimd::default()
        })
        .build()
        .unwrap();
    let aimd_run = load(server.addr, BulkheadLayer::new(aimd), 48, length).await;
    let report = format!(
        "unloaded {unloaded:?}\nfixed {fixed_run:?}\ngradient {adaptive_run:?}\naimd {aimd_run:?}"
    );
    eprintln!("{report}");
    assert!(
        aimd_run.median * 2 <= fixed_run.median
            && aimd_run.median <= unloaded.median * 3
            && aimd_run.ok_per_second >= fixed_run.ok_per_second * 0.6,
        "AIMD too keeps latency down at most of the throughput\n{report}"
    );

    assert!(
        fixed_run.median >= unloaded.median * 3,
        "the load queues at the server under a high fixed limit\n{report}"
    );
    assert!(
        adaptive_run.median * 2 <= fixed_run.median,
        "the adaptive limit keeps latency well below the fixed one's\n{report}"
    );
    assert!(
        adaptive_run.median <= unloaded.median * 3,
        "and near the no-load latency\n{report}"
    );
    assert!(
        adaptive_run.ok_per_second >= fixed_run.ok_per_second * 0.6,
        "while keeping most of the server's throughput\n{report}"
    );
    assert!(
        adaptive_run.rejected > 0,
        "the excess is refused at the client\n{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_is_not_retried_even_where_resource_exhausted_is() {
    use grpc_resilience_core::CodeSet;
    use grpc_retry::{Jitter, RetryLayer, RetryPolicies, RetryPolicy};

    let server = TestServer::start().await;
    // A policy that retries RESOURCE_EXHAUSTED from the server after 300 ms.
    let policy = RetryPolicy::default()
        .with_max_attempts(3)
        .with_initial_delay(Duration::from_millis(300))
        .with_max_delay(Duration::from_millis(300))
        .with_jitter(Jitter::None)
        .with_retryable_codes(CodeSet::of(&[Code::ResourceExhausted]));
    let layer = BulkheadLayer::new(fixed(1));
    let channel = ServiceBuilder::new()
        .layer(RetryLayer::new(RetryPolicies::new(policy).unwrap()))
        .layer(layer.clone())
        .service(server.channel());
    let mut queries = QueryServiceClient::new(channel);

    // Control: the server's RESOURCE_EXHAUSTED is retried, after 300 ms.
    server
        .faults
        .script("GetProduct", [Fault::status(Code::ResourceExhausted)])
        .unwrap();
    let start = Instant::now();
    queries.get_product(get()).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "retried after its backoff"
    );
    assert_eq!(server.faults.stats("GetProduct").unwrap().calls, 2);

    // The bulkhead's own refusal is not: it comes back at once.
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let mut hung_client = queries.clone();
    let hung = tokio::spawn(async move { hung_client.get_product(get()).await });
    let full = eventually(Duration::from_secs(5), || {
        layer.partitions().iter().any(|p| p.in_flight == 1)
            && server.faults.stats("GetProduct").unwrap().calls == 3
    })
    .await;
    assert!(full, "{:?}", layer.partitions());
    let start = Instant::now();
    let status = queries.get_product(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "not retried: {:?}",
        start.elapsed()
    );
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        3,
        "the refused call was never sent"
    );
    hung.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_full_stack_refusals_never_open_the_breaker_below() {
    use grpc_circuit_breaker::{BreakerConfig, BreakerRegistry, CircuitBreakerLayer, State};
    use grpc_retry::{RetryLayer, RetryPolicies, RetryPolicy};
    use grpc_timeout::{TimeoutLayer, TimeoutPolicy};

    let server = TestServer::start().await;
    server
        .faults
        .always(
            "GetProduct",
            Fault::pass().with_delay(Duration::from_secs(30)),
        )
        .unwrap();
    let registry = || {
        BreakerRegistry::with_default_config(BreakerConfig::default().with_failure_threshold(3))
            .unwrap()
    };
    let timeouts = || TimeoutPolicy::new(Duration::from_secs(20)).unwrap();
    let retries = || RetryLayer::new(RetryPolicies::new(RetryPolicy::default()).unwrap());

    // Fills Query's partition of 2 with hung calls, then sends 10 more.
    async fn refuse<S>(channel: S, layer: &BulkheadLayer) -> Vec<Code>
    where
        S: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
        S::Error: Into<tonic::codegen::StdError>,
        S::Future: Send,
        S::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <S::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let hung: Vec<_> = (0..2)
            .map(|_| {
                let mut client = QueryServiceClient::new(channel.clone());
                tokio::spawn(async move { client.get_product(get()).await })
            })
            .collect();
        let full = eventually(Duration::from_secs(5), || {
            layer.partitions().iter().any(|p| p.in_flight == 2)
        })
        .await;
        assert!(full, "{:?}", layer.partitions());
        let mut client = QueryServiceClient::new(channel);
        let mut codes = Vec::new();
        for _ in 0..10 {
            codes.push(client.get_product(get()).await.unwrap_err().code());
        }
        for call in hung {
            call.abort();
        }
        codes
    }

    // The documented order: Timeout > Retry > Bulkhead > CircuitBreaker.
    let breakers = registry();
    let layer = BulkheadLayer::new(fixed(2));
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts()))
        .layer(retries())
        .layer(layer.clone())
        .layer(CircuitBreakerLayer::new(breakers.clone()))
        .service(server.channel());
    let codes = refuse(channel, &layer).await;
    assert_eq!(codes, vec![Code::ResourceExhausted; 10]);
    assert_eq!(
        breakers.state("query"),
        Some(State::Closed),
        "the breaker saw no refusal"
    );

    // The control: the bulkhead below the breaker, whose default failure
    // codes include RESOURCE_EXHAUSTED: local refusals open it.
    let breakers = registry();
    let layer = BulkheadLayer::new(fixed(2));
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeouts()))
        .layer(retries())
        .layer(CircuitBreakerLayer::new(breakers.clone()))
        .layer(layer.clone())
        .service(server.channel());
    refuse(channel, &layer).await;
    assert_eq!(breakers.state("query"), Some(State::Open));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_for_a_slot_tells_the_server_the_time_it_has_left() {
    use grpc_timeout::{TimeoutLayer, TimeoutPolicy};

    let server = TestServer::start().await;
    // The first call holds the one slot for 1.5 s.
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_millis(1_500))],
        )
        .unwrap();
    let layer = BulkheadLayer::new(
        BulkheadConfig::builder()
            .max_concurrent(1)
            .max_queue(1)
            .max_wait(Duration::from_secs(5))
            .build()
            .unwrap(),
    );
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(3)).unwrap(),
        ))
        .layer(layer.clone())
        .service(server.channel());
    let mut first = QueryServiceClient::new(channel.clone());
    let first = tokio::spawn(async move { first.get_product(get()).await });
    let sent = eventually(Duration::from_secs(5), || {
        server.faults.stats("GetProduct").unwrap().calls == 1
    })
    .await;
    assert!(sent, "the first call reached the server");

    let start = Instant::now();
    QueryServiceClient::new(channel)
        .get_product(get())
        .await
        .expect("the queued call succeeds");
    let waited = start.elapsed();
    first.await.unwrap().unwrap();

    let seen = server.timeouts_seen("catalog.v1.QueryService/GetProduct");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0] > Duration::from_millis(2_900), "{seen:?}");
    // Sent only once the first call ended: most of its 1.5 s later (the
    // rest went to noticing that the server had the first call).
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    assert!(
        seen[1] <= Duration::from_secs(3) - Duration::from_millis(700),
        "the server was told the 3 s of the call's start, not what was left after \
         {waited:?} in the queue: {seen:?}"
    );
    assert!(seen[1] > Duration::from_millis(500), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_deadline_ends_the_wait_for_a_slot() {
    let server = TestServer::start().await;
    server
        .faults
        .script(
            "GetProduct",
            [Fault::pass().with_delay(Duration::from_secs(3))],
        )
        .unwrap();
    let layer = BulkheadLayer::new(
        BulkheadConfig::builder()
            .max_concurrent(1)
            .max_queue(1)
            .max_wait(Duration::from_secs(10))
            .build()
            .unwrap(),
    );
    // The bulkhead alone over the channel: only the caller's own deadline.
    let channel = ServiceBuilder::new()
        .layer(layer.clone())
        .service(server.channel());
    let mut first = QueryServiceClient::new(channel.clone());
    let first = tokio::spawn(async move { first.get_product(get()).await });
    let sent = eventually(Duration::from_secs(5), || {
        server.faults.stats("GetProduct").unwrap().calls == 1
    })
    .await;
    assert!(sent, "the first call reached the server");

    let mut request = tonic::Request::new(get());
    request.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let status = QueryServiceClient::new(channel)
        .get_product(request)
        .await
        .unwrap_err();
    let elapsed = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed < Duration::from_millis(1_500),
        "refused at its 300 ms deadline, not after the slot freed at 3 s: {elapsed:?}"
    );
    assert_eq!(
        server.faults.stats("GetProduct").unwrap().calls,
        1,
        "the call that ran out of time in the queue was never sent"
    );
    assert!(
        layer.partitions().iter().all(|p| p.queued == 0),
        "{:?}",
        layer.partitions()
    );
    first.abort();
}
