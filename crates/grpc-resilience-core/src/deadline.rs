//! One absolute deadline per call, shared by every layer.
//!
//! The `grpc-timeout` header is relative and rounded down to 8 digits, so a
//! layer that re-derives the deadline from it (and from its own clock read)
//! gets a slightly different instant than the layer above. Instead the
//! outermost layer that knows the call's deadline records it once as a
//! [`CallDeadline`] request extension; layers below read that instant, a
//! layer that shortens the deadline (a shorter per-method policy, a
//! per-attempt timeout) replaces it with the earlier one, and whichever
//! layer hands a request to the next service writes `grpc-timeout` from the
//! instant at that moment ([`CallDeadline::write_header`]), so the server is
//! told the time actually left.
//!
//! A layer used alone, with no extension on the request, falls back to the
//! caller's `grpc-timeout` header ([`CallDeadline::of_request`]).
//!
//! ```
//! use std::time::Duration;
//! use grpc_resilience_core::CallDeadline;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let mut request = http::Request::builder()
//!     .uri("http://catalog/catalog.v1.QueryService/GetProduct")
//!     .header("grpc-timeout", "2S")
//!     .body(())
//!     .unwrap();
//! // The outermost layer works the deadline out once and records it.
//! let deadline = CallDeadline::get_or_insert(&mut request).expect("the caller set one");
//! assert!(deadline.remaining() <= Duration::from_secs(2));
//! // Layers below read the same instant, with no parse.
//! assert_eq!(CallDeadline::of_request(&request), Some(deadline));
//! # }
//! ```

use std::time::Duration;

use http::{HeaderMap, Request};
use tokio::time::Instant;

use crate::timeout_header;

/// Whether a deadline bounds a whole call or one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The whole call, retries included.
    Call,
    /// One attempt of a call.
    Attempt,
}

impl Scope {
    /// `"call"` or `"attempt"`, as in metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Call => "call",
            Scope::Attempt => "attempt",
        }
    }
}

/// The absolute deadline of a call (or of one attempt, below a per-attempt
/// timeout), kept in the request's extensions.
///
/// The outermost layer that knows the call's deadline records it once
/// ([`CallDeadline::get_or_insert`], [`CallDeadline::insert_into`]); layers
/// below read that instant ([`CallDeadline::of_request`]) instead of
/// re-deriving it from the relative, rounded `grpc-timeout` header; a layer
/// that shortens it (a shorter per-method policy, a per-attempt timeout)
/// replaces it with the earlier instant; and whichever layer hands the
/// request on writes `grpc-timeout` from it at that moment
/// ([`CallDeadline::write_header`]). A request with no extension falls
/// back to its `grpc-timeout` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallDeadline {
    at: Instant,
}

impl CallDeadline {
    /// A deadline at `at`.
    pub fn at(at: Instant) -> Self {
        CallDeadline { at }
    }

    /// A deadline `timeout` from now, or `None` when that instant cannot be
    /// represented (a timeout of centuries: no deadline in practice).
    pub fn after(timeout: Duration) -> Option<Self> {
        Instant::now().checked_add(timeout).map(Self::at)
    }

