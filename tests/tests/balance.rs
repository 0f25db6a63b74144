//! BalancedChannel over three real replicas: per-endpoint breakers,
//! ejection with its guards, health checks, endpoints changing under load.

use std::collections::BTreeMap;
use std::time::Duration;

use catalog_proto::GetProductRequest;
use catalog_proto::query_service_client::QueryServiceClient;
use grpc_balance::{
    BalanceConfig, BalancedChannel, EndpointStatus, HealthConfig, OutlierConfig, Reason,
};
use grpc_circuit_breaker::{
    BreakerConfig, BreakerRegistry, CircuitBreaker, CircuitBreakerLayer, FailureRate, State,
};
use grpc_fault::Fault;
use grpc_resilience_tests::{QUERY_SERVICE, TestServer, eventually};
use grpc_retry::{Jitter, Retry, RetryLayer, RetryPolicies, RetryPolicy};
use tokio::time::Instant;
use tonic::Code;
use tower::ServiceBuilder;
use tower::discover::Change;

fn get() -> GetProductRequest {
    GetProductRequest { id: "p1".into() }
}

async fn three() -> Vec<TestServer> {
    vec![
        TestServer::start().await,
        TestServer::start().await,
        TestServer::start().await,
    ]
}

fn key(server: &TestServer) -> String {
    server.addr.to_string()
}

fn config(base: Duration, percent: u8) -> BalanceConfig {
    BalanceConfig::new("query")
        .with_endpoint_breaker(BreakerConfig::default().with_failure_threshold(3))
        .with_outlier(
            OutlierConfig::default()
                .with_base_ejection_time(base)
                .with_max_ejection_time(base * 4)
                .with_max_ejection_percent(percent),
        )
}

fn balanced(
    servers: &[TestServer],
    config: BalanceConfig,
    registry: &BreakerRegistry,
) -> BalancedChannel {
    BalancedChannel::from_endpoints(
        config,
        registry.clone(),
        servers.iter().map(TestServer::endpoint),
    )
    .unwrap()
}

fn retrying(channel: BalancedChannel) -> QueryServiceClient<Retry<BalancedChannel>> {
    QueryServiceClient::new(ServiceBuilder::new().layer(retry_layer()).service(channel))
}

fn retry_layer() -> RetryLayer {
    let policy = RetryPolicy::default()
        .with_initial_delay(Duration::from_millis(5))
        .with_max_delay(Duration::from_millis(20))
        .with_jitter(Jitter::None);
    RetryLayer::new(RetryPolicies::new(policy).unwrap())
}

/// The documented stack: retry -> per-service breaker -> balanced channel.
/// Above a balancer the per-service breaker judges a failure rate (one
/// endpoint's few failures must not open it), here 50% over 100 calls.
fn stacked(
    channel: BalancedChannel,
    registry: &BreakerRegistry,
) -> QueryServiceClient<Retry<CircuitBreaker<BalancedChannel>>> {
    registry
        .configure(
            "query",
            BreakerConfig::default().with_failure_rate(FailureRate {
                window: 100,
                minimum_calls: 20,
                failure_rate: 50.0,
                ..FailureRate::default()
            }),
        )
        .unwrap();
    QueryServiceClient::new(
        ServiceBuilder::new()
            .layer(retry_layer())
            .layer(CircuitBreakerLayer::new(registry.clone()))
            .service(channel),
    )
}

fn calls(server: &TestServer) -> u64 {
    server
        .faults
        .stats("GetProduct")
        .map(|s| s.calls)
        .unwrap_or(0)
}

