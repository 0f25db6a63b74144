//! Generated client and server stubs for the product-catalog protocol
//! (`proto/catalog.proto`): a `QueryService` with a unary and a
//! server-streaming method and a `CommandService` with a unary and a
//! client-streaming method.
//!
//! Only the tests, benches and examples of this workspace use it.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Version 1 of the catalog protocol.
pub mod v1 {
    tonic::include_proto!("catalog.v1");
}

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
