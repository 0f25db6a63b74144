//! gRPC metadata (HTTP/2 headers) as OpenTelemetry propagation carriers.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector};

/// Writes a propagator's fields into request headers; a field that is not
/// a valid header name or value is skipped.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            // A retried request carries the head of the first attempt:
            // each attempt's own context replaces it.
            self.0.insert(name, value);
        }
    }
}

/// Reads a propagator's fields from request headers; a value that is not
/// visible ASCII reads as absent.
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injector_replaces_and_skips_invalid() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static("old"));
        let mut injector = HeaderInjector(&mut headers);
        injector.set("traceparent", "new".to_owned());
        injector.set("bad name", "x".to_owned());
        injector.set("tracestate", "a\nb".to_owned());
        assert_eq!(headers.get_all("traceparent").iter().count(), 1);
        assert_eq!(headers["traceparent"], "new");
        assert_eq!(headers.len(), 1);
    }

    #[test]
    fn extractor_reads_ascii_only() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static("v"));
        headers.insert("tracestate", HeaderValue::from_bytes(b"\xff").unwrap());
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("traceparent"), Some("v"));
        assert_eq!(extractor.get("tracestate"), None);
        assert_eq!(extractor.get("missing"), None);
        let mut keys = extractor.keys();
        keys.sort_unstable();
        assert_eq!(keys, ["traceparent", "tracestate"]);
    }
}
