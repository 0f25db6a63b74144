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

use std::error::Error;

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

/// A failure below the gRPC layer (a reset connection, a broken pipe) that
/// carries no status: callers see it as `UNAVAILABLE`, as gRPC's spec
/// says of transport failures, with the cause in the message. The cause
/// itself is kept.
#[derive(Debug)]
pub struct TransportError {
    status: Status,
    cause: BoxError,
}

impl TransportError {
    /// The cause.
    pub fn cause(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.cause
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
/// caller should see, `UNAVAILABLE` (see [`TransportError`]); errors that
/// have one (and tonic's own timeouts and connect errors, which tonic maps)
/// pass unchanged.
pub fn with_transport_status(err: BoxError) -> BoxError {
    if find_status(&*err).is_some()
        || find_error::<tonic::TimeoutExpired>(&*err).is_some()
        || find_error::<tonic::ConnectError>(&*err).is_some()
    {
        return err;
    }
    let status = Status::unavailable(format!("transport error: {err}"));
    Box::new(TransportError { status, cause: err })
}

/// The gRPC code a failed call's caller sees for this error.
///
/// The code of the first [`tonic::Status`] in the chain.
/// [`tonic::TimeoutExpired`] (tonic's own enforcement of `grpc-timeout`)
/// is `DEADLINE_EXCEEDED`. Any other error comes from the transport below
/// the stub (refused connection, reset stream, broken pipe), which gRPC
/// clients report as `UNAVAILABLE`.
pub fn error_code(err: &(dyn Error + 'static)) -> Code {
    if let Some(status) = find_status(err) {
        return status.code();
    }
    if find_error::<tonic::TimeoutExpired>(err).is_some() {
        return Code::DeadlineExceeded;
    }
    Code::Unavailable
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
    fn transport_errors_get_an_unavailable_status() {
        let err = with_transport_status(Box::new(std::io::Error::other("connection reset")));
        let transport = err.downcast_ref::<TransportError>().unwrap();
        assert_eq!(transport.cause().to_string(), "connection reset");
        let status = Status::from_error(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "transport error: connection reset");
        let kept = with_transport_status(Box::new(Status::not_found("x")));
        assert_eq!(Status::from_error(kept).code(), Code::NotFound);
    }

    #[test]
    fn errors_without_status_are_unavailable() {
        let err: BoxError = Box::new(std::io::Error::other("connection reset"));
        assert_eq!(error_code(&*err), Code::Unavailable);
        assert!(find_status(&*err).is_none());
    }
}
