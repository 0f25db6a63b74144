//! Error types.

use std::fmt;
use std::time::Duration;

use tonic::Status;

use crate::Scope;

/// A call (or attempt) ran past its deadline.
///
/// Its `source()` is a `DEADLINE_EXCEEDED` [`tonic::Status`], so a tonic
/// stub's caller sees `Code::DeadlineExceeded`.
#[derive(Debug)]
pub struct Elapsed {
    timeout: Duration,
    scope: Scope,
    when: When,
    status: Status,
}

/// When a deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum When {
    /// Before the call was sent: it was not sent.
    BeforeSending,
    /// While waiting for the response headers.
    BeforeResponse,
    /// While the response body was being read.
    DuringBody,
}

impl Elapsed {
    pub(crate) fn new(timeout: Duration, scope: Scope, when: When, method: &str) -> Self {
        let what = match scope {
            Scope::Call => "call",
            Scope::Attempt => "attempt",
        };
        let message = match when {
            When::BeforeSending => {
                format!("{what} to {method} had no time left before its deadline; it was not sent")
            }
            When::BeforeResponse => format!(
                "{what} to {method} ran past its deadline of {timeout:?} before a response arrived"
            ),
            When::DuringBody => format!(
                "{what} to {method} ran past its deadline of {timeout:?} before the response stream ended"
            ),
        };
        Elapsed {
            timeout,
            scope,
            when,
            status: Status::deadline_exceeded(message),
        }
    }

    /// The deadline that was exceeded, as a duration from the call's start.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the deadline was a whole call's or one attempt's.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Whether the deadline passed while a response stream was being read
    /// (the response headers had arrived in time).
    pub fn during_body(&self) -> bool {
        self.when == When::DuringBody
    }

    /// Whether the call (or attempt) was sent: `false` when its deadline
    /// had already passed when it reached this layer, so that it failed
    /// at once without reaching the network.
    pub fn was_sent(&self) -> bool {
        self.when != When::BeforeSending
    }

    /// The status a gRPC caller sees.
    pub fn status(&self) -> &Status {
        &self.status
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for Elapsed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.status)
    }
}
