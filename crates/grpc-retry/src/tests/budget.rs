//! The retry budget (`RetryLayer::with_budget`).

use super::*;

fn counter(snapshotter: &metrics_util::debugging::Snapshotter, name: &str) -> u64 {
    use metrics_util::debugging::DebugValue;
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(k, ..)| k.key().name() == name)
        .map(|(.., v)| match v {
            DebugValue::Counter(n) => n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

/// Runs one call whose attempts all fail with UNAVAILABLE; returns how many
/// attempts the service saw.
async fn failing_call(service: &mut Svc, handle: &mut Handle) -> usize {
    assert!(service.poll_ready().is_ready());
    let mut fut = tokio::spawn(service.call(request(GET, b"x")));
    let mut attempts = 0;
    let result = loop {
        tokio::select! {
            result = &mut fut => break result.unwrap(),
            request = handle.next_request() => {
                let (_, send) = request.expect("an attempt");
                attempts += 1;
                send.send_response(trailers_only(Code::Unavailable));
            }
        }
    };
    assert_eq!(code_of(result), Code::Unavailable);
    attempts
}

#[tokio::test(start_paused = true)]
async fn a_budget_allows_retries_up_to_its_ratio_of_calls() {
    use metrics_util::debugging::DebuggingRecorder;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);

    // One retry per two calls, no minimum rate.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
    let layer = layer(no_jitter().with_max_attempts(3)).with_budget(budget);
    let (mut service, mut handle) = setup(layer);
    let mut attempts = 0;
    for _ in 0..20 {
        attempts += failing_call(&mut service, &mut handle).await;
    }
    // Every second call finds two deposits, enough for one retry: 20 first
    // attempts and 10 retries; every call ends for want of budget.
    assert_eq!(attempts, 30);
    assert_eq!(counter(&snapshotter, "grpc.retry.budget_exhausted"), 20);
}

#[tokio::test(start_paused = true)]
async fn a_budget_keeps_retrying_random_faults() {
    // 30% of first attempts fail; every one of them is retried (and then
    // succeeds), where the budget allows 50%.
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.5).unwrap();
    let layer = layer(no_jitter().with_max_attempts(3)).with_budget(budget);
    let (mut service, mut handle) = setup(layer);
    let mut retried = 0;
    for i in 0..100u32 {
        let fails = i % 10 < 3;
        let answers = if fails {
            vec![trailers_only(Code::Unavailable), trailers_only(Code::Ok)]
        } else {
            vec![trailers_only(Code::Ok)]
        };
        let (result, seen) = run(&mut service, &mut handle, request(GET, b"x"), answers).await;
        assert_eq!(code_of(result), Code::Ok, "call {i}");
        retried += seen.len() - 1;
    }
    assert_eq!(retried, 30);
}

#[tokio::test(start_paused = true)]
async fn the_minimum_rate_allows_retries_without_traffic_and_deposits_expire() {
    // No ratio: only the minimum, 2 retries a second over a 1 s window.
    let budget = RetryBudget::new(Duration::from_secs(1), 2, 0.0).unwrap();
    let layer = layer(no_jitter().with_max_attempts(2)).with_budget(budget.clone());
    let (mut service, mut handle) = setup(layer);
    let mut attempts = Vec::new();
    for _ in 0..4 {
        attempts.push(failing_call(&mut service, &mut handle).await);
    }
    assert_eq!(attempts, [2, 2, 1, 1], "two retries, then none");
    // The window passes: the withdrawals expire.
    advance(Duration::from_secs(2)).await;
    assert_eq!(failing_call(&mut service, &mut handle).await, 2);
}

#[tokio::test(start_paused = true)]
async fn an_overloaded_server_sees_no_retry_storm() {
    // Every attempt fails; without a budget each call would be tried 3 times.
    let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.1).unwrap();
    let layer = layer(no_jitter().with_max_attempts(3)).with_budget(budget);
    let (mut service, mut handle) = setup(layer);
    let mut attempts = 0;
    for _ in 0..100 {
        attempts += failing_call(&mut service, &mut handle).await;
    }
    // 100 calls: 10 retries from the ratio, 10 from the minimum (1/s over
    // 10 s); the load stays under 1.2x the offered load.
    assert!(attempts <= 120, "{attempts} attempts for 100 calls");
    assert!(attempts > 100, "some retries are allowed: {attempts}");
}

