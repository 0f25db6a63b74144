//! The [`Bulkhead`] service and the partitions its clones share.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use grpc_resilience_core::{BoxError, CallDeadline, MethodId, MethodMap};
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::BulkheadConfig;
use crate::future::{Permit, ResponseBody, ResponseFuture, reject};
use crate::partition::{Enqueued, Partition, Rejection};

/// How calls that no selector partition matches are partitioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioning {
    /// One partition per gRPC service, named after the fully qualified
    /// service (`catalog.v1.QueryService`). The default.
    PerService,
    /// One partition per method, named `package.Service/Method`.
    PerMethod,
    /// Not limited: only selector partitions apply.
    None,
}

/// A partition's current state, for an admin endpoint or a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionStatus {
    /// The partition's name: a service, a method or a selector.
    pub name: String,
    /// Its current limit (it moves if the limit is adaptive).
    pub limit: u32,
    /// Calls holding a slot.
    pub in_flight: u32,
    /// Calls waiting for one.
    pub queued: usize,
}

impl PartitionStatus {
    fn of(p: &Partition) -> Self {
        PartitionStatus {
            name: p.name().to_string(),
            limit: p.limit(),
            in_flight: p.in_flight(),
            queued: p.queued(),
        }
    }
}

/// What every clone of a layer's services shares.
pub(crate) struct Shared {
    pub(crate) config: BulkheadConfig,
    pub(crate) partitioning: Partitioning,
    pub(crate) selectors: MethodMap<Arc<Partition>>,
    // Partitions made on first use, per service or method; copied on
    // write, read without locks.
    pub(crate) dynamic: ArcSwap<FxHashMap<Box<str>, Arc<Partition>>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("partitioning", &self.partitioning)
            .field("partitions", &self.status())
            .finish()
    }
}

impl Shared {
    pub(crate) fn new(config: BulkheadConfig, partitioning: Partitioning) -> Self {
        Shared {
            config,
            partitioning,
            selectors: MethodMap::new(),
            dynamic: ArcSwap::default(),
        }
    }

    /// A copy with the same partitions (for a layer being configured).
    pub(crate) fn duplicate(&self) -> Self {
        Shared {
            config: self.config.clone(),
            partitioning: self.partitioning,
            selectors: self.selectors.clone(),
            dynamic: ArcSwap::new(self.dynamic.load_full()),
        }
    }

    fn lookup(&self, key: &str) -> Arc<Partition> {
        match self.dynamic.load().get(key) {
            Some(p) => p.clone(),
            None => self.insert(key),
        }
    }

    #[cold]
    fn insert(&self, key: &str) -> Arc<Partition> {
        let made = Arc::new(Partition::new(key, self.config.clone()));
        self.dynamic.rcu(|map| {
            let mut map = FxHashMap::clone(map);
            map.entry(key.into()).or_insert_with(|| made.clone());
            map
        });
        self.dynamic.load().get(key).cloned().unwrap_or(made)
    }

    pub(crate) fn status(&self) -> Vec<PartitionStatus> {
        let mut out: Vec<PartitionStatus> = self
            .selectors
            .entries()
            .into_iter()
            .map(|(_, p)| PartitionStatus::of(p))
            .collect();
        let mut dynamic: Vec<PartitionStatus> = self
            .dynamic
            .load()
            .values()
            .map(|p| PartitionStatus::of(p))
            .collect();
        dynamic.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(dynamic);
        out
    }
}

/// How many partitions each service clone remembers, so the usual call
/// finds its partition without touching shared memory.
const LOCAL: usize = 4;

/// Concurrency partitions for gRPC calls; see the [crate docs](crate).
#[derive(Debug)]
pub struct Bulkhead<S> {
    inner: S,
    shared: Arc<Shared>,
    local: [Option<Arc<Partition>>; LOCAL],
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            local: self.local.clone(),
        }
    }
}

impl<S> Bulkhead<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Bulkhead {
            inner,
            shared,
            local: Default::default(),
        }
    }

    /// Wraps `inner` with one partition per gRPC service, each with
    /// `config`.
    pub fn new(inner: S, config: BulkheadConfig) -> Self {
        tower_layer::Layer::layer(&crate::BulkheadLayer::new(config), inner)
    }

    /// The state of every partition made so far.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.shared.status()
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The partition of this request, if one applies.
    #[inline]
    fn partition<B>(&mut self, request: &http::Request<B>) -> Option<Arc<Partition>> {
        let id = MethodId::from_request(request).ok()?;
        if !self.shared.selectors.is_empty()
            && let Some(p) = self.shared.selectors.get(&id)
        {
            return Some(p.clone());
        }
        let key = match self.shared.partitioning {
            Partitioning::PerService => id.service(),
            Partitioning::PerMethod => &id.path()[1..],
            Partitioning::None => return None,
        };
        if let Some(p) = self.local.iter().flatten().find(|p| &**p.name() == key) {
            return Some(p.clone());
        }
        let p = self.shared.lookup(key);
        self.local.rotate_right(1);
        self.local[0] = Some(p.clone());
        Some(p)
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for Bulkhead<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Never rejects or waits for a slot here: the partition depends on
        // the request, and tonic stubs would report a rejection here as
        // UNKNOWN. Both happen in the call's future.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(partition) = self.partition(&request) else {
            return ResponseFuture::called(self.inner.call(request), None);
        };
        match partition.acquire() {
            Some(in_flight) => {
                let permit = Permit::new(partition, in_flight);
                ResponseFuture::called(self.inner.call(request), Some(permit))
            }
            None => self.call_full(partition, request),
        }
    }
}

impl<S> Bulkhead<S> {
    /// A call that found its partition at its limit: queue it or reject it.
    #[cold]
    fn call_full<B>(
        &mut self,
        partition: Arc<Partition>,
        mut request: http::Request<B>,
    ) -> ResponseFuture<S, B>
    where
        S: Service<http::Request<B>> + Clone,
    {
        // Time in the queue counts against the call's deadline: recorded
        // now (from the caller's `grpc-timeout` if no layer above did), so
        // the wait ends at the deadline and the request is sent with the
        // time left then.
        let deadline = CallDeadline::get_or_insert(&mut request);
        let now = Instant::now();
        if deadline.is_some_and(|d| d.has_passed_at(now)) {
            return ResponseFuture::rejected(reject(&partition, Rejection::Deadline));
        }
        match partition.enqueue() {
            Enqueued::Acquired(in_flight) => {
                let permit = Permit::new(partition, in_flight);
                ResponseFuture::called(self.inner.call(request), Some(permit))
            }
            Enqueued::Full => ResponseFuture::rejected(reject(&partition, Rejection::QueueFull)),
            Enqueued::Waiting(rx) => {
                // The ready service goes with the call; this clone must be
                // made ready again before the next call, as usual.
                let fresh = self.inner.clone();
                let ready = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::waiting(partition, rx, ready, request, deadline, now)
            }
        }
    }
}
