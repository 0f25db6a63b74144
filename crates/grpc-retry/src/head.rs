//! The request head a retried call keeps to build its next attempt.
//!
//! A retry needs the original head only if it happens, yet the first
//! attempt consumes the request. Copying the whole `HeaderMap` and
//! extension map up front costs two allocations for the headers and three
//! more for the `tonic::GrpcMethod` extension a generated stub adds, on
//! every call. So the head keeps, without allocating:
//!
//! * the two headers every generated stub sends, `te: trailers` and
//!   `content-type: application/grpc`, as two flags, and up to
//!   [`INLINE_HEADERS`] other header pairs inline (a `HeaderValue` clone
//!   is a `Bytes` clone: free for static values, a reference count
//!   otherwise), `grpc-timeout` left out when the call has a deadline
//!   (every attempt writes its own); more headers are kept as a map. The
//!   head lives in the call's future, which is moved several times per
//!   call, so each slot it does not need is bytes not copied;
//! * the `tonic::GrpcMethod` extension a generated stub adds, when it is
//!   all the request holds besides a [`CallDeadline`] (each attempt records
//!   the call's deadline itself). A request holding any other extension (a
//!   `RetryOverride`, say) keeps a clone of its whole map, so nothing a
//!   layer below reads is ever lost on a retry.

use grpc_resilience_core::CallDeadline;
use grpc_resilience_core::timeout_header::GRPC_TIMEOUT;
use http::header::{CONTENT_TYPE, TE};
use http::{Extensions, HeaderMap, HeaderName, HeaderValue};

/// How many header values, besides a stub's `te` and `content-type`, a
/// head keeps inline before it keeps a map.
pub(crate) const INLINE_HEADERS: usize = 2;

/// The `content-type` a tonic stub sends.
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// A request's head, kept to build the next attempt.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) version: http::Version,
    headers: Headers,
    extensions: Carried,
}

#[derive(Debug)]
enum Headers {
    /// Every header value: `te: trailers` and `content-type:
    /// application/grpc` (once each) as flags, the others in the map's
    /// order.
    Inline {
        te_trailers: bool,
        grpc_content_type: bool,
        pairs: [Option<(HeaderName, HeaderValue)>; INLINE_HEADERS],
    },
    Map(HeaderMap),
}

/// The extensions a retried attempt carries.
#[derive(Debug)]
enum Carried {
    /// The request held no extension but these (and perhaps a
    /// `CallDeadline`, which each attempt records itself).
    Known {
        grpc_method: Option<tonic::GrpcMethod<'static>>,
    },
    /// A clone of the whole map.
    Map(Extensions),
}

impl Head {
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        Self::of(&http::Request::new(()).into_parts().0, false)
    }

    /// The head of `parts`. With `has_deadline`, `grpc-timeout` is left
    /// out: every attempt writes the time left when it is sent.
    #[inline(always)]
    pub(crate) fn of(parts: &http::request::Parts, has_deadline: bool) -> Self {
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: Headers::of(&parts.headers, has_deadline),
            extensions: Carried::of(&parts.extensions),
        }
    }

    /// The headers for the next attempt.
    pub(crate) fn headers(&self) -> HeaderMap {
        match &self.headers {
            Headers::Map(map) => map.clone(),
            Headers::Inline {
                te_trailers,
                grpc_content_type,
                pairs,
            } => {
                // Room for what each attempt adds (`grpc-timeout`,
                // `grpc-previous-rpc-attempts`).
                let mut map = HeaderMap::with_capacity(INLINE_HEADERS + 4);
                if *te_trailers {
                    map.append(TE, HeaderValue::from_static("trailers"));
                }
                if *grpc_content_type {
                    map.append(CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
                }
                for (name, value) in pairs.iter().flatten() {
                    map.append(name.clone(), value.clone());
                }
                map
            }
        }
    }

    /// The extensions for the next attempt.
    pub(crate) fn extensions(&self) -> Extensions {
        match &self.extensions {
            Carried::Map(map) => map.clone(),
            Carried::Known { grpc_method } => {
                let mut map = Extensions::new();
                if let Some(m) = grpc_method {
                    map.insert(m.clone());
                }
                map
            }
        }
    }
}

impl Headers {
    // Filled where it is returned (one value, no early return), so the
    // inline pairs are not built aside and copied in.
    #[inline(always)]
    fn of(headers: &HeaderMap, has_deadline: bool) -> Self {
        let mut kept = Headers::Inline {
            te_trailers: false,
            grpc_content_type: false,
            pairs: Default::default(),
        };
        let mut overflow = false;
        if let Headers::Inline {
            te_trailers,
            grpc_content_type,
            pairs,
        } = &mut kept
        {
            let mut slots = pairs.iter_mut();
            for (name, value) in headers {
                if has_deadline && name == GRPC_TIMEOUT {
                    continue;
                }
                // A flag stands for one plain value: a repeated header
                // keeps its later values in slots, a sensitive one its mark.
                let plain = !value.is_sensitive();
                if name == TE && !*te_trailers && plain && value == "trailers" {
                    *te_trailers = true;
                    continue;
                }
                if name == CONTENT_TYPE
                    && !*grpc_content_type
                    && plain
                    && value == GRPC_CONTENT_TYPE
                {
                    *grpc_content_type = true;
                    continue;
                }
                let Some(slot) = slots.next() else {
                    overflow = true;
                    break;
                };
                *slot = Some((name.clone(), value.clone()));
            }
        }
        if overflow {
            // Too many to keep inline.
            let mut map = headers.clone();
            if has_deadline {
                map.remove(GRPC_TIMEOUT);
            }
            kept = Headers::Map(map);
        }
        kept
    }
}

