//! The in-memory store: one process, bounded.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Claim, ClaimToken, Entry, Store};
use crate::error::{ConfigError, StoreError};
use crate::record::{Fingerprint, Record};

/// Keys and responses in this process's memory: the default store, for a
/// single server (replicas behind a load balancer need a shared store).
///
/// Bounded in entries and in bytes (the recorded responses' bodies and
/// headers plus the keys). When a new key does not fit, expired entries go
/// first, then the oldest completed records (so a very old key may run its
/// handler again; `idempotency.evictions` counts it); keys in progress are
/// never evicted, and a claim that finds the store full of them fails with
/// a [`StoreError`]. A record larger than the whole byte bound is refused
/// the same way.
///
/// Each call takes a short lock on a map; no lock is held while a handler
/// runs. Clones share the same entries.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    max_entries: usize,
    max_bytes: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    map: HashMap<Box<str>, Slot>,
    // Keys in the order of their last write, with the write's number; an
    // item whose number is not the slot's any more is stale.
    order: VecDeque<(Box<str>, u64)>,
    bytes: usize,
    writes: u64,
    tokens: u128,
}

struct Slot {
    write: u64,
    expires: Instant,
    size: usize,
    state: SlotState,
}

enum SlotState {
    InProgress {
        token: ClaimToken,
        fingerprint: Fingerprint,
    },
    Completed(Arc<Record>),
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("entries", &state.map.len())
            .field("bytes", &state.bytes)
            .field("max_entries", &self.shared.max_entries)
            .field("max_bytes", &self.shared.max_bytes)
            .finish()
    }
}

impl MemoryStore {
    /// Default bound on entries.
    pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
    /// Default bound on bytes: 64 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

    /// A store with the default bounds (100,000 entries, 64 MiB).
    pub fn new() -> Self {
        Self::build(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }

    /// A store with these bounds.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when a bound is zero.
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Result<Self, ConfigError> {
        if max_entries == 0 {
            return Err(ConfigError::value("max_entries", 0, "must be at least 1"));
        }
        if max_bytes == 0 {
            return Err(ConfigError::value("max_bytes", 0, "must be at least 1"));
        }
        Ok(Self::build(max_entries, max_bytes))
    }

    fn build(max_entries: usize, max_bytes: usize) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                max_entries,
                max_bytes,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// How many entries the store holds (expired ones not yet dropped
    /// included).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes the store accounts for.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn claim_now(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(slot) = state.map.get(key) {
            if slot.expires > now {
                return Ok(Claim::Existing(slot.entry()));
            }
            state.remove(key);
        }
        let size = key.len() + 64;
        self.make_room(&mut state, now, size)?;
        state.tokens += 1;
        let token = ClaimToken(state.tokens);
        state.insert(
            key,
            now + lease,
            size,
            SlotState::InProgress { token, fingerprint },
        );
        Ok(Claim::Claimed(token))
    }

    fn complete_now(
        &self,
        key: &str,
        token: ClaimToken,
        record: Record,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let size = key.len() + record.size();
        if size > self.shared.max_bytes {
            // The claim stays until released: the caller releases on error.
            return Err(StoreError::new(format!(
                "a record of {size} bytes does not fit in the in-memory store ({} bytes)",
                self.shared.max_bytes
            )));
        }
        let mut state = self.lock();
        if !state.owned_by(key, token, now) {
            return Ok(false);
        }
        state.remove(key);
        self.make_room(&mut state, now, size)?;
        state.insert(
            key,
            now + retention,
            size,
            SlotState::Completed(Arc::new(record)),
        );
        Ok(true)
    }

    fn release_now(&self, key: &str, token: ClaimToken) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.owned_by(key, token, now) {
            state.remove(key);
        }
    }

    fn fetch_now(&self, key: &str) -> Option<Entry> {
        let now = Instant::now();
        let state = self.lock();
        state
            .map
            .get(key)
            .filter(|slot| slot.expires > now)
            .map(Slot::entry)
    }

    /// Drops expired entries, then the oldest completed ones, until an
    /// entry of `size` bytes fits.
    fn make_room(&self, state: &mut State, now: Instant, size: usize) -> Result<(), StoreError> {
        let fits = |state: &State| {
            state.map.len() < self.shared.max_entries && state.bytes + size <= self.shared.max_bytes
        };
        if fits(state) {
            return Ok(());
        }
        // One pass over the queue at most: in-progress keys go to the back.
        let mut budget = state.order.len();
        while !fits(state) && budget > 0 {
            budget -= 1;
            let Some((key, write)) = state.order.pop_front() else {
                break;
            };
            let Some(slot) = state.map.get(&key) else {
                continue;
            };
            if slot.write != write {
                continue;
            }
            let expired = slot.expires <= now;
            match slot.state {
                SlotState::InProgress { .. } if !expired => state.order.push_back((key, write)),
                SlotState::Completed(_) if !expired => {
                    metrics::counter!("idempotency.evictions").increment(1);
                    tracing::debug!(key = %key, "evicting an idempotency record to make room");
                    state.remove(&key);
                }
                _ => {
                    state.remove(&key);
                }
            }
        }
        if fits(state) {
            Ok(())
        } else {
            Err(StoreError::new(format!(
                "the in-memory idempotency store is full ({} keys in progress, {} bytes)",
                state.map.len(),
                state.bytes
            )))
        }
    }
}

