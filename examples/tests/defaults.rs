//! Issue 10's "defaults that hold up": under the chaos a user meets (30%
//! UNAVAILABLE, 10% lost responses, a 1 s restart of the service) the
//! shipped channel settings must do better than a bare channel.

use std::time::Duration;

use grpc_resilience_examples::catalog::demo::{self, Op, Phase, Scenario};
use grpc_resilience_examples::catalog::faults::FaultSettings;
use tonic::Code;

const READS: &[(Op, u32)] = &[(Op::GetProduct, 85), (Op::ListProducts, 15)];

fn chaos() -> FaultSettings {
    FaultSettings {
        errors: vec![(Code::Unavailable, 0.3)],
        lost_responses: 0.1,
        ..FaultSettings::none()
    }
}

fn phase(name: &'static str, ms: u64, query: FaultSettings) -> Phase {
    Phase {
        name,
        description: name,
        duration: Duration::from_millis(ms),
        wave: false,
        mix: READS,
        command: FaultSettings::none(),
        query,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_restart_goes_better_through_the_stack_than_through_a_bare_channel() {
    let scenario = Scenario {
        phases: vec![
            phase("chaos", 3000, chaos()),
            phase(
                "restart",
                1000,
                FaultSettings {
                    outage: true,
                    ..FaultSettings::none()
                },
            ),
            phase("chaos again", 5000, chaos()),
        ],
        ..Scenario::quick()
    };
    let report = demo::run(scenario, false).await.expect("the scenario runs");
    let text = report.render();
    let (r, p) = (&report.resilient, &report.plain);
    let (all_r, all_p) = (r.summary(|_| true), p.summary(|_| true));
    assert_eq!(all_r.calls, all_p.calls);
    let after = |run: &demo::RunReport| run.summary(|c| c.phase == 2).success_rate();
    eprintln!(
        "success: resilient {:.3} vs plain {:.3}; after the restart {:.3} vs {:.3}",
        all_r.success_rate(),
        all_p.success_rate(),
        after(r),
        after(p)
    );
    assert!(
        all_r.success_rate() > all_p.success_rate() + 0.1,
        "resilient {:.3} vs plain {:.3}\n{text}",
        all_r.success_rate(),
        all_p.success_rate()
    );
    assert!(
        after(r) > after(p),
        "after the restart: resilient {:.3} vs plain {:.3}\n{text}",
        after(r),
        after(p)
    );
}
