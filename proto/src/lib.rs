//! The product-catalog protocol of the seed's CQRS system
//! (`proto/catalog.proto`): generated client and server stubs for a
//! `QueryService` (unary `GetProduct`, server-streaming `ListProducts`) and
//! a `CommandService` (unary `CreateProduct`, client-streaming
//! `ImportProducts`), and [`InMemoryCatalog`], a server for both.
//!
//! Only the tests, benches and examples of this workspace use it.

mod server;

/// Version 1 of the catalog protocol (generated code).
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all
)]
pub mod v1 {
    tonic::include_proto!("catalog.v1");
}

pub use server::{CatalogStats, IDEMPOTENCY_KEY, IdempotentCommandService, InMemoryCatalog};
pub use v1::*;

/// Full gRPC method paths, as they appear in the `:path` of a request.
pub mod paths {
    /// `QueryService.GetProduct` (unary).
    pub const GET_PRODUCT: &str = "/catalog.v1.QueryService/GetProduct";
    /// `QueryService.ListProducts` (server streaming).
    pub const LIST_PRODUCTS: &str = "/catalog.v1.QueryService/ListProducts";
    /// `CommandService.CreateProduct` (unary).
    pub const CREATE_PRODUCT: &str = "/catalog.v1.CommandService/CreateProduct";
    /// `CommandService.ImportProducts` (client streaming).
    pub const IMPORT_PRODUCTS: &str = "/catalog.v1.CommandService/ImportProducts";
}
