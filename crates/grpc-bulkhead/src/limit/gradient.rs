use std::time::Duration;

use tokio::time::Instant;

use super::Sample;

/// A gradient limit, in the manner of Netflix concurrency-limits'
/// `Gradient2Limit` and Envoy's adaptive concurrency filter.
///
/// Each completed call updates two latencies: the *no-load* latency, the
/// lowest seen over the last one to two `min_rtt_window`s, and the
/// *current* latency, an exponential moving average over about the last
/// `short_window` calls. Then:
///
/// ```text
/// gradient = clamp(tolerance * no_load / current, 0.5, 1.0)
/// target   = limit * gradient + queue_allowance
/// limit    = limit * (1 - smoothing) + target * smoothing   (within min_limit..=max_limit)
/// ```
///
/// While the current latency stays within `tolerance` times the no-load
/// one, the limit grows by `queue_allowance` (smoothed); once calls queue
/// at the server and latency rises, the gradient falls below one and the
/// limit shrinks toward the concurrency the server handles without
/// queueing, plus the allowance. A call that ends with an overload signal
/// counts as a gradient of 0.5. The limit only grows while it is in use
/// (at least half of it in flight).
///
/// Choose it when the server does not say it is overloaded but slows down:
/// it needs no threshold. Start it low (`initial_limit`): the first calls
/// set the no-load latency. The no-load latency is a window minimum, so a
/// server that stays loaded for longer than two windows raises it; keep
/// the window long (the default is 30 s).
#[derive(Clone, Debug, PartialEq)]
pub struct Gradient {
    /// The limit to start with.
    pub initial_limit: u32,
    /// The limit never goes below this (at least 1).
    pub min_limit: u32,
    /// The limit never goes above this.
    pub max_limit: u32,
    /// How far one call moves the limit toward its target, within (0, 1].
    pub smoothing: f64,
    /// How much slower than the no-load latency calls may get before the
    /// limit shrinks; at least 1.
    pub tolerance: f64,
    /// Calls the limit allows beyond what the gradient says, so it keeps
    /// probing for more capacity (Envoy adds about the square root of the
    /// limit, Netflix 4). Not negative.
    pub queue_allowance: f64,
    /// About how many calls the current latency averages over (at least 1).
    pub short_window: u32,
    /// The no-load latency is the lowest seen over the last one to two of
    /// these windows.
    pub min_rtt_window: Duration,
}