#[tokio::test(start_paused = true)]
async fn with_a_throttle_and_a_budget_both_must_allow() {
    // A generous budget, a throttle that allows one failure.
    let budget = RetryBudget::new(Duration::from_secs(10), 100, 10.0).unwrap();
    let throttle = RetryThrottle::new(2.0, 0.1).unwrap();
    let layer = layer(no_jitter().with_max_attempts(3))
        .with_budget(budget)
        .with_throttle(throttle);
    let (mut service, mut handle) = setup(layer.clone());
    // 2 -> 1 token: not above half; the budget alone would allow.
    assert_eq!(failing_call(&mut service, &mut handle).await, 1);
    assert!(layer.budget().is_some());

    // A full throttle and a spent budget: no retry either.
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.1).unwrap();
    let throttle = RetryThrottle::new(100.0, 1.0).unwrap();
    let layer = self::layer(no_jitter().with_max_attempts(3))
        .with_throttle(throttle)
        .with_budget(budget);
    let (mut service, mut handle) = setup(layer.clone());
    assert_eq!(failing_call(&mut service, &mut handle).await, 1);
    assert!(layer.throttle().unwrap().allows_retry());
}

#[tokio::test(start_paused = true)]
async fn transparent_retries_do_not_spend_the_budget() {
    let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.1).unwrap();
    let layer = layer(no_jitter().with_max_attempts(2)).with_budget(budget);
    let (mut service, mut handle) = setup(layer);
    assert!(service.poll_ready().is_ready());
    let fut = tokio::spawn(service.call(request(GET, b"x")));
    let (_, send) = next(&mut handle).await;
    send.send_error(crate::test_h2::remote_reset(h2::Reason::REFUSED_STREAM).await);
    let (_, send) = next(&mut handle).await;
    send.send_response(trailers_only(Code::Ok));
    assert_eq!(code_of(fut.await.unwrap()), Code::Ok);
}

#[test]
fn clones_share_one_budget_and_bad_values_are_named() {
    let a = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
    let b = a.clone();
    assert!(a.same_budget(&b));
    assert!(!a.same_budget(&RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap()));
    assert_eq!(a.ttl(), Duration::from_secs(10));
    assert_eq!(a.min_retries_per_second(), 0);
    assert_eq!(a.retry_ratio(), 0.5);
    let debug = format!("{a:?}");
    assert!(
        debug.contains("RetryBudget") && debug.contains("retry_ratio"),
        "{debug}"
    );
    // Deposits through one clone fund retries through the other.
    a.deposit();
    a.deposit();
    assert!(b.withdraw());
    assert!(!a.withdraw());

    for (ttl, min, ratio, expected) in [
        (Duration::from_millis(500), 1, 0.1, "`budget.ttl` = 500ms"),
        (Duration::from_secs(61), 1, 0.1, "`budget.ttl` = 61s"),
        (
            Duration::from_secs(10),
            1,
            -0.1,
            "`budget.retry_ratio` = -0.1",
        ),
        (
            Duration::from_secs(10),
            1,
            f32::NAN,
            "`budget.retry_ratio` = NaN",
        ),
        (
            Duration::from_secs(10),
            1,
            1001.0,
            "`budget.retry_ratio` = 1001",
        ),
        (
            Duration::from_secs(10),
            u32::MAX,
            0.1,
            "`budget.min_retries_per_second` = 4294967295",
        ),
        (Duration::from_secs(10), 0, 0.0, "`budget.retry_ratio` = 0"),
    ] {
        let err = RetryBudget::new(ttl, min, ratio).unwrap_err();
        assert!(
            err.to_string().contains(expected),
            "{err} should contain {expected}"
        );
    }
}
