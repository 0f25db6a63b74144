//! Error types.

use std::fmt;
use std::sync::Arc;

use grpc_resilience_core::error::LocalRejection;
use tonic::{Code, Status};

use crate::Rejection;

/// A call the bulkhead rejected without sending it: its partition was at
/// its limit and the wait queue was full, the call waited `max_wait`, or
/// the call's deadline came first ([`Rejection`]).
///
/// Its source chain holds a [`LocalRejection`] and then a
/// [`tonic::Status`] naming the partition: `RESOURCE_EXHAUSTED`, or
/// `DEADLINE_EXCEEDED` for [`Rejection::Deadline`]. So a tonic stub's
/// caller sees that code, and a retry layer above does not retry it.
#[derive(Debug)]
pub struct BulkheadFull {
    partition: Arc<str>,
    reason: Rejection,
    rejection: LocalRejection,
}

impl BulkheadFull {
    pub(crate) fn new(partition: Arc<str>, reason: Rejection, limit: u32) -> Self {
        let (code, why) = match reason {
            Rejection::QueueFull => (Code::ResourceExhausted, "is full"),
            Rejection::WaitTimedOut => (
                Code::ResourceExhausted,
                "had no free slot within the maximum wait",
            ),
            Rejection::Deadline => (
                Code::DeadlineExceeded,
                "had no free slot before the call's deadline",
            ),
        };
        let status = Status::new(
            code,
            format!(
                "bulkhead `{partition}` {why} ({limit} calls in flight); the call was not sent"
            ),
        );
        BulkheadFull {
            partition,
            reason,
            rejection: LocalRejection::new(status),
        }
    }

    /// The partition that rejected the call.
    pub fn partition(&self) -> &str {
        &self.partition
    }

    /// Why: the queue was full, the wait timed out, or the deadline came
    /// first.
    pub fn reason(&self) -> Rejection {
        self.reason
    }

    /// The status a gRPC caller sees.
    pub fn status(&self) -> &Status {
        self.rejection.status()
    }
}

impl fmt::Display for BulkheadFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bulkhead full")
    }
}

impl std::error::Error for BulkheadFull {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.rejection)
    }
}
