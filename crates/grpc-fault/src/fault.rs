//! What a fault does.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::Code;

/// How to reset a stream: the HTTP/2 `RST_STREAM` error code (RFC 9113,
/// section 7). Every code the protocol defines has a variant, and
/// [`ResetReason::Other`] sends any other value, as a broken peer might.
///
/// What a gRPC client reports for each is in the table of
/// `grpc_resilience_core::error::transport_code` (gRPC's HTTP/2 protocol
/// spec): `CANCEL` is `CANCELLED`, `REFUSED_STREAM` is `UNAVAILABLE` and
/// safe to retry, `ENHANCE_YOUR_CALM` is `RESOURCE_EXHAUSTED`, the protocol
/// errors are `INTERNAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResetReason {
    /// `NO_ERROR` (0x0).
    NoError,
    /// `PROTOCOL_ERROR` (0x1).
    ProtocolError,
    /// `INTERNAL_ERROR` (0x2).
    InternalError,
    /// `FLOW_CONTROL_ERROR` (0x3).
    FlowControlError,
    /// `SETTINGS_TIMEOUT` (0x4).
    SettingsTimeout,
    /// `STREAM_CLOSED` (0x5).
    StreamClosed,
    /// `FRAME_SIZE_ERROR` (0x6).
    FrameSizeError,
    /// `REFUSED_STREAM` (0x7): the server did not process the request at
    /// all, so a client may retry it safely.
    RefusedStream,
    /// `CANCEL` (0x8).
    Cancel,
    /// `COMPRESSION_ERROR` (0x9).
    CompressionError,
    /// `CONNECT_ERROR` (0xa).
    ConnectError,
    /// `ENHANCE_YOUR_CALM` (0xb): the server thinks the client is
    /// overloading it.
    EnhanceYourCalm,
    /// `INADEQUATE_SECURITY` (0xc).
    InadequateSecurity,
    /// `HTTP_1_1_REQUIRED` (0xd).
    Http11Required,
    /// Any other code, sent as written.
    Other(u32),
}

impl ResetReason {
    /// Every reason the protocol defines, in code order.
    pub const ALL: [ResetReason; 14] = [
        ResetReason::NoError,
        ResetReason::ProtocolError,
        ResetReason::InternalError,
        ResetReason::FlowControlError,
        ResetReason::SettingsTimeout,
        ResetReason::StreamClosed,
        ResetReason::FrameSizeError,
        ResetReason::RefusedStream,
        ResetReason::Cancel,
        ResetReason::CompressionError,
        ResetReason::ConnectError,
        ResetReason::EnhanceYourCalm,
        ResetReason::InadequateSecurity,
        ResetReason::Http11Required,
    ];

    /// The HTTP/2 error code.
    pub fn code(self) -> u32 {
        match self {
            ResetReason::NoError => 0x0,
            ResetReason::ProtocolError => 0x1,
            ResetReason::InternalError => 0x2,
            ResetReason::FlowControlError => 0x3,
            ResetReason::SettingsTimeout => 0x4,
            ResetReason::StreamClosed => 0x5,
            ResetReason::FrameSizeError => 0x6,
            ResetReason::RefusedStream => 0x7,
            ResetReason::Cancel => 0x8,
            ResetReason::CompressionError => 0x9,
            ResetReason::ConnectError => 0xa,
            ResetReason::EnhanceYourCalm => 0xb,
            ResetReason::InadequateSecurity => 0xc,
            ResetReason::Http11Required => 0xd,
            ResetReason::Other(code) => code,
        }
    }

    /// The reason with HTTP/2 error code `code`.
    pub fn from_code(code: u32) -> Self {
        ResetReason::ALL
            .into_iter()
            .find(|r| r.code() == code)
            .unwrap_or(ResetReason::Other(code))
    }

    /// The reason as the `h2` crate spells it.
    pub(crate) fn to_h2(self) -> h2::Reason {
        h2::Reason::from(self.code())
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
    // Raw header edits applied to the status headers or trailers the fault
    // sends; empty (no allocation) unless a `raw` / `with_header` method
    // was used.
    pub(crate) edits: Vec<HeaderEdit>,
}

/// One raw change to the status headers (or trailers) a fault sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HeaderEdit {
    /// Replace every value of the header with this one.
    Set(HeaderName, HeaderValue),
    /// Add a value, keeping the ones there (a repeated header).
    Append(HeaderName, HeaderValue),
}

/// Applies `edits` in order.
pub(crate) fn apply_edits(edits: &[HeaderEdit], headers: &mut HeaderMap) {
    for edit in edits {
        match edit {
            HeaderEdit::Set(name, value) => {
                headers.insert(name.clone(), value.clone());
            }
            HeaderEdit::Append(name, value) => {
                headers.append(name.clone(), value.clone());
            }
        }
    }
}