fn out_of_rotation(status: &BTreeMap<String, EndpointStatus>) -> usize {
    status
        .values()
        .filter(|s| **s != EndpointStatus::Active)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_ejected_the_others_take_its_traffic_and_it_is_probed_back() {
    let servers = three().await;
    servers[0]
        .faults
        .always("GetProduct", Fault::status(Code::Unavailable))
        .unwrap();
    let registry = BreakerRegistry::new();
    let channel = balanced(&servers, config(Duration::from_millis(400), 50), &registry);
    let mut client = stacked(channel.clone(), &registry);
    let bad = channel.breaker_name(&key(&servers[0]));
    assert_eq!(bad, format!("query@{}", servers[0].addr));

    const CALLS: usize = 2000;
    let mut failed = 0;
    let mut saw_ejected = false;
    let start = Instant::now();
    for _ in 0..CALLS {
        if client.get_product(get()).await.is_err() {
            failed += 1;
        }
        saw_ejected |= matches!(
            channel.endpoints()[&key(&servers[0])],
            EndpointStatus::Ejected(_)
        );
        assert!(start.elapsed() < Duration::from_secs(60), "bounded in time");
    }
    assert!(saw_ejected, "the failing replica was ejected");
    assert!(
        failed * 1000 <= CALLS,
        "success rate above 99.9%: {failed} of {CALLS} failed"
    );
    let (bad_calls, good_calls) = (calls(&servers[0]), calls(&servers[1]) + calls(&servers[2]));
    assert!(
        good_calls >= CALLS as u64,
        "the others served every call: {good_calls}"
    );
    assert!(
        calls(&servers[1]) > 300 && calls(&servers[2]) > 300,
        "both healthy replicas share the traffic"
    );
    // 3 failures open its breaker; after that only probes, one per
    // (growing) ejection.
    assert!(
        bad_calls <= 3 + 10,
        "the failing replica saw only probes: {bad_calls}"
    );
    assert!(
        registry.status().contains_key(&bad),
        "{:?}",
        registry.status()
    );

    // It recovers: probed back in while calls flow.
    servers[0].faults.clear_all();
    let deadline = Instant::now() + Duration::from_secs(20);
    while channel.endpoints()[&key(&servers[0])] != EndpointStatus::Active {
        assert!(
            Instant::now() < deadline,
            "probed back in: {:?}",
            channel.endpoints()
        );
        client.get_product(get()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(registry.state(&bad), Some(State::Closed));
    let before = calls(&servers[0]);
    for _ in 0..300 {
        client.get_product(get()).await.unwrap();
    }
    assert!(calls(&servers[0]) > before + 30, "it takes traffic again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_three_failing_with_max_ejection_percent_50_one_stays_in() {
    let servers = three().await;
    for server in &servers[..2] {
        server
            .faults
            .always("GetProduct", Fault::status(Code::Unavailable))
            .unwrap();
    }
    let registry = BreakerRegistry::new();
    // Long ejections: the one ejected stays out for the whole test.
    let channel = balanced(&servers, config(Duration::from_secs(60), 50), &registry);
    let mut client = retrying(channel.clone());
    let start = Instant::now();
    for _ in 0..300 {
        let _ = client.get_product(get()).await;
        assert!(
            out_of_rotation(&channel.endpoints()) <= 1,
            "{:?}",
            channel.endpoints()
        );
        assert!(start.elapsed() < Duration::from_secs(60), "bounded in time");
    }
    let status = channel.endpoints();
    let bad: Vec<_> = servers[..2].iter().map(|s| status[&key(s)]).collect();
    assert_eq!(
        bad.iter()
            .filter(|s| **s == EndpointStatus::Ejected(Reason::Breaker))
            .count(),
        1,
        "exactly one failing replica ejected: {status:?}"
    );
    assert_eq!(
        bad.iter().filter(|s| **s == EndpointStatus::Active).count(),
        1,
        "the other stays in: {status:?}"
    );
    assert_eq!(status[&key(&servers[2])], EndpointStatus::Active);
    // The one kept in is guarded by its own (open) breaker.
    let kept = servers[..2]
        .iter()
        .find(|s| status[&key(s)] == EndpointStatus::Active)
        .unwrap();
    assert_eq!(
        registry.state(&channel.breaker_name(&key(kept))),
        Some(State::Open)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_ejects_before_any_call_fails_and_serving_probes_it_back_within_a_second() {
    let servers = three().await;
    let registry = BreakerRegistry::new();
    let config = config(Duration::from_secs(30), 50).with_health(HealthConfig::new(QUERY_SERVICE));
    let channel = balanced(&servers, config, &registry);
    let mut client = QueryServiceClient::new(channel.clone());
    for _ in 0..30 {
        client.get_product(get()).await.unwrap();
    }

    servers[0]
        .health
        .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    let ejected = eventually(Duration::from_secs(5), || {
        channel.endpoints()[&key(&servers[0])] == EndpointStatus::Ejected(Reason::Health)
    })
    .await;
    assert!(ejected, "{:?}", channel.endpoints());
    let before = calls(&servers[0]);
    // No retry layer: every call must succeed on its own.
    for _ in 0..300 {
        client.get_product(get()).await.unwrap();
    }
    assert_eq!(
        calls(&servers[0]),
        before,
        "no call reached the NOT_SERVING replica"
    );

    servers[0]
        .health
        .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    let start = Instant::now();
    let back = eventually(Duration::from_secs(5), || {
        !matches!(
            channel.endpoints()[&key(&servers[0])],
            EndpointStatus::Ejected(_)
        )
    })
    .await;
    assert!(back, "{:?}", channel.endpoints());
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "probed back within a second, not after 30 s: {took:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while calls(&servers[0]) == before {
        assert!(Instant::now() < deadline, "it gets calls again");
        client.get_product(get()).await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || channel.endpoints()
            [&key(&servers[0])]
            == EndpointStatus::Active)
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_and_one_removed_during_load_fail_no_call() {
    let servers = three().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<
        Result<Change<String, tonic::transport::Endpoint>, String>,
    >();
    for server in &servers[..2] {
        tx.send(Ok(Change::Insert(key(server), server.endpoint())))
            .unwrap();
    }
    let registry = BreakerRegistry::new();
    let channel = BalancedChannel::from_discover(
        config(Duration::from_secs(30), 50),
        registry.clone(),
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || channel.endpoints().len() == 2).await);

    let mut load = Vec::new();
    for _ in 0..4 {
        let mut client = QueryServiceClient::new(channel.clone());
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..400 {
                if let Err(status) = client.get_product(get()).await {
                    failures.push(status);
                }
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send(Ok(Change::Insert(key(&servers[2]), servers[2].endpoint())))
        .unwrap();
    tx.send(Err("a discovery hiccup is skipped".into()))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || calls(&servers[2]) > 0).await,
        "the new replica gets calls"
    );
    tx.send(Ok(Change::Remove(key(&servers[0])))).unwrap();
    assert!(eventually(Duration::from_secs(5), || channel.endpoints().len() == 2).await);
    let removed_at = calls(&servers[0]);

    for task in load {
        let failures = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap();
        assert!(failures.is_empty(), "no call failed: {failures:?}");
    }
    assert!(
        calls(&servers[0]) <= removed_at + 8,
        "the removed replica gets no new calls: {} after {removed_at}",
        calls(&servers[0])
    );
    assert!(!channel.endpoints().contains_key(&key(&servers[0])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_name_is_resolved_into_endpoints() {
    let server = TestServer::start().await;
    let registry = BreakerRegistry::new();
    let name = format!("localhost:{}", server.addr.port());
    let channel = BalancedChannel::from_dns(
        config(Duration::from_secs(30), 50).with_dns_refresh(Duration::from_millis(100)),
        registry.clone(),
        &name,
    )
    .unwrap();
    let key = format!("127.0.0.1:{}", server.addr.port());
    assert!(
        eventually(Duration::from_secs(5), || channel
            .endpoints()
            .contains_key(&key))
        .await,
        "{:?}",
        channel.endpoints()
    );
    // localhost may also resolve to ::1, where nothing listens: retries
    // and ejection keep the calls whole.
    let mut client = retrying(channel.clone());
    for _ in 0..50 {
        client.get_product(get()).await.unwrap();
    }
    assert!(calls(&server) >= 50);
    assert!(registry.status().contains_key(&format!("query@{key}")));

    let err =
        BalancedChannel::from_dns(BalanceConfig::new("query"), registry, "localhost").unwrap_err();
    assert!(err.to_string().contains("`dns` = `localhost`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_health_watch_falls_back_to_passive_detection_and_is_retried_with_backoff() {
    let servers = three().await;
    // The watch itself fails on one replica.
    servers[0]
        .faults
        .always("Watch", Fault::status(Code::Unavailable))
        .unwrap();
    let registry = BreakerRegistry::new();
    let config = config(Duration::from_secs(30), 50).with_health(
        HealthConfig::new(QUERY_SERVICE)
            .with_retry_backoff(Duration::from_millis(20))
            .with_max_retry_backoff(Duration::from_millis(100)),
    );
    let channel = balanced(&servers, config, &registry);
    let mut client = QueryServiceClient::new(channel.clone());
    let watches = || {
        servers[0]
            .faults
            .stats("Watch")
            .map(|s| s.calls)
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(10), || watches() >= 3).await,
        "the watch is opened again: {} attempts",
        watches()
    );
    // Meanwhile the replica is judged passively: in, and serving calls.
    assert_eq!(
        channel.endpoints()[&key(&servers[0])],
        EndpointStatus::Active
    );
    for _ in 0..100 {
        client.get_product(get()).await.unwrap();
    }
    assert!(calls(&servers[0]) > 0);

    // Once the watch works again, its reports count.
    servers[0].faults.clear_all();
    servers[0]
        .health
        .set_service_status(QUERY_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    assert!(
        eventually(Duration::from_secs(10), || {
            channel.endpoints()[&key(&servers[0])] == EndpointStatus::Ejected(Reason::Health)
        })
        .await,
        "{:?}",
        channel.endpoints()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulkhead_per_endpoint_holds_calls_beyond_its_limit() {
    let (servers, channel) = full_endpoints().await;
    let total = || servers.iter().map(calls).sum::<u64>();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let mut client = QueryServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            client.get_product(get()).await.map(drop)
        }));
    }
    assert!(eventually(Duration::from_secs(1), || total() >= 3).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(), 3, "one call in flight per endpoint, the rest wait");
    for server in &servers {
        assert_eq!(calls(server), 1);
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    assert_eq!(total(), 6);
}

/// How long each of [`full_endpoints`]'s servers holds a GetProduct.
const HOLD: Duration = Duration::from_millis(2_000);

/// Three servers that hold each GetProduct for [`HOLD`], one call at a
/// time each: three calls fill them, and the next ones wait in the
/// balancer's buffer until one ends.
async fn full_endpoints() -> (Vec<TestServer>, BalancedChannel) {
    let servers = three().await;
    for server in &servers {
        server
            .faults
            .always("GetProduct", Fault::pass().with_delay(HOLD))
            .unwrap();
    }
    let config = config(Duration::from_secs(30), 50).with_max_concurrent_calls(1);
    let channel = balanced(&servers, config, &BreakerRegistry::new());
    (servers, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_while_no_endpoint_is_ready_is_not_sent() {
    let (servers, channel) = full_endpoints().await;
    let total = || servers.iter().map(calls).sum::<u64>();
    let holders: Vec<_> = (0..3)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move { client.get_product(get()).await.map(drop) })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || total() == 3).await);

    // The balancer alone: the caller's own 300 ms deadline, nothing above
    // to enforce it while the call waits for an endpoint.
    let late: Vec<_> = (0..3)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let mut request = tonic::Request::new(get());
                request.set_timeout(Duration::from_millis(300));
                client.get_product(request).await.map(drop)
            })
        })
        .collect();
    for call in late {
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("answered once an endpoint is ready")
            .unwrap()
            .unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
    for call in holders {
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        total(),
        3,
        "a call whose deadline passed in the buffer was never sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_for_an_endpoint_tells_the_server_the_time_it_has_left() {
    use grpc_timeout::{TimeoutLayer, TimeoutPolicy};

    let (servers, channel) = full_endpoints().await;
    let total = || servers.iter().map(calls).sum::<u64>();
    let channel = ServiceBuilder::new()
        .layer(TimeoutLayer::new(
            TimeoutPolicy::new(Duration::from_secs(5)).unwrap(),
        ))
        .service(channel);
    let holders: Vec<_> = (0..3)
        .map(|_| {
            let mut client = QueryServiceClient::new(channel.clone());
            tokio::spawn(async move { client.get_product(get()).await.map(drop) })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), || total() == 3).await);
    let start = Instant::now();
    QueryServiceClient::new(channel)
        .get_product(get())
        .await
        .expect("sent once an endpoint is free");
    // The call's own time at a server is HOLD; the rest it spent waiting
    // for an endpoint.
    let queued = start.elapsed().saturating_sub(HOLD);
    for call in holders {
        call.await.unwrap().unwrap();
    }
    let mut seen: Vec<Duration> = servers
        .iter()
        .flat_map(|s| s.timeouts_seen("catalog.v1.QueryService/GetProduct"))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen[1] > Duration::from_millis(4_900), "{seen:?}");
    // It waited most of HOLD (the rest went to noticing the servers had
    // the first three).
    assert!(queued >= Duration::from_millis(1_000), "{queued:?}");
    assert!(
        seen[0] <= Duration::from_secs(5) - queued + Duration::from_millis(50),
        "the server was told the 5 s of the call's start, not what was left after \
         {queued:?} waiting for an endpoint: {seen:?}"
    );
}
