//! Which breaker a call goes through, and the lock-free map from a key to
//! its breaker.

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use grpc_resilience_core::{MethodId, MethodTable, Striped, same_path};
use http::uri::PathAndQuery;
use rustc_hash::FxHashMap;

use crate::future::Stripe;
use crate::registry::BreakerRegistry;
use crate::state::Core;

/// A function choosing a breaker for a request from its URI and headers;
/// `None` sends the call without a breaker.
pub type KeyFn =
    Arc<dyn for<'a> Fn(&'a http::Uri, &'a http::HeaderMap) -> Option<&'a str> + Send + Sync>;

/// Which breaker a call goes through.
#[derive(Clone)]
pub enum Keying {
    /// One breaker per gRPC service (the default).
    PerService,
    /// One breaker, with this name, for every call.
    Single(String),
    /// The breaker named by a function of the request.
    Custom(KeyFn),
}

impl fmt::Debug for Keying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keying::PerService => f.write_str("PerService"),
            Keying::Single(name) => f.debug_tuple("Single").field(name).finish(),
            Keying::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The breaker name a service gets: its name without package and without a
/// `Service` suffix, in snake case. `catalog.v1.CommandService` →
/// `command`, `shop.ProductCatalogService` → `product_catalog`.
pub fn service_breaker_name(service: &str) -> String {
    let short = service.rsplit('.').next().unwrap_or(service);
    let base = match short.strip_suffix("Service") {
        Some(base) if !base.is_empty() => base,
        _ => short,
    };
    let mut name = String::with_capacity(base.len() + 4);
    for (i, c) in base.char_indices() {
        if c.is_uppercase() {
            if i > 0 && !name.ends_with('_') {
                name.push('_');
            }
            name.extend(c.to_lowercase());
        } else {
            name.push(c);
        }
    }
    name
}

/// A breaker with the handles calls take, one per thread stripe.
#[derive(Debug)]
pub(crate) struct Entry {
    stripes: Striped<Core>,
}

impl Entry {
    fn new(core: Arc<Core>) -> Self {
        Entry {
            stripes: Striped::new(core),
        }
    }

    #[inline]
    pub(crate) fn stripe(&self) -> &Arc<Stripe> {
        self.stripes.handle()
    }
}

/// How many (layer, path) pairs each thread remembers the breaker of.
const REMEMBERED: usize = 8;

/// The breaker stripe a thread last found for a call path through one
/// layer's services.
///
/// The path is a clone: a stub's static path costs nothing to keep, a
/// path parsed from bytes keeps those bytes (at most one header block)
/// until eight other paths have replaced it or the thread ends.
struct Remembered {
    layer: u64,
    path: PathAndQuery,
    stripe: Weak<Stripe>,
}

thread_local! {
    // Per thread, not per service clone: callers often call through a
    // fresh clone per call (a client cloned per request or task; the
    // breaker's own clone after a rejection; a retry's clone for its
    // retries), which a per-clone memory would always find empty. Per
    // thread, a hit touches no memory another thread writes.
    static REMEMBERED_STRIPES: RefCell<[Option<Remembered>; REMEMBERED]> =
        const { RefCell::new([const { None }; REMEMBERED]) };
}

/// Ids for [`Shared`]: a thread's memory keys on a layer's id, never on an
/// address a later layer could reuse.
static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(0);

/// What every clone of a layer's services shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Unique to this `Shared` for the life of the process.
    id: u64,
    pub(crate) registry: BreakerRegistry,
    pub(crate) keying: Keying,
    pub(crate) names: FxHashMap<String, String>,
    // Key (service or custom key) to breaker; copied on write, read without
    // locks.
    entries: ArcSwap<FxHashMap<Box<str>, Arc<Entry>>>,
    // Method path to its service's breaker, for a thread whose memory of
    // (layer, path) pairs missed: no parse, no hash.
    methods: MethodTable<Option<Arc<Entry>>>,
    pub(crate) single: Option<Entry>,
}

