//! The [`CircuitBreakerLayer`].

use std::sync::Arc;

use tower_layer::Layer;

use crate::keying::{Keying, Shared};
use crate::registry::BreakerRegistry;
use crate::service::{CircuitBreaker, Gate};

/// Applies [`CircuitBreaker`] to a service.
#[derive(Clone, Debug)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
}

impl CircuitBreakerLayer {
    /// One breaker per gRPC service, from `registry`, named after the
    /// service (see [`service_breaker_name`](crate::service_breaker_name)).
    pub fn new(registry: BreakerRegistry) -> Self {
        Self::with_keying(registry, Keying::PerService)
    }

    /// Breakers chosen by `keying`.
    pub fn with_keying(registry: BreakerRegistry, keying: Keying) -> Self {
        CircuitBreakerLayer {
            shared: Arc::new(Shared::new(registry, keying, Default::default())),
        }
    }

    /// Names the breaker of a service (fully qualified, e.g.
    /// `catalog.v1.CommandService`) instead of deriving its name; with
    /// [`Keying::PerService`] only.
    pub fn with_service_name(self, service: &str, breaker: &str) -> Self {
        let mut names = self.shared.names.clone();
        names.insert(service.to_owned(), breaker.to_owned());
        CircuitBreakerLayer {
            shared: Arc::new(Shared::new(
                self.shared.registry.clone(),
                self.shared.keying.clone(),
                names,
            )),
        }
    }

    /// The registry this layer's breakers live in.
    pub fn registry(&self) -> &BreakerRegistry {
        &self.shared.registry
    }

    /// The layer's admission without a service, sharing its breakers: for
    /// a service that runs the breaker inside its own future (see
    /// [`Gate`]).
    pub fn gate(&self) -> Gate {
        Gate::new(self.shared.clone())
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_shared(inner, self.shared.clone())
    }
}
