//! The request head a retried call keeps to build its next attempt.

/// A request's head, kept to build the next attempt.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) version: http::Version,
    pub(crate) headers: http::HeaderMap,
    pub(crate) extensions: http::Extensions,
}

impl Head {
    #[cfg(test)]
    pub(crate) fn empty() -> Self {
        Self::of(&http::Request::new(()).into_parts().0)
    }

    pub(crate) fn of(parts: &http::request::Parts) -> Self {
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            extensions: parts.extensions.clone(),
        }
    }
}
