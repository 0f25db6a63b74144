//! Method identity: `/package.Service/Method` parsed from a request path.

use std::fmt;

/// The gRPC method a request calls, borrowed from its `:path`.
///
/// A gRPC request path has the form `/package.Service/Method`. Parsing only
/// finds the separating slash; nothing is allocated or copied.
///
/// ```
/// use grpc_resilience_core::MethodId;
///
/// let id = MethodId::from_path("/catalog.v1.QueryService/GetProduct").unwrap();
/// assert_eq!(id.service(), "catalog.v1.QueryService");
/// assert_eq!(id.service_name(), "QueryService");
/// assert_eq!(id.method(), "GetProduct");
/// assert!(MethodId::from_path("/healthz").is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MethodId<'a> {
    path: &'a str,
    // Index of the slash between service and method.
    slash: usize,
}

impl<'a> MethodId<'a> {
    /// Parses a request path of the form `/package.Service/Method`.
    ///
    /// # Errors
    ///
    /// [`InvalidMethodPath`] when the path is not a gRPC method path: it does
    /// not start with `/`, has no second `/`, has an empty service or method
    /// name, or has more than two segments.
    #[inline]
    pub fn from_path(path: &'a str) -> Result<Self, InvalidMethodPath<'a>> {
        let invalid = |reason| Err(InvalidMethodPath { path, reason });
        let bytes = path.as_bytes();
        if bytes.first() != Some(&b'/') {
            return invalid(PathProblem::NoLeadingSlash);
        }
        // Method names are short: find their slash from the end, then check
        // the service part holds none.
        let slash = bytes.iter().rposition(|&b| b == b'/').unwrap_or(0);
        if slash == 0 || slash == bytes.len() - 1 {
            return invalid(PathProblem::NoMethod);
        }
        if slash == 1 {
            return invalid(PathProblem::EmptyService);
        }
        if has_slash(&bytes[1..slash]) {
            return invalid(PathProblem::TooManySegments);
        }
        Ok(MethodId { path, slash })
    }

    /// Parses the method from a request's URI path.
    ///
    /// # Errors
    ///
    /// As [`MethodId::from_path`].
    pub fn from_request<B>(request: &'a http::Request<B>) -> Result<Self, InvalidMethodPath<'a>> {
        Self::from_path(request.uri().path())
    }

    /// The fully qualified service, e.g. `catalog.v1.QueryService`.
    #[inline]
    pub fn service(&self) -> &'a str {
        &self.path[1..self.slash]
    }

    /// The service without its package, e.g. `QueryService`.
    pub fn service_name(&self) -> &'a str {
        let service = self.service();
        match service.rfind('.') {
            Some(dot) => &service[dot + 1..],
            None => service,
        }
    }

    /// The method, e.g. `GetProduct`.
    #[inline]
    pub fn method(&self) -> &'a str {
        &self.path[self.slash + 1..]
    }

    /// The whole path, e.g. `/catalog.v1.QueryService/GetProduct`.
    #[inline]
    pub fn path(&self) -> &'a str {
        self.path
    }
}

/// Whether `bytes` holds a `/`, tested eight bytes at a time.
#[inline]
fn has_slash(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const SLASHES: u64 = ONES * b'/' as u64;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        // A byte equal to '/' becomes zero; the classic zero-byte test.
        let x = u64::from_ne_bytes(eight) ^ SLASHES;
        if x.wrapping_sub(ONES) & !x & HIGHS != 0 {
            return true;
        }
    }
    words.remainder().contains(&b'/')
}

impl fmt::Debug for MethodId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodId")
            .field("service", &self.service())
            .field("method", &self.method())
            .finish()
    }
}

impl fmt::Display for MethodId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path[1..])
    }
}

/// A request path that is not a gRPC method path.
///
/// It borrows the path, so producing it allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidMethodPath<'a> {
    path: &'a str,
    reason: PathProblem,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathProblem {
    NoLeadingSlash,
    EmptyService,
    NoMethod,
    TooManySegments,
}

