//! The demo: one bounded scenario, run at the same time through two
//! complete systems (each with its own Command and Query services, faults
//! and gateway), one with resilient channels and one with plain ones, all
//! driven through the GraphQL API over HTTP; then a report side by side
//! and a check of what the resilient run must achieve.
//!
//! The scenario, phase by phase:
//!
//! 1. **steady**: reads and writes, no fault;
//! 2. **burst**: 30% `UNAVAILABLE` and 10% lost responses on both services;
//! 3. **outage**: the Query service is down; its breaker opens and calls
//!    fail fast;
//! 4. **recovery**: the Query service is back; the breaker goes HALF_OPEN,
//!    then CLOSED;
//! 5. **slow**: the Query service answers after 4 s: `GetProduct` (3 s
//!    deadline) times out, `ListProducts` (10 s) does not;
//! 6. **lost writes**: 30% of `CreateProduct` responses are lost after the
//!    product was written; retries with an idempotency key must not write
//!    twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use grpc_resilience_core::BoxError;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic::Code;

use super::channels::{CatalogConfig, Setting, Stack};
use super::cli::DemoArgs;
use super::client::GraphqlClient;
use super::faults::FaultSettings;
use super::gateway::{BreakerState, BreakerTransition};
use super::stats::quantile;
use super::system::{System, SystemOptions};

/// A GraphQL operation the demo sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `product(id)` (Query service, `GetProduct`).
    GetProduct,
    /// `products(first)` (Query service, `ListProducts`).
    ListProducts,
    /// `createProduct(input)` (Command service, `CreateProduct`).
    CreateProduct,
}

impl Op {
    /// The gRPC method's name.
    pub fn name(self) -> &'static str {
        match self {
            Op::GetProduct => "GetProduct",
            Op::ListProducts => "ListProducts",
            Op::CreateProduct => "CreateProduct",
        }
    }
}

const MIXED: &[(Op, u32)] = &[
    (Op::GetProduct, 70),
    (Op::ListProducts, 15),
    (Op::CreateProduct, 15),
];
const READS: &[(Op, u32)] = &[(Op::GetProduct, 85), (Op::ListProducts, 15)];
const WAVE: &[(Op, u32)] = &[(Op::GetProduct, 50), (Op::ListProducts, 50)];
const CREATES: &[(Op, u32)] = &[(Op::CreateProduct, 100)];

/// One phase of the scenario.
#[derive(Clone, Debug)]
pub struct Phase {
    /// A short name.
    pub name: &'static str,
    /// What happens, for the report.
    pub description: &'static str,
    /// How long calls are sent for.
    pub duration: Duration,
    /// One wave of [`Scenario::wave`] concurrent calls instead of a steady
    /// rate for `duration`.
    pub wave: bool,
    /// The operations and their weights.
    pub mix: &'static [(Op, u32)],
    /// The Command service's faults.
    pub command: FaultSettings,
    /// The Query service's faults.
    pub query: FaultSettings,
}

/// The demo's scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// Calls started per second (open loop: a call starts on schedule,
    /// whether earlier ones have ended or not, as users arrive), the same
    /// in both runs.
    pub rate: u32,
    /// Calls in flight at most; a call due while that many are in flight
    /// is not sent and counts as failed (`SHED`).
    pub max_in_flight: usize,
    /// Calls in a wave phase.
    pub wave: usize,
    /// Seed of the faults and of the callers' choices.
    pub seed: u64,
}

/// The index of each phase of [`Scenario::standard`] and
/// [`Scenario::quick`].
pub mod phase {
    /// No fault.
    pub const STEADY: usize = 0;
    /// Random errors and lost responses.
    pub const BURST: usize = 1;
    /// The Query service is down.
    pub const OUTAGE: usize = 2;
    /// The Query service is back.
    pub const RECOVERY: usize = 3;
    /// The Query service is slow.
    pub const SLOW: usize = 4;
    /// Lost write responses.
    pub const LOST_WRITES: usize = 5;
}