impl Shared {
    pub(crate) fn new(
        registry: BreakerRegistry,
        keying: Keying,
        names: FxHashMap<String, String>,
    ) -> Self {
        let single = match &keying {
            Keying::Single(name) => Some(Entry::new(registry.core(name))),
            _ => None,
        };
        Shared {
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            registry,
            keying,
            names,
            entries: ArcSwap::default(),
            methods: MethodTable::default(),
            single,
        }
    }

    /// The calling thread's stripe of the breaker for a key, from the
    /// shared map, without taking a reference to the entry (whose count
    /// every thread would share).
    #[inline]
    pub(crate) fn lookup_stripe(&self, key: &str) -> Arc<Stripe> {
        if let Some(entry) = self.entries.load().get(key) {
            return entry.stripe().clone();
        }
        self.insert(key).stripe().clone()
    }

    #[cfg(test)]
    pub(crate) fn methods_kept(&self) -> usize {
        self.methods.len()
    }

    /// The breaker for a key, made if new.
    fn entry(&self, key: &str) -> Arc<Entry> {
        match self.entries.load().get(key) {
            Some(entry) => entry.clone(),
            None => self.insert(key),
        }
    }

    /// The calling thread's stripe of the per-service breaker for a call
    /// to `uri`; `None` when its path names no gRPC method.
    ///
    /// A repeat of one of the thread's last few (layer, path) pairs parses
    /// nothing and looks nothing up: a stub's static path matches by
    /// address. A miss finds the breaker in the layer's table of methods
    /// (each method's path parsed and its breaker looked up once per
    /// layer) and remembers it.
    #[inline]
    pub(crate) fn service_stripe(&self, uri: &http::Uri) -> Option<Arc<Stripe>> {
        let path = uri.path_and_query()?;
        let hit = REMEMBERED_STRIPES.try_with(|remembered| {
            let remembered = remembered.try_borrow().ok()?;
            let ours = || remembered.iter().flatten().filter(|r| r.layer == self.id);
            // By address first (a stub's static path), then by content.
            ours()
                .find(|r| std::ptr::eq(r.path.as_str(), path.as_str()))
                .or_else(|| ours().find(|r| same_path(&r.path, path)))?
                .stripe
                .upgrade()
        });
        if let Ok(Some(stripe)) = hit {
            return Some(stripe);
        }
        self.service_stripe_miss(path)
    }

    #[cold]
    #[inline(never)]
    fn service_stripe_miss(&self, path: &PathAndQuery) -> Option<Arc<Stripe>> {
        // Found with no borrow of the thread's memory held: making a
        // breaker can run code (a metrics recorder) that makes a call.
        // A kept entry gives this thread's stripe without a reference to
        // the entry itself (whose count every thread would share).
        let stripe = if let Some(kept) = self.methods.get(path) {
            kept.as_ref()?.stripe().clone()
        } else if self.methods.is_full() {
            // More paths than the table keeps: found as without it.
            self.lookup_stripe(MethodId::from_path(path.path()).ok()?.service())
        } else {
            match self
                .methods
                .get_or_try_insert_with(path, |id| id.map(|id| self.entry(id.service())))
            {
                Ok(kept) => kept.as_ref()?.stripe().clone(),
                Err(entry) => entry?.stripe().clone(),
            }
        };
        // During the thread's teardown, or re-entered: just not remembered.
        let _ = REMEMBERED_STRIPES.try_with(|remembered| {
            if let Ok(mut remembered) = remembered.try_borrow_mut() {
                remembered.rotate_right(1);
                remembered[0] = Some(Remembered {
                    layer: self.id,
                    path: path.clone(),
                    stripe: Arc::downgrade(&stripe),
                });
            }
        });
        Some(stripe)
    }

    #[cold]
    fn insert(&self, key: &str) -> Arc<Entry> {
        let name = match &self.keying {
            Keying::PerService => self
                .names
                .get(key)
                .cloned()
                .unwrap_or_else(|| service_breaker_name(key)),
            _ => key.to_owned(),
        };
        let entry = Arc::new(Entry::new(self.registry.core(&name)));
        self.entries.rcu(|map| {
            let mut map = FxHashMap::clone(map);
            map.entry(key.into()).or_insert_with(|| entry.clone());
            map
        });
        self.entries.load().get(key).cloned().unwrap_or(entry)
    }
}
