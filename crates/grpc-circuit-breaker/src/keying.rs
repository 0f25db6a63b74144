//! Which breaker a call goes through, and the lock-free map from a key to
//! its breaker.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
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

const STRIPES: usize = 8;

/// A breaker with the handles calls take.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) key: Box<str>,
    stripes: [Arc<Stripe>; STRIPES],
}

impl Entry {
    fn new(key: &str, core: Arc<Core>) -> Self {
        Entry {
            key: key.into(),
            stripes: std::array::from_fn(|_| Arc::new(Stripe(core.clone()))),
        }
    }

    #[inline]
    pub(crate) fn stripe(&self) -> &Arc<Stripe> {
        &self.stripes[stripe_index()]
    }
}

thread_local! {
    static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
}

#[inline]
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    STRIPE.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
            s.set(i);
        }
        i
    })
}

/// What every clone of a layer's services shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) registry: BreakerRegistry,
    pub(crate) keying: Keying,
    pub(crate) names: FxHashMap<String, String>,
    // Key (service or custom key) to breaker; copied on write, read without
    // locks.
    entries: ArcSwap<FxHashMap<Box<str>, Arc<Entry>>>,
    pub(crate) single: Option<Entry>,
}

impl Shared {
    pub(crate) fn new(
        registry: BreakerRegistry,
        keying: Keying,
        names: FxHashMap<String, String>,
    ) -> Self {
        let single = match &keying {
            Keying::Single(name) => Some(Entry::new(name, registry.core(name))),
            _ => None,
        };
        Shared {
            registry,
            keying,
            names,
            entries: ArcSwap::default(),
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

    /// The breaker for a key, from the shared map.
    pub(crate) fn lookup(&self, key: &str) -> Arc<Entry> {
        match self.entries.load().get(key) {
            Some(entry) => entry.clone(),
            None => self.insert(key),
        }
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
        let entry = Arc::new(Entry::new(key, self.registry.core(&name)));
        self.entries.rcu(|map| {
            let mut map = FxHashMap::clone(map);
            map.entry(key.into()).or_insert_with(|| entry.clone());
            map
        });
        self.entries.load().get(key).cloned().unwrap_or(entry)
    }
}
