//! Unit tests: the ejection state machine in paused time, and the endpoint
//! service's readiness inside tower's p2c balancer with mocks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use tokio::runtime::Handle;
use tower::ServiceExt;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower_service::Service;
use tower_test::mock;

use crate::endpoint::{ACTIVE, EJECTED, EndpointService, EndpointState, PROBING};
use crate::outlier::{Controller, Reason};
use crate::{BalanceConfig, BreakerRegistry, EndpointStatus, OutlierConfig};

const BASE: Duration = Duration::from_secs(10);

fn controller(percent: u8, probes: u32) -> Arc<Controller> {
    let config = BalanceConfig::new("query").with_outlier(
        OutlierConfig::default()
            .with_base_ejection_time(BASE)
            .with_max_ejection_time(BASE * 3)
            .with_max_ejection_percent(percent)
            .with_probe_successes(probes)
            .with_max_probes(probes),
    );
    Controller::new(config, BreakerRegistry::new(), Handle::current())
}

fn endpoint(controller: &Arc<Controller>, key: &str) -> Arc<EndpointState> {
    let breaker = controller.breaker_name(key);
    let state = Arc::new(EndpointState::new(
        key.into(),
        breaker.as_str().into(),
        Arc::downgrade(controller),
        controller.config.outlier().max_probes(),
    ));
    controller.insert(state.clone());
    state
}

