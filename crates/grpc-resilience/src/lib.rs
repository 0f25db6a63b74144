//! Resilient tonic gRPC clients from one config file.

pub mod config;
mod error;

pub use config::{
    BreakerSettings, ChannelSettings, FailureRateSettings, ImportWarning, ResilienceConfig,
    RetryConfig, RetrySettings, ThrottleSettings, TimeoutConfig,
};
pub use error::ConfigError;
