//! Distributed tracing of the catalog system: which spans are exported and
//! where to.
//!
//! Every GraphQL request has a `graphql_request` span (the gateway's); each
//! gRPC call it makes a `grpc_call` span under it and a `grpc_attempt` span
//! per attempt (the resilient channels of `grpc-resilience`, whose
//! `opentelemetry` feature sends each attempt's context in its metadata);
//! and the Command and Query services open a `grpc_server` span per call as
//! the child of the attempt that reached them ([`grpc_otel::ServerTraceLayer`]).
//!
//! With an OTLP endpoint ([`otlp_endpoint`]: `--otlp-endpoint` or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`) the spans are exported there
//! over OTLP/gRPC; with none, no OpenTelemetry layer is installed and the
//! spans stay the plain `tracing` ones (the facade then writes no
//! metadata).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing::Level;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The standard environment variable of the OTLP endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The service name the exported spans carry.
pub const SERVICE_NAME: &str = "catalog";

/// The OTLP endpoint: `flag` if given, else `OTEL_EXPORTER_OTLP_ENDPOINT`
/// if set and not empty, else none (no export).
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::env::var(OTLP_ENDPOINT_ENV).ok())
        .filter(|e| !e.trim().is_empty())
}

/// Which spans become OpenTelemetry spans: the gateway's, the channels'
/// (the retry layer's attempts are DEBUG spans), the servers'; not the
/// transport's own (h2, hyper, tower).
pub fn span_filter() -> Targets {
    Targets::new()
        .with_default(Level::INFO)
        .with_target("grpc_retry", Level::DEBUG)
        .with_target("h2", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("tonic", LevelFilter::OFF)
        .with_target("opentelemetry", LevelFilter::OFF)
        .with_target("opentelemetry_sdk", LevelFilter::OFF)
        .with_target("opentelemetry_otlp", LevelFilter::OFF)
}

/// A tracer provider that sends its spans to `exporter` in batches, as
/// service [`SERVICE_NAME`].
pub fn provider<E: SpanExporter + 'static>(exporter: E) -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(SERVICE_NAME).build())
        .build()
}

/// The `tracing` layer that turns the spans [`span_filter`] lets through
/// into OpenTelemetry spans of `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(SERVICE_NAME))
        .with_filter(span_filter())
}

/// A provider exporting over OTLP/gRPC to `endpoint`. Call it inside a
/// tokio runtime (the exporter's channel runs on it).
///
/// # Errors
///
/// The exporter's message if `endpoint` cannot be used.
pub fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("cannot export traces to {endpoint}: {e}"))?;
    Ok(provider(exporter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_attempts_and_drops_transport_spans() {
        let filter = span_filter();
        assert!(filter.would_enable("grpc_retry::future", &Level::DEBUG));
        assert!(filter.would_enable("grpc_resilience::telemetry", &Level::INFO));
        assert!(!filter.would_enable("grpc_resilience::telemetry", &Level::DEBUG));
        assert!(!filter.would_enable("h2::proto", &Level::INFO));
        assert!(!filter.would_enable("hyper::client", &Level::ERROR));
    }

    #[test]
    fn endpoint_flag_wins_and_empty_means_none() {
        assert_eq!(
            otlp_endpoint(Some("http://127.0.0.1:4317")).as_deref(),
            Some("http://127.0.0.1:4317")
        );
        assert_eq!(otlp_endpoint(Some("  ")), None);
    }
}
