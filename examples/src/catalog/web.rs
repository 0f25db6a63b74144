//! The HTTP side: dashboard at `/`, GraphQL (and GraphiQL) at `/graphql`,
//! subscriptions over WebSocket at `/graphql/ws`, Prometheus text at
//! `/metrics`.

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQL, GraphQLSubscription};
use axum::Router;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::gateway::GatewaySchema;

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

/// The path of the GraphQL endpoint (POST) and GraphiQL (GET).
pub const GRAPHQL_PATH: &str = "/graphql";
/// The path of the GraphQL subscriptions (WebSocket).
pub const GRAPHQL_WS_PATH: &str = "/graphql/ws";

/// The gateway's routes.
pub fn router(schema: GatewaySchema, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD_HTML) }))
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    DASHBOARD_JS,
                )
            }),
        )
        .route(
            "/dashboard.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    DASHBOARD_CSS,
                )
            }),
        )
        .route(
            GRAPHQL_PATH,
            get(graphiql)
                .post_service(GraphQL::new(schema.clone()))
                .layer(axum::middleware::from_fn(graphql_span)),
        )
        .route_service(GRAPHQL_WS_PATH, GraphQLSubscription::new(schema))
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        metrics.render(),
                    )
                        .into_response()
                }
            }),
        )
}

/// Runs a request to the GraphQL endpoint in a `graphql_request` span (the
/// gateway's, `otel.kind = "server"`): the gRPC calls its resolvers make
/// are its children. A caller's W3C Trace Context (`traceparent`) makes it
/// a child of the caller's span; without one it is the trace's root.
async fn graphql_span(request: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "graphql_request",
        otel.name = "graphql",
        otel.kind = "server",
        http.request.method = request.method().as_str(),
        url.path = GRAPHQL_PATH,
        http.response.status_code = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some(parent) =
            grpc_otel::extract_context(&grpc_otel::TraceContextPropagator::new(), request.headers())
    {
        // Fails only for a span already started, which this one is not.
        let _ = span.set_parent(parent);
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}

async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint(GRAPHQL_PATH)
            .subscription_endpoint(GRAPHQL_WS_PATH)
            .finish(),
    )
}
