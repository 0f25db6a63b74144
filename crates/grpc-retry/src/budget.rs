//! Retry budgets: retries as a share of recent calls (Finagle, Linkerd).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

use crate::RetryConfigError;

/// The largest [`RetryBudget`] minimum rate, in retries per second.
pub const MAX_MIN_RETRIES_PER_SECOND: u32 = 1_000_000;

/// A retry budget in the Finagle / Linkerd style: retries may be at most
/// `retry_ratio` of the calls made over the last `ttl`, plus
/// `min_retries_per_second` (so that a client with little traffic can
/// retry at all). Each call that may be retried deposits when it starts;
/// each retry withdraws, and a retry the budget cannot pay for is not sent
/// (counted as `grpc.retry.budget_exhausted`). Deposits and withdrawals
/// expire after `ttl`. Retries the server provably never processed (a
/// refused connection or stream) are not counted, as with
/// [`RetryThrottle`](crate::RetryThrottle). Built on tower's
/// [`TpsBudget`], on tokio's clock.
///
/// A `RetryBudget` is a handle: clones share one budget. Give the same
/// budget to every [`RetryLayer`](crate::RetryLayer) that calls one target.
///
/// # A budget or gRFC A6's token bucket?
///
/// The [`RetryThrottle`](crate::RetryThrottle) (A6) counts *failures*
/// against successes: each failed attempt takes a token, each success gives
/// back `token_ratio`, and retries stop below half the bucket. Under random
/// faults that are not overload (say 30 % failed calls and 10 % lost
/// responses) failures outpace the refill at a small `token_ratio`, the
/// bucket drains and retries stop, though each retry would most likely
/// succeed: a client that retries nothing does worse than one with no
/// retry layer. A budget counts *calls*: at a `retry_ratio` of 0.5 it goes
/// on retrying 30 % random faults, and under overload (every attempt
/// failing) it still holds the extra load to `retry_ratio` of the offered
/// load plus the minimum rate: no retry storm.
///
/// Choose the budget when faults are mostly random and load is what must be
/// bounded; choose the A6 throttle to match other gRPC clients' behaviour,
/// or to stop retrying a target that mostly fails. With both on a layer, a
/// retry is sent only when both allow it (the throttle is asked first; the
/// budget is charged only for a retry that is sent).
///
/// # Precision
///
/// tower's budget counts in whole units: at a `retry_ratio` of 1 or below,
/// one retry costs `floor(1 / retry_ratio)` deposits, so 0.3 allows one
/// retry per 3 calls (33 %) and anything above 0.5 allows one per call.
/// Above 1 the cost is kept to a thousandth of a call. Each deposit and
/// withdrawal takes a short lock inside tower's budget (to roll its window).
///
/// ```
/// use std::time::Duration;
/// use grpc_retry::{RetryBudget, RetryLayer, RetryPolicies, RetryPolicy};
///
/// // Retries at most 20 % of the calls of the last 10 s, plus 5 a second.
/// let budget = RetryBudget::new(Duration::from_secs(10), 5, 0.2)?;
/// let layer = RetryLayer::new(RetryPolicies::new(RetryPolicy::default())?)
///     .with_budget(budget.clone());
/// assert!(layer.budget().unwrap().same_budget(&budget));
/// # Ok::<(), grpc_retry::RetryConfigError>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

struct Inner {
    budget: TpsBudget,
    ttl: Duration,
    min_per_sec: u32,
    ratio: f32,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ttl", &self.inner.ttl)
            .field("min_retries_per_second", &self.inner.min_per_sec)
            .field("retry_ratio", &self.inner.ratio)
            .field("budget", &self.inner.budget)
            .finish()
    }
}

impl RetryBudget {
    /// A budget allowing `retry_ratio` retries per call made within the
    /// last `ttl`, plus `min_retries_per_second`.
    ///
    /// # Errors
    ///
    /// [`RetryConfigError`] naming the bad value: `budget.ttl` outside
    /// [1 s, 60 s], `budget.retry_ratio` not within [0, 1000] (or 0 with
    /// no minimum rate: a budget that never allows a retry),
    /// `budget.min_retries_per_second` above
    /// [`MAX_MIN_RETRIES_PER_SECOND`].
    pub fn new(
        ttl: Duration,
        min_retries_per_second: u32,
        retry_ratio: f32,
    ) -> Result<Self, RetryConfigError> {
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(60) {
            return Err(RetryConfigError::new(
                "budget.ttl",
                format!("{ttl:?}"),
                "must be within [1s, 60s]",
            ));
        }
        if !(retry_ratio.is_finite() && (0.0..=1000.0).contains(&retry_ratio)) {
            return Err(RetryConfigError::new(
                "budget.retry_ratio",
                retry_ratio.to_string(),
                "must be within [0, 1000]",
            ));
        }
        if min_retries_per_second > MAX_MIN_RETRIES_PER_SECOND {
            return Err(RetryConfigError::new(
                "budget.min_retries_per_second",
                min_retries_per_second.to_string(),
                "must be at most 1000000",
            ));
        }
        if retry_ratio == 0.0 && min_retries_per_second == 0 {
            return Err(RetryConfigError::new(
                "budget.retry_ratio",
                "0".into(),
                "must be above 0 when min_retries_per_second is 0 (the budget would allow no retry)",
            ));
        }
        Ok(RetryBudget {
            inner: Arc::new(Inner {
                budget: TpsBudget::new(ttl, min_retries_per_second, retry_ratio),
                ttl,
                min_per_sec: min_retries_per_second,
                ratio: retry_ratio,
            }),
        })
    }

    /// How long a deposit or withdrawal counts.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Retries allowed per second whatever the traffic.
    pub fn min_retries_per_second(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// Retries allowed per call, as configured (see the precision note).
    pub fn retry_ratio(&self) -> f32 {
        self.inner.ratio
    }

    /// Whether `self` and `other` share one budget.
    pub fn same_budget(&self, other: &RetryBudget) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// A call that may be retried started: it adds to the budget.
    pub fn deposit(&self) {
        self.inner.budget.deposit();
    }

    /// Takes one retry from the budget: `false` (nothing taken) when it is
    /// spent.
    pub fn withdraw(&self) -> bool {
        self.inner.budget.withdraw()
    }
}
