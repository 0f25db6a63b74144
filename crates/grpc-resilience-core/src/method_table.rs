//! What a layer worked out per method, shared by all its clones.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use http::uri::PathAndQuery;

use crate::method::{MethodId, same_path};

/// What a layer worked out for each method it was called with (its policy,
/// its metric handles), shared by every clone of the layer's service and
/// read without a lock.
///
/// [`LastMethod`](crate::LastMethod) remembers one method per clone, so a
/// client that alternates methods (most do) would work each call's method
/// out again: parse its path, look up its policy. With a table behind it
/// ([`LastMethod::get_or_insert_from`](crate::LastMethod::get_or_insert_from)),
/// each method is worked out once per layer; a call whose method is not the
/// clone's last finds it here by the address of its path (a generated
/// stub's path is a `&'static str`), else by its content.
///
/// The table keeps up to its capacity of paths (64 by default, the first
/// ones seen, a path that names no method included); past that, a path
/// not in it is worked out on each call that misses, as without a table,
/// and nothing waits. Reading takes no lock and writes no shared memory.
/// A new path is worked out with no lock held (the making of a value may
/// call through the same layer), then added under a lock; threads that
/// meet a new path at once may each work it out, and the first to add it
/// is kept.
///
/// ```
/// use grpc_resilience_core::{LastMethod, MethodTable};
///
/// let table = MethodTable::default();
/// let mut last = LastMethod::default();
/// let get = http::Uri::from_static("http://catalog/catalog.v1.QueryService/GetProduct");
/// let list = http::Uri::from_static("http://catalog/catalog.v1.QueryService/ListProducts");
/// let mut worked_out = 0;
/// for uri in [&get, &list, &get, &list] {
///     last.get_or_insert_from(uri, &table, |id| {
///         worked_out += 1;
///         id.map(|id| id.method().len())
///     });
/// }
/// assert_eq!(worked_out, 2, "once per method, not once per switch");
/// assert_eq!(table.len(), 2);
/// ```
#[derive(Debug)]
pub struct MethodTable<T> {
    // Filled in order under `adding`; `len` says how many are, published
    // after each is set.
    slots: Box<[Slot<T>]>,
    len: AtomicUsize,
    adding: Mutex<()>,
}

/// One method's path (a clone, which keeps its bytes alive: an equal
/// address is the same path) and what was worked out for it; boxed, so an
/// empty slot is one pointer.
type Slot<T> = OnceLock<Box<(PathAndQuery, T)>>;

impl<T> Default for MethodTable<T> {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl<T> MethodTable<T> {
    /// How many methods a default table keeps.
    pub const DEFAULT_CAPACITY: usize = 64;

    /// A table that keeps up to `capacity` methods.
    pub fn with_capacity(capacity: usize) -> Self {
        MethodTable {
            slots: (0..capacity).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            adding: Mutex::new(()),
        }
    }

    /// How many methods it keeps now.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether it keeps none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it has no room for another path.
    pub fn is_full(&self) -> bool {
        self.len() >= self.slots.len()
    }

    /// What was worked out for the method at `key`, if it is kept.
    #[inline]
    pub fn get(&self, key: &PathAndQuery) -> Option<&T> {
        // Each slot is its own synchronised cell: a slot below `len` that
        // this thread cannot see set yet (it cannot, with `len` read with
        // Acquire, but nothing depends on that) reads as a miss, which the
        // insert path checks again under the lock. No unsafe code, and no
        // order of events that returns a wrong value.
        let kept = self.slots.get(..self.len()).unwrap_or_default();
        let entries = || kept.iter().filter_map(OnceLock::get);
        // By address first (a stub's static path), then by content.
        entries()
            .find(|entry| std::ptr::eq(entry.0.as_str(), key.as_str()))
            .or_else(|| entries().find(|entry| same_path(&entry.0, key)))
            .map(|entry| &entry.1)
    }

