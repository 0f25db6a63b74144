//! The product catalog system of the design, running: a GraphQL gateway
//! that calls a Command and a Query service through resilient gRPC
//! channels, with an operations API, Prometheus metrics, a live dashboard
//! and a demo that compares the resilient channels with plain ones.
//!
//! ```text
//! browser / GraphQL client
//!        |  HTTP (/graphql, /graphql/ws, /metrics, / dashboard)
//!   gateway (async-graphql on axum)
//!        |  channels: timeout > retry > circuit breaker > tonic Channel
//!   Command service (CreateProduct, ImportProducts)   Query service (GetProduct, ListProducts)
//!        \__________ one in-memory catalog, faults injected per service __________/
//! ```
//!
//! Run it with the `catalog` binary: `catalog demo` or `catalog serve`.

pub mod attempts;
pub mod backend;
pub mod channels;
pub mod cli;
pub mod client;
pub mod demo;
pub mod faults;
pub mod gateway;
pub mod stats;
pub mod system;
pub mod telemetry;
pub mod traces;
pub mod web;
