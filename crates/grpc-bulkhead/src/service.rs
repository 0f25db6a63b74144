//! The [`Bulkhead`] service and the partitions its clones share.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use grpc_resilience_core::{BoxError, CallDeadline, MethodId, MethodMap, take_ready};
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tower_service::Service;

use crate::config::BulkheadConfig;
use crate::error::BulkheadFull;
use crate::future::{Permit, ResponseBody, ResponseFuture, SlotWait, reject};
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

/// The bulkhead's admission, without a service: what [`Bulkhead`] does
/// before it calls the service it wraps, for a service that runs the
/// bulkhead inside its own future beside other layers (the
/// `grpc-resilience` facade does, to keep one future per attempt).
///
/// Get one from [`BulkheadLayer::gate`](crate::BulkheadLayer::gate). Its
/// clones share the layer's partitions; each remembers the partitions it
/// used last.
///
/// ```
/// use grpc_bulkhead::{Admission, BulkheadConfig, BulkheadLayer};
///
/// let layer = BulkheadLayer::new(BulkheadConfig::builder().max_concurrent(1).build()?);
/// let mut gate = layer.gate();
/// let mut call = || http::Request::builder()
///     .uri("/catalog.v1.QueryService/GetItem")
///     .body(())
///     .unwrap();
/// let Admission::Admitted(permit) = gate.admit(&mut call()) else { panic!() };
/// // The partition is full: with no wait queue, the next call is refused.
/// assert!(matches!(gate.admit(&mut call()), Admission::Rejected(_)));
/// drop(permit); // the call ended (a permit left unreported counts as cancelled)
/// assert!(matches!(gate.admit(&mut call()), Admission::Admitted(_)));
/// # Ok::<(), grpc_bulkhead::BulkheadConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Gate {
    shared: Arc<Shared>,
    local: [Option<Arc<Partition>>; LOCAL],
}

/// What the bulkhead decided for one call; see [`Gate::admit`].
///
/// Exhaustive on purpose: each variant says whether the caller holds a
/// slot, and a new one would change what every caller must do.
#[derive(Debug)]
#[must_use = "a permit or a wait is the call's place in its partition"]
pub enum Admission {
    /// No partition applies to the call: it goes on without a slot.
    Unlimited,
    /// The call holds a slot until its [`Permit`] reports the call's
    /// outcome or is dropped.
    Admitted(Permit),
    /// The partition is full and the call waits in its queue; the
    /// [`SlotWait`] resolves to the slot or to the refusal. Poll it in the
    /// call's task; dropping it leaves the queue.
    Queued(SlotWait),
    /// Refused at once: the queue is full, or the call's deadline had
    /// passed. Counted and logged already.
    Rejected(BulkheadFull),
}

impl Gate {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Gate {
            shared,
            local: Default::default(),
        }
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

    /// Admits `request` to its partition: a slot if one is free, else a
    /// place in the queue, else a refusal. A call that must wait has its
    /// deadline recorded in `request` (from the caller's `grpc-timeout`
    /// if no layer above recorded one), so the wait ends there.
    #[inline]
    pub fn admit<B>(&mut self, request: &mut http::Request<B>) -> Admission {
        let Some(partition) = self.partition(request) else {
            return Admission::Unlimited;
        };
        match partition.acquire() {
            Some(in_flight) => Admission::Admitted(Permit::new(partition, in_flight)),
            None => admit_full(partition, request),
        }
    }
}

/// A call that found its partition at its limit: queue it or reject it.
#[cold]
fn admit_full<B>(partition: Arc<Partition>, request: &mut http::Request<B>) -> Admission {
    // Time in the queue counts against the call's deadline: recorded now
    // (from the caller's `grpc-timeout` if no layer above did), so the
    // wait ends at the deadline and the request is sent with the time left
    // then.
    let deadline = CallDeadline::get_or_insert(request);
    let now = Instant::now();
    if deadline.is_some_and(|d| d.has_passed_at(now)) {
        return Admission::Rejected(reject(&partition, Rejection::Deadline));
    }
    match partition.enqueue() {
        Enqueued::Acquired(in_flight) => Admission::Admitted(Permit::new(partition, in_flight)),
        Enqueued::Full => Admission::Rejected(reject(&partition, Rejection::QueueFull)),
        Enqueued::Waiting(rx) => Admission::Queued(SlotWait::new(partition, rx, deadline, now)),
    }
}

/// Concurrency partitions for gRPC calls; see the [crate docs](crate).
#[derive(Debug)]
pub struct Bulkhead<S> {
    inner: S,
    gate: Gate,
}

impl<S: Clone> Clone for Bulkhead<S> {
    fn clone(&self) -> Self {
        Bulkhead {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<S> Bulkhead<S> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Bulkhead {
            inner,
            gate: Gate::new(shared),
        }
    }

    /// Wraps `inner` with one partition per gRPC service, each with
    /// `config`.
    pub fn new(inner: S, config: BulkheadConfig) -> Self {
        tower_layer::Layer::layer(&crate::BulkheadLayer::new(config), inner)
    }

    /// The state of every partition made so far.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.gate.shared.status()
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

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&mut request) {
            Admission::Unlimited => ResponseFuture::called(self.inner.call(request), None),
            Admission::Admitted(permit) => {
                ResponseFuture::called(self.inner.call(request), Some(permit))
            }
            Admission::Rejected(error) => {
                // Release the reservation the ready inner service holds:
                // a refused caller that backs off must not keep it.
                drop(take_ready(&mut self.inner));
                ResponseFuture::rejected(error)
            }
            Admission::Queued(wait) => {
                // The ready service goes with the call; this clone must be
                // made ready again before the next call, as usual.
                ResponseFuture::waiting(wait, take_ready(&mut self.inner), request)
            }
        }
    }
}
