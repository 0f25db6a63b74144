use std::time::Duration;

use tokio::time::Instant;

use super::Sample;

/// Additive increase, multiplicative decrease (Netflix concurrency-limits'
/// `AIMDLimit`, with TCP's once-per-round-trip backoff).
///
/// * A call that ends with an overload signal, or whose latency is above
///   `latency_threshold`, multiplies the limit by `backoff_ratio` (rounded
///   down, not below `min_limit`). The limit backs off once per round
///   trip: a call admitted before the last backoff does not back off
///   again, so a burst of slow calls that were all in flight together
///   counts as one signal.
/// * Any other call grows the limit (up to `max_limit`), provided the limit
///   is in use: at least half of it was in flight when the call was
///   admitted. An idle client does not grow a limit it never tested. Until
///   the first backoff each such call adds one (a slow start, to find the
///   level quickly); after it, each adds `1 / limit`, about one per round
///   trip (TCP's congestion avoidance). Adding one per call at a level the
///   server is near to would outpace a once-per-round-trip backoff and
///   hold latency above the threshold.
///
/// Choose it when the server says clearly when it is overloaded (it sheds
/// with `RESOURCE_EXHAUSTED` or `UNAVAILABLE`), or when you know the
/// latency above which it is in trouble.
#[derive(Clone, Debug, PartialEq)]
pub struct Aimd {
    /// The limit to start with.
    pub initial_limit: u32,
    /// The limit never goes below this (at least 1).
    pub min_limit: u32,
    /// The limit never goes above this.
    pub max_limit: u32,
    /// What a backoff multiplies the limit by, within [0.5, 1).
    pub backoff_ratio: f64,
    /// A call slower than this (to its response headers) is an overload
    /// signal.
    pub latency_threshold: Duration,
}

impl Default for Aimd {
    /// Starts at 20, between 1 and 200, backs off by 0.9, and treats calls
    /// over 5 s as overload (Netflix's defaults).
    fn default() -> Self {
        Aimd {
            initial_limit: 20,
            min_limit: 1,
            max_limit: 200,
            backoff_ratio: 0.9,
            latency_threshold: Duration::from_secs(5),
        }
    }
}

#[derive(Debug)]
pub(crate) struct AimdState {
    config: Aimd,
    limit: f64,
    last_backoff: Option<Instant>,
}

impl AimdState {
    pub(crate) fn new(config: Aimd) -> Self {
        AimdState {
            limit: f64::from(config.initial_limit),
            config,
            last_backoff: None,
        }
    }

    pub(crate) fn update(&mut self, sample: Sample) -> u32 {
        let c = &self.config;
        let (min, max) = (f64::from(c.min_limit), f64::from(c.max_limit));
        if sample.dropped || sample.rtt > c.latency_threshold {
            let seen = self.last_backoff.is_some_and(|at| sample.start < at);
            if !seen {
                self.limit = (self.limit * c.backoff_ratio).floor().max(min);
                self.last_backoff = Some(sample.start + sample.rtt);
            }
        } else if f64::from(sample.in_flight) * 2.0 >= self.limit.floor() {
            let step = if self.last_backoff.is_some() {
                1.0 / self.limit
            } else {
                1.0
            };
            self.limit = (self.limit + step).min(max);
        }
        self.limit.floor() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(start: Instant, rtt_ms: u64, in_flight: u32, dropped: bool) -> Sample {
        Sample {
            start,
            rtt: Duration::from_millis(rtt_ms),
            in_flight,
            dropped,
        }
    }

    fn state() -> AimdState {
        AimdState::new(Aimd {
            initial_limit: 10,
            min_limit: 2,
            max_limit: 12,
            backoff_ratio: 0.5,
            latency_threshold: Duration::from_millis(100),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn success_adds_one_up_to_the_max_when_the_limit_is_used() {
        let mut s = state();
        let t = Instant::now();
        assert_eq!(s.update(sample(t, 10, 5, false)), 11);
        assert_eq!(s.update(sample(t, 10, 11, false)), 12);
        assert_eq!(
            s.update(sample(t, 10, 12, false)),
            12,
            "capped at max_limit"
        );
        // Less than half the limit in flight: the limit is not tested, so it
        // does not grow.
        let mut s = state();
        assert_eq!(s.update(sample(t, 10, 4, false)), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn overload_or_slow_call_multiplies_down_once_per_round_trip() {
        let mut s = state();
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_millis(200)).await;
        // A call admitted at t0, answered after 200 ms (slower than the
        // threshold): halve.
        assert_eq!(s.update(sample(t0, 200, 10, false)), 5);
        // Other calls of the same burst, admitted before that backoff: no
        // second backoff.
        assert_eq!(s.update(sample(t0, 199, 10, false)), 5);
        assert_eq!(s.update(sample(t0, 20, 10, true)), 5);
        // A call admitted after it that is dropped: halve again, then the
        // floor holds.
        let t1 = Instant::now();
        assert_eq!(s.update(sample(t1, 5, 5, true)), 2);
        let t2 = t1 + Duration::from_millis(10);
        assert_eq!(s.update(sample(t2, 5, 2, true)), 2, "min_limit");
        // After a backoff, successes climb back by one per limit's worth
        // of calls (one per round trip), not one per call: 2 + 1/2 + 1/2.5
        // = 2.9, then 3.24.
        let t3 = t2 + Duration::from_millis(10);
        assert_eq!(s.update(sample(t3, 5, 2, false)), 2);
        assert_eq!(s.update(sample(t3, 5, 2, false)), 2);
        assert_eq!(s.update(sample(t3, 5, 2, false)), 3);
    }
}
