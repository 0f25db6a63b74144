//! Issue 10's "defaults that hold up": under the chaos a user meets (30%
//! UNAVAILABLE, 10% lost responses, a 1 s restart of the service) and under
//! a hard outage, the shipped channel settings must do better than a bare
//! channel: both the catalog example's built-in
//! `examples/config/catalog.toml` and the facade's `config/resilience.toml`,
//! which the README's quick start loads.

use std::time::Duration;

use grpc_resilience_examples::catalog::channels::CatalogConfig;
use grpc_resilience_examples::catalog::demo::{self, Op, Phase, Report, Scenario};
use grpc_resilience_examples::catalog::faults::FaultSettings;
use tonic::Code;

const READS: &[(Op, u32)] = &[(Op::GetProduct, 85), (Op::ListProducts, 15)];

/// Each scenario lasts at most 9 s; a run that has not ended well after
/// that hangs.
const BOUND: Duration = Duration::from_secs(60);

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

/// The facade's `config/resilience.toml`, which the README's quick start
/// loads.
fn shipped() -> CatalogConfig {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/resilience.toml");
    CatalogConfig::from_file(path).expect("the shipped config loads")
}

/// Chaos, a 1 s restart (the Query service down), chaos again.
fn chaos_with_a_restart() -> Scenario {
    Scenario {
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
    }
}

/// Runs the scenario through channels built from `config` and through bare
/// ones, and asserts the resilient run succeeds on at least 10 points more
/// of the calls, and more often after the restart.
async fn assert_beats_a_bare_channel(config: CatalogConfig) {
    let origin = config.origin().to_owned();
    let report: Report = tokio::time::timeout(
        BOUND,
        demo::run_with_config(chaos_with_a_restart(), config, false),
    )
    .await
    .unwrap_or_else(|_| panic!("{origin}: the scenario did not end within {BOUND:?}"))
    .expect("the scenario runs");
    let text = report.render();
    let (r, p) = (&report.resilient, &report.plain);
    let (all_r, all_p) = (r.summary(|_| true), p.summary(|_| true));
    assert_eq!(all_r.calls, all_p.calls);
    let after = |run: &demo::RunReport| run.summary(|c| c.phase == 2).success_rate();
    eprintln!(
        "{origin}: success: resilient {:.3} vs plain {:.3}; after the restart {:.3} vs {:.3}",
        all_r.success_rate(),
        all_p.success_rate(),
        after(r),
        after(p)
    );
    assert!(
        all_r.success_rate() > all_p.success_rate() + 0.1,
        "{origin}: resilient {:.3} vs plain {:.3}\n{text}",
        all_r.success_rate(),
        all_p.success_rate()
    );
    assert!(
        after(r) > after(p),
        "{origin}: after the restart: resilient {:.3} vs plain {:.3}\n{text}",
        after(r),
        after(p)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_restart_goes_better_through_the_stack_than_through_a_bare_channel() {
    assert_beats_a_bare_channel(CatalogConfig::built_in()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_a_restart_goes_better_through_the_quick_start_config_than_through_a_bare_channel()
 {
    assert_beats_a_bare_channel(shipped()).await;
}

/// One second without faults, a 4 s hard outage of the Query service, 2 s
/// after it is back. Through channels built from `config`, the down
/// service must get fewer calls than from a bare channel (the breaker
/// sheds them and fails calls fast), and the calls of the last second,
/// once the service is back, must all succeed (the breaker closed again).
async fn assert_sheds_a_hard_outage_and_recovers(config: CatalogConfig) {
    let origin = config.origin().to_owned();
    let scenario = Scenario {
        phases: vec![
            phase("steady", 1000, FaultSettings::none()),
            phase(
                "outage",
                4000,
                FaultSettings {
                    outage: true,
                    ..FaultSettings::none()
                },
            ),
            phase("back", 2000, FaultSettings::none()),
        ],
        ..Scenario::quick()
    };
    let report: Report =
        tokio::time::timeout(BOUND, demo::run_with_config(scenario, config, false))
            .await
            .unwrap_or_else(|_| panic!("{origin}: the scenario did not end within {BOUND:?}"))
            .expect("the scenario runs");
    let text = report.render();
    let (r, p) = (&report.resilient, &report.plain);
    let reached = |run: &demo::RunReport| run.server_calls[1][1];
    let rejected = r.summary(|c| c.phase == 1).rejected;
    let back_at = r.phase_starts[2];
    let last_second = r.summary(|c| c.phase == 2 && c.at >= back_at + Duration::from_secs(1));
    eprintln!(
        "{origin}: outage: the down service got {} calls vs {} from a bare channel, {rejected} \
         rejected; after it is back: {}/{} of the last second ok",
        reached(r),
        reached(p),
        last_second.ok,
        last_second.calls
    );
    assert!(
        reached(r) < reached(p),
        "{origin}: the down service got {} calls vs {} from a bare channel\n{text}",
        reached(r),
        reached(p)
    );
    assert!(rejected > 0, "{origin}: no call failed fast\n{text}");
    assert!(
        last_second.calls > 0 && last_second.ok == last_second.calls,
        "{origin}: {}/{} of the last second ok\n{text}",
        last_second.ok,
        last_second.calls
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_outage_is_shed_and_recovered_from_with_the_catalog_config() {
    assert_sheds_a_hard_outage_and_recovers(CatalogConfig::built_in()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_outage_is_shed_and_recovered_from_with_the_quick_start_config() {
    assert_sheds_a_hard_outage_and_recovers(shipped()).await;
}
