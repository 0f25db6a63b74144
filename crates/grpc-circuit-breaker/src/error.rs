//! Error types.

use std::fmt;
use std::sync::Arc;

use grpc_resilience_core::error::LocalRejection;
use tonic::Status;

use crate::State;

/// A call the breaker rejected without sending it.
///
/// Its source chain holds a [`LocalRejection`] and then an `UNAVAILABLE`
/// [`tonic::Status`] naming the breaker, so a tonic stub's caller sees
/// `Code::Unavailable` and a retry layer above does not retry it.
#[derive(Debug)]
pub struct BreakerOpen {
    breaker: Arc<str>,
    state: State,
    rejection: LocalRejection,
}

impl BreakerOpen {
    pub(crate) fn new(breaker: Arc<str>, state: State) -> Self {
        let why = match state {
            State::HalfOpen => "half-open and at its probe limit",
            State::ForcedOpen => "forced open",
            _ => "open",
        };
        let status = Status::unavailable(format!(
            "circuit breaker `{breaker}` is {why}; the call was not sent"
        ));
        BreakerOpen {
            breaker,
            state,
            rejection: LocalRejection::new(status),
        }
    }

    /// The name of the breaker that rejected the call.
    pub fn breaker(&self) -> &str {
        &self.breaker
    }

    /// The state that rejected it: open, half-open (probe limit reached)
    /// or forced open.
    pub fn state(&self) -> State {
        self.state
    }

    /// The status a gRPC caller sees.
    pub fn status(&self) -> &Status {
        self.rejection.status()
    }
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("circuit breaker open")
    }
}

impl std::error::Error for BreakerOpen {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.rejection)
    }
}
