//! Which timeout applies to which method.

use std::fmt;
use std::time::Duration;

use grpc_resilience_core::{MethodId, MethodMap, Selector, timeout_header};
use http::HeaderValue;

/// The longest timeout a policy accepts: one year. Anything longer is
/// almost certainly a unit mistake; to give a method no deadline at all,
/// use [`TimeoutPolicy::without_timeout`].
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A configured timeout with its `grpc-timeout` encoding, made once.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) timeout: Duration,
    pub(crate) header: HeaderValue,
}

/// Per-method timeouts: a default plus per-operation values.
///
/// Operations are named by [`Selector`] strings: `GetProduct` (a method of
/// that name in any service), `catalog.v1.QueryService/*` (a whole
/// service), `catalog.v1.QueryService/GetProduct` (one method) or `*` (the
/// default). The most specific wins.
///
/// ```
/// use std::time::Duration;
/// use grpc_timeout::TimeoutPolicy;
///
/// // A catalog service: 5 s by default, longer for listing, shorter for
/// // single reads.
/// let policy = TimeoutPolicy::new(Duration::from_secs(5))?
///     .with_operation("ListProducts", Duration::from_secs(10))?
///     .with_operation("GetProduct", Duration::from_secs(3))?
///     .with_operation("CreateProduct", Duration::from_secs(5))?;
/// assert_eq!(
///     policy.timeout_for("/catalog.v1.QueryService/GetProduct"),
///     Some(Duration::from_secs(3))
/// );
/// # Ok::<(), grpc_timeout::TimeoutConfigError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct TimeoutPolicy {
    // `None` values mark methods that explicitly have no timeout.
    pub(crate) map: MethodMap<Option<Entry>>,
}

impl TimeoutPolicy {
    /// A policy whose every method has `default` as its timeout.
    ///
    /// # Errors
    ///
    /// [`TimeoutConfigError`] if `default` is zero or above [`MAX_TIMEOUT`].
    pub fn new(default: Duration) -> Result<Self, TimeoutConfigError> {
        Self::empty().with_operation("*", default)
    }

    /// A policy with no timeout for any method yet; only the operations
    /// added with [`TimeoutPolicy::with_operation`] get one.
    pub fn empty() -> Self {
        TimeoutPolicy::default()
    }

    /// Sets the timeout of the methods `selector` names.
    ///
    /// # Errors
    ///
    /// [`TimeoutConfigError`] naming the selector and the value if the
    /// selector is malformed or given twice, or the timeout is zero or above
    /// [`MAX_TIMEOUT`].
    pub fn with_operation(
        self,
        selector: &str,
        timeout: Duration,
    ) -> Result<Self, TimeoutConfigError> {
        let invalid = |reason: String| TimeoutConfigError {
            key: selector.to_owned(),
            value: format!("{timeout:?}"),
            reason,
        };
        if timeout.is_zero() {
            return Err(invalid("a timeout must be greater than zero".into()));
        }
        if timeout > MAX_TIMEOUT {
            return Err(invalid(
                "a timeout may be at most one year; leave the method without a timeout to have none".into(),
            ));
        }
        let entry = Entry {
            timeout,
            header: timeout_header::encode(timeout),
        };
        self.insert(selector, Some(entry), format!("{timeout:?}"))
    }

    /// Gives the methods `selector` names no timeout, overriding a less
    /// specific one (for example a long-lived watch stream under a
    /// service-wide timeout). A deadline the caller set still applies.
    ///
    /// # Errors
    ///
    /// [`TimeoutConfigError`] if the selector is malformed or given twice.
    pub fn without_timeout(self, selector: &str) -> Result<Self, TimeoutConfigError> {
        self.insert(selector, None, "none".into())
    }

    fn insert(
        mut self,
        selector: &str,
        entry: Option<Entry>,
        value: String,
    ) -> Result<Self, TimeoutConfigError> {
        let invalid = |reason: String| TimeoutConfigError {
            key: selector.to_owned(),
            value: value.clone(),
            reason,
        };
        let parsed: Selector = selector.parse().map_err(|e| invalid(format!("{e}")))?;
        self.map
            .insert(parsed, entry)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(self)
    }

    /// The configured timeout for a request path; `None` when the method
    /// has none. A path that is not a gRPC method path gets the default.
    pub fn timeout_for(&self, path: &str) -> Option<Duration> {
        self.map
            .get_path(path)
            .and_then(|e| e.as_ref())
            .map(|e| e.timeout)
    }

    pub(crate) fn entry(&self, method: Option<&MethodId<'_>>) -> Option<&Entry> {
        let found = match method {
            Some(id) => self.map.get(id),
            None => self.map.default_value(),
        };
        found.and_then(Option::as_ref)
    }
}

/// A timeout setting that was rejected; it names the key and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeoutConfigError {
    key: String,
    value: String,
    reason: String,
}

impl TimeoutConfigError {
    /// The operation selector the bad setting was for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The rejected value, as written.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for TimeoutConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid timeout for `{}` (value {}): {}",
            self.key, self.value, self.reason
        )
    }
}

impl std::error::Error for TimeoutConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_policy() {
        let policy = TimeoutPolicy::new(Duration::from_secs(5))
            .and_then(|p| p.with_operation("ListProducts", Duration::from_secs(10)))
            .and_then(|p| p.with_operation("GetProduct", Duration::from_secs(3)))
            .unwrap();
        assert_eq!(
            policy.timeout_for("/catalog.v1.QueryService/ListProducts"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            policy.timeout_for("/catalog.v1.QueryService/GetProduct"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            policy.timeout_for("/catalog.v1.CommandService/CreateProduct"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            policy.timeout_for("/not-grpc"),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn without_timeout_overrides_the_default() {
        let policy = TimeoutPolicy::new(Duration::from_secs(5))
            .and_then(|p| p.without_timeout("catalog.v1.QueryService/ListProducts"))
            .unwrap();
        assert_eq!(
            policy.timeout_for("/catalog.v1.QueryService/ListProducts"),
            None
        );
        assert_eq!(
            policy.timeout_for("/catalog.v1.QueryService/GetProduct"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(TimeoutPolicy::empty().timeout_for("/a.B/C"), None);
    }

    #[test]
    fn bad_settings_name_key_and_value() {
        let err = TimeoutPolicy::new(Duration::ZERO).unwrap_err();
        assert_eq!(err.key(), "*");
        assert_eq!(
            err.to_string(),
            "invalid timeout for `*` (value 0ns): a timeout must be greater than zero"
        );

        let err = TimeoutPolicy::empty()
            .with_operation("GetProduct", Duration::from_secs(400 * 24 * 3600))
            .unwrap_err();
        assert_eq!(err.key(), "GetProduct");
        assert!(err.to_string().contains("at most one year"), "{err}");

        let err = TimeoutPolicy::empty()
            .with_operation("Get Product", Duration::from_secs(1))
            .unwrap_err();
        assert!(err.to_string().contains("`Get Product`"), "{err}");

        let err = TimeoutPolicy::new(Duration::from_secs(1))
            .and_then(|p| p.with_operation("*", Duration::from_secs(2)))
            .unwrap_err();
        assert_eq!(err.value(), "2s");
        assert!(err.to_string().contains("more than once"), "{err}");
    }
}