impl Default for Gradient {
    /// Starts at 4, between 1 and 200, smoothing 0.2, tolerance 1.5, queue
    /// allowance 4, current latency over about 10 calls, no-load latency
    /// over 30 s windows.
    fn default() -> Self {
        Gradient {
            initial_limit: 4,
            min_limit: 1,
            max_limit: 200,
            smoothing: 0.2,
            tolerance: 1.5,
            queue_allowance: 4.0,
            short_window: 10,
            min_rtt_window: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub(crate) struct GradientState {
    config: Gradient,
    limit: f64,
    // Seconds.
    short_rtt: Option<f64>,
    // The minimum of the current window and of the one before it.
    min_current: f64,
    min_previous: f64,
    window_start: Option<Instant>,
}

impl GradientState {
    pub(crate) fn new(config: Gradient) -> Self {
        GradientState {
            limit: f64::from(config.initial_limit),
            config,
            short_rtt: None,
            min_current: f64::INFINITY,
            min_previous: f64::INFINITY,
            window_start: None,
        }
    }

    fn no_load_rtt(&mut self, now: Instant, rtt: f64) -> f64 {
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.config.min_rtt_window {
            self.min_previous = self.min_current;
            self.min_current = f64::INFINITY;
            self.window_start = Some(now);
        }
        self.min_current = self.min_current.min(rtt);
        self.min_current.min(self.min_previous)
    }

    pub(crate) fn update(&mut self, sample: Sample) -> u32 {
        let c = &self.config;
        // A zero latency (a paused clock, an instant answer) would make the
        // ratio meaningless; a microsecond is below any real call.
        let rtt = sample.rtt.as_secs_f64().max(1e-6);
        let alpha = 2.0 / (f64::from(c.short_window) + 1.0);
        let short = match self.short_rtt {
            Some(avg) => avg + alpha * (rtt - avg),
            None => rtt,
        };
        self.short_rtt = Some(short);
        let now = sample.start + sample.rtt;
        let no_load = self.no_load_rtt(now, rtt);
        let c = &self.config;

        let gradient = if sample.dropped {
            0.5
        } else {
            (c.tolerance * no_load / short).clamp(0.5, 1.0)
        };
        let target = if sample.dropped {
            self.limit * gradient
        } else {
            self.limit * gradient + c.queue_allowance
        };
        let next = self.limit * (1.0 - c.smoothing) + target * c.smoothing;
        let in_use = f64::from(sample.in_flight) * 2.0 >= self.limit;
        if next < self.limit || in_use {
            self.limit = next.clamp(f64::from(c.min_limit), f64::from(c.max_limit));
        }
        self.limit.round() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Gradient {
        Gradient {
            initial_limit: 10,
            min_limit: 2,
            max_limit: 50,
            smoothing: 0.5,
            tolerance: 1.0,
            queue_allowance: 2.0,
            short_window: 1,
            min_rtt_window: Duration::from_secs(10),
        }
    }

    fn at(state: &mut GradientState, start: Instant, rtt_ms: u64, in_flight: u32) -> u32 {
        state.update(Sample {
            start,
            rtt: Duration::from_millis(rtt_ms),
            in_flight,
            dropped: false,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn steady_latency_grows_by_the_allowance() {
        let mut s = GradientState::new(config());
        let t = Instant::now();
        // No-load 10 ms, current 10 ms: gradient 1, target = 10 + 2,
        // smoothed halfway: 11.
        assert_eq!(at(&mut s, t, 10, 10), 11);
        assert_eq!(at(&mut s, t, 10, 11), 12);
        // Not in use (less than half in flight): no growth.
        assert_eq!(at(&mut s, t, 10, 3), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn rising_latency_shrinks_it_to_the_no_load_concurrency() {
        let mut s = GradientState::new(config());
        let t = Instant::now();
        assert_eq!(at(&mut s, t, 10, 10), 11);
        // Latency doubles: gradient 0.5, target = 11 * 0.5 + 2 = 7.5,
        // smoothed: (11 + 7.5) / 2 = 9.25.
        assert_eq!(at(&mut s, t, 20, 11), 9);
        // A server whose latency is 10 ms up to 8 calls and grows in
        // proportion beyond: the limit settles where the gradient balances
        // the allowance, 8 / L = 1 - 2 / L, L = 10.
        let mut limit = 9;
        for _ in 0..200 {
            let latency = 10 * u64::from(limit.max(8)) / 8;
            limit = at(&mut s, t, latency, limit);
        }
        assert!((9..=11).contains(&limit), "settled at {limit}");
        // However slow the server gets, the gradient at most halves the
        // limit and the allowance keeps probing: it settles at twice the
        // allowance.
        for _ in 0..50 {
            limit = at(&mut s, t, 10_000, limit);
        }
        assert_eq!(limit, 4);
        // Overload signals take no allowance, down to the floor.
        for _ in 0..50 {
            limit = s.update(Sample {
                start: t,
                rtt: Duration::from_millis(10),
                in_flight: limit,
                dropped: true,
            });
        }
        assert_eq!(limit, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn overload_signal_halves_the_target() {
        let mut s = GradientState::new(config());
        let t = Instant::now();
        let limit = s.update(Sample {
            start: t,
            rtt: Duration::from_millis(10),
            in_flight: 10,
            dropped: true,
        });
        // target = 10 * 0.5 = 5, smoothed: 7.5, rounds to 8.
        assert_eq!(limit, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn the_no_load_latency_is_a_window_minimum() {
        let mut s = GradientState::new(config());
        let t0 = Instant::now();
        assert_eq!(s.no_load_rtt(t0, 0.010), 0.010);
        assert_eq!(s.no_load_rtt(t0 + Duration::from_secs(5), 0.030), 0.010);
        // A new window keeps the last one's minimum...
        assert_eq!(s.no_load_rtt(t0 + Duration::from_secs(11), 0.030), 0.010);
        // ...and forgets it one window later.
        assert_eq!(s.no_load_rtt(t0 + Duration::from_secs(22), 0.030), 0.030);
    }
}
