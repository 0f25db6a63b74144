use std::sync::Arc;

use grpc_resilience_core::Selector;
use tower_layer::Layer;

use crate::config::{BulkheadConfig, BulkheadConfigError};
use crate::partition::Partition;
use crate::service::{Bulkhead, Gate, PartitionStatus, Partitioning, Shared};

/// Applies [`Bulkhead`] to a service.
///
/// Every service made from one layer (and every clone of them) shares the
/// layer's partitions.
#[derive(Clone, Debug)]
pub struct BulkheadLayer {
    shared: Arc<Shared>,
}

impl BulkheadLayer {
    /// One partition per gRPC service, each with `config`.
    pub fn new(config: BulkheadConfig) -> Self {
        Self::with_partitioning(config, Partitioning::PerService)
    }

    /// Partitions chosen by `partitioning`, each with `config`.
    pub fn with_partitioning(config: BulkheadConfig, partitioning: Partitioning) -> Self {
        BulkheadLayer {
            shared: Arc::new(Shared::new(config, partitioning)),
        }
    }

    /// A layer that limits only the calls of partitions added with
    /// [`BulkheadLayer::with_partition`].
    pub fn empty() -> Self {
        Self::with_partitioning(BulkheadConfig::default(), Partitioning::None)
    }

    /// One partition, with its own `config`, shared by every call that
    /// `selector` matches: `*` (every call), `package.Service/*`,
    /// `package.Service/Method` or `Method` (in any service), matched as
    /// gRPC's service config matches (method, then method name, then
    /// service, then `*`). The partition is named after the selector.
    /// Calls it matches do not go to their per-service partition.
    ///
    /// # Errors
    ///
    /// [`BulkheadConfigError`] if the selector does not parse (field
    /// `selector`), is given twice, or `config` is invalid (naming the
    /// partition and the field).
    pub fn with_partition(
        self,
        selector: &str,
        config: BulkheadConfig,
    ) -> Result<Self, BulkheadConfigError> {
        let parsed: Selector = selector.parse().map_err(|_| {
            BulkheadConfigError::new(
                "selector",
                selector.to_owned(),
                "not a method selector (`*`, `package.Service/*`, `package.Service/Method` or `Method`)",
            )
        })?;
        config.validate().map_err(|e| e.for_partition(selector))?;
        let mut shared = self.shared.duplicate();
        let partition = Arc::new(Partition::new(selector, config));
        shared.selectors.insert(parsed, partition).map_err(|_| {
            BulkheadConfigError::new("selector", selector.to_owned(), "is given more than once")
        })?;
        Ok(BulkheadLayer {
            shared: Arc::new(shared),
        })
    }

    /// The state of every partition made so far: selector partitions
    /// first, then per-service or per-method ones by name.
    pub fn partitions(&self) -> Vec<PartitionStatus> {
        self.shared.status()
    }

    /// The layer's admission without a service, sharing its partitions:
    /// for a service that runs the bulkhead inside its own future (see
    /// [`Gate`]).
    pub fn gate(&self) -> Gate {
        Gate::new(self.shared.clone())
    }
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bulkhead::from_shared(inner, self.shared.clone())
    }
}
