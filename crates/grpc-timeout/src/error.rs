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
    during_body: bool,
    status: Status,
}

impl Elapsed {
    pub(crate) fn new(timeout: Duration, scope: Scope, during_body: bool, method: &str) -> Self {
        let what = match scope {
            Scope::Call => "call",
            Scope::Attempt => "attempt",
        };
        let when = if during_body {
            "before the response stream ended"
        } else {
            "before a response arrived"
        };
        let status = Status::deadline_exceeded(format!(
            "{what} to {method} ran past its deadline of {timeout:?} {when}"
        ));
        Elapsed {
            timeout,
            scope,
            during_body,
            status,
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
        self.during_body
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
