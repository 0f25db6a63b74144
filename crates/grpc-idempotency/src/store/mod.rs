//! Where keys and recorded responses live.
//!
//! The layer talks to a [`Store`] in four steps:
//!
//! 1. [`Store::claim`] the key, atomically: the first caller gets a
//!    [`ClaimToken`] and runs the handler; every other caller learns what
//!    the key holds (an [`Entry`]).
//! 2. [`Store::complete`] it with the [`Record`] of the response, kept for
//!    the retention window, or
//! 3. [`Store::release`] it when the outcome must not be kept (a retryable
//!    failure, a cancelled handler), so a retry can claim it again.
//! 4. [`Store::fetch`] what a key holds, while waiting for another caller's
//!    handler to finish.
//!
//! A claim that is never completed nor released (the process died) expires
//! after its lease, so the key cannot stay locked forever.
//!
//! [`MemoryStore`] is the default, for one process; with the `redis`
//! feature, `RedisStore` serves a fleet of replicas. Implement [`Store`] to
//! keep keys in your own database: claim must be atomic (an insert that
//! fails when the key exists and has not expired), and complete/release
//! must only act while the token still owns the key.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::StoreError;
use crate::record::{Fingerprint, Record};

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;

/// Proof that a caller claimed a key: only its holder may complete or
/// release the claim. Unique per claim (a store makes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimToken(u128);

impl ClaimToken {
    /// A token from its bits; a store must make each claim's token unique
    /// (a counter for one process, random bits for a fleet).
    pub const fn from_u128(bits: u128) -> Self {
        ClaimToken(bits)
    }

    /// The token's bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

/// What a key holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A caller claimed the key and its handler is running.
    InProgress {
        /// The fingerprint of the claiming request.
        fingerprint: Fingerprint,
    },
    /// The handler finished; this is its response.
    Completed(Arc<Record>),
}

/// The answer to [`Store::claim`].
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The key was free (or its entry had expired): the caller owns it and
    /// must complete or release it.
    Claimed(ClaimToken),
    /// The key is taken.
    Existing(Entry),
}

/// Persistence for idempotency keys. Cheap to clone (a handle).
///
/// Every method may be slow (a network round trip); the layer bounds each
/// call with its store timeout. None is called while a lock of the layer is
/// held, and a handler never runs inside a store call.
pub trait Store: Clone + Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, for at most `lease`
    /// (then the claim expires, as if released). Atomic: of concurrent
    /// claims of one free key, exactly one gets [`Claim::Claimed`].
    ///
    /// The layer drops this future when the store timeout passes. A store
    /// whose claim may still take effect after that (a request already on
    /// the wire) should then release it, as `RedisStore` does, or the key
    /// stays held, unanswered, until its lease ends.
    fn claim(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Replaces the claim with the handler's response, kept for
    /// `retention`. Returns `false` (and changes nothing) if `token` no
    /// longer owns the key (the lease ran out and another caller claimed
    /// it).
    fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        record: Record,
        retention: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Frees the key if `token` still owns it, so the next request with
    /// the key runs the handler.
    fn release(
        &self,
        key: &str,
        token: ClaimToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What `key` holds now; `None` when it is free or expired.
    fn fetch(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;
}