    /// The instant.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// The time left from now, zero once it has passed.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// The time left from `now`, zero once it has passed.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.at.saturating_duration_since(now)
    }

    /// Whether the deadline has passed at `now` (reached counts as passed:
    /// no time is left to send anything).
    pub fn has_passed_at(&self, now: Instant) -> bool {
        now >= self.at
    }

    /// The earlier of `self` and `other`.
    pub fn min(self, other: Option<Self>) -> Self {
        match other {
            Some(other) if other.at < self.at => other,
            _ => self,
        }
    }

    /// The deadline recorded on `request`, or else the one its
    /// `grpc-timeout` header gives from now. A malformed header gives none.
    pub fn of_request<B>(request: &Request<B>) -> Option<Self> {
        if let Some(deadline) = request.extensions().get::<CallDeadline>() {
            return Some(*deadline);
        }
        match timeout_header::from_headers(request.headers()) {
            Ok(Some(timeout)) => Self::after(timeout),
            _ => None,
        }
    }

    /// [`of_request`](Self::of_request), and records what it found on the
    /// request so that layers below read the same instant.
    pub fn get_or_insert<B>(request: &mut Request<B>) -> Option<Self> {
        if let Some(deadline) = request.extensions().get::<CallDeadline>() {
            return Some(*deadline);
        }
        let deadline = Self::of_request(request)?;
        request.extensions_mut().insert(deadline);
        Some(deadline)
    }

    /// Records `self` on `request`, replacing any deadline there.
    pub fn insert_into<B>(self, request: &mut Request<B>) {
        request.extensions_mut().insert(self);
    }

    /// Writes `grpc-timeout` with the time left at `now`, replacing any
    /// value there, unless the value there already states that time to the
    /// header's own precision, or within a millisecond
    /// ([`timeout_header::states`]): a layer above that wrote it a moment
    /// ago saves this one an encode, an allocation and an insert.
    pub fn write_header(&self, headers: &mut HeaderMap, now: Instant) {
        let remaining = self.remaining_at(now);
        if crate::headers::get(headers, &timeout_header::GRPC_TIMEOUT)
            .is_some_and(|v| timeout_header::states(v.as_bytes(), remaining))
        {
            return;
        }
        headers.insert(
            timeout_header::GRPC_TIMEOUT,
            timeout_header::encode(remaining),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn request(timeout: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri("/p.S/M");
        if let Some(t) = timeout {
            builder = builder.header("grpc-timeout", t);
        }
        builder.body(()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_extension_wins_over_the_header() {
        let mut req = request(Some("10S"));
        let at = Instant::now() + Duration::from_millis(1500);
        CallDeadline::at(at).insert_into(&mut req);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(CallDeadline::of_request(&req).unwrap().instant(), at);
    }

    #[tokio::test(start_paused = true)]
    async fn get_or_insert_records_the_header_once() {
        let mut req = request(Some("2S"));
        let first = CallDeadline::get_or_insert(&mut req).unwrap();
        assert_eq!(first.remaining(), Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(500)).await;
        // Read again later: the same instant, not 2 s from the new now.
        assert_eq!(CallDeadline::get_or_insert(&mut req), Some(first));
        assert_eq!(first.remaining(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn no_or_malformed_header_is_no_deadline() {
        assert_eq!(CallDeadline::of_request(&request(None)), None);
        let mut bad = request(Some("12x"));
        assert_eq!(CallDeadline::get_or_insert(&mut bad), None);
        assert!(bad.extensions().get::<CallDeadline>().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn header_carries_the_time_left_when_written() {
        let deadline = CallDeadline::after(Duration::from_millis(300)).unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
        let mut headers = HeaderMap::new();
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "200000u");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(deadline.has_passed_at(Instant::now()));
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "0n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_that_states_the_time_left_is_kept_and_any_other_replaced() {
        let deadline = CallDeadline::after(Duration::from_secs(5)).unwrap();
        let mut headers = HeaderMap::new();
        // A layer above wrote the full 5 s an instant ago.
        let written = HeaderValue::from_static("5000000u");
        headers.insert("grpc-timeout", written.clone());
        tokio::time::advance(Duration::from_nanos(300)).await;
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "5000000u");
        // A millisecond later it would overstate by 1,000 units.
        tokio::time::advance(Duration::from_millis(1)).await;
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "4998999u");
        // A header that understates (a caller's shorter value), or that
        // does not parse, is replaced too.
        for other in ["1S", "abc", "4997000u"] {
            headers.insert("grpc-timeout", HeaderValue::from_static(other));
            deadline.write_header(&mut headers, Instant::now());
            assert_eq!(headers["grpc-timeout"], "4998999u", "after {other}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_less_than_a_millisecond_old_is_kept_even_in_nanoseconds() {
        // Under 100 ms the header counts nanoseconds; one written 300 ns,
        // then 500 µs ago is within the millisecond `states` asks for.
        let deadline = CallDeadline::after(Duration::from_millis(50)).unwrap();
        let mut headers = HeaderMap::new();
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "50000000n");
        tokio::time::advance(Duration::from_nanos(300)).await;
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "50000000n");
        tokio::time::advance(Duration::from_micros(500)).await;
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "50000000n");
        // Past a millisecond, it is rewritten.
        tokio::time::advance(Duration::from_micros(600)).await;
        deadline.write_header(&mut headers, Instant::now());
        assert_eq!(headers["grpc-timeout"], "48899700n");
    }

    #[tokio::test(start_paused = true)]
    async fn min_keeps_the_earlier() {
        let a = CallDeadline::after(Duration::from_secs(1)).unwrap();
        let b = CallDeadline::after(Duration::from_secs(2)).unwrap();
        assert_eq!(a.min(Some(b)), a);
        assert_eq!(b.min(Some(a)), a);
        assert_eq!(b.min(None), b);
    }
}
