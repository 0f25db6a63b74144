//! What a fault does.

use std::time::Duration;

use tonic::Code;

/// How to reset a stream (the HTTP/2 `RST_STREAM` error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// `REFUSED_STREAM`: the server did not process the request at all, so
    /// a client may retry it safely (clients see `UNAVAILABLE`).
    RefusedStream,
    /// `CANCEL` (clients see `CANCELLED`).
    Cancel,
    /// `INTERNAL_ERROR` (clients see `INTERNAL`).
    InternalError,
}

impl ResetReason {
    pub(crate) fn to_h2(self) -> h2::Reason {
        match self {
            ResetReason::RefusedStream => h2::Reason::REFUSED_STREAM,
            ResetReason::Cancel => h2::Reason::CANCEL,
            ResetReason::InternalError => h2::Reason::INTERNAL_ERROR,
        }
    }
}

/// One injected fault: what happens to one call.
///
/// Build it with a constructor, then optionally add a delay before it
/// takes effect with [`Fault::with_delay`]:
///
/// ```
/// use std::time::Duration;
/// use grpc_fault::Fault;
/// use tonic::Code;
///
/// let faults = [
///     Fault::status(Code::Unavailable).with_pushback(Duration::from_millis(50)),
///     Fault::pass().with_delay(Duration::from_millis(200)),
///     Fault::status_after_messages(3, Code::Internal),
///     Fault::lose_response(),
/// ];
/// # let _ = faults;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    pub(crate) delay: Duration,
    pub(crate) action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Status {
        code: Code,
        message: String,
        pushback: Option<String>,
    },
    StatusAfterMessages {
        messages: usize,
        code: Code,
        message: String,
    },
    SlowStream(Duration),
    LoseResponse,
    Reset(ResetReason),
    DropConnection,
    EarlyStatus {
        code: Code,
        message: String,
    },
}

impl Fault {
    fn new(action: Action) -> Self {
        Fault {
            delay: Duration::ZERO,
            action,
        }
    }

    /// No fault: the handler runs and its response goes out unchanged.
    pub fn pass() -> Self {
        Fault::new(Action::Pass)
    }

    /// Answers with `code` as a Trailers-Only response (the way tonic
    /// servers send errors); the handler does not run.
    pub fn status(code: Code) -> Self {
        Fault::new(Action::Status {
            code,
            message: format!("injected fault: {}", code.description()),
            pushback: None,
        })
    }

    /// Runs the handler and lets `messages` of its response messages
    /// through, then ends the stream with `code` in the trailers: a failure
    /// after the response headers, which a client must treat as committed.
    /// With `0`, the response has headers and then the failing trailers.
    pub fn status_after_messages(messages: usize, code: Code) -> Self {
        Fault::new(Action::StatusAfterMessages {
            messages,
            code,
            message: format!(
                "injected fault after {messages} messages: {}",
                code.description()
            ),
        })
    }

    /// Runs the handler and waits `gap` before each response message after
    /// the first (a slow stream).
    pub fn slow_stream(gap: Duration) -> Self {
        Fault::new(Action::SlowStream(gap))
    }

    /// Runs the handler to the end (its writes happen), then throws its
    /// response away and answers `UNAVAILABLE`, as when a response is lost
    /// on the way back. A client that retries this call runs the handler
    /// again. The handler's whole response is read first, so on a
    /// streaming method the call lasts as long as the stream.
    pub fn lose_response() -> Self {
        Fault::new(Action::LoseResponse)
    }

    /// Answers with `code` as a Trailers-Only response at once, then keeps
    /// reading the request body to its end without resetting the stream;
    /// the handler does not run. tonic servers reset a client stream they
    /// answered early; some servers and proxies do not, and a client keeps
    /// sending. The bytes read count in the call's record
    /// ([`RecordedCall::bytes_received`](crate::RecordedCall::bytes_received)
    /// and its digest), so a test can check what such a server got. The
    /// reading ends with the client's stream (or its connection).
    pub fn early_status(code: Code) -> Self {
        Fault::new(Action::EarlyStatus {
            code,
            message: format!(
                "injected fault (answered early, reading on): {}",
                code.description()
            ),
        })
    }

    /// Resets the HTTP/2 stream before the handler runs.
    pub fn reset(reason: ResetReason) -> Self {
        Fault::new(Action::Reset(reason))
    }

    /// Closes the whole connection the call came on, before the handler
    /// runs. Needs a server that accepts connections through
    /// [`incoming`](crate::incoming); on others the stream is reset with
    /// `REFUSED_STREAM` instead.
    pub fn drop_connection() -> Self {
        Fault::new(Action::DropConnection)
    }

    /// Waits `delay` before the fault (or the handler, for
    /// [`Fault::pass`]) takes effect.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Sets the `grpc-message` of a [`Fault::status`] or
    /// [`Fault::status_after_messages`] fault; other faults ignore it.
    pub fn with_message(mut self, text: impl Into<String>) -> Self {
        match &mut self.action {
            Action::Status { message, .. } | Action::StatusAfterMessages { message, .. } => {
                *message = text.into();
            }
            _ => {}
        }
        self
    }

    /// Adds `grpc-retry-pushback-ms` with this delay to a
    /// [`Fault::status`] fault (server pushback, gRFC A6).
    pub fn with_pushback(self, delay: Duration) -> Self {
        self.with_raw_pushback(delay.as_millis().to_string())
    }

    /// Adds `grpc-retry-pushback-ms` with any text, e.g. `-1` ("do not
    /// retry") or a malformed value, to test how clients treat it.
    pub fn with_raw_pushback(mut self, value: impl Into<String>) -> Self {
        if let Action::Status { pushback, .. } = &mut self.action {
            *pushback = Some(value.into());
        }
        self
    }

    /// Whether the handler runs for this fault.
    pub fn runs_handler(&self) -> bool {
        matches!(
            self.action,
            Action::Pass
                | Action::StatusAfterMessages { .. }
                | Action::SlowStream(_)
                | Action::LoseResponse
        )
    }

    /// A short name for logs and call records: `pass`, `status`,
    /// `status_after_messages`, `slow_stream`, `lose_response`, `reset`,
    /// `drop_connection`, `early_status`.
    pub fn name(&self) -> &'static str {
        match self.action {
            Action::Pass => "pass",
            Action::Status { .. } => "status",
            Action::StatusAfterMessages { .. } => "status_after_messages",
            Action::SlowStream(_) => "slow_stream",
            Action::LoseResponse => "lose_response",
            Action::Reset(_) => "reset",
            Action::DropConnection => "drop_connection",
            Action::EarlyStatus { .. } => "early_status",
        }
    }
}