/// What the Query service does during the slow phase: slower than
/// `GetProduct`'s 3 s deadline, faster than `ListProducts`' 10 s.
pub const SLOW_LATENCY: Duration = Duration::from_millis(4000);

impl Scenario {
    /// The full scenario (about 30 s).
    pub fn standard() -> Self {
        Self::with_durations([3000, 6000, 4000, 5000, 4000])
    }

    /// A shorter one (about 20 s), for tests.
    pub fn quick() -> Self {
        Self::with_durations([1500, 5000, 2500, 3000, 3000])
    }

    fn with_durations(ms: [u64; 5]) -> Self {
        let [steady, burst, outage, recovery, lost] = ms.map(Duration::from_millis);
        let chaos = FaultSettings {
            errors: vec![(Code::Unavailable, 0.3)],
            lost_responses: 0.1,
            ..FaultSettings::none()
        };
        let none = FaultSettings::none;
        Scenario {
            phases: vec![
                Phase {
                    name: "steady",
                    description: "reads and writes, no fault",
                    duration: steady,
                    wave: false,
                    mix: MIXED,
                    command: none(),
                    query: none(),
                },
                Phase {
                    name: "burst",
                    description: "30% UNAVAILABLE + 10% lost responses on both services",
                    duration: burst,
                    wave: false,
                    mix: MIXED,
                    command: chaos.clone(),
                    query: chaos,
                },
                Phase {
                    name: "outage",
                    description: "the Query service is down (every call UNAVAILABLE)",
                    duration: outage,
                    wave: false,
                    mix: READS,
                    command: none(),
                    query: FaultSettings {
                        outage: true,
                        ..none()
                    },
                },
                Phase {
                    name: "recovery",
                    description: "the Query service is back",
                    duration: recovery,
                    wave: false,
                    mix: READS,
                    command: none(),
                    query: none(),
                },
                Phase {
                    name: "slow",
                    description: "the Query service answers after 4 s: one wave of reads",
                    duration: SLOW_LATENCY,
                    wave: true,
                    mix: WAVE,
                    command: none(),
                    query: FaultSettings {
                        latency: SLOW_LATENCY,
                        ..none()
                    },
                },
                Phase {
                    name: "lost writes",
                    description: "30% of CreateProduct responses lost after the write",
                    duration: lost,
                    wave: false,
                    mix: CREATES,
                    command: FaultSettings {
                        lost_responses: 0.3,
                        ..none()
                    },
                    query: none(),
                },
            ],
            rate: 40,
            max_in_flight: 200,
            wave: 8,
            seed: 7,
        }
    }

    fn planned(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

/// One GraphQL call the demo made.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// The phase it was sent in.
    pub phase: usize,
    /// The operation.
    pub op: Op,
    /// Whether it returned data without error.
    pub ok: bool,
    /// `OK`, the gRPC code name of the error, or `HTTP` when no GraphQL
    /// response came back.
    pub code: String,
    /// Attempts, from the error's extensions (1 for a success).
    pub attempts: u32,
    /// Whether a breaker refused it.
    pub rejected: bool,
    /// How long it took.
    pub latency: Duration,
    /// When it ended, since the scenario began.
    pub at: Duration,
    /// The id of a product it created.
    pub created: Option<String>,
}

/// What one run (resilient or plain) did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The stack of the run.
    pub stack: Stack,
    /// What shaped its channels.
    pub settings: Vec<Setting>,
    /// Every call.
    pub calls: Vec<CallRecord>,
    /// Breaker transitions, with their time since the scenario began.
    pub transitions: Vec<(Duration, BreakerTransition)>,
    /// When each phase began.
    pub phase_starts: Vec<Duration>,
    /// Products the Command service wrote during the scenario.
    pub writes: u64,
    /// Creates the Command service answered from an earlier write with the
    /// same idempotency key.
    pub deduplicated: u64,
    /// Retries (attempts after the first) per operation, counted by the
    /// gateway during the scenario.
    pub retries: BTreeMap<Op, u64>,
    /// Calls that reached the Command and the Query service, per phase
    /// (counted by their fault injectors).
    pub server_calls: Vec<[u64; 2]>,
}

