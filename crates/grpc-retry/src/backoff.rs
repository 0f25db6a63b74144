//! Delays between attempts.

use std::time::Duration;

use rand::RngExt;

use crate::RetryPolicy;

/// How a delay is randomised, so clients that failed together do not retry
/// together.
///
/// The jitter applies to the capped delay, `min(initial *
/// multiplier^(n-1), max_delay)`, and a jittered delay never exceeds
/// `max_delay`: delays at the cap are spread below it rather than all
/// landing on it.
///
/// The default is `Proportional(0.2)`: each delay stays within 20 % of the
/// configured schedule (retry 2 of the default policy waits 160 to 240 ms),
/// so the time a call spends retrying is predictable and fits a deadline as
/// configured, while clients that failed together still spread out. Choose
/// [`Jitter::Full`] for what gRPC's retry design (gRFC A6) specifies, which
/// spreads a thundering herd further at the price of sometimes retrying at
/// once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// The delay as computed.
    None,
    /// Uniform in `[0, delay]`: the "full jitter" gRFC A6 specifies,
    /// `random(0, min(initial * multiplier^(n-1), max_delay))`.
    Full,
    /// Uniform in `[delay * (1 - f), min(delay * (1 + f), max_delay)]`, for
    /// `f` within `[0, 1]` (the default uses `f = 0.2`, the spread grpc-core
    /// gives its connection backoff).
    Proportional(f64),
}

/// The delay before retry `n` (1 for the first retry), before jitter:
/// `min(initial * multiplier^(n-1), max_delay)`. The arithmetic saturates:
/// a delay too large to represent is `max_delay`.
pub fn base_delay(policy: &RetryPolicy, n: u32) -> Duration {
    let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    let secs = policy.initial_delay.as_secs_f64() * policy.multiplier.powi(exp);
    Duration::try_from_secs_f64(secs).map_or(policy.max_delay, |d| d.min(policy.max_delay))
}

/// `d * f` for `f` within `[0, 1]`, never above `d` (float rounding near
/// `Duration::MAX` would otherwise overflow).
fn scale(d: Duration, f: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * f).map_or(d, |scaled| scaled.min(d))
}

