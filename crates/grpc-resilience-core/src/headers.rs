//! Header lookups tuned for the small maps gRPC calls carry, and the guard
//! that keeps a hostile status header away from tonic.

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use http::{HeaderMap, HeaderName, HeaderValue};

/// The `grpc-status-details-bin` header name.
pub const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// Base64 as tonic decodes status details: the standard alphabet, padding
/// optional.
const DETAILS_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Maps up to this size are scanned instead of hashed.
const SCAN_UP_TO: usize = 8;

/// The first value of header `name`, as `HeaderMap::get` returns it.
///
/// gRPC requests and trailers hold a handful of headers, and the names a
/// layer looks for (`grpc-status`, `grpc-timeout`) are not standard HTTP
/// names, whose hash `HeaderMap` must compute byte by byte. A short linear
/// scan compares each entry's name once: the standard names differ at
/// once, the others by length or by a short byte comparison.
#[inline]
pub fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    if headers.len() <= SCAN_UP_TO {
        headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    } else {
        headers.get(name)
    }
}

/// Removes a `grpc-status-details-bin` header that is not valid base64,
/// returning whether it did.
///
/// tonic 0.14 decodes this header with an `expect`: a server (or anything
/// on the path) that sends invalid base64 there panics the task reading the
/// response. Every layer that hands a response head or trailers on to tonic
/// calls this first, so no peer can panic a client through this library.
/// The status code and message are kept; only the undecodable details go,
/// with a WARN naming the header.
pub fn sanitize_status_details(headers: &mut HeaderMap) -> bool {
    let Some(value) = get(headers, &GRPC_STATUS_DETAILS) else {
        return false;
    };
    if DETAILS_BASE64.decode(value.as_bytes()).is_ok() {
        return false;
    }
    tracing::warn!(
        header = "grpc-status-details-bin",
        len = value.len(),
        "dropping a grpc-status-details-bin header that is not valid base64"
    );
    headers.remove(GRPC_STATUS_DETAILS);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_keeps_valid_details_and_drops_invalid_ones() {
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", HeaderValue::from_static("14"));
        ok.insert(
            GRPC_STATUS_DETAILS,
            HeaderValue::from_static("CAUSBWhlbGxv"),
        );
        assert!(!sanitize_status_details(&mut ok));
        assert_eq!(ok[GRPC_STATUS_DETAILS], "CAUSBWhlbGxv");
        // Unpadded is what tonic sends.
        ok.insert(GRPC_STATUS_DETAILS, HeaderValue::from_static("aGk"));
        assert!(!sanitize_status_details(&mut ok));
        assert!(tonic::Status::from_header_map(&ok).is_some());

        let mut bad = HeaderMap::new();
        bad.insert("grpc-status", HeaderValue::from_static("14"));
        bad.insert(GRPC_STATUS_DETAILS, HeaderValue::from_static("not base64!"));
        assert!(sanitize_status_details(&mut bad));
        assert!(bad.get(GRPC_STATUS_DETAILS).is_none());
        assert_eq!(bad["grpc-status"], "14");
        // What tonic would have panicked on now reads as the server's code.
        let status = tonic::Status::from_header_map(&bad).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn agrees_with_header_map_get(
            names in proptest::collection::vec(prop_oneof![
                Just("grpc-status"), Just("grpc-timeout"), Just("content-type"), Just("te"), Just("x-a"), Just("grpc-message"),
            ], 0..14),
            wanted in prop_oneof![Just("grpc-status"), Just("grpc-timeout"), Just("te"), Just("x-b")],
        ) {
            let mut map = HeaderMap::new();
            for (i, n) in names.iter().enumerate() {
                map.append(*n, HeaderValue::from(i));
            }
            let wanted = HeaderName::from_static(wanted);
            prop_assert_eq!(get(&map, &wanted), map.get(&wanted));
        }
    }
}
