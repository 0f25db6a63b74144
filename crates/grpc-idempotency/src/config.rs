//! The layer's choices, and the settings every service clone shares.

use std::time::Duration;

use grpc_resilience_core::{CodeSet, MethodMap};
use http::HeaderName;
use tonic::Code;

/// What a request gets when its key is held by a call whose handler is
/// still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInProgress {
    /// Wait up to this long for the first call to finish, then answer with
    /// its recorded response (or run the handler if the first call released
    /// the key); when the wait runs out, `ABORTED` with pushback.
    Wait(Duration),
    /// Answer at once with `ABORTED` and a `grpc-retry-pushback-ms` header
    /// telling the client when to try again.
    Abort,
}

/// What happens to a response larger than the layer records
/// ([`IdempotencyLayer::with_max_response_bytes`](crate::IdempotencyLayer::with_max_response_bytes)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOversize {
    /// The caller gets the whole response and the key is released: a
    /// repeat with the key runs the handler again. Exactly-once does not
    /// hold for such responses; `idempotency.released` counts them (reason
    /// `too_large`).
    Release,
    /// The caller gets `RESOURCE_EXHAUSTED` naming the key and the bound,
    /// and that answer is recorded, so repeats get it too and the handler
    /// never runs twice. The handler's effects stand, but its response is
    /// lost: use it when running twice is worse than an error.
    Reject,
}

/// What the layer does when its store fails (unreachable, timed out,
/// full).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStoreError {
    /// Fail closed: the call gets `UNAVAILABLE` without running the handler
    /// (clients retry it later, with the same key). Writes never run twice,
    /// but they stop while the store is down.
    FailClosed,
    /// Fail open: run the handler without deduplication, nothing recorded;
    /// `idempotency.unprotected` counts every such call and a WARN is
    /// logged. Writes go on while the store is down, but a retried one may
    /// run twice.
    RunUnprotected,
}

/// The settings shared by a layer's services.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) methods: MethodMap<()>,
    pub(crate) key_header: HeaderName,
    pub(crate) require_key: bool,
    pub(crate) retention: Duration,
    pub(crate) lease: Duration,
    pub(crate) on_in_progress: OnInProgress,
    pub(crate) pushback: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) on_oversize: OnOversize,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) store_timeout: Duration,
    pub(crate) release_on: CodeSet,
}

/// The longest key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 255;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            methods: MethodMap::new(),
            key_header: crate::IDEMPOTENCY_KEY,
            require_key: false,
            retention: Duration::from_secs(24 * 60 * 60),
            lease: Duration::from_secs(60),
            on_in_progress: OnInProgress::Wait(Duration::from_secs(5)),
            pushback: Duration::from_millis(500),
            poll_interval: Duration::from_millis(10),
            max_request_bytes: 4 << 20,
            max_response_bytes: 1 << 20,
            on_oversize: OnOversize::Release,
            on_store_error: OnStoreError::FailClosed,
            store_timeout: Duration::from_secs(1),
            release_on: CodeSet::of(&[Code::Unavailable, Code::Cancelled]),
        }
    }
}