impl<'a> InvalidMethodPath<'a> {
    /// The path that was rejected.
    #[inline]
    pub fn path(&self) -> &'a str {
        self.path
    }
}

impl fmt::Display for InvalidMethodPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self.reason {
            PathProblem::NoLeadingSlash => "it does not start with `/`",
            PathProblem::EmptyService => "the service name is empty",
            PathProblem::NoMethod => "the method name is missing",
            PathProblem::TooManySegments => "it has more than two segments",
        };
        write!(
            f,
            "`{}` is not a gRPC method path (expected `/package.Service/Method`): {reason}",
            self.path
        )
    }
}

impl std::error::Error for InvalidMethodPath<'_> {}

/// What a layer worked out for the last method it was called with (its
/// policy, its metric handles), remembered by the request's path.
///
/// A generated stub calls with a static path (`PathAndQuery::from_static`),
/// so a repeat call matches the remembered one by address: no parse and no
/// lookup. Another path is compared as a string; a new method is parsed
/// and worked out once, replacing the last one. `compute` gets `None` for
/// a path that is not a gRPC method.
///
/// ```
/// use grpc_resilience_core::LastMethod;
///
/// let mut last = LastMethod::default();
/// let uri = http::Uri::from_static("http://catalog/catalog.v1.QueryService/GetProduct");
/// let mut parsed = 0;
/// for _ in 0..3 {
///     let method = last.get_or_insert_with(&uri, |id| {
///         parsed += 1;
///         id.map(|id| id.method().to_owned())
///     });
///     assert_eq!(method.as_deref(), Some("GetProduct"));
/// }
/// assert_eq!(parsed, 1);
/// ```
#[derive(Clone, Debug)]
pub struct LastMethod<T> {
    last: Option<(http::uri::PathAndQuery, T)>,
}

impl<T> Default for LastMethod<T> {
    fn default() -> Self {
        LastMethod { last: None }
    }
}

