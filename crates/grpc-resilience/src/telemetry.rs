//! Call telemetry: one logical call, retries included.

use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use grpc_resilience_core::codes::code_name;
use grpc_resilience_core::{MethodId, OnOutcome, Outcome, Stripe, Striped};
use metrics::{Counter, Histogram};
use rustc_hash::FxHashMap;
use tokio::time::Instant;
use tracing::Span;

/// `grpc.client.call.count`: logical calls, labels `service`, `method`,
/// `code`.
pub const CALL_COUNT: &str = "grpc.client.call.count";
/// `grpc.client.call.duration`: seconds from the call to its final status,
/// retries included, labels `service`, `method`, `code`.
pub const CALL_DURATION: &str = "grpc.client.call.duration";

const CODES: usize = 17;

/// The metric handles of one method, registered once per status code seen.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    service: Box<str>,
    method: Box<str>,
    by_code: [OnceLock<(Counter, Histogram)>; CODES],
}

impl MethodMetrics {
    fn new(id: &MethodId<'_>) -> Self {
        MethodMetrics {
            service: id.service().into(),
            method: id.method().into(),
            by_code: Default::default(),
        }
    }

    /// The call's span, named from the method these metrics are for.
    pub(crate) fn call_span(&self, server: Option<&ServerAddress>) -> Span {
        call_span(&self.service, &self.method, server)
    }

    fn handles(&self, code: tonic::Code) -> &(Counter, Histogram) {
        let index = (code as usize).min(CODES - 1);
        self.by_code[index].get_or_init(|| {
            let labels = [
                ("service", self.service.to_string()),
                ("method", self.method.to_string()),
                ("code", code_name(code).to_owned()),
            ];
            (
                metrics::counter!(CALL_COUNT, &labels),
                metrics::histogram!(CALL_DURATION, &labels),
            )
        })
    }
}

/// A method's metric handles, with a handle per thread stripe for calls to
/// keep (see [`Striped`]).
pub(crate) type SharedMetrics = Arc<Striped<MethodMetrics>>;

/// Metric handles per method path, shared by every clone of a channel;
/// read without locks.
#[derive(Debug, Default)]
pub(crate) struct MetricsCache {
    methods: ArcSwap<FxHashMap<Box<str>, SharedMetrics>>,
}

impl MetricsCache {
    pub(crate) fn get(&self, id: &MethodId<'_>) -> SharedMetrics {
        if let Some(m) = self.methods.load().get(id.path()) {
            return m.clone();
        }
        self.insert(id)
    }

    #[cold]
    fn insert(&self, id: &MethodId<'_>) -> SharedMetrics {
        let fresh = Arc::new(Striped::new(Arc::new(MethodMetrics::new(id))));
        self.methods.rcu(|map| {
            let mut map = FxHashMap::clone(map);
            map.entry(id.path().into()).or_insert_with(|| fresh.clone());
            map
        });
        self.methods.load().get(id.path()).cloned().unwrap_or(fresh)
    }
}

/// Records a logical call's outcome once: metrics and the span's status.
#[derive(Debug)]
pub struct CallRecorder {
    // This thread's handle: no count shared with other cores is written.
    metrics: Arc<Stripe<MethodMetrics>>,
    start: Instant,
    span: Span,
}

impl CallRecorder {
    pub(crate) fn new(metrics: Arc<Stripe<MethodMetrics>>, span: Span) -> Self {
        CallRecorder {
            metrics,
            start: Instant::now(),
            span,
        }
    }
}

impl OnOutcome for CallRecorder {
    fn span(&self) -> Option<&Span> {
        Some(&self.span)
    }

    fn on_outcome(self, outcome: Outcome) {
        let code = outcome.code();
        let (count, duration) = self.metrics.handles(code);
        count.increment(1);
        duration.record(self.start.elapsed().as_secs_f64());
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", code as i32);
        }
    }
}

/// Where a channel's calls go, for the spans' `server.address` and
/// `server.port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerAddress {
    host: Box<str>,
    port: Option<u16>,
}

impl ServerAddress {
    pub(crate) fn of_uri(uri: &http::Uri) -> Option<Self> {
        Some(ServerAddress {
            host: uri.host()?.into(),
            port: uri.port_u16(),
        })
    }
}

/// The span of one logical call, with OpenTelemetry's RPC fields.
fn call_span(service: &str, method: &str, server: Option<&ServerAddress>) -> Span {
    let span = tracing::info_span!(
        "grpc_call",
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
    );
    if let Some(server) = server
        && !span.is_disabled()
    {
        span.record("server.address", &*server.host);
        if let Some(port) = server.port {
            span.record("server.port", i64::from(port));
        }
    }
    span
}
