//! Delays between attempts.

use std::time::Duration;

use rand::RngExt;

use crate::RetryPolicy;

/// How a delay is randomised, so clients that failed together do not retry
/// together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// The delay as computed.
    None,
    /// Uniform in `[0, delay]` (AWS's "full jitter").
    Full,
    /// Uniform in `[delay * (1 - f), delay * (1 + f)]`; gRPC's retry design
    /// uses `f = 0.2`.
    Proportional(f64),
}

/// The delay before retry `n` (1 for the first retry), before jitter:
/// `min(initial * multiplier^(n-1), max_delay)`.
pub fn base_delay(policy: &RetryPolicy, n: u32) -> Duration {
    let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    let secs = policy.initial_delay.as_secs_f64() * policy.multiplier.powi(exp);
    let max = policy.max_delay.as_secs_f64();
    if secs.is_finite() && secs < max {
        Duration::from_secs_f64(secs.max(0.0))
    } else {
        policy.max_delay
    }
}

/// The delay before retry `n`, jittered with `unit`, a number drawn
/// uniformly from `[0, 1)`; never above `max_delay`.
pub fn jittered(policy: &RetryPolicy, n: u32, unit: f64) -> Duration {
    let base = base_delay(policy, n);
    let delay = match policy.jitter {
        Jitter::None => base,
        Jitter::Full => base.mul_f64(unit),
        Jitter::Proportional(f) => base.mul_f64(1.0 - f + 2.0 * f * unit),
    };
    delay.min(policy.max_delay)
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
        // +20 % of the 5 s cap would be 6 s: the cap holds.
        assert_eq!(jittered(&p, 10, 0.999_999), ms(5000));
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
                    let low = base.mul_f64(1.0 - f);
                    // Allow a nanosecond of float rounding.
                    prop_assert!(d + Duration::from_nanos(1) >= low, "{:?} < {:?}", d, low);
                    prop_assert!(d <= base.mul_f64(1.0 + f) + Duration::from_nanos(1));
                }
            }
        }

        #[test]
        fn random_delays_stay_under_the_cap(p in policy(), n in 1u32..50) {
            prop_assert!(delay(&p, n) <= p.max_delay);
        }
    }
}
