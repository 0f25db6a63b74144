//! Whether and when an attempt is retried.

use std::error::Error;
use std::time::Duration;

use grpc_resilience_core::error::{LocalRejection, error_code, find_error};
use grpc_resilience_core::{classify_head, headers};
use http::HeaderMap;
use tonic::Code;

/// The server's pushback, from `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushback {
    /// No header.
    None,
    /// Retry after exactly this long.
    After(Duration),
    /// Negative, malformed or repeated: the server says do not retry.
    DoNotRetry,
}

pub(crate) const PUSHBACK: http::HeaderName =
    http::HeaderName::from_static("grpc-retry-pushback-ms");

/// Reads `grpc-retry-pushback-ms`: a valid value is a non-negative integer
/// of milliseconds; anything else (a sign, text, a second value) means "do
/// not retry".
pub(crate) fn pushback(headers: &HeaderMap) -> Pushback {
    if headers::get(headers, &PUSHBACK).is_none() {
        return Pushback::None;
    }
    let mut values = headers.get_all(&PUSHBACK).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Pushback::DoNotRetry;
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 12 || !bytes.iter().all(u8::is_ascii_digit) {
        return Pushback::DoNotRetry;
    }
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Pushback::DoNotRetry, |ms| {
            Pushback::After(Duration::from_millis(ms))
        })
}

/// How an attempt ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Response headers arrived: the call is committed, never retried; its
    /// status comes in the trailers.
    Committed,
    /// A Trailers-Only response with OK: done, and a success.
    Succeeded,
    /// A failure before any response header: a Trailers-Only error or a
    /// transport error.
    Failed {
        code: Code,
        pushback: Pushback,
        /// The server provably never saw the call.
        never_processed: bool,
    },
    /// Refused by a layer below (an open breaker): not retried.
    Rejected,
}

/// Whether the server answered the attempt completely in its response head
/// (Trailers-Only): such an answer stands even if the attempt's request
/// body failed afterwards.
pub(crate) fn answered<B>(
    result: &Result<http::Response<B>, grpc_resilience_core::BoxError>,
) -> bool {
    result
        .as_ref()
        .is_ok_and(|response| classify_head(response.status(), response.headers()).is_some())
}

/// Classifies an attempt's result.
pub(crate) fn ended<B>(
    result: &Result<http::Response<B>, grpc_resilience_core::BoxError>,
) -> Ended {
    match result {
        Ok(response) => match classify_head(response.status(), response.headers()) {
            None => Ended::Committed,
            Some(outcome) if outcome.is_ok() => Ended::Succeeded,
            Some(outcome) => Ended::Failed {
                code: outcome.code(),
                pushback: pushback(response.headers()),
                never_processed: false,
            },
        },
        Err(err) => {
            if find_error::<LocalRejection>(&**err).is_some() {
                return Ended::Rejected;
            }
            Ended::Failed {
                code: error_code(&**err),
                pushback: Pushback::None,
                never_processed: never_processed(&**err),
            }
        }
    }
}

/// Whether the server provably never processed the call: the connection
/// could not be made, the server reset the stream with `REFUSED_STREAM`,
/// or it was above the last stream of a graceful `GOAWAY`. A `GOAWAY`
/// whose reason is `REFUSED_STREAM` does not count: h2 gives its reason to
/// every stream it fails, processed ones too.
pub(crate) fn never_processed(err: &(dyn Error + 'static)) -> bool {
    if find_error::<tonic::ConnectError>(err).is_some() {
        return true;
    }
    match find_error::<h2::Error>(err) {
        Some(h2) => {
            (h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(PUSHBACK, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn pushback_values() {
        assert_eq!(pushback(&headers(&[])), Pushback::None);
        assert_eq!(pushback(&headers(&["0"])), Pushback::After(Duration::ZERO));
        assert_eq!(
            pushback(&headers(&["250"])),
            Pushback::After(Duration::from_millis(250))
        );
        for bad in [
            &["-1"][..],
            &["1.5"],
            &["ten"],
            &[""],
            &["+5"],
            &["1", "2"],
            &["9999999999999"],
        ] {
            assert_eq!(pushback(&headers(bad)), Pushback::DoNotRetry, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn refused_streams_and_connect_errors_were_never_processed() {
        let refused: grpc_resilience_core::BoxError =
            Box::new(crate::test_h2::remote_reset(h2::Reason::REFUSED_STREAM).await);
        assert!(never_processed(&*refused));
        let reset: grpc_resilience_core::BoxError =
            Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert!(!never_processed(&*reset));
        let io: grpc_resilience_core::BoxError = Box::new(std::io::Error::other("reset by peer"));
        assert!(!never_processed(&*io));
    }

    #[tokio::test]
    async fn only_a_stream_the_server_refused_was_never_processed() {
        use crate::test_h2::{remote_go_away, remote_reset};
        use h2::Reason;

        let refused: grpc_resilience_core::BoxError =
            Box::new(remote_reset(Reason::REFUSED_STREAM).await);
        assert!(never_processed(&*refused), "RST_STREAM(REFUSED_STREAM)");
        // h2 gives a GOAWAY's reason to every stream it fails, processed
        // ones too (when the connection then closes): the error alone does
        // not say whether the server took the stream.
        let go_away: grpc_resilience_core::BoxError =
            Box::new(remote_go_away(0, Reason::REFUSED_STREAM).await);
        assert!(!never_processed(&*go_away), "GOAWAY(REFUSED_STREAM)");
        // A graceful GOAWAY above the stream: never processed.
        let graceful: grpc_resilience_core::BoxError =
            Box::new(remote_go_away(0, Reason::NO_ERROR).await);
        assert!(never_processed(&*graceful), "GOAWAY(0, NO_ERROR)");
        // A reason this side made up is not the server's word.
        let local: grpc_resilience_core::BoxError =
            Box::new(h2::Error::from(Reason::REFUSED_STREAM));
        assert!(!never_processed(&*local));
    }

    #[test]
    fn rejections_and_commits() {
        let rejected: Result<http::Response<()>, grpc_resilience_core::BoxError> = Err(Box::new(
            LocalRejection::new(tonic::Status::unavailable("breaker open")),
        ));
        assert_eq!(ended(&rejected), Ended::Rejected);
        let committed: Result<http::Response<()>, grpc_resilience_core::BoxError> =
            Ok(http::Response::new(()));
        assert_eq!(ended(&committed), Ended::Committed);
        let mut trailers_only = http::Response::new(());
        trailers_only
            .headers_mut()
            .insert("grpc-status", "14".parse().unwrap());
        trailers_only
            .headers_mut()
            .insert(PUSHBACK, "30".parse().unwrap());
        assert_eq!(
            ended(&Ok::<_, grpc_resilience_core::BoxError>(trailers_only)),
            Ended::Failed {
                code: Code::Unavailable,
                pushback: Pushback::After(Duration::from_millis(30)),
                never_processed: false
            }
        );
    }
}