impl<T> LastMethod<T> {
    /// What `compute` made of `uri`'s method, computed now unless `uri` has
    /// the path of the last call.
    #[inline]
    pub fn get_or_insert_with(
        &mut self,
        uri: &http::Uri,
        compute: impl FnOnce(Option<MethodId<'_>>) -> T,
    ) -> &T {
        self.get_or_insert_by(uri, |key| compute(MethodId::from_path(key.path()).ok()))
    }

    /// Like [`get_or_insert_with`](Self::get_or_insert_with), but a path
    /// that is not the last one is looked up in `table` (shared by the
    /// layer's clones) before it is worked out: each method is worked out
    /// once per table, however calls alternate between methods.
    #[inline]
    pub fn get_or_insert_from(
        &mut self,
        uri: &http::Uri,
        table: &crate::MethodTable<T>,
        compute: impl FnOnce(Option<MethodId<'_>>) -> T,
    ) -> &T
    where
        T: Clone,
    {
        self.get_or_insert_by(uri, |key| table.get_or_insert_with(key, compute))
    }

    /// The value for `uri`'s path: the last one's, else `miss`'s.
    #[inline(always)]
    fn get_or_insert_by(
        &mut self,
        uri: &http::Uri,
        miss: impl FnOnce(&http::uri::PathAndQuery) -> T,
    ) -> &T {
        let key = uri.path_and_query();
        let hit = match (&self.last, key) {
            (Some((seen, _)), Some(key)) => same_path(seen, key),
            _ => false,
        };
        if !hit {
            self.last = None;
        }
        let (_, value) = self.last.get_or_insert_with(|| {
            // A URI without a path is keyed as `/`: no method either.
            let key = key
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
            let value = miss(&key);
            (key, value)
        });
        value
    }
}

/// Whether two request paths are the same: by address first (a generated
/// stub's path is a `&'static str`, the same for every call of a method),
/// else by content. Sound for a path kept as a clone: the clone keeps its
/// bytes alive, so an equal address cannot be another path's.
#[inline]
pub fn same_path(a: &http::uri::PathAndQuery, b: &http::uri::PathAndQuery) -> bool {
    let (a, b) = (a.as_str(), b.as_str());
    std::ptr::eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_method_is_worked_out_once_and_each_method_gets_its_own() {
        let mut last = LastMethod::default();
        let mut computed = Vec::new();
        let stub = |path: &'static str| {
            let mut parts = http::Uri::from_static("http://catalog").into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
            http::Uri::from_parts(parts).unwrap()
        };
        let get = "/catalog.v1.QueryService/GetProduct";
        let create = "/catalog.v1.CommandService/CreateProduct";
        let uris = [
            stub(get),
            stub(get),
            format!("http://catalog{get}").parse().unwrap(),
            stub(create),
            stub(get),
            "http://catalog/healthz".parse().unwrap(),
            "http://catalog".parse().unwrap(),
            stub(create),
        ];
        let seen: Vec<Option<String>> = uris
            .iter()
            .map(|uri| {
                last.get_or_insert_with(uri, |id| {
                    computed.push(uri.to_string());
                    id.map(|id| id.method().to_owned())
                })
                .clone()
            })
            .collect();
        let method = |m: &str| Some(m.to_owned());
        assert_eq!(
            seen,
            [
                method("GetProduct"),
                method("GetProduct"),
                method("GetProduct"),
                method("CreateProduct"),
                method("GetProduct"),
                None,
                None,
                method("CreateProduct"),
            ]
        );
        // Worked out again only when the path changed.
        assert_eq!(computed.len(), 6, "{computed:?}");
    }
    use proptest::prelude::*;

    #[test]
    fn parses_service_and_method() {
        let id = MethodId::from_path("/catalog.v1.CommandService/CreateProduct").unwrap();
        assert_eq!(id.service(), "catalog.v1.CommandService");
        assert_eq!(id.service_name(), "CommandService");
        assert_eq!(id.method(), "CreateProduct");
        assert_eq!(id.path(), "/catalog.v1.CommandService/CreateProduct");
        assert_eq!(id.to_string(), "catalog.v1.CommandService/CreateProduct");
    }

    #[test]
    fn service_without_package() {
        let id = MethodId::from_path("/Echo/Say").unwrap();
        assert_eq!(id.service(), "Echo");
        assert_eq!(id.service_name(), "Echo");
    }

    #[test]
    fn rejects_paths_that_are_not_grpc() {
        for (path, reason) in [
            ("", "does not start"),
            ("Svc/M", "does not start"),
            ("/", "method name is missing"),
            ("/Svc", "method name is missing"),
            ("/Svc/", "method name is missing"),
            ("//M", "service name is empty"),
            ("/a/b/c", "more than two segments"),
        ] {
            let err = MethodId::from_path(path).unwrap_err();
            assert_eq!(err.path(), path);
            let text = err.to_string();
            assert!(text.contains(reason), "{path:?}: {text}");
            assert!(text.contains(&format!("`{path}`")), "{text}");
        }
    }

    proptest! {
        #[test]
        fn has_slash_agrees_with_contains(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(has_slash(&bytes), bytes.contains(&b'/'));
        }

        #[test]
        fn round_trips(service in "[a-zA-Z0-9_.]{1,20}", method in "[a-zA-Z0-9_]{1,20}") {
            let path = format!("/{service}/{method}");
            let id = MethodId::from_path(&path).unwrap();
            prop_assert_eq!(id.service(), service.as_str());
            prop_assert_eq!(id.method(), method.as_str());
        }

        #[test]
        fn never_panics(path in ".{0,40}") {
            let _ = MethodId::from_path(&path);
        }
    }
}