impl Carried {
    fn of(extensions: &Extensions) -> Self {
        let grpc_method = extensions.get::<tonic::GrpcMethod<'static>>();
        let known = usize::from(grpc_method.is_some())
            + usize::from(extensions.get::<CallDeadline>().is_some());
        if extensions.len() != known {
            return Carried::Map(extensions.clone());
        }
        Carried::Known {
            grpc_method: grpc_method.cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct Custom(u32);

    fn parts(headers: &[(&'static str, &'static str)]) -> http::request::Parts {
        let mut request = http::Request::new(());
        for (name, value) in headers {
            request.headers_mut().append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        request.into_parts().0
    }

    #[test]
    fn a_few_headers_are_kept_in_order_with_repeated_values() {
        let parts = parts(&[("te", "trailers"), ("x-a", "1"), ("x-a", "2")]);
        let head = Head::of(&parts, false);
        assert!(matches!(head.headers, Headers::Inline { .. }));
        assert_eq!(head.headers(), parts.headers);
    }

    #[test]
    fn a_stubs_fixed_headers_leave_the_slots_to_its_metadata() {
        // What a generated stub sends, with two metadata entries of its
        // caller: nothing needs a map.
        let parts = parts(&[
            ("x-a", "1"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("x-b", "2"),
            ("grpc-timeout", "1S"),
        ]);
        let head = Head::of(&parts, true);
        assert!(matches!(head.headers, Headers::Inline { .. }));
        let headers = head.headers();
        assert_eq!(headers.len(), 4);
        assert_eq!(headers["te"], "trailers");
        assert_eq!(headers["content-type"], "application/grpc");
        assert_eq!(headers["x-a"], "1");
        assert_eq!(headers["x-b"], "2");
    }

    #[test]
    fn other_values_of_the_fixed_headers_are_kept_as_they_came() {
        for pairs in [
            &[("content-type", "application/grpc+proto"), ("x-a", "1")][..],
            &[("te", "trailers"), ("te", "trailers"), ("x-a", "1")],
            &[("te", "deflate"), ("content-type", "application/grpc")],
            &[
                ("content-type", "application/grpc"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        ] {
            let parts = parts(pairs);
            let head = Head::of(&parts, false);
            assert!(matches!(head.headers, Headers::Inline { .. }), "{pairs:?}");
            assert_eq!(head.headers(), parts.headers, "{pairs:?}");
        }
        // A value marked sensitive stays so.
        let mut parts = parts(&[("x-a", "1")]);
        let mut te = HeaderValue::from_static("trailers");
        te.set_sensitive(true);
        parts.headers.append("te", te);
        let headers = Head::of(&parts, false).headers();
        assert!(headers["te"].is_sensitive());
    }

    #[test]
    fn grpc_timeout_is_left_out_when_each_attempt_writes_it() {
        let parts = parts(&[("te", "trailers"), ("grpc-timeout", "1S"), ("x-a", "1")]);
        let headers = Head::of(&parts, true).headers();
        assert!(!headers.contains_key(GRPC_TIMEOUT));
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["x-a"], "1");
    }

    #[test]
    fn many_headers_are_kept_as_a_map() {
        let parts = parts(&[
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
            ("grpc-timeout", "1S"),
        ]);
        let head = Head::of(&parts, false);
        assert!(matches!(head.headers, Headers::Map(_)));
        assert_eq!(head.headers(), parts.headers);
        let with_deadline = Head::of(&parts, true);
        assert!(matches!(with_deadline.headers, Headers::Map(_)));
        let without = with_deadline.headers();
        assert_eq!(without.len(), 5);
        assert!(!without.contains_key(GRPC_TIMEOUT));
    }

    #[test]
    fn the_extensions_a_stub_sends_are_carried_without_the_map() {
        let mut parts = parts(&[]);
        parts.extensions.insert(tonic::GrpcMethod::new(
            "catalog.v1.QueryService",
            "GetProduct",
        ));
        parts.extensions.insert(CallDeadline::at(
            tokio::time::Instant::now() + std::time::Duration::from_secs(1),
        ));
        let head = Head::of(&parts, true);
        assert!(matches!(head.extensions, Carried::Known { .. }));
        let carried = head.extensions();
        let method = carried
            .get::<tonic::GrpcMethod<'static>>()
            .expect("the method");
        assert_eq!(method.service(), "catalog.v1.QueryService");
        assert_eq!(method.method(), "GetProduct");
        // Each attempt records the call's deadline itself.
        assert_eq!(carried.len(), 1);
    }

    #[test]
    fn any_other_extension_keeps_the_whole_map() {
        let mut parts = parts(&[]);
        parts.extensions.insert(tonic::GrpcMethod::new(
            "catalog.v1.QueryService",
            "GetProduct",
        ));
        parts.extensions.insert(Custom(7));
        parts
            .extensions
            .insert(crate::RetryOverride::default().with_max_attempts(2));
        let head = Head::of(&parts, false);
        assert!(matches!(head.extensions, Carried::Map(_)));
        let carried = head.extensions();
        assert_eq!(carried.get::<Custom>(), Some(&Custom(7)));
        assert_eq!(
            carried.get::<crate::RetryOverride>(),
            parts.extensions.get::<crate::RetryOverride>()
        );
        assert!(carried.get::<tonic::GrpcMethod<'static>>().is_some());
    }
}