/// Numbers of a set of calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Calls.
    pub calls: usize,
    /// Successful calls.
    pub ok: usize,
    /// Calls that ended with `DEADLINE_EXCEEDED`.
    pub timeouts: usize,
    /// Calls a breaker refused.
    pub rejected: usize,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
}

impl Summary {
    fn of<'a>(calls: impl Iterator<Item = &'a CallRecord>) -> Summary {
        let calls: Vec<&CallRecord> = calls.collect();
        let mut latencies: Vec<Duration> = calls.iter().map(|c| c.latency).collect();
        latencies.sort_unstable();
        Summary {
            calls: calls.len(),
            ok: calls.iter().filter(|c| c.ok).count(),
            timeouts: calls
                .iter()
                .filter(|c| c.code == "DEADLINE_EXCEEDED")
                .count(),
            rejected: calls.iter().filter(|c| c.rejected).count(),
            p50: quantile(&latencies, 0.5),
            p99: quantile(&latencies, 0.99),
        }
    }

    /// Share of successful calls, 0 to 1 (0 without calls).
    pub fn success_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.ok as f64 / self.calls as f64
        }
    }
}

impl RunReport {
    /// The numbers of the calls that match `filter`.
    pub fn summary(&self, filter: impl Fn(&CallRecord) -> bool) -> Summary {
        Summary::of(self.calls.iter().filter(|c| filter(c)))
    }

    /// The transitions of breaker `name`, in order, as `(from, to)`.
    pub fn transitions_of(&self, name: &str) -> Vec<(BreakerState, BreakerState)> {
        self.transitions
            .iter()
            .filter(|(_, t)| t.name == name)
            .map(|(_, t)| (t.from, t.to))
            .collect()
    }

    fn phase_of(&self, at: Duration) -> usize {
        self.phase_starts
            .iter()
            .rposition(|start| *start <= at)
            .unwrap_or(0)
    }
}

/// One thing the resilient run must achieve, and whether it did.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// What is expected.
    pub what: String,
    /// Whether it held.
    pub met: bool,
    /// What was seen.
    pub seen: String,
}

/// The demo's outcome.
#[derive(Clone, Debug)]
pub struct Report {
    /// The scenario that ran.
    pub scenario: Scenario,
    /// The run through resilient channels.
    pub resilient: RunReport,
    /// The run through plain channels.
    pub plain: RunReport,
    /// What the resilient run had to achieve.
    pub expectations: Vec<Expectation>,
}

impl Report {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.expectations.iter().all(|e| e.met)
    }
}

/// A small deterministic generator for the callers' choices.
#[derive(Debug)]
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick(&mut self, mix: &[(Op, u32)]) -> Op {
        let total: u32 = mix.iter().map(|(_, w)| w).sum();
        let mut draw = (self.next() % u64::from(total.max(1))) as u32;
        for (op, weight) in mix {
            if draw < *weight {
                return *op;
            }
            draw -= weight;
        }
        mix[0].0
    }
}

fn fault_input(s: &FaultSettings) -> Value {
    json!({
        "outage": s.outage,
        "errors": s.errors.iter().map(|(code, rate)| json!({
            "code": grpc_resilience_core::codes::code_name(*code),
            "rate": rate,
        })).collect::<Vec<_>>(),
        "lostResponseRate": s.lost_responses,
        "latencyMs": s.latency.as_millis() as u64,
    })
}