/// Lets spawned timers run after the clock moved.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn ejection_lasts_base_times_n_then_probes_and_a_success_brings_it_back() {
    let c = controller(100, 1);
    let a = endpoint(&c, "a:1");
    endpoint(&c, "b:1");

    assert!(c.eject(&a, Reason::Breaker));
    assert_eq!(a.mode(), EJECTED);
    tokio::time::advance(BASE - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(
        a.mode(),
        EJECTED,
        "still out just before base_ejection_time"
    );
    tokio::time::advance(Duration::from_millis(2)).await;
    settle().await;
    assert_eq!(a.mode(), PROBING);

    // A failed probe: out again, for twice as long.
    c.on_probe_outcome(&a, false);
    assert_eq!(
        c.status()["a:1"],
        EndpointStatus::Ejected(Reason::ProbeFailed)
    );
    tokio::time::advance(BASE * 2 - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(a.mode(), EJECTED, "the second ejection lasts 2 x base");
    tokio::time::advance(Duration::from_millis(2)).await;
    settle().await;
    assert_eq!(a.mode(), PROBING);

    // Third: capped at max_ejection_time (3 x base), not more.
    c.on_probe_outcome(&a, false);
    c.on_probe_outcome(&a, false);
    assert_eq!(a.mode(), EJECTED);
    tokio::time::advance(BASE * 3 + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(a.mode(), PROBING);

    c.on_probe_outcome(&a, true);
    assert_eq!(a.mode(), ACTIVE);
    assert_eq!(c.status()["a:1"], EndpointStatus::Active);
}

#[tokio::test(start_paused = true)]
async fn a_stale_timer_changes_nothing() {
    let c = controller(100, 1);
    let a = endpoint(&c, "a:1");
    endpoint(&c, "b:1");
    c.eject(&a, Reason::Breaker);
    // Back early (an operator's reset), then ejected again.
    c.activate(&a);
    tokio::time::advance(BASE / 2).await;
    c.eject(&a, Reason::Breaker);
    // The first ejection's timer fires now: the second one still holds.
    tokio::time::advance(BASE / 2 + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(a.mode(), EJECTED);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_keeps_the_last_endpoints_in() {
    let c = controller(50, 1);
    let eps: Vec<_> = ["a:1", "b:1", "c:1"]
        .iter()
        .map(|k| endpoint(&c, k))
        .collect();
    assert!(c.eject(&eps[0], Reason::Breaker));
    assert!(!c.eject(&eps[1], Reason::Breaker), "3 x 50% = 1 at most");
    assert!(!c.eject(&eps[2], Reason::Health));
    assert_eq!(eps[1].mode(), ACTIVE);
    // A probing endpoint still counts as out.
    tokio::time::advance(BASE + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(eps[0].mode(), PROBING);
    assert!(!c.eject(&eps[1], Reason::Breaker));

    let c = controller(0, 1);
    let a = endpoint(&c, "a:1");
    endpoint(&c, "b:1");
    assert!(!c.eject(&a, Reason::Breaker), "0% never ejects");
}

#[tokio::test(start_paused = true)]
async fn health_ejection_waits_for_serving_then_probes_at_once() {
    let c = controller(100, 2);
    let a = endpoint(&c, "a:1");
    endpoint(&c, "b:1");
    c.on_not_serving(&a);
    assert_eq!(c.status()["a:1"], EndpointStatus::Ejected(Reason::Health));
    tokio::time::advance(BASE * 10).await;
    settle().await;
    assert_eq!(a.mode(), EJECTED, "no timer while NOT_SERVING");
    c.on_serving(&a);
    assert_eq!(a.mode(), PROBING, "SERVING lets probes through at once");
    c.on_probe_outcome(&a, true);
    assert_eq!(a.mode(), PROBING, "two probes needed");
    c.on_probe_outcome(&a, true);
    assert_eq!(a.mode(), ACTIVE);

    // A broken watch while NOT_SERVING falls back to the passive schedule.
    c.on_not_serving(&a);
    c.on_watch_broken(&a);
    tokio::time::advance(BASE * 3 + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(a.mode(), PROBING);
}

#[tokio::test(start_paused = true)]
async fn details_count_ejections_and_report_health_and_breaker_state() {
    let c = controller(50, 1);
    let a = endpoint(&c, "a:1");
    endpoint(&c, "b:1");
    let fresh = &c.details()["a:1"];
    assert_eq!(
        (fresh.status, fresh.ejections, fresh.consecutive_ejections),
        (EndpointStatus::Active, 0, 0)
    );
    assert_eq!(fresh.breaker, "query@a:1");
    assert!(!fresh.not_serving && !fresh.is_ejected());

    c.on_not_serving(&a);
    let out = &c.details()["a:1"];
    assert_eq!(out.status, EndpointStatus::Ejected(Reason::Health));
    assert!(out.not_serving && out.is_ejected());
    assert_eq!((out.ejections, out.consecutive_ejections), (1, 1));

    c.on_serving(&a);
    c.on_probe_outcome(&a, false);
    let again = &c.details()["a:1"];
    assert_eq!(again.status, EndpointStatus::Ejected(Reason::ProbeFailed));
    assert!(!again.not_serving);
    assert_eq!((again.ejections, again.consecutive_ejections), (2, 2));

    // The other endpoint was never out; the cap (50 % of 2) kept room for
    // one only.
    let b = &c.details()["b:1"];
    assert_eq!((b.status, b.ejections), (EndpointStatus::Active, 0));
}

type Req = http::Request<String>;
type Res = http::Response<Full<Bytes>>;

fn unavailable() -> Res {
    http::Response::builder()
        .header("grpc-status", "14")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn ok() -> Res {
    http::Response::builder()
        .header("grpc-status", "0")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

type Stack = PendingRequests<EndpointService<mock::Mock<Req, Res>>, CompleteOnResponse>;

fn stack(c: &Arc<Controller>, key: &str) -> (Stack, mock::Handle<Req, Res>, Arc<EndpointState>) {
    let (service, handle) = mock::pair::<Req, Res>();
    let state = endpoint(c, key);
    let service = PendingRequests::new(
        EndpointService::new(service, state.clone()),
        CompleteOnResponse::default(),
    );
    (service, handle, state)
}

#[tokio::test(start_paused = true)]
async fn after_a_failure_the_next_pick_goes_to_another_endpoint() {
    let c = controller(50, 1);
    let (a, mut ha, _) = stack(&c, "a:1");
    let (b, mut hb, _) = stack(&c, "b:1");
    let mut balance = Balance::new(ServiceList::new::<Req>(vec![a, b]));
    let mut checked = 0;
    for _ in 0..200 {
        // The call runs on its own task: a layer may hand the request to
        // the endpoint only once the call is polled.
        let call = tokio::spawn(
            balance
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(String::new())),
        );
        let failed_on_a = tokio::select! {
            Some((_, respond)) = ha.next_request() => {
                respond.send_response(unavailable());
                true
            }
            Some((_, respond)) = hb.next_request() => {
                respond.send_response(ok());
                false
            }
        };
        let response = call.await.unwrap().unwrap();
        let _ = response.into_body().collect().await;
        if failed_on_a {
            // The retry's pick: must be b.
            let call = tokio::spawn(
                balance
                    .ready()
                    .await
                    .unwrap()
                    .call(http::Request::new(String::new())),
            );
            let picked_a = tokio::select! {
                Some((_, respond)) = ha.next_request() => {
                    respond.send_response(ok());
                    true
                }
                Some((_, respond)) = hb.next_request() => {
                    respond.send_response(ok());
                    false
                }
            };
            assert!(!picked_a, "the endpoint that just failed was picked again");
            call.await.unwrap().unwrap();
            checked += 1;
            if checked == 20 {
                return;
            }
        }
    }
    panic!("a was picked only {checked} times");
}

#[tokio::test(start_paused = true)]
async fn an_ejected_endpoint_is_skipped_and_woken_when_its_ejection_ends() {
    // Cap 100%, one probe at a time.
    let c = controller(100, 1);
    let (a, mut ha, sa) = stack(&c, "a:1");
    let (b, mut hb, _) = stack(&c, "b:1");
    let mut balance = Balance::new(ServiceList::new::<Req>(vec![a, b]));
    assert!(c.eject(&sa, Reason::Breaker));
    for _ in 0..20 {
        let call = balance
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(String::new()));
        assert!(
            ha.next_request().now_or_never().is_none(),
            "no call reaches an ejected endpoint"
        );
        let (_, respond) = hb.next_request().await.unwrap();
        respond.send_response(ok());
        call.await.unwrap();
    }
    // b ejected too (cap 100%): no endpoint is ready, until a's ejection
    // ends and its timer wakes the balancer.
    // (b's ejection ends after a's.)
    tokio::time::advance(BASE / 2).await;
    let sb = c.get(&c.breaker_name("b:1")).unwrap();
    assert!(c.eject(&sb, Reason::Breaker));
    let ready = tokio::time::timeout(BASE * 2, balance.ready()).await;
    assert!(ready.is_ok(), "woken when the ejection ended");
    assert_eq!(sa.mode(), PROBING);
    // Probing: one probe at a time.
    let probe = balance.call(http::Request::new(String::new()));
    let (_, respond) = ha.next_request().await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(100), balance.ready()).await;
    assert!(second.is_err(), "a second probe waits for the first");
    respond.send_response(ok());
    let _ = probe.await.unwrap().into_body().collect().await;
    assert_eq!(sa.mode(), ACTIVE, "the probe's success brought it back");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), balance.ready())
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn success_rate_mode_ejects_an_endpoint_far_below_the_others() {
    use std::sync::atomic::Ordering;
    let config = BalanceConfig::new("query").with_outlier(
        OutlierConfig::default()
            .with_base_ejection_time(BASE)
            .with_max_ejection_percent(50)
            .with_success_rate(
                crate::SuccessRate::default()
                    .with_interval(Duration::from_secs(1))
                    .with_minimum_hosts(3)
                    .with_request_volume(10)
                    .with_stdev_factor(1.0),
            ),
    );
    let c = Controller::new(config, BreakerRegistry::new(), Handle::current());
    let eps: Vec<_> = ["a:1", "b:1", "c:1", "d:1", "e:1"]
        .iter()
        .map(|k| endpoint(&c, k))
        .collect();
    let set = |ep: &EndpointState, ok: u64, failed: u64| {
        ep.ok.store(ok, Ordering::Relaxed);
        ep.failed.store(failed, Ordering::Relaxed);
    };
    set(&eps[0], 50, 50);
    for ep in &eps[1..4] {
        set(ep, 99, 1);
    }
    // Too few calls to be judged, however bad.
    set(&eps[4], 0, 5);
    tokio::time::advance(Duration::from_secs(1) + Duration::from_millis(1)).await;
    settle().await;
    let status = c.status();
    assert_eq!(
        status["a:1"],
        EndpointStatus::Ejected(Reason::SuccessRate),
        "{status:?}"
    );
    for key in ["b:1", "c:1", "d:1", "e:1"] {
        assert_eq!(status[key], EndpointStatus::Active, "{status:?}");
    }
    // The counts start again each interval; fewer than minimum_hosts
    // endpoints with enough calls: nobody is judged.
    set(&eps[1], 0, 100);
    set(&eps[2], 100, 0);
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(eps[1].mode(), ACTIVE);
}