    /// What `compute` made of the method at `key`: the kept value, else
    /// worked out now and kept (`Ok` either way), or, when the table is
    /// full, worked out and given back (`Err`). `compute` gets `None` for a
    /// path that is not a gRPC method.
    pub fn get_or_try_insert_with(
        &self,
        key: &PathAndQuery,
        compute: impl FnOnce(Option<MethodId<'_>>) -> T,
    ) -> Result<&T, T> {
        match self.get(key) {
            Some(value) => Ok(value),
            None => self.insert(key, compute),
        }
    }

    #[cold]
    fn insert(
        &self,
        key: &PathAndQuery,
        compute: impl FnOnce(Option<MethodId<'_>>) -> T,
    ) -> Result<&T, T> {
        // Worked out before the lock is taken: making a value may run code
        // (a metrics recorder) that calls through the same layer, and a
        // full table is then not waited on at all.
        let value = compute(MethodId::from_path(key.path()).ok());
        if self.is_full() {
            return Err(value);
        }
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        // Another clone may have added it meanwhile: the first one stays.
        if let Some(kept) = self.get(key) {
            return Ok(kept);
        }
        let len = self.len.load(Ordering::Relaxed);
        let Some(slot) = self.slots.get(len) else {
            return Err(value);
        };
        // Set only here, under the lock, at `len`: it is empty.
        let kept = slot.get_or_init(|| Box::new((key.clone(), value)));
        self.len.store(len + 1, Ordering::Release);
        Ok(&kept.1)
    }
}

impl<T: Clone> MethodTable<T> {
    /// What `compute` made of the method at `key`, worked out now (and
    /// kept, while there is room) unless it is kept already. `compute`
    /// gets `None` for a path that is not a gRPC method.
    pub fn get_or_insert_with(
        &self,
        key: &PathAndQuery,
        compute: impl FnOnce(Option<MethodId<'_>>) -> T,
    ) -> T {
        match self.get_or_try_insert_with(key, compute) {
            Ok(kept) => kept.clone(),
            Err(value) => value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LastMethod;

    fn stub(path: &'static str) -> http::Uri {
        let mut parts = http::Uri::from_static("http://catalog").into_parts();
        parts.path_and_query = Some(PathAndQuery::from_static(path));
        http::Uri::from_parts(parts).unwrap()
    }

    const GET: &str = "/catalog.v1.QueryService/GetProduct";
    const LIST: &str = "/catalog.v1.QueryService/ListProducts";
    const CREATE: &str = "/catalog.v1.CommandService/CreateProduct";

    #[test]
    fn alternating_methods_are_worked_out_once_each_across_clones() {
        let table = MethodTable::default();
        let mut worked_out = Vec::new();
        let mut clones = [LastMethod::default(), LastMethod::default()];
        for round in 0..4 {
            for (i, path) in [GET, LIST, CREATE].into_iter().enumerate() {
                let last = &mut clones[(round + i) % 2];
                let method = last
                    .get_or_insert_from(&stub(path), &table, |id| {
                        worked_out.push(path);
                        id.map(|id| id.method().to_owned())
                    })
                    .clone();
                assert_eq!(method.as_deref(), path.rsplit('/').next());
            }
        }
        assert_eq!(worked_out, [GET, LIST, CREATE]);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_path_parsed_per_call_is_found_by_its_content() {
        let table = MethodTable::default();
        let mut worked_out = 0;
        for _ in 0..3 {
            // A new allocation each time: its address never repeats.
            let key: PathAndQuery = String::from(GET).parse().unwrap();
            let value = table.get_or_insert_with(&key, |id| {
                worked_out += 1;
                id.map(|id| id.service().to_owned())
            });
            assert_eq!(value.as_deref(), Some("catalog.v1.QueryService"));
        }
        assert_eq!(worked_out, 1);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_path_that_is_no_grpc_method_is_kept_as_none() {
        let table = MethodTable::default();
        let key = PathAndQuery::from_static("/healthz");
        assert!(!table.get_or_insert_with(&key, |id| id.is_some()));
        assert!(!table.get_or_insert_with(&key, |_| true), "kept");
    }

    #[test]
    fn a_full_table_works_new_methods_out_each_time_and_keeps_its_own() {
        let table = MethodTable::with_capacity(1);
        let mut worked_out = Vec::new();
        for path in [GET, LIST, LIST, GET] {
            table.get_or_insert_with(&PathAndQuery::from_static(path), |_| {
                worked_out.push(path);
            });
        }
        assert_eq!(worked_out, [GET, LIST, LIST]);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn threads_adding_the_same_methods_keep_one_entry_each() {
        let table = MethodTable::<usize>::default();
        let worked_out = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        for path in [GET, LIST, CREATE] {
                            let key = PathAndQuery::from_static(path);
                            let value = table.get_or_insert_with(&key, |_| {
                                worked_out.fetch_add(1, Ordering::Relaxed);
                                path.len()
                            });
                            assert_eq!(value, path.len());
                        }
                    }
                });
            }
        });
        // Threads that met a path at once may each have worked it out;
        // after that, nobody did.
        let worked_out = worked_out.load(Ordering::Relaxed);
        assert!((3..=12).contains(&worked_out), "{worked_out}");
        assert_eq!(table.len(), 3);
    }

    /// Runs `f` on a thread and fails if it does not finish within 5 s
    /// (a deadlock), without hanging the test run.
    fn finishes<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(f());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("finished, not deadlocked")
    }

    #[test]
    fn working_a_method_out_may_use_the_same_table() {
        // A value whose making calls through the same layer (a metrics
        // recorder that makes a call, say) must not deadlock.
        let table = std::sync::Arc::new(MethodTable::default());
        let inner = table.clone();
        let value = finishes(move || {
            table.get_or_insert_with(&PathAndQuery::from_static(GET), |_| {
                inner.get_or_insert_with(&PathAndQuery::from_static(LIST), |_| 1) + 1
            })
        });
        assert_eq!(value, 2);
    }

    #[test]
    fn a_full_table_is_not_waited_on() {
        let table = std::sync::Arc::new(MethodTable::with_capacity(1));
        table.get_or_insert_with(&PathAndQuery::from_static(GET), |_| 0);
        // Another thread adding (or stuck making a value) holds the lock:
        // a miss on the full table works its method out without waiting.
        let _adding = table.adding.lock().unwrap();
        let other = table.clone();
        let value =
            finishes(move || other.get_or_insert_with(&PathAndQuery::from_static(LIST), |_| 7));
        assert_eq!(value, 7);
    }
}