async fn set_faults(client: &GraphqlClient, phase: &Phase) -> Result<(), BoxError> {
    for (service, settings) in [("COMMAND", &phase.command), ("QUERY", &phase.query)] {
        let r = client
            .execute(
                "mutation($s: Service!, $f: FaultInput!) { setFaults(service: $s, faults: $f) { outage } }",
                json!({"s": service, "f": fault_input(settings)}),
            )
            .await?;
        if let Some(error) = r.error() {
            return Err(format!("setFaults({service}) failed: {error}").into());
        }
    }
    Ok(())
}

async fn call(
    client: &GraphqlClient,
    op: Op,
    id: &str,
) -> (bool, String, u32, bool, Option<String>) {
    let (query, vars) = match op {
        Op::GetProduct => (
            "query($id: String!) { product(id: $id) { id } }",
            json!({"id": id}),
        ),
        Op::ListProducts => ("{ products(first: 5) { nodes { id } } }", Value::Null),
        Op::CreateProduct => (
            "mutation($id: String!) { createProduct(input: {id: $id, name: \"demo\", priceCents: 1999}) { id } }",
            json!({"id": id}),
        ),
    };
    match client.execute(query, vars).await {
        Err(_) => (false, "HTTP".into(), 0, false, None),
        Ok(r) => match r.error() {
            None => {
                let created = r.data()["createProduct"]["id"].as_str().map(str::to_owned);
                (true, "OK".into(), 1, false, created)
            }
            Some(e) => {
                let ext = &e["extensions"];
                let code = ext["code"].as_str().unwrap_or("UNKNOWN").to_owned();
                let attempts = ext["attempts"].as_u64().unwrap_or(1) as u32;
                let rejected = ext["breakerRejected"].as_bool().unwrap_or(false);
                (false, code, attempts, rejected, None)
            }
        },
    }
}

/// Sends the calls of phase `phase_index` on schedule and waits for them.
async fn run_phase(
    client: &GraphqlClient,
    scenario: &Scenario,
    phase_index: usize,
    start: Instant,
    label: &'static str,
    records: &Arc<Mutex<Vec<CallRecord>>>,
    bar: &ProgressBar,
) {
    let phase = &scenario.phases[phase_index];
    let mut choices = Choices(
        scenario
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add(phase_index as u64)
            | 1,
    );
    let (count, interval) = if phase.wave {
        (scenario.wave, Duration::ZERO)
    } else {
        let interval = Duration::from_secs(1) / scenario.rate.max(1);
        let count = (phase.duration.as_micros() / interval.as_micros().max(1)) as usize;
        (count, interval)
    };
    let phase_start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..count {
        let op = if phase.wave {
            phase.mix[n % phase.mix.len()].0
        } else {
            choices.pick(phase.mix)
        };
        let id = match op {
            Op::CreateProduct => format!("{label}-{phase_index}-{n}"),
            _ => format!("p{}", 1 + choices.next() % 20),
        };
        tokio::time::sleep_until(phase_start + interval * n as u32).await;
        // Reap the calls that ended, to know how many are in flight.
        while tasks.try_join_next().is_some() {}
        if tasks.len() >= scenario.max_in_flight {
            records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(CallRecord {
                    phase: phase_index,
                    op,
                    ok: false,
                    code: "SHED".into(),
                    attempts: 0,
                    rejected: false,
                    latency: Duration::ZERO,
                    at: start.elapsed(),
                    created: None,
                });
            continue;
        }
        let client = client.clone();
        let records = records.clone();
        let bar = bar.clone();
        tasks.spawn(async move {
            let began = Instant::now();
            let (ok, code, attempts, rejected, created) = call(&client, op, &id).await;
            let record = CallRecord {
                phase: phase_index,
                op,
                ok,
                code,
                attempts,
                rejected,
                latency: began.elapsed(),
                at: start.elapsed(),
                created,
            };
            records
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(record);
            bar.inc(1);
        });
    }
    // Every call ends: the HTTP client gives up after its timeout.
    while tasks.join_next().await.is_some() {}
}