impl Slot {
    fn entry(&self) -> Entry {
        match &self.state {
            SlotState::InProgress { fingerprint, .. } => Entry::InProgress {
                fingerprint: *fingerprint,
            },
            SlotState::Completed(record) => Entry::Completed(record.clone()),
        }
    }
}

impl State {
    fn owned_by(&self, key: &str, token: ClaimToken, now: Instant) -> bool {
        matches!(
            self.map.get(key),
            Some(Slot { state: SlotState::InProgress { token: t, .. }, expires, .. })
                if *t == token && *expires > now
        )
    }

    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.map.remove(key) {
            self.bytes -= slot.size;
        }
        // Its item in `order` is now stale and is skipped when reached.
        if self.map.is_empty() {
            self.order.clear();
        }
    }

    fn insert(&mut self, key: &str, expires: Instant, size: usize, state: SlotState) {
        self.writes += 1;
        let write = self.writes;
        self.order.push_back((key.into(), write));
        self.bytes += size;
        self.map.insert(
            key.into(),
            Slot {
                write,
                expires,
                size,
                state,
            },
        );
        // Keep stale items from piling up when keys are rewritten often.
        if self.order.len() > 2 * self.map.len() + 16 {
            let map = &self.map;
            self.order
                .retain(|(k, w)| map.get(k).is_some_and(|slot| slot.write == *w));
        }
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim_now(key, fingerprint, lease)
    }

    async fn complete(
        &self,
        key: &str,
        token: ClaimToken,
        record: Record,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        self.complete_now(key, token, record, retention)
    }

    async fn release(&self, key: &str, token: ClaimToken) -> Result<(), StoreError> {
        self.release_now(key, token);
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.fetch_now(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    const LEASE: Duration = Duration::from_secs(10);
    const KEEP: Duration = Duration::from_secs(60);

    fn fp(n: u128) -> Fingerprint {
        Fingerprint::from_u128(n)
    }

    fn record(n: u128, body: usize) -> Record {
        Record::new(
            fp(n),
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from(vec![1; body]),
            None,
        )
    }

    fn token(claim: Claim) -> ClaimToken {
        match claim {
            Claim::Claimed(token) => token,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn claim_complete_fetch_and_expiry() {
        let store = MemoryStore::new();
        let t = token(store.claim("k", fp(1), LEASE).await.unwrap());
        assert_eq!(
            store.claim("k", fp(2), LEASE).await.unwrap(),
            Claim::Existing(Entry::InProgress { fingerprint: fp(1) })
        );
        assert!(store.complete("k", t, record(1, 3), KEEP).await.unwrap());
        let Some(Entry::Completed(rec)) = store.fetch("k").await.unwrap() else {
            panic!("completed");
        };
        assert_eq!(rec.body().len(), 3);
        tokio::time::advance(KEEP).await;
        assert_eq!(store.fetch("k").await.unwrap(), None);
        token(store.claim("k", fp(1), LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_and_a_stale_owner_cannot_complete_or_release() {
        let store = MemoryStore::new();
        let old = token(store.claim("k", fp(1), LEASE).await.unwrap());
        tokio::time::advance(LEASE).await;
        let new = token(store.claim("k", fp(1), LEASE).await.unwrap());
        assert_ne!(old, new);
        assert!(!store.complete("k", old, record(1, 1), KEEP).await.unwrap());
        store.release("k", old).await.unwrap();
        assert_eq!(
            store.fetch("k").await.unwrap(),
            Some(Entry::InProgress { fingerprint: fp(1) })
        );
        store.release("k", new).await.unwrap();
        assert_eq!(store.fetch("k").await.unwrap(), None);
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_entries_evicting_the_oldest_completed_record() {
        let store = MemoryStore::with_limits(2, 1 << 20).unwrap();
        let a = token(store.claim("a", fp(1), LEASE).await.unwrap());
        store.complete("a", a, record(1, 1), KEEP).await.unwrap();
        let _b = token(store.claim("b", fp(2), LEASE).await.unwrap());
        // "a" (completed) goes to make room; "b" (in progress) stays.
        let c = token(store.claim("c", fp(3), LEASE).await.unwrap());
        assert_eq!(store.fetch("a").await.unwrap(), None);
        assert!(store.fetch("b").await.unwrap().is_some());
        // Two keys in progress fill it: the next claim fails, typed.
        let err = store.claim("d", fp(4), LEASE).await.unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        store.release("c", c).await.unwrap();
        token(store.claim("d", fp(4), LEASE).await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_bytes() {
        let store = MemoryStore::with_limits(100, 1_000).unwrap();
        let a = token(store.claim("a", fp(1), LEASE).await.unwrap());
        store.complete("a", a, record(1, 600), KEEP).await.unwrap();
        let b = token(store.claim("b", fp(2), LEASE).await.unwrap());
        store.complete("b", b, record(2, 600), KEEP).await.unwrap();
        assert_eq!(store.fetch("a").await.unwrap(), None, "evicted for bytes");
        assert!(store.bytes() <= 1_000);
        let c = token(store.claim("c", fp(3), LEASE).await.unwrap());
        let err = store
            .complete("c", c, record(3, 5_000), KEEP)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        assert!(MemoryStore::with_limits(0, 1).is_err());
        assert!(MemoryStore::with_limits(1, 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entries_make_room_first() {
        let store = MemoryStore::with_limits(1, 1 << 20).unwrap();
        let _a = token(
            store
                .claim("a", fp(1), Duration::from_secs(1))
                .await
                .unwrap(),
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        token(store.claim("b", fp(2), LEASE).await.unwrap());
        assert_eq!(store.len(), 1);
    }
}
