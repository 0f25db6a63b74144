//! Errors and the rejection convention.
//!
//! A layer that fails a call does it from the call's future, never from
//! `poll_ready`: tonic's generated stubs turn a `poll_ready` error into
//! `Unknown: Service was not ready`. The error it returns carries a
//! [`tonic::Status`] in its source chain (usually as its own `source()`), so
//! the stub finds it (tonic walks the chain in `Status::from_error`) and the
//! caller sees the right code: `DEADLINE_EXCEEDED` for a timeout,
//! `UNAVAILABLE` for an open breaker. Each layer keeps its own error type,
//! so an outer layer can still tell them apart by downcasting.
//!
//! Failures without a gRPC status (a reset stream, a broken connection)
//! keep the code gRPC gives them ([`transport_code`]: a stream reset with
//! `CANCEL` is `CANCELLED`, a refused stream or a lost connection is
//! `UNAVAILABLE`, ...) and stay reachable through `source()`.

use std::error::Error;
use std::sync::Arc;

use tonic::{Code, Status};

/// A boxed error, as tower middleware returns.
pub type BoxError = Box<dyn Error + Send + Sync>;

/// The first [`tonic::Status`] in an error's source chain, the error itself
/// included.
pub fn find_status<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a Status> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(status) = err.downcast_ref::<Status>() {
            return Some(status);
        }
        next = err.source();
    }
    None
}

/// The first error of type `E` in an error's source chain, the error itself
/// included.
pub fn find_error<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// A layer refused to send a call (an open circuit breaker, a shed load):
/// the call never left the client, and sending it again at once would be
/// refused again, so retry layers do not retry it.
///
/// Layers put it in their error's source chain, with the status the caller
/// should see as its own source.
#[derive(Debug)]
pub struct LocalRejection {
    status: Status,
}

impl LocalRejection {
    /// A rejection the caller sees as `status`.
    pub fn new(status: Status) -> Self {
        LocalRejection { status }
    }

    /// The status the caller sees.
    pub fn status(&self) -> &Status {
        &self.status
    }
}

impl std::fmt::Display for LocalRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call was rejected before it was sent")
    }
}

impl Error for LocalRejection {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.status)
    }
}

/// A failure below the gRPC layer (a reset stream, a broken connection)
/// that carries no gRPC status, given the status gRPC prescribes for it
/// (see [`transport_code`]).
///
/// Its source chain is: this error, then that [`tonic::Status`] (so a
/// tonic stub finds the code), then the original error (a tonic transport
/// error, then hyper's, then `h2::Error`, as the transport built it). A
/// caller can walk [`Error::source`] from the status its stub returned and
/// downcast to any of them.
#[derive(Debug)]
pub struct TransportError {
    status: Status,
    cause: Arc<dyn Error + Send + Sync + 'static>,
}

impl TransportError {
    /// The original error.
    pub fn cause(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.cause
    }

    /// The status a caller sees for it.
    pub fn status(&self) -> &Status {
        &self.status
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "transport error: {}", self.cause)
    }
}

impl Error for TransportError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.status)
    }
}

/// Gives an error without a [`tonic::Status`] in its chain the status a
/// caller should see ([`error_code`]) as a [`TransportError`], which keeps
/// the original error in its source chain: [`tonic::TimeoutExpired`]
/// (tonic's own `grpc-timeout` enforcement, which tonic's stubs would read
/// as `CANCELLED`) becomes `DEADLINE_EXCEEDED`, anything else its
/// [`transport_code`]. Errors that have a status, and connect errors (which
/// tonic's stubs map to `UNAVAILABLE` themselves), pass unchanged.
pub fn with_transport_status(err: BoxError) -> BoxError {
    if find_status(&*err).is_some() || find_error::<tonic::ConnectError>(&*err).is_some() {
        return err;
    }
    let timeout = find_error::<tonic::TimeoutExpired>(&*err).is_some();
    let code = if timeout {
        Code::DeadlineExceeded
    } else {
        transport_code(&*err)
    };
    let cause: Arc<dyn Error + Send + Sync + 'static> = Arc::from(err);
    let message = if timeout {
        format!("deadline exceeded: {cause}")
    } else {
        format!("transport error: {cause}")
    };
    let mut status = Status::new(code, message);
    status.set_source(cause.clone());
    Box::new(TransportError { status, cause })
}