async fn run_one(
    system: &System,
    scenario: Arc<Scenario>,
    bar: ProgressBar,
    multi: MultiProgress,
    announce: bool,
) -> Result<RunReport, BoxError> {
    let stack = system.gateway.channels().stack();
    let label = stack.as_str();
    let client = GraphqlClient::new(system.graphql_url(), Duration::from_secs(20));
    let backend = system
        .backend
        .as_ref()
        .ok_or("the demo runs over the built-in services")?;
    let before = backend.catalog.stats();
    let ops = [Op::GetProduct, Op::ListProducts, Op::CreateProduct];
    let retries_before: Vec<u64> = ops
        .iter()
        .map(|op| system.gateway.retries(op.name()))
        .collect();
    let gateway_start = system.gateway.uptime();
    let start = Instant::now();
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut phase_starts = Vec::new();
    let mut server_calls = Vec::new();
    let seen = |injector: &grpc_fault::FaultInjector| injector.stats("*").map_or(0, |s| s.calls);
    for (i, phase) in scenario.phases.iter().enumerate() {
        set_faults(&client, phase).await?;
        let calls_before = [seen(&backend.command_faults), seen(&backend.query_faults)];
        phase_starts.push(start.elapsed());
        bar.set_message(format!(
            "phase {}/{}: {}",
            i + 1,
            scenario.phases.len(),
            phase.name
        ));
        if announce {
            multi.suspend(|| {
                println!(
                    "  t+{:>5.1}s  {:<12} {}",
                    start.elapsed().as_secs_f64(),
                    phase.name,
                    phase.description
                );
            });
        }
        run_phase(&client, &scenario, i, start, label, &records, &bar).await;
        server_calls.push([
            seen(&backend.command_faults) - calls_before[0],
            seen(&backend.query_faults) - calls_before[1],
        ]);
    }
    set_faults(
        &client,
        &Phase {
            command: FaultSettings::none(),
            query: FaultSettings::none(),
            ..scenario.phases[0].clone()
        },
    )
    .await?;
    bar.finish_with_message("done");
    let after = backend.catalog.stats();
    let start_ms = gateway_start.as_millis() as u64;
    let transitions = system
        .gateway
        .transitions()
        .into_iter()
        .filter(|t| t.since_start_ms >= start_ms && t.from != t.to)
        .map(|t| (Duration::from_millis(t.since_start_ms - start_ms), t))
        .collect();
    let calls = std::mem::take(&mut *records.lock().unwrap_or_else(PoisonError::into_inner));
    let retries = ops
        .iter()
        .zip(retries_before)
        .map(|(op, before)| (*op, system.gateway.retries(op.name()) - before))
        .collect();
    Ok(RunReport {
        stack,
        settings: system.gateway.channels().settings(),
        calls,
        transitions,
        phase_starts,
        writes: after.writes - before.writes,
        deduplicated: after.deduplicated - before.deduplicated,
        retries,
        server_calls,
    })
}

