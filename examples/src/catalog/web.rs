//! The HTTP side: dashboard at `/`, GraphQL (and GraphiQL) at `/graphql`,
//! subscriptions over WebSocket at `/graphql/ws`, Prometheus text at
//! `/metrics`.

use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQL, GraphQLSubscription};
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

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
            get(graphiql).post_service(GraphQL::new(schema.clone())),
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

async fn graphiql() -> impl IntoResponse {
    Html(
        GraphiQLSource::build()
            .endpoint(GRAPHQL_PATH)
            .subscription_endpoint(GRAPHQL_WS_PATH)
            .finish(),
    )
}