/// The delay before retry `n`, jittered with `unit`, a number drawn
/// uniformly from `[0, 1)` (values outside `[0, 1]` are clamped, NaN reads
/// as 0); never above `max_delay`.
pub fn jittered(policy: &RetryPolicy, n: u32, unit: f64) -> Duration {
    let unit = if unit.is_nan() {
        0.0
    } else {
        unit.clamp(0.0, 1.0)
    };
    let base = base_delay(policy, n);
    match policy.jitter {
        Jitter::None => base,
        Jitter::Full => scale(base, unit),
        Jitter::Proportional(f) => {
            let f = if f.is_finite() {
                f.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let spread = scale(base, f);
            let low = base - spread;
            let high = base.saturating_add(spread).min(policy.max_delay);
            low + scale(high - low, unit)
        }
    }
}

/// The delay before retry `n`, with a random jitter.
pub(crate) fn delay(policy: &RetryPolicy, n: u32) -> Duration {
    let unit: f64 = if policy.jitter == Jitter::None {
        0.0
    } else {
        rand::rng().random()
    };
    jittered(policy, n, unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_exponentially_to_the_cap() {
        let p = RetryPolicy::default().with_jitter(Jitter::None);
        let delays: Vec<Duration> = (1..=8).map(|n| jittered(&p, n, 0.5)).collect();
        assert_eq!(
            delays,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(jittered(&p, u32::MAX, 0.5), ms(5000));
    }

    #[test]
    fn jitter_bounds() {
        let p = RetryPolicy::default();
        assert_eq!(jittered(&p, 1, 0.0), ms(80));
        assert_eq!(jittered(&p.with_jitter(Jitter::Full), 2, 0.0), ms(0));
        assert_eq!(jittered(&p.with_jitter(Jitter::Full), 2, 0.5), ms(100));
        // +20 % of the 5 s cap would be 6 s: the cap holds, and the draw
        // stays spread below it.
        let top = jittered(&p, 10, 0.999_999);
        assert!(top <= ms(5000) && top > ms(4999), "{top:?}");
        assert_eq!(jittered(&p, 10, 0.0), ms(4000));
    }

    #[test]
    fn delays_at_the_cap_are_spread_below_it() {
        let p = RetryPolicy::default();
        assert_eq!(p.jitter, Jitter::Proportional(0.2));
        // Retry 10 is at the 5 s cap: draws that jitter above the cap must
        // not all land on it.
        let at_cap: Vec<Duration> = [0.5, 0.6, 0.8, 0.99]
            .into_iter()
            .map(|unit| jittered(&p, 10, unit))
            .collect();
        for d in &at_cap {
            assert!(*d <= ms(5000) && *d >= ms(4000), "{at_cap:?}");
        }
        for pair in at_cap.windows(2) {
            assert!(pair[0] < pair[1], "spread, not lockstep: {at_cap:?}");
        }
        // Random draws at the cap differ.
        let draws: std::collections::BTreeSet<Duration> = (0..50).map(|_| delay(&p, 10)).collect();
        assert!(draws.len() > 1, "{draws:?}");
        assert!(draws.iter().all(|d| *d <= ms(5000)));
    }

    #[test]
    fn extreme_policies_that_validate_do_not_panic() {
        let huge = [
            RetryPolicy::default()
                .with_multiplier(1e30)
                .with_max_delay(Duration::MAX),
            RetryPolicy::default()
                .with_initial_delay(Duration::MAX)
                .with_max_delay(Duration::MAX),
            RetryPolicy::default()
                .with_initial_delay(Duration::MAX)
                .with_max_delay(Duration::MAX)
                .with_jitter(Jitter::Proportional(1.0)),
        ];
        for p in huge {
            if p.validate().is_err() {
                continue;
            }
            for n in [1, 2, 50, 1000, u32::MAX] {
                for unit in [0.0, 0.5, 0.999_999] {
                    assert!(jittered(&p, n, unit) <= p.max_delay, "{p:?}");
                }
                assert!(delay(&p, n) <= p.max_delay);
            }
        }
        // A unit outside [0, 1) is clamped, not a panic.
        let p = RetryPolicy::default();
        for unit in [-1.0, 2.0, f64::NAN, f64::INFINITY] {
            assert!(jittered(&p, 3, unit) <= p.max_delay);
        }
    }

    fn any_duration() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::MAX),
            Just(Duration::from_nanos(1)),
            (0u64..=u64::MAX, 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
            (1u64..100_000).prop_map(Duration::from_millis),
        ]
    }

    fn any_policy() -> impl Strategy<Value = RetryPolicy> {
        (
            any_duration(),
            any_duration(),
            prop_oneof![
                Just(1e30),
                Just(f64::MAX),
                Just(f64::MIN_POSITIVE),
                0.0f64..1e6,
                -10.0f64..10.0
            ],
            prop_oneof![
                Just(Jitter::None),
                Just(Jitter::Full),
                (-1.0f64..=2.0).prop_map(Jitter::Proportional),
            ],
        )
            .prop_map(|(initial, max, multiplier, jitter)| {
                RetryPolicy::default()
                    .with_initial_delay(initial)
                    .with_max_delay(max)
                    .with_multiplier(multiplier)
                    .with_jitter(jitter)
            })
    }

    fn policy() -> impl Strategy<Value = RetryPolicy> {
        (
            1u64..2_000,
            0u64..10_000,
            0.1f64..10.0,
            prop_oneof![
                Just(Jitter::None),
                Just(Jitter::Full),
                (0.0f64..=1.0).prop_map(Jitter::Proportional),
            ],
        )
            .prop_map(|(initial, extra, multiplier, jitter)| {
                RetryPolicy::default()
                    .with_initial_delay(ms(initial))
                    .with_max_delay(ms(initial + extra))
                    .with_multiplier(multiplier)
                    .with_jitter(jitter)
            })
    }

    proptest! {
        #[test]
        fn every_delay_is_within_its_bounds(p in policy(), n in 1u32..200, unit in 0.0f64..1.0) {
            prop_assert!(p.validate().is_ok());
            let base = base_delay(&p, n);
            let d = jittered(&p, n, unit);
            prop_assert!(base <= p.max_delay);
            prop_assert!(d <= p.max_delay, "{:?} > max {:?}", d, p.max_delay);
            match p.jitter {
                Jitter::None => prop_assert_eq!(d, base),
                Jitter::Full => prop_assert!(d <= base),
                Jitter::Proportional(f) => {
                    // Jitter applies to the capped base; the top of the
                    // range is cut at the cap.
                    let low = base.mul_f64(1.0 - f);
                    // Allow a nanosecond of float rounding.
                    prop_assert!(d + Duration::from_nanos(1) >= low, "{:?} < {:?}", d, low);
                    prop_assert!(d <= base.mul_f64(1.0 + f) + Duration::from_nanos(1));
                }
            }
        }

        #[test]
        fn every_policy_that_validates_computes_every_delay(p in any_policy(), unit in 0.0f64..1.0) {
            prop_assume!(p.validate().is_ok());
            for n in 1..=1000 {
                let d = jittered(&p, n, unit);
                prop_assert!(d <= p.max_delay, "{:?} > max {:?}", d, p.max_delay);
            }
            prop_assert!(delay(&p, 1000) <= p.max_delay);
        }

        #[test]
        fn random_delays_stay_under_the_cap(p in policy(), n in 1u32..50) {
            prop_assert!(delay(&p, n) <= p.max_delay);
        }
    }
}
