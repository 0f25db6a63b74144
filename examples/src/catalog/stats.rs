//! Live per-service numbers for the dashboard: calls per second, success
//! rate, retries and latency percentiles over the last few seconds.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::attempts::Downstream;

/// How far back the live numbers look.
pub const WINDOW: Duration = Duration::from_secs(5);
/// The most calls kept per service (a bound for heavy traffic).
const MAX_SAMPLES: usize = 50_000;

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    latency: Duration,
    ok: bool,
    attempts: u32,
    rejected: bool,
}

/// One logical call through the gateway, as the live numbers count it.
#[derive(Clone, Copy, Debug)]
pub struct CallSample {
    /// How long the call took.
    pub latency: Duration,
    /// Whether it succeeded (or failed with a client error such as
    /// `NOT_FOUND`: the service answered).
    pub ok: bool,
    /// Attempts made.
    pub attempts: u32,
    /// Whether a circuit breaker refused it.
    pub rejected: bool,
}

/// Numbers of one service over the last [`WINDOW`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceStats {
    /// Logical calls per second.
    pub calls_per_second: f64,
    /// Share of calls that succeeded, 0 to 1 (1 when there were none).
    pub success_rate: f64,
    /// Retries (attempts after the first) in the window.
    pub retries: u64,
    /// Calls a breaker rejected in the window.
    pub rejected: u64,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
}

/// The recent calls of both services.
#[derive(Debug, Default)]
pub struct LiveStats {
    services: [Mutex<VecDeque<Sample>>; 2],
}

/// The `q` quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

impl LiveStats {
    /// Records a call to `service`.
    pub fn record(&self, service: Downstream, call: CallSample) {
        let now = Instant::now();
        let mut samples = self.services[service as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > WINDOW)
            || samples.len() >= MAX_SAMPLES
        {
            samples.pop_front();
        }
        samples.push_back(Sample {
            at: now,
            latency: call.latency,
            ok: call.ok,
            attempts: call.attempts,
            rejected: call.rejected,
        });
    }

    /// The numbers of `service` now.
    pub fn snapshot(&self, service: Downstream) -> ServiceStats {
        let now = Instant::now();
        let samples: Vec<Sample> = self.services[service as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| now.duration_since(s.at) <= WINDOW)
            .copied()
            .collect();
        if samples.is_empty() {
            return ServiceStats {
                success_rate: 1.0,
                ..ServiceStats::default()
            };
        }
        let mut latencies: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
        latencies.sort_unstable();
        let ok = samples.iter().filter(|s| s.ok).count();
        ServiceStats {
            calls_per_second: samples.len() as f64 / WINDOW.as_secs_f64(),
            success_rate: ok as f64 / samples.len() as f64,
            retries: samples
                .iter()
                .map(|s| u64::from(s.attempts.saturating_sub(1)))
                .sum(),
            rejected: samples.iter().filter(|s| s.rejected).count() as u64,
            p50_ms: quantile(&latencies, 0.5).as_secs_f64() * 1000.0,
            p99_ms: quantile(&latencies, 0.99).as_secs_f64() * 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_leave_the_window() {
        let stats = LiveStats::default();
        let call = |ok| CallSample {
            latency: Duration::from_millis(10),
            ok,
            attempts: 2,
            rejected: false,
        };
        stats.record(Downstream::Query, call(true));
        stats.record(Downstream::Query, call(false));
        let now = stats.snapshot(Downstream::Query);
        assert_eq!(now.success_rate, 0.5);
        assert_eq!(now.retries, 2);
        assert_eq!(stats.snapshot(Downstream::Command).calls_per_second, 0.0);
        tokio::time::advance(WINDOW + Duration::from_millis(1)).await;
        assert_eq!(stats.snapshot(Downstream::Query).calls_per_second, 0.0);
    }
}
