//! Error types.

use std::borrow::Cow;
use std::fmt;

use grpc_resilience_core::{BoxError, DuplicateSelector, InvalidSelector};

/// A store could not do what the layer asked (unreachable, timed out,
/// full, or holding bytes it cannot read).
///
/// What the layer does then is configured with
/// [`IdempotencyLayer::with_store_failure`](crate::IdempotencyLayer::with_store_failure).
#[derive(Debug)]
pub struct StoreError {
    message: Cow<'static, str>,
    source: Option<BoxError>,
}

impl StoreError {
    /// An error with a message of its own.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        StoreError {
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by `source` (e.g. the database client's error).
    pub fn with_source(message: impl Into<Cow<'static, str>>, source: impl Into<BoxError>) -> Self {
        StoreError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| &**s as &(dyn std::error::Error + 'static))
    }
}

/// Bytes that are not an encoded [`Record`](crate::Record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    reason: Cow<'static, str>,
}

impl DecodeError {
    pub(crate) fn new(reason: impl Into<Cow<'static, str>>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid idempotency record: {}", self.reason)
    }
}

impl std::error::Error for DecodeError {}

/// A layer option that was given a bad value.
#[derive(Debug)]
pub struct ConfigError {
    kind: ConfigErrorKind,
}

#[derive(Debug)]
enum ConfigErrorKind {
    Selector(InvalidSelector),
    Duplicate(DuplicateSelector),
    Value {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl ConfigError {
    pub(crate) fn value(
        option: &'static str,
        value: impl fmt::Display,
        reason: &'static str,
    ) -> Self {
        ConfigError {
            kind: ConfigErrorKind::Value {
                option,
                value: value.to_string(),
                reason,
            },
        }
    }
}

impl From<InvalidSelector> for ConfigError {
    fn from(err: InvalidSelector) -> Self {
        ConfigError {
            kind: ConfigErrorKind::Selector(err),
        }
    }
}

impl From<DuplicateSelector> for ConfigError {
    fn from(err: DuplicateSelector) -> Self {
        ConfigError {
            kind: ConfigErrorKind::Duplicate(err),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ConfigErrorKind::Selector(err) => err.fmt(f),
            ConfigErrorKind::Duplicate(err) => err.fmt(f),
            ConfigErrorKind::Value {
                option,
                value,
                reason,
            } => write!(f, "invalid {option} `{value}`: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ConfigErrorKind::Selector(err) => Some(err),
            ConfigErrorKind::Duplicate(err) => Some(err),
            ConfigErrorKind::Value { .. } => None,
        }
    }
}