/// [`with_transport_status`] on an error kept in place (in a result that
/// is not moved: a response beside it would be copied with it).
pub fn set_transport_status(err: &mut BoxError) {
    if find_status(&**err).is_some() || find_error::<tonic::ConnectError>(&**err).is_some() {
        return;
    }
    replace_error(err, with_transport_status);
}

/// Replaces the error kept in place at `err` with `f` of it.
pub fn replace_error(err: &mut BoxError, f: impl FnOnce(BoxError) -> BoxError) {
    // A zero-sized stand-in: boxing it allocates nothing.
    let taken = std::mem::replace(err, Box::new(Taken));
    *err = f(taken);
}

/// Stands in, for a moment, for an error being replaced.
#[derive(Debug)]
struct Taken;

impl std::fmt::Display for Taken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("error taken")
    }
}

impl Error for Taken {}

/// The gRPC code of a failure that carries no gRPC status, as gRPC's HTTP/2
/// protocol spec, grpc-core and tonic map it.
///
/// A stream reset (`RST_STREAM`, found as an `h2::Error` anywhere in the
/// source chain) maps by its reason:
///
/// | HTTP/2 reason | code |
/// |---|---|
/// | `CANCEL` | `CANCELLED` |
/// | `REFUSED_STREAM` | `UNAVAILABLE` (the server never processed the call) |
/// | `ENHANCE_YOUR_CALM` | `RESOURCE_EXHAUSTED` |
/// | `INADEQUATE_SECURITY` | `PERMISSION_DENIED` |
/// | `NO_ERROR`, `PROTOCOL_ERROR`, `INTERNAL_ERROR`, `FLOW_CONTROL_ERROR`, `SETTINGS_TIMEOUT`, `FRAME_SIZE_ERROR`, `COMPRESSION_ERROR`, `CONNECT_ERROR` | `INTERNAL` |
/// | `STREAM_CLOSED`, `HTTP_1_1_REQUIRED`, any other | `UNKNOWN` |
///
/// A graceful `GOAWAY` from the server (`NO_ERROR`) is `UNAVAILABLE`: the
/// streams it names were never processed. Every other failure (a refused or
/// broken connection, an I/O error, an h2 error without a reason) is a
/// connection failure: `UNAVAILABLE`.
///
/// This is the table of tonic's `Status::from_error`, which only applies it
/// when tonic is built with its `server` feature (a client-only build reads
/// every reset as `UNKNOWN`); here it holds in every build. One difference:
/// hyper's "canceled" error (the connection went away before the request
/// was sent) reads `CANCELLED` in tonic; here, as in grpc-core, it is a
/// connection failure, `UNAVAILABLE`, since the caller cancelled nothing.
///
/// Errors this crate cannot recognize are connection failures too,
/// `UNAVAILABLE`: that is what lets a retry layer retry the I/O and hyper
/// errors a broken connection surfaces as, transparently. This includes
/// errors of tower layers placed *below* a retry or a stub (tower's timeout
/// `Elapsed`, load shedding's `Overloaded`): this crate does not depend on
/// tower to tell them apart. Place a timeout above the retry layer (or use
/// this workspace's deadline layer, whose errors carry a status) to have
/// `DEADLINE_EXCEEDED`.
pub fn transport_code(err: &(dyn Error + 'static)) -> Code {
    match find_error::<h2::Error>(err) {
        Some(h2) => h2_code(h2),
        None => Code::Unavailable,
    }
}

fn h2_code(err: &h2::Error) -> Code {
    use h2::Reason;
    let Some(reason) = err.reason() else {
        return Code::Unavailable;
    };
    if err.is_go_away() && err.is_remote() && reason == Reason::NO_ERROR {
        return Code::Unavailable;
    }
    match reason {
        Reason::NO_ERROR
        | Reason::PROTOCOL_ERROR
        | Reason::INTERNAL_ERROR
        | Reason::FLOW_CONTROL_ERROR
        | Reason::SETTINGS_TIMEOUT
        | Reason::FRAME_SIZE_ERROR
        | Reason::COMPRESSION_ERROR
        | Reason::CONNECT_ERROR => Code::Internal,
        Reason::REFUSED_STREAM => Code::Unavailable,
        Reason::CANCEL => Code::Cancelled,
        Reason::ENHANCE_YOUR_CALM => Code::ResourceExhausted,
        Reason::INADEQUATE_SECURITY => Code::PermissionDenied,
        _ => Code::Unknown,
    }
}

/// The gRPC code a failed call's caller sees for this error.
///
/// The code of the first [`tonic::Status`] in the chain.
/// [`tonic::TimeoutExpired`] (tonic's own enforcement of `grpc-timeout`)
/// is `DEADLINE_EXCEEDED`. Any other error comes from the transport below
/// the stub and gets its [`transport_code`]: a stream reset by its HTTP/2
/// reason (`CANCEL` is `CANCELLED`, ...), a connection failure
/// `UNAVAILABLE`.
pub fn error_code(err: &(dyn Error + 'static)) -> Code {
    if let Some(status) = find_status(err) {
        return status.code();
    }
    if find_error::<tonic::TimeoutExpired>(err).is_some() {
        return Code::DeadlineExceeded;
    }
    transport_code(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;

    #[derive(Debug)]
    struct Wrapper(Status);
    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn finds_status_through_the_chain() {
        let err: BoxError = Box::new(Wrapper(Status::deadline_exceeded("late")));
        assert_eq!(error_code(&*err), Code::DeadlineExceeded);
        assert!(find_error::<Wrapper>(&*err).is_some());
        // tonic finds the same status, so a stub's caller sees this code.
        assert_eq!(Status::from_error(err).code(), Code::DeadlineExceeded);
    }

    #[test]
    fn tonic_timeouts_are_deadline_exceeded() {
        let err: BoxError = Box::new(tonic::TimeoutExpired(()));
        assert_eq!(error_code(&*err), Code::DeadlineExceeded);
    }

    #[test]
    fn a_tonic_timeout_reaches_the_caller_as_deadline_exceeded() {
        // tonic's stubs read a bare TimeoutExpired as CANCELLED: given a
        // status here, the caller sees what `error_code` says.
        let err = with_transport_status(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(error_code(&*err), Code::DeadlineExceeded);
        assert!(
            find_error::<tonic::TimeoutExpired>(&*err).is_some(),
            "the cause is in the chain"
        );
        let status = Status::from_error(err);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }

    #[test]
    fn the_status_is_set_in_place_as_with_transport_status_gives_it() {
        // A tonic timeout: replaced by its status, the cause kept.
        let mut err: BoxError = Box::new(tonic::TimeoutExpired(()));
        set_transport_status(&mut err);
        assert_eq!(error_code(&*err), Code::DeadlineExceeded);
        assert!(find_status(&*err).is_some());
        assert!(find_error::<tonic::TimeoutExpired>(&*err).is_some());
        // An error with a status is left as it is, not rewrapped.
        let mut err: BoxError = Box::new(Wrapper(Status::not_found("gone")));
        let before: *const (dyn Error + Send + Sync) = &*err;
        set_transport_status(&mut err);
        assert!(std::ptr::eq(before, &*err));
        assert!(err.downcast_ref::<Wrapper>().is_some());
        // `replace_error` hands over the error it replaces.
        let mut err: BoxError = "first".into();
        replace_error(&mut err, |old| format!("{old}, then second").into());
        assert_eq!(err.to_string(), "first, then second");
    }

    #[test]
    fn transport_errors_get_an_unavailable_status() {
        let err = with_transport_status(Box::new(std::io::Error::other("connection reset")));
        let transport = err.downcast_ref::<TransportError>().unwrap();
        assert_eq!(transport.cause().to_string(), "connection reset");
        assert!(
            find_error::<std::io::Error>(&*err).is_some(),
            "the cause is in the chain"
        );
        let status = Status::from_error(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "transport error: connection reset");
        let kept = with_transport_status(Box::new(Status::not_found("x")));
        assert_eq!(Status::from_error(kept).code(), Code::NotFound);
    }

    /// An error holding an `h2::Error` as its source, as hyper's does.
    #[derive(Debug)]
    struct Hyperish(h2::Error);
    impl fmt::Display for Hyperish {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("http2 error")
        }
    }
    impl Error for Hyperish {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    const REASONS: [(h2::Reason, Code); 14] = [
        (h2::Reason::NO_ERROR, Code::Internal),
        (h2::Reason::PROTOCOL_ERROR, Code::Internal),
        (h2::Reason::INTERNAL_ERROR, Code::Internal),
        (h2::Reason::FLOW_CONTROL_ERROR, Code::Internal),
        (h2::Reason::SETTINGS_TIMEOUT, Code::Internal),
        (h2::Reason::STREAM_CLOSED, Code::Unknown),
        (h2::Reason::FRAME_SIZE_ERROR, Code::Internal),
        (h2::Reason::REFUSED_STREAM, Code::Unavailable),
        (h2::Reason::CANCEL, Code::Cancelled),
        (h2::Reason::COMPRESSION_ERROR, Code::Internal),
        (h2::Reason::CONNECT_ERROR, Code::Internal),
        (h2::Reason::ENHANCE_YOUR_CALM, Code::ResourceExhausted),
        (h2::Reason::INADEQUATE_SECURITY, Code::PermissionDenied),
        (h2::Reason::HTTP_1_1_REQUIRED, Code::Unknown),
    ];

    #[test]
    fn stream_resets_keep_the_code_of_their_reason() {
        for (reason, code) in REASONS {
            let err: BoxError = Box::new(Hyperish(h2::Error::from(reason)));
            assert_eq!(error_code(&*err), code, "{reason:?}");
            assert_eq!(transport_code(&*err), code, "{reason:?}");
            let err = with_transport_status(err);
            assert_eq!(error_code(&*err), code, "{reason:?}");
            assert_eq!(
                err.downcast_ref::<TransportError>()
                    .unwrap()
                    .status()
                    .code(),
                code
            );
            // What the stub's caller gets: the code, and the h2 error one
            // walk down the source chain.
            let status = Status::from_error(err);
            assert_eq!(status.code(), code, "{reason:?}");
            let h2 = find_error::<h2::Error>(&status).expect("the h2 error is kept");
            assert_eq!(h2.reason(), Some(reason));
            assert!(find_error::<Hyperish>(&status).is_some());
        }
        // Outside a known reason: UNKNOWN, as tonic reads it.
        let err: BoxError = Box::new(Hyperish(h2::Error::from(h2::Reason::from(0x99))));
        assert_eq!(error_code(&*err), Code::Unknown);
    }

    /// A stream above the last stream id of the server's graceful GOAWAY
    /// was never processed: UNAVAILABLE (transparently retryable), not the
    /// INTERNAL a `NO_ERROR` stream reset reads as.
    #[tokio::test]
    async fn a_graceful_goaway_is_unavailable() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (client_io, mut server_io) = tokio::io::duplex(64 * 1024);
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .uri("http://catalog/a.B/C")
            .body(())
            .unwrap();
        let (response, _body) = client.send_request(request, true).unwrap();
        // A server by hand: empty SETTINGS, then GOAWAY(last stream 0,
        // NO_ERROR), as a server shutting down before it took stream 1.
        let mut preface = [0u8; 24];
        server_io.read_exact(&mut preface).await.unwrap();
        server_io
            .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .unwrap();
        let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        server_io.write_all(&goaway).await.unwrap();
        let h2 = response.await.unwrap_err();
        assert!(h2.is_go_away() && h2.is_remote(), "{h2:?}");
        let err: BoxError = Box::new(Hyperish(h2));
        assert_eq!(error_code(&*err), Code::Unavailable);
        let status = Status::from_error(with_transport_status(err));
        assert_eq!(status.code(), Code::Unavailable);
        // The same reason on a stream reset is a protocol violation.
        let reset: BoxError = Box::new(Hyperish(h2::Error::from(h2::Reason::NO_ERROR)));
        assert_eq!(error_code(&*reset), Code::Internal);
    }

    #[test]
    fn errors_without_status_are_unavailable() {
        let err: BoxError = Box::new(std::io::Error::other("connection reset"));
        assert_eq!(error_code(&*err), Code::Unavailable);
        assert!(find_status(&*err).is_none());
    }
}