fn check(what: impl Into<String>, met: bool, seen: impl Into<String>) -> Expectation {
    Expectation {
        what: what.into(),
        met,
        seen: seen.into(),
    }
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// What the resilient run must achieve, judged against the plain run.
pub fn expectations(resilient: &RunReport, plain: &RunReport) -> Vec<Expectation> {
    use BreakerState::*;
    let in_phase = |r: &RunReport, p: usize| r.summary(|c| c.phase == p);
    let mut out = Vec::new();

    let (rb, pb) = (
        in_phase(resilient, phase::BURST),
        in_phase(plain, phase::BURST),
    );
    out.push(check(
        "burst: resilient success rate at least 85% and above plain",
        rb.success_rate() >= 0.85 && rb.success_rate() > pb.success_rate(),
        format!(
            "resilient {} vs plain {}",
            pct(rb.success_rate()),
            pct(pb.success_rate())
        ),
    ));

    let reached = |r: &RunReport| r.server_calls.get(phase::OUTAGE).map_or(0, |c| c[1]);
    out.push(check(
        "outage: the down Query service gets fewer calls from the resilient gateway than from the plain one (the breaker sheds them)",
        reached(resilient) < reached(plain),
        format!(
            "calls that reached it: resilient {} vs plain {}",
            reached(resilient),
            reached(plain)
        ),
    ));

    let query = resilient.transitions_of("query");
    let opened_in_outage = resilient.transitions.iter().any(|(at, t)| {
        t.name == "query" && t.to == Open && resilient.phase_of(*at) == phase::OUTAGE
    });
    let ro = in_phase(resilient, phase::OUTAGE);
    out.push(check(
        "outage: the query breaker opens, and calls then fail fast (rejected)",
        opened_in_outage && ro.rejected > 0,
        format!(
            "opened during the outage: {opened_in_outage}; {} of {} calls rejected",
            ro.rejected, ro.calls
        ),
    ));

    let recovered = query
        .windows(2)
        .any(|w| w[0] == (Open, HalfOpen) && w[1] == (HalfOpen, Closed));
    let recovery_calls: Vec<&CallRecord> = resilient
        .calls
        .iter()
        .filter(|c| c.phase == phase::RECOVERY)
        .collect();
    let tail = &recovery_calls[recovery_calls.len().saturating_sub(20)..];
    let tail_ok = !tail.is_empty() && tail.iter().all(|c| c.ok);
    out.push(check(
        "recovery: query goes OPEN -> HALF_OPEN -> CLOSED and the last 20 reads succeed",
        recovered && tail_ok,
        format!(
            "query transitions: {}; last {} reads all ok: {tail_ok}",
            query
                .iter()
                .map(|(f, t)| format!("{f:?}->{t:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            tail.len()
        ),
    ));

    let slow_get = resilient.summary(|c| c.phase == phase::SLOW && c.op == Op::GetProduct);
    let slow_list = resilient.summary(|c| c.phase == phase::SLOW && c.op == Op::ListProducts);
    out.push(check(
        "slow: every GetProduct ends DEADLINE_EXCEEDED within its 3 s deadline (+0.5 s); every ListProducts (10 s) succeeds",
        slow_get.calls > 0
            && slow_get.timeouts == slow_get.calls
            && slow_get.p99 <= Duration::from_millis(3500)
            && slow_list.calls > 0
            && slow_list.ok == slow_list.calls,
        format!(
            "GetProduct {}/{} timed out, p99 {:.2} s; ListProducts {}/{} ok",
            slow_get.timeouts,
            slow_get.calls,
            slow_get.p99.as_secs_f64(),
            slow_list.ok,
            slow_list.calls
        ),
    ));

    let creates = resilient.summary(|c| c.op == Op::CreateProduct);
    let lost_phase =
        resilient.summary(|c| c.op == Op::CreateProduct && c.phase == phase::LOST_WRITES);
    let already_exists = resilient
        .calls
        .iter()
        .filter(|c| c.code == "ALREADY_EXISTS")
        .count();
    out.push(check(
        "lost writes: at least 95% of creates confirmed, no retried create re-executed (no ALREADY_EXISTS), retries deduplicated by idempotency key, never more products than confirmed + failed creates",
        lost_phase.success_rate() >= 0.95
            && already_exists == 0
            && resilient.deduplicated > 0
            && resilient.writes <= creates.calls as u64,
        format!(
            "{} of {} creates confirmed in the phase; ALREADY_EXISTS {already_exists}; deduplicated {}; written {} for {} create requests",
            lost_phase.ok, lost_phase.calls, resilient.deduplicated, resilient.writes, creates.calls
        ),
    ));

    let retries: u64 = resilient.retries.values().sum();
    out.push(check(
        "retries happened (and none in the plain run)",
        retries > 0 && plain.retries.values().all(|n| *n == 0),
        format!(
            "resilient {retries}, plain {}",
            plain.retries.values().sum::<u64>()
        ),
    ));

    let (ra, pa) = (resilient.summary(|_| true), plain.summary(|_| true));
    out.push(check(
        "overall: resilient success rate above plain",
        ra.success_rate() > pa.success_rate(),
        format!(
            "resilient {} vs plain {}",
            pct(ra.success_rate()),
            pct(pa.success_rate())
        ),
    ));
    out
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1000.0)
    }
}

impl Report {
    /// The report as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let (r, p) = (&self.resilient, &self.plain);
        let _ = writeln!(out, "\n=== What shapes the behaviour");
        for run in [r, p] {
            let _ = writeln!(out, "  [{}]", run.stack.as_str());
            for s in &run.settings {
                let _ = writeln!(out, "    {}: {}\n      [{}]", s.name, s.value, s.source);
            }
        }
        let _ = writeln!(
            out,
            "  [scenario] {} calls/s per run (open loop, at most {} in flight), waves of {}, fault seed {}",
            self.scenario.rate, self.scenario.max_in_flight, self.scenario.wave, self.scenario.seed
        );

        let _ = writeln!(
            out,
            "\n=== Per phase: calls, success, attempts that reached the services\n  {:<12} {:>27}   {:>27}",
            "", "resilient", "plain"
        );
        for (i, phase) in self.scenario.phases.iter().enumerate() {
            let (a, b) = (r.summary(|c| c.phase == i), p.summary(|c| c.phase == i));
            let reached = |run: &RunReport| run.server_calls.get(i).map_or(0, |c| c[0] + c[1]);
            let _ = writeln!(
                out,
                "  {:<12} {:>5} {:>7} ok {:>5} sent   {:>5} {:>7} ok {:>5} sent   {}",
                phase.name,
                a.calls,
                pct(a.success_rate()),
                reached(r),
                b.calls,
                pct(b.success_rate()),
                reached(p),
                phase.description
            );
        }

        let _ = writeln!(out, "\n=== Per operation");
        let _ = writeln!(
            out,
            "  {:<14} {:<10} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
            "operation",
            "stack",
            "calls",
            "ok",
            "success",
            "retries",
            "timeouts",
            "rejected",
            "p50",
            "p99"
        );
        for op in [Op::GetProduct, Op::ListProducts, Op::CreateProduct] {
            for run in [r, p] {
                let s = run.summary(|c| c.op == op);
                let _ = writeln!(
                    out,
                    "  {:<14} {:<10} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
                    op.name(),
                    run.stack.as_str(),
                    s.calls,
                    s.ok,
                    pct(s.success_rate()),
                    run.retries.get(&op).copied().unwrap_or(0),
                    s.timeouts,
                    s.rejected,
                    ms(s.p50),
                    ms(s.p99)
                );
            }
        }

        let _ = writeln!(out, "\n=== Writes: products created vs create requests");
        for run in [r, p] {
            let creates = run.summary(|c| c.op == Op::CreateProduct);
            let _ = writeln!(
                out,
                "  {:<10} {} requests, {} confirmed to the client, {} written, {} retries answered from the first write (idempotency key), {} written but reported as failed",
                run.stack.as_str(),
                creates.calls,
                creates.ok,
                run.writes,
                run.deduplicated,
                run.writes.saturating_sub(creates.ok as u64)
            );
        }

        let _ = writeln!(
            out,
            "\n=== Breaker transitions (resilient run; t = since the scenario began)"
        );
        if r.transitions.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for (at, t) in &r.transitions {
            let phase = self.scenario.phases[r.phase_of(*at)].name;
            let _ = writeln!(
                out,
                "  t+{:>5.2}s  {}  {:<8} {:?} -> {:?}  ({}; during {phase})",
                at.as_secs_f64(),
                t.at,
                t.name,
                t.from,
                t.to,
                t.trigger
            );
        }

        let _ = writeln!(out, "\n=== Expectations of the resilient run");
        for e in &self.expectations {
            let _ = writeln!(
                out,
                "  [{}] {}\n         {}",
                if e.met { " ok " } else { "FAIL" },
                e.what,
                e.seen
            );
        }
        let _ = writeln!(
            out,
            "\n{}",
            if self.passed() {
                "All expectations met."
            } else {
                "Some expectations were NOT met."
            }
        );
        out
    }
}

