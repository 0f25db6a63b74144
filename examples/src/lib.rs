//! Runnable examples of the grpc-resilience layers on the design's
//! product-catalog system. See [`catalog`] and the `catalog` binary.

pub mod catalog;
