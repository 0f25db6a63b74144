//! Reload under load, with an in-process inner service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use grpc_resilience_core::{BoxError, timeout_header};
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tower_service::Service;

use crate::{ResilienceConfig, ResilientChannel, State};

/// Answers every call `UNAVAILABLE` (Trailers-Only) and records, per
/// `x-call`, each attempt's `grpc-timeout`. With a gate, an attempt waits
/// for a permit first.
#[derive(Clone, Default)]
struct Backend {
    log: Arc<Mutex<HashMap<String, Vec<Option<Duration>>>>>,
    gate: Option<Arc<Semaphore>>,
}

impl Service<http::Request<tonic::body::Body>> for Backend {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (call, timeout) = seen_as(&request);
        self.log
            .lock()
            .unwrap()
            .entry(call)
            .or_default()
            .push(timeout);
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                gate.acquire().await.unwrap().forget();
            }
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "14")
                .body(tonic::body::Body::empty())
                .unwrap())
        })
    }
}

/// How a test backend records a call: its `x-call` header (the test's
/// name for it) and the `grpc-timeout` it was sent with.
pub(crate) fn seen_as<B>(request: &http::Request<B>) -> (String, Option<Duration>) {
    let call = request
        .headers()
        .get("x-call")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let timeout = timeout_header::from_headers(request.headers()).unwrap();
    (call, timeout)
}

fn config(timeout_ms: u64, attempts: u32) -> ResilienceConfig {
    ResilienceConfig::from_toml(&format!(
        "[retry.default]\nmax_attempts = {attempts}\ninitial_delay = 1\nmax_delay = 1\njitter = false\n\
         [circuit_breakers.query]\nfailure_threshold = 100000\n\
         [timeouts]\ndefault = 60000\n[timeouts.operations]\nget_product = {timeout_ms}\n"
    ))
    .unwrap()
}

fn request(call: &str) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri("http://backend/catalog.v1.QueryService/GetProduct")
        .header("x-call", call)
        .body(tonic::body::Body::empty())
        .unwrap()
}

async fn call(channel: &ResilientChannel<Backend>, id: &str) {
    let response = channel.clone().oneshot(request(id)).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "14");
}

