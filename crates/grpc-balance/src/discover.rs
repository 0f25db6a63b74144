//! Where endpoints come from: a static list, a DNS name, a user's stream.
//! Each source makes the endpoint services and sends them to the balancer.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use grpc_circuit_breaker::{CircuitBreaker, CircuitBreakerLayer, Keying};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tower::Layer;
use tower::discover::Change;
use tower::limit::ConcurrencyLimit;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::Either;

use crate::endpoint::{EndpointService, EndpointState};
use crate::outlier::Controller;

/// One endpoint's service in the balancer: load tracking, ejection, an
/// optional bulkhead, the endpoint's breaker, its channel.
pub type EndpointStack = PendingRequests<
    EndpointService<Either<ConcurrencyLimit<CircuitBreaker<Channel>>, CircuitBreaker<Channel>>>,
    CompleteOnResponse,
>;

/// The stream of endpoint changes the balancer reads.
pub struct Discovery {
    rx: mpsc::UnboundedReceiver<Change<Arc<str>, EndpointStack>>,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery").finish_non_exhaustive()
    }
}

impl Stream for Discovery {
    type Item = Result<Change<Arc<str>, EndpointStack>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|change| change.map(Ok))
    }
}

pub(crate) type Sender = mpsc::UnboundedSender<Change<Arc<str>, EndpointStack>>;

pub(crate) fn channel() -> (Sender, Discovery) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Discovery { rx })
}

impl Controller {
    /// Makes the service of the endpoint `key` and starts its health watch.
    pub(crate) fn make(self: &Arc<Self>, key: Arc<str>, endpoint: Endpoint) -> EndpointStack {
        let breaker = self.breaker_name(&key);
        if self.registry.config(&breaker).is_none() {
            // Validated with the balanced channel's config.
            let _ = self
                .registry
                .configure(&breaker, self.config.effective_endpoint_breaker());
        }
        self.registry.get_or_create(&breaker);
        let channel = endpoint.connect_lazy();
        let state = Arc::new(EndpointState::new(
            key,
            breaker.as_str().into(),
            Arc::downgrade(self),
            self.config.outlier().max_probes(),
        ));
        if let Some(health) = self.config.health() {
            let task = self.handle.spawn(crate::health::watch(
                channel.clone(),
                health.clone(),
                Arc::downgrade(&state),
                Arc::downgrade(self),
            ));
            state.add_task(task.abort_handle());
        }
        self.insert(state.clone());
        let service =
            CircuitBreakerLayer::with_keying(self.registry.clone(), Keying::Single(breaker))
                .layer(channel);
        let service = match self.config.max_concurrent_calls() {
            Some(n) => Either::Left(ConcurrencyLimit::new(service, n)),
            None => Either::Right(service),
        };
        PendingRequests::new(
            EndpointService::new(service, state),
            CompleteOnResponse::default(),
        )
    }

    /// Adds (or replaces) an endpoint.
    pub(crate) fn add(self: &Arc<Self>, tx: &Sender, key: Arc<str>, endpoint: Endpoint) -> bool {
        if let Some(old) = self.get(&self.breaker_name(&key)) {
            old.abort_tasks();
        }
        let service = self.make(key.clone(), endpoint);
        tx.send(Change::Insert(key, service)).is_ok()
    }

    /// Removes an endpoint.
    pub(crate) fn drop_endpoint(&self, tx: &Sender, key: Arc<str>) -> bool {
        self.remove(&self.breaker_name(&key));
        tx.send(Change::Remove(key)).is_ok()
    }
}

/// Resolves `host_port` every `refresh`, adding and removing endpoints.
pub(crate) async fn dns<F>(
    host_port: String,
    controller: Weak<Controller>,
    tx: Sender,
    configure: F,
) where
    F: Fn(Endpoint) -> Endpoint,
{
    let mut current: BTreeSet<SocketAddr> = BTreeSet::new();
    loop {
        let Some(ctl) = controller.upgrade() else {
            return;
        };
        let refresh = ctl.config.dns_refresh();
        match tokio::net::lookup_host(host_port.as_str()).await {
            Ok(addrs) => {
                let found: BTreeSet<SocketAddr> = addrs.collect();
                if found.is_empty() {
                    tracing::warn!(name = %host_port, "DNS returned no address; keeping the endpoints");
                } else {
                    for addr in found.difference(&current) {
                        let uri = format!("http://{addr}");
                        let Ok(endpoint) = Endpoint::from_shared(uri) else {
                            continue;
                        };
                        let endpoint =
                            configure(endpoint.connect_timeout(ctl.config.connect_timeout()));
                        tracing::info!(name = %host_port, %addr, "DNS: endpoint added");
                        if !ctl.add(&tx, addr.to_string().into(), endpoint) {
                            return;
                        }
                    }
                    for addr in current.difference(&found) {
                        tracing::info!(name = %host_port, %addr, "DNS: endpoint removed");
                        if !ctl.drop_endpoint(&tx, addr.to_string().into()) {
                            return;
                        }
                    }
                    current = found;
                }
            }
            Err(err) => {
                tracing::warn!(name = %host_port, %err, "DNS lookup failed; keeping the endpoints")
            }
        }
        drop(ctl);
        tokio::time::sleep(refresh).await;
        if tx.is_closed() {
            return;
        }
    }
}

/// Forwards a user's stream of endpoint changes.
pub(crate) async fn forward<D, K, E>(discover: D, controller: Weak<Controller>, tx: Sender)
where
    D: Stream<Item = Result<Change<K, Endpoint>, E>> + Send + 'static,
    K: fmt::Display,
    E: fmt::Display,
{
    let mut discover = std::pin::pin!(discover);
    while let Some(change) = discover.next().await {
        let Some(ctl) = controller.upgrade() else {
            return;
        };
        let sent = match change {
            Ok(Change::Insert(key, endpoint)) => ctl.add(&tx, key.to_string().into(), endpoint),
            Ok(Change::Remove(key)) => ctl.drop_endpoint(&tx, key.to_string().into()),
            Err(err) => {
                tracing::warn!(%err, "endpoint discovery error; keeping the endpoints");
                true
            }
        };
        if !sent {
            return;
        }
    }
}
