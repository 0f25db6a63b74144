//! The demo's scenario, shortened, through both stacks: the report's facts.

use grpc_resilience_examples::catalog::demo::{self, Op, Scenario, phase};
use grpc_resilience_examples::catalog::gateway::BreakerState::{Closed, HalfOpen, Open};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_scenario_meets_every_expectation_and_the_report_says_so() {
    let report = demo::run(Scenario::quick(), false)
        .await
        .expect("the demo runs");
    let text = report.render();
    assert!(report.passed(), "{text}");
    let (r, p) = (&report.resilient, &report.plain);

    // The query breaker opened and closed again through HALF_OPEN.
    let query = r.transitions_of("query");
    assert!(query.contains(&(Closed, Open)), "{query:?}");
    assert!(
        query
            .windows(2)
            .any(|w| w[0] == (Open, HalfOpen) && w[1] == (HalfOpen, Closed)),
        "{query:?}"
    );
    assert_eq!(
        r.transitions_of("command"),
        vec![],
        "no reason to open command"
    );
    assert!(p.transitions.is_empty(), "plain channels have no breakers");

    // No duplicate product: never more writes than create requests, no
    // retried create answered ALREADY_EXISTS, and retries were answered
    // from the first write.
    let creates = r.summary(|c| c.op == Op::CreateProduct);
    assert!(r.writes <= creates.calls as u64, "{text}");
    assert!(r.deduplicated > 0, "{text}");
    assert!(r.calls.iter().all(|c| c.code != "ALREADY_EXISTS"), "{text}");
    // Without retries, lost responses leave written products the client
    // was told failed.
    let plain_creates = p.summary(|c| c.op == Op::CreateProduct);
    assert!(p.writes > plain_creates.ok as u64, "{text}");

    // Retries happened, only in the resilient run.
    assert!(r.retries.values().sum::<u64>() > 0, "{text}");
    assert_eq!(p.retries.values().sum::<u64>(), 0);

    // The resilient run succeeded more, overall and under the burst.
    let (ra, pa) = (r.summary(|_| true), p.summary(|_| true));
    assert_eq!(ra.calls, pa.calls, "the same calls were sent to both");
    assert!(ra.success_rate() > pa.success_rate(), "{text}");
    let burst = |run: &demo::RunReport| run.summary(|c| c.phase == phase::BURST).success_rate();
    assert!(burst(r) > burst(p) + 0.2, "{text}");

    // Slow GetProducts were cut at their deadline; the plain ones waited.
    let slow_get =
        |run: &demo::RunReport| run.summary(|c| c.phase == phase::SLOW && c.op == Op::GetProduct);
    assert_eq!(slow_get(r).timeouts, slow_get(r).calls, "{text}");
    assert!(slow_get(p).p50 >= demo::SLOW_LATENCY, "{text}");

    for section in [
        "What shapes the behaviour",
        "retry throttle",
        "failure-rate mode",
        "Per phase: calls, success",
        "Per operation",
        "products created vs create requests",
        "Breaker transitions",
        "All expectations met.",
    ] {
        assert!(text.contains(section), "no {section:?} in:\n{text}");
    }
}