/// Which config a call ran under, from what the backend saw: A is 2
/// attempts under a 1 s deadline, B 4 attempts under 3 s.
fn config_seen(attempts: &[Option<Duration>]) -> Result<char, String> {
    let first = attempts[0].expect("a deadline is sent");
    match (attempts.len(), first) {
        (2, t) if t <= Duration::from_secs(1) && t > Duration::from_millis(900) => Ok('A'),
        (4, t) if t <= Duration::from_secs(3) && t > Duration::from_millis(2900) => Ok('B'),
        other => Err(format!("half-applied config: {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_concurrent_load_no_call_sees_a_half_applied_config() {
    let backend = Backend::default();
    let (a, b) = (config(1000, 2), config(3000, 4));
    let channel = ResilientChannel::new(backend.clone(), &a).unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloader = {
        let channel = channel.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut reloads = 0u32;
            // Bounded: stops when the callers are done, or after 20 000.
            while !done.load(std::sync::atomic::Ordering::Relaxed) && reloads < 20_000 {
                let next = if reloads.is_multiple_of(2) { &b } else { &a };
                channel.reload(next).unwrap();
                reloads += 1;
                tokio::task::yield_now().await;
            }
            reloads
        })
    };
    let mut callers = Vec::new();
    for task in 0..4 {
        let channel = channel.clone();
        callers.push(tokio::spawn(async move {
            for i in 0..100 {
                call(&channel, &format!("{task}-{i}")).await;
            }
        }));
    }
    for caller in callers {
        tokio::time::timeout(Duration::from_secs(60), caller)
            .await
            .expect("bounded")
            .unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let reloads = reloader.await.unwrap();
    assert!(reloads > 1, "the config changed during the load");
    let log = backend.log.lock().unwrap();
    assert_eq!(log.len(), 400);
    let mut seen = HashMap::new();
    for (id, attempts) in log.iter() {
        let which = config_seen(attempts).unwrap_or_else(|e| panic!("call {id}: {e}"));
        *seen.entry(which).or_insert(0) += 1;
    }
    assert!(seen.len() == 2, "both configs served calls: {seen:?}");
}

#[tokio::test(start_paused = true)]
async fn a_call_under_way_finishes_under_the_config_it_started_with() {
    let gate = Arc::new(Semaphore::new(0));
    let backend = Backend {
        gate: Some(gate.clone()),
        ..Backend::default()
    };
    let channel = ResilientChannel::new(backend.clone(), &config(1000, 2)).unwrap();
    let started = tokio::spawn({
        let channel = channel.clone();
        async move { call(&channel, "old").await }
    });
    // The first attempt is at the backend, held.
    while backend.log.lock().unwrap().get("old").is_none() {
        tokio::task::yield_now().await;
    }
    let report = channel.reload(&config(3000, 4)).unwrap();
    assert_eq!(report.generation(), 1);
    gate.add_permits(100);
    started.await.unwrap();
    call(&channel, "new").await;
    let log = backend.log.lock().unwrap();
    assert_eq!(config_seen(&log["old"]), Ok('A'));
    assert_eq!(config_seen(&log["new"]), Ok('B'));
}

#[tokio::test(start_paused = true)]
async fn an_invalid_config_is_rejected_whole_and_the_old_one_stays() {
    let backend = Backend::default();
    let channel = ResilientChannel::new(backend.clone(), &config(1000, 2)).unwrap();
    let bad = config(3000, 4).with_retry_default(crate::RetrySettings::new().with_max_attempts(0));
    let err = channel.reload(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "retry.default.max_attempts = 0: must be at least 1 (1 means no retry)"
    );
    call(&channel, "after").await;
    assert_eq!(config_seen(&backend.log.lock().unwrap()["after"]), Ok('A'));
    assert_eq!(
        channel.config().timeouts().operations().next(),
        Some(("get_product", Some(Duration::from_secs(1))))
    );
}

#[tokio::test(start_paused = true)]
async fn breaker_state_survives_a_reload() {
    let backend = Backend::default();
    let cfg = ResilienceConfig::from_toml(
        "[retry.default]\nenabled = false\n[circuit_breakers.query]\nfailure_threshold = 3\n",
    )
    .unwrap();
    let channel = ResilientChannel::new(backend.clone(), &cfg).unwrap();
    for i in 0..3 {
        call(&channel, &i.to_string()).await;
    }
    assert_eq!(channel.registry().state("query"), Some(State::Open));
    let changed = ResilienceConfig::from_toml(
        "[retry.default]\nenabled = false\n[timeouts]\ndefault = 100\n\
         [circuit_breakers.query]\nfailure_threshold = 10\n",
    )
    .unwrap();
    let before = channel.registry().config("query");
    let report = channel.reload(&changed).unwrap();
    // The live breaker takes the new threshold and keeps its state.
    assert!(report.breakers_not_reconfigured().is_empty());
    assert_ne!(channel.registry().config("query"), before);
    assert_eq!(channel.registry().state("query"), Some(State::Open));
    let err = channel
        .clone()
        .oneshot(request("refused"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("open"), "{err}");
    assert!(!backend.log.lock().unwrap().contains_key("refused"));
    // Closed again, it now takes 10 failures to open: 3 no longer do.
    channel.registry().reset("query").unwrap();
    for i in 10..13 {
        call(&channel, &i.to_string()).await;
    }
    assert_eq!(channel.registry().state("query"), Some(State::Closed));
}

fn budget_config(min_per_second: u32, ratio: f32) -> ResilienceConfig {
    ResilienceConfig::from_toml(&format!(
        "[retry.default]\nmax_attempts = 3\ninitial_delay = 1\nmax_delay = 1\njitter = false\n\
         [retry.budget]\nttl = \"10s\"\nmin_retries_per_second = {min_per_second}\nretry_ratio = {ratio}\n\
         [circuit_breakers.query]\nfailure_threshold = 100000\n"
    ))
    .unwrap()
}

#[tokio::test]
async fn a_spent_retry_budget_stops_retries() {
    // No minimum rate and 0.1 % of calls: the first call's deposit does
    // not pay for one retry.
    let backend = Backend::default();
    let channel = ResilientChannel::new(backend.clone(), &budget_config(0, 0.001)).unwrap();
    call(&channel, "spent").await;
    assert_eq!(backend.log.lock().unwrap()["spent"].len(), 1, "not retried");

    // A generous budget lets the policy's 3 attempts go.
    let backend = Backend::default();
    let channel = ResilientChannel::new(backend.clone(), &budget_config(100, 1.0)).unwrap();
    call(&channel, "funded").await;
    assert_eq!(backend.log.lock().unwrap()["funded"].len(), 3, "retried");
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_budget_and_replaces_a_changed_one() {
    let layer = crate::ResilienceLayer::new(&budget_config(5, 0.2)).unwrap();
    let before = layer.budget().expect("configured");
    assert_eq!(before.min_retries_per_second(), 5);
    layer.reload(&budget_config(5, 0.2)).unwrap();
    assert!(layer.budget().unwrap().same_budget(&before));
    layer.reload(&budget_config(6, 0.2)).unwrap();
    let after = layer.budget().unwrap();
    assert!(!after.same_budget(&before));
    assert_eq!(after.min_retries_per_second(), 6);
}

#[tokio::test]
async fn channels_to_one_target_share_a_budget() {
    let config = ResilienceConfig::from_toml(
        "[retry.budget]\n\
         [channels.a]\nendpoint = \"http://127.0.0.1:1\"\n\
         [channels.a_again]\nendpoint = \"http://127.0.0.1:1\"\n\
         [channels.b]\nendpoint = \"http://127.0.0.1:2\"\n",
    )
    .unwrap();
    let channels = crate::ResilientChannels::from_config(&config).unwrap();
    let a = channels.budget("a").expect("configured");
    assert!(a.same_budget(&channels.budget("a_again").unwrap()));
    assert!(!a.same_budget(&channels.budget("b").unwrap()));
    // Finagle's defaults for unset fields.
    assert_eq!(a.ttl(), Duration::from_secs(10));
    assert_eq!(a.min_retries_per_second(), 10);
    assert_eq!(a.retry_ratio(), 0.2);
}

fn bulkhead_config(bulkhead: &str) -> ResilienceConfig {
    ResilienceConfig::from_toml(&format!(
        "[retry.default]\nmax_attempts = 3\ninitial_delay = 1\nmax_delay = 1\njitter = false\n\
         retryable_codes = [\"RESOURCE_EXHAUSTED\", \"UNAVAILABLE\"]\n\
         [circuit_breakers.query]\nfailure_threshold = 1\n{bulkhead}"
    ))
    .unwrap()
}

#[tokio::test]
async fn a_full_bulkhead_refuses_locally_without_retry_or_breaker() {
    let gate = Arc::new(Semaphore::new(0));
    let backend = Backend {
        gate: Some(gate.clone()),
        ..Backend::default()
    };
    let config = bulkhead_config("[bulkhead.default]\nmax_concurrent = 1\n");
    let layer = crate::ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, backend.clone());
    let first = tokio::spawn(channel.clone().oneshot(request("first")));
    // Bounded wait until the first call holds the only slot at the server.
    for _ in 0..1000 {
        if backend.log.lock().unwrap().contains_key("first") {
            break;
        }
        tokio::task::yield_now().await;
    }
    let partitions = layer.bulkhead_partitions();
    assert_eq!(partitions.len(), 1);
    assert_eq!(partitions[0].in_flight, 1);
    let err = channel
        .clone()
        .oneshot(request("second"))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_resilience_core::error::error_code(&*err),
        tonic::Code::ResourceExhausted,
        "{err}"
    );
    assert!(
        !backend.log.lock().unwrap().contains_key("second"),
        "refused before the server, and not retried"
    );
    assert_eq!(
        layer.circuit_breaker_status()["query"],
        State::Closed,
        "a local refusal is no breaker failure"
    );
    gate.add_permits(100);
    // The backend answers UNAVAILABLE: the call ends, whatever its status.
    let _ = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("bounded")
        .unwrap();
}

#[tokio::test]
async fn without_a_bulkhead_section_nothing_is_limited() {
    let gate = Arc::new(Semaphore::new(0));
    let backend = Backend {
        gate: Some(gate.clone()),
        ..Backend::default()
    };
    let config =
        ResilienceConfig::from_toml("[circuit_breakers.query]\nfailure_threshold = 1000\n")
            .unwrap();
    let layer = crate::ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, backend.clone());
    let calls: Vec<_> = (0..3)
        .map(|i| tokio::spawn(channel.clone().oneshot(request(&format!("c{i}")))))
        .collect();
    for _ in 0..1000 {
        if backend.log.lock().unwrap().len() == 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        backend.log.lock().unwrap().len(),
        3,
        "all three at the server"
    );
    assert!(layer.bulkhead_partitions().is_empty());
    gate.add_permits(100);
    for call in calls {
        tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("bounded")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn a_reload_keeps_an_unchanged_bulkhead_and_its_calls_in_flight() {
    let gate = Arc::new(Semaphore::new(0));
    let backend = Backend {
        gate: Some(gate.clone()),
        ..Backend::default()
    };
    let config = bulkhead_config("[bulkhead.default]\nmax_concurrent = 1\n");
    let layer = crate::ResilienceLayer::new(&config).unwrap();
    let channel = tower_layer::Layer::layer(&layer, backend.clone());
    let first = tokio::spawn(channel.clone().oneshot(request("first")));
    for _ in 0..1000 {
        if backend.log.lock().unwrap().contains_key("first") {
            break;
        }
        tokio::task::yield_now().await;
    }
    // Same bulkhead, another retry setting: the slot stays taken.
    let reloaded = ResilienceConfig::from_toml(
        &config
            .to_toml()
            .replace("max_attempts = 3", "max_attempts = 2"),
    )
    .unwrap();
    layer.reload(&reloaded).unwrap();
    assert_eq!(layer.bulkhead_partitions()[0].in_flight, 1);
    let err = channel
        .clone()
        .oneshot(request("second"))
        .await
        .unwrap_err();
    assert_eq!(
        grpc_resilience_core::error::error_code(&*err),
        tonic::Code::ResourceExhausted
    );
    // A new limit: new partitions.
    layer
        .reload(&bulkhead_config("[bulkhead.default]\nmax_concurrent = 2\n"))
        .unwrap();
    assert!(layer.bulkhead_partitions().is_empty(), "made on first use");
    gate.add_permits(100);
    // The backend answers UNAVAILABLE: the call ends, whatever its status.
    let _ = tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .expect("bounded")
        .unwrap();
}

#[tokio::test]
async fn the_deadline_layer_keeps_its_own_head_timer() {
    // Even over a tonic `Channel`: the channel's `grpc-timeout` timer
    // starts only once a connection is up (the loopback test
    // `a_connection_that_never_completes_still_fails_at_the_deadline`).
    let config = ResilienceConfig::new().with_timeout_default(Duration::from_secs(5));
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let shared = ResilientChannel::new(channel, &config).unwrap();
    assert!(shared.shared().layers.load().deadline().times_the_head());
}
