//! Header lookups tuned for the small maps gRPC calls carry.

use http::{HeaderMap, HeaderName, HeaderValue};

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

#[cfg(test)]
mod tests {
    use super::*;
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