fn header_value(name: &str, value: &[u8]) -> Option<HeaderValue> {
    match HeaderValue::from_bytes(value) {
        Ok(value) => Some(value),
        Err(_) => {
            tracing::warn!(
                header = name,
                "fault header value holds bytes no HTTP/2 header can carry (CR, LF, NUL or DEL); not sent"
            );
            None
        }
    }
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
    ResetAfterMessages {
        messages: usize,
        reason: ResetReason,
    },
}

impl Fault {
    fn new(action: Action) -> Self {
        Fault {
            delay: Duration::ZERO,
            action,
            edits: Vec::new(),
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

    /// Resets the HTTP/2 stream with `reason` before the handler runs and
    /// before any response header: the client sees the reset instead of a
    /// response.
    pub fn reset(reason: ResetReason) -> Self {
        Fault::new(Action::Reset(reason))
    }

    /// Runs the handler, lets its response headers and `messages` of its
    /// response messages through, then resets the HTTP/2 stream with
    /// `reason` instead of sending the trailers: a reset of a committed
    /// call. With `0`, the response has headers and then the reset.
    pub fn reset_after_messages(messages: usize, reason: ResetReason) -> Self {
        Fault::new(Action::ResetAfterMessages { messages, reason })
    }

    /// Answers a Trailers-Only response whose `grpc-status` is `value` as
    /// written, valid or not: `abc`, `99999`, an empty value. The handler
    /// does not run. Combine with [`Fault::with_header`] and the other raw
    /// methods to play a broken or hostile server.
    pub fn raw_status(value: impl AsRef<[u8]>) -> Self {
        Fault::status(Code::Unknown)
            .with_message("injected fault: a raw grpc-status")
            .set_header("grpc-status", value.as_ref())
    }

    /// Like [`Fault::status_after_messages`], with `grpc-status` in the
    /// trailers exactly `value`.
    pub fn raw_status_after_messages(messages: usize, value: impl AsRef<[u8]>) -> Self {
        Fault::status_after_messages(messages, Code::Unknown)
            .with_message("injected fault: a raw grpc-status")
            .set_header("grpc-status", value.as_ref())
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

    /// Sends `grpc-status-details-bin` exactly as `value` (it should be
    /// base64 of a `google.rpc.Status`; anything else tests how a client
    /// copes) with a status fault.
    ///
    /// Like every raw header method it applies to the status headers of
    /// [`Fault::status`] and [`Fault::raw_status`] (Trailers-Only) and to
    /// the trailers of [`Fault::status_after_messages`] and
    /// [`Fault::raw_status_after_messages`]; other faults ignore it. A
    /// value holding bytes no HTTP/2 header can carry (CR, LF, NUL, DEL) is
    /// not sent, with a WARN.
    pub fn with_raw_details(self, value: impl AsRef<[u8]>) -> Self {
        self.set_header("grpc-status-details-bin", value.as_ref())
    }

    /// Sends `grpc-message` exactly as `value`, not percent-encoded
    /// ([`Fault::with_message`] encodes its text as the protocol says):
    /// for a malformed encoding such as `%zz` or bytes that are not UTF-8.
    /// Applies as [`Fault::with_raw_details`] says.
    pub fn with_raw_message(self, value: impl AsRef<[u8]>) -> Self {
        self.set_header("grpc-message", value.as_ref())
    }

    /// Adds a header with a status fault's headers or trailers, after the
    /// ones it sends already: naming one it sends (`grpc-status`,
    /// `grpc-message`, `grpc-retry-pushback-ms`) repeats that header, and
    /// calling it twice sends two values. An invalid name or value is not
    /// sent, with a WARN. Applies as [`Fault::with_raw_details`] says.
    ///
    /// ```
    /// use grpc_fault::Fault;
    /// use tonic::Code;
    ///
    /// // Two grpc-status values that disagree.
    /// let fault = Fault::status(Code::Unavailable).with_header("grpc-status", "0");
    /// # let _ = fault;
    /// ```
    pub fn with_header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::warn!(header = name, "not a valid header name; not sent");
            return self;
        };
        if let Some(value) = header_value(name, value.as_ref()) {
            self.edits.push(HeaderEdit::Append(header, value));
        }
        self
    }

    fn set_header(mut self, name: &'static str, value: &[u8]) -> Self {
        if let Some(value) = header_value(name, value) {
            self.edits
                .push(HeaderEdit::Set(HeaderName::from_static(name), value));
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
                | Action::ResetAfterMessages { .. }
        )
    }

    /// A short name for logs and call records: `pass`, `status`,
    /// `status_after_messages`, `slow_stream`, `lose_response`, `reset`,
    /// `drop_connection`, `reset_after_messages`, `early_status`.
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
            Action::ResetAfterMessages { .. } => "reset_after_messages",
        }
    }
}