/// Runs `scenario` through resilient and plain channels at the same time
/// and judges the outcome. With `progress`, draws progress bars (when the
/// output is a terminal) and prints the phases as they begin.
///
/// # Errors
///
/// A system that cannot start, or an admin mutation that fails.
pub async fn run(scenario: Scenario, progress: bool) -> Result<Report, BoxError> {
    run_with_config(scenario, CatalogConfig::built_in(), progress).await
}

/// [`run`], with the resilient channels built from `config` instead of the
/// built-in `examples/config/catalog.toml` (for instance the facade's
/// shipped `config/resilience.toml`, which the README's quick start loads).
///
/// # Errors
///
/// A system that cannot start, or an admin mutation that fails.
pub async fn run_with_config(
    scenario: Scenario,
    config: CatalogConfig,
    progress: bool,
) -> Result<Report, BoxError> {
    let resilient = System::start(SystemOptions {
        stack: Stack::Resilient,
        seed: scenario.seed,
        config,
        ..SystemOptions::default()
    })
    .await?;
    let plain = System::start(SystemOptions {
        stack: Stack::Plain,
        seed: scenario.seed,
        ..SystemOptions::default()
    })
    .await?;
    if progress {
        println!("Dashboard of the resilient run: {}", resilient.url());
        println!("Dashboard of the plain run:     {}", plain.url());
        println!(
            "Scenario: {} phases, about {:.0} s, both runs at once.",
            scenario.phases.len(),
            scenario.planned().as_secs_f64() + 1.0
        );
    }
    let multi = MultiProgress::with_draw_target(if progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style =
        ProgressStyle::with_template("{prefix:>10} {spinner} {elapsed:>3} {pos:>5} calls  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let bar = |name: &'static str| {
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(name);
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    let scenario = Arc::new(scenario);
    let (r, p) = tokio::join!(
        run_one(
            &resilient,
            scenario.clone(),
            bar("resilient"),
            multi.clone(),
            progress
        ),
        run_one(&plain, scenario.clone(), bar("plain"), multi.clone(), false),
    );
    let (resilient_report, plain_report) = (r?, p?);
    let expectations = expectations(&resilient_report, &plain_report);
    Ok(Report {
        scenario: (*scenario).clone(),
        resilient: resilient_report,
        plain: plain_report,
        expectations,
    })
}

/// Runs the demo from the command line: exit code 0 only if the resilient
/// run met every expectation.
pub async fn run_cli(args: DemoArgs) -> ExitCode {
    let scenario = if args.quick {
        Scenario::quick()
    } else {
        Scenario::standard()
    };
    println!("catalog demo: the same scenario through resilient and through plain channels\n");
    match run(scenario, !args.no_progress).await {
        Ok(report) => {
            print!("{}", report.render());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("catalog demo: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_follow_the_weights() {
        let mut c = Choices(42);
        let mut counts: BTreeMap<Op, u32> = BTreeMap::new();
        for _ in 0..10_000 {
            *counts.entry(c.pick(MIXED)).or_default() += 1;
        }
        let get = counts[&Op::GetProduct];
        assert!((6500..7500).contains(&get), "{counts:?}");
        assert!(counts[&Op::CreateProduct] > 1000, "{counts:?}");
    }
}
