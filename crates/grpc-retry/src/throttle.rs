//! Retry throttling: gRPC's token bucket (gRFC A6).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::RetryConfigError;

const SCALE: f64 = 1000.0;

/// A token bucket shared by every call through the layers that hold it, as
/// gRFC A6 counts: each attempt that fails with a retryable code or with
/// server pushback takes a token, each call that ends with OK gives back
/// `token_ratio` of one (a committed call when its trailers say OK), any
/// other outcome leaves the bucket alone, and retries stop while the bucket
/// holds half its `max_tokens` or less. When a service is down, retries dry up by
/// themselves instead of multiplying its load.
///
/// Tokens are kept in thousandths in one atomic word: no lock.
///
/// A `RetryThrottle` is a handle: clones share one bucket, as gRPC keeps one
/// bucket per target for the whole process. Give the same throttle to every
/// [`RetryLayer`](crate::RetryLayer) (every channel) that calls one target,
/// so retries to that target stop together.
///
/// ```
/// use grpc_retry::RetryThrottle;
///
/// let throttle = RetryThrottle::new(10.0, 0.1)?;
/// assert!(throttle.allows_retry());
/// for _ in 0..5 {
///     throttle.on_failure();
/// }
/// assert!(!throttle.allows_retry()); // 5 of 10 left: not above half
/// # Ok::<(), grpc_retry::RetryConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryThrottle {
    bucket: Arc<Bucket>,
}

struct Bucket {
    max: u64,
    ratio: u64,
    tokens: AtomicU64,
}

impl fmt::Debug for RetryThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryThrottle")
            .field("max_tokens", &self.max_tokens())
            .field("token_ratio", &self.token_ratio())
            .field("tokens", &self.tokens())
            .finish()
    }
}

impl RetryThrottle {
    /// A full bucket of `max_tokens` (within (0, 1000]) refilled by
    /// `token_ratio` (above 0, at most `max_tokens`) per success; values are
    /// kept to three decimals, as gRPC's service config does.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the bad value.
    pub fn new(max_tokens: f64, token_ratio: f64) -> Result<Self, RetryConfigError> {
        if !(max_tokens.is_finite() && max_tokens > 0.0 && max_tokens <= 1000.0) {
            return Err(RetryConfigError::new(
                "throttle.max_tokens",
                max_tokens.to_string(),
                "must be within (0, 1000]",
            ));
        }
        if !(token_ratio.is_finite() && token_ratio > 0.0 && token_ratio <= max_tokens) {
            return Err(RetryConfigError::new(
                "throttle.token_ratio",
                token_ratio.to_string(),
                "must be above 0 and at most max_tokens",
            ));
        }
        let max = (max_tokens * SCALE).round() as u64;
        Ok(RetryThrottle {
            bucket: Arc::new(Bucket {
                max,
                ratio: ((token_ratio * SCALE).round() as u64).max(1),
                tokens: AtomicU64::new(max),
            }),
        })
    }

    /// The bucket's size, as configured (to three decimals).
    pub fn max_tokens(&self) -> f64 {
        self.bucket.max as f64 / SCALE
    }

    /// What a success gives back, as configured (to three decimals).
    pub fn token_ratio(&self) -> f64 {
        self.bucket.ratio as f64 / SCALE
    }

    /// Whether `self` and `other` share one bucket.
    pub fn same_bucket(&self, other: &RetryThrottle) -> bool {
        Arc::ptr_eq(&self.bucket, &other.bucket)
    }

    /// The tokens in the bucket now.
    pub fn tokens(&self) -> f64 {
        self.bucket.tokens.load(Ordering::Relaxed) as f64 / SCALE
    }

    /// Whether a retry may be sent now.
    pub fn allows_retry(&self) -> bool {
        self.bucket.tokens.load(Ordering::Relaxed) * 2 > self.bucket.max
    }

    /// An attempt failed with a retryable code or with server pushback.
    pub fn on_failure(&self) {
        let _ = self
            .bucket
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(1000))
            });
    }

    /// A call ended with OK.
    pub fn on_success(&self) {
        let (max, ratio) = (self.bucket.max, self.bucket.ratio);
        let _ = self
            .bucket
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < max).then(|| (t + ratio).min(max))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_a6_arithmetic() {
        let t = RetryThrottle::new(10.0, 0.5).unwrap();
        assert_eq!(t.tokens(), 10.0);
        for _ in 0..4 {
            t.on_failure();
        }
        assert_eq!(t.tokens(), 6.0);
        assert!(t.allows_retry());
        t.on_failure();
        assert_eq!(t.tokens(), 5.0);
        assert!(!t.allows_retry(), "5 is not above 10 / 2");
        t.on_success();
        assert_eq!(t.tokens(), 5.5);
        assert!(t.allows_retry());
        for _ in 0..100 {
            t.on_success();
        }
        assert_eq!(t.tokens(), 10.0, "capped at max_tokens");
        for _ in 0..100 {
            t.on_failure();
        }
        assert_eq!(t.tokens(), 0.0, "never below zero");
    }

    #[test]
    fn clones_share_one_bucket() {
        let a = RetryThrottle::new(4.0, 1.0).unwrap();
        let b = a.clone();
        let other = RetryThrottle::new(4.0, 1.0).unwrap();
        assert!(a.same_bucket(&b));
        assert!(!a.same_bucket(&other));
        a.on_failure();
        b.on_failure();
        assert_eq!(a.tokens(), 2.0);
        assert!(
            !b.allows_retry(),
            "failures through either handle drain the one bucket"
        );
        assert_eq!(other.tokens(), 4.0);
        // Two layers given clones of one throttle share it.
        let layer_a = crate::RetryLayer::new(Default::default()).with_throttle(a.clone());
        let layer_b = crate::RetryLayer::new(Default::default()).with_throttle(a.clone());
        assert!(
            layer_a
                .throttle()
                .unwrap()
                .same_bucket(layer_b.throttle().unwrap())
        );
    }

    #[test]
    fn ratios_keep_three_decimals() {
        let t = RetryThrottle::new(3.0, 0.1234).unwrap();
        t.on_failure();
        t.on_success();
        assert_eq!(t.tokens(), 2.123);
    }

    #[test]
    fn bad_values_are_named() {
        for (max, ratio, expected) in [
            (0.0, 0.1, "`throttle.max_tokens` = 0"),
            (1001.0, 0.1, "`throttle.max_tokens` = 1001"),
            (f64::NAN, 0.1, "`throttle.max_tokens` = NaN"),
            (10.0, 0.0, "`throttle.token_ratio` = 0"),
            (10.0, -1.0, "`throttle.token_ratio` = -1"),
            (10.0, 11.0, "`throttle.token_ratio` = 11"),
        ] {
            let err = RetryThrottle::new(max, ratio).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let t = std::sync::Arc::new(RetryThrottle::new(1000.0, 1.0).unwrap());
        std::thread::scope(|s| {
            for _ in 0..4 {
                let t = t.clone();
                s.spawn(move || {
                    for _ in 0..100 {
                        t.on_failure();
                    }
                });
            }
        });
        assert_eq!(t.tokens(), 600.0);
    }
}
