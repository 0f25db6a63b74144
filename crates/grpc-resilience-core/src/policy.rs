//! Per-method policy maps with gRPC service-config matching.

use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;
use std::fmt;
use std::str::FromStr;

use crate::MethodId;

/// Which calls a policy entry applies to.
///
/// Written as a string (in config files and [`FromStr`]):
///
/// | text | selector | matches |
/// |---|---|---|
/// | `*` | [`Selector::Default`] | every call |
/// | `catalog.v1.QueryService/*` | [`Selector::Service`] | every method of that service |
/// | `catalog.v1.QueryService/GetProduct` | [`Selector::Method`] | that one method |
/// | `GetProduct` | [`Selector::MethodName`] | a method of that name in any service |
///
/// The first three are gRPC's service-config names (`{}`, `{service}`,
/// `{service, method}`). The last is this library's extension, for
/// configurations that name operations without their service
/// (`ListProducts = 10_000`); gRPC's service config has no such form.
///
/// # Which selector wins
///
/// When several match a call, the most specific wins, in this order:
///
/// 1. [`Selector::Method`]: the exact method;
/// 2. [`Selector::Service`]: the call's service;
/// 3. [`Selector::MethodName`]: a method of that name in any service;
/// 4. [`Selector::Default`].
///
/// The first, second and fourth are gRPC's own order. A bare method name
/// ranks below a service because it says nothing about the service: it is
/// a default for methods of that name, so an entry written for a specific
/// service (`catalog.v1.QueryService/*`) is never overridden by one
/// written for every service, and a configuration in gRPC's own forms
/// behaves exactly as gRPC's service config does.
///
/// A selector is matched against calls as they are made; one that names
/// no method of any service the channel calls (a typo, a removed method)
/// never matches and has no effect. Nothing at this level can warn about
/// it, because a [`MethodMap`] does not know which services a channel
/// serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Every call not matched by a more specific selector.
    Default,
    /// Every method of one fully qualified service.
    Service(String),
    /// One method of one service.
    Method {
        /// Fully qualified service, e.g. `catalog.v1.QueryService`.
        service: String,
        /// Method name, e.g. `GetProduct`.
        method: String,
    },
    /// A method of this name in any service.
    MethodName(String),
}

impl Selector {
    /// Whether this selector applies to `id`.
    pub fn matches(&self, id: &MethodId<'_>) -> bool {
        match self {
            Selector::Default => true,
            Selector::Service(service) => id.service() == service,
            Selector::Method { service, method } => {
                id.service() == service && id.method() == method
            }
            Selector::MethodName(method) => id.method() == method,
        }
    }

    /// How specific the selector is; a higher rank wins (see
    /// [Which selector wins](Selector#which-selector-wins)).
    fn rank(&self) -> u8 {
        match self {
            Selector::Method { .. } => 3,
            Selector::Service(_) => 2,
            Selector::MethodName(_) => 1,
            Selector::Default => 0,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Default => f.write_str("*"),
            Selector::Service(s) => write!(f, "{s}/*"),
            Selector::Method { service, method } => write!(f, "{service}/{method}"),
            Selector::MethodName(m) => f.write_str(m),
        }
    }
}

impl FromStr for Selector {
    type Err = InvalidSelector;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| InvalidSelector {
            text: text.to_owned(),
            reason,
        };
        let valid_name = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if text == "*" {
            return Ok(Selector::Default);
        }
        let text_no_slash = text.strip_prefix('/').unwrap_or(text);
        match text_no_slash.split_once('/') {
            None => {
                if valid_name(text_no_slash) && !text_no_slash.contains('.') {
                    Ok(Selector::MethodName(text_no_slash.to_owned()))
                } else if valid_name(text_no_slash) {
                    Err(invalid(
                        "a name with a `.` is a service: write `package.Service/*` for a whole service",
                    ))
                } else {
                    Err(invalid("names may hold only letters, digits, `_` and `.`"))
                }
            }
            Some((service, method)) => {
                if !valid_name(service) {
                    return Err(invalid(
                        "the service name must be non-empty and hold only letters, digits, `_` and `.`",
                    ));
                }
                if method == "*" {
                    return Ok(Selector::Service(service.to_owned()));
                }
                if !valid_name(method) || method.contains('.') {
                    return Err(invalid(
                        "the method name must be non-empty and hold only letters, digits and `_` (or be `*`)",
                    ));
                }
                Ok(Selector::Method {
                    service: service.to_owned(),
                    method: method.to_owned(),
                })
            }
        }
    }
}

/// A selector string that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidSelector {
    text: String,
    reason: &'static str,
}

impl fmt::Display for InvalidSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid method selector `{}`: {}",
            self.text, self.reason
        )
    }
}

impl std::error::Error for InvalidSelector {}

/// The same selector was given twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateSelector(pub Selector);

impl fmt::Display for DuplicateSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "method selector `{}` is given more than once", self.0)
    }
}

impl std::error::Error for DuplicateSelector {}

/// Values (policies) per gRPC method, matched as gRPC's service config does.
///
/// A lookup returns the value of the most specific matching [`Selector`]:
/// the exact method, then the whole service, then a method of that name in
/// any service, then the default (see
/// [Which selector wins](Selector#which-selector-wins) for why). A selector
/// that matches no call the channel makes has no effect. The map is built once; a lookup hashes
/// borrowed `&str` keys with a fast hash, skips empty tables, and allocates
/// nothing.
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience_core::{MethodId, MethodMap};
///
/// let mut timeouts = MethodMap::new();
/// timeouts.insert("*".parse()?, Duration::from_secs(5))?;
/// timeouts.insert("ListProducts".parse()?, Duration::from_secs(10))?;
/// let map = timeouts;
///
/// let list = MethodId::from_path("/catalog.v1.QueryService/ListProducts")?;
/// let get = MethodId::from_path("/catalog.v1.QueryService/GetProduct")?;
/// assert_eq!(map.get(&list), Some(&Duration::from_secs(10)));
/// assert_eq!(map.get(&get), Some(&Duration::from_secs(5)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct MethodMap<T> {
    default: Option<T>,
    // Keyed by the whole path, `/package.Service/Method`.
    exact: FxHashMap<Box<str>, T>,
    by_name: FxHashMap<Box<str>, T>,
    services: FxHashMap<Box<str>, T>,
}

impl<T> Default for MethodMap<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn insert_new<T>(map: &mut FxHashMap<Box<str>, T>, key: String, value: T) -> Result<(), T> {
    match map.entry(key.into_boxed_str()) {
        Entry::Occupied(_) => Err(value),
        Entry::Vacant(v) => {
            v.insert(value);
            Ok(())
        }
    }
}

fn get_nonempty<'m, T>(map: &'m FxHashMap<Box<str>, T>, key: &str) -> Option<&'m T> {
    if map.is_empty() { None } else { map.get(key) }
}

impl<T> MethodMap<T> {
    /// An empty map: every lookup finds nothing.
    pub fn new() -> Self {
        MethodMap {
            default: None,
            exact: FxHashMap::default(),
            by_name: FxHashMap::default(),
            services: FxHashMap::default(),
        }
    }

    /// A map with only a default value.
    pub fn with_default(value: T) -> Self {
        let mut map = Self::new();
        map.default = Some(value);
        map
    }

    /// Adds a value for `selector`.
    ///
    /// # Errors
    ///
    /// [`DuplicateSelector`] if the map already has a value for it.
    pub fn insert(&mut self, selector: Selector, value: T) -> Result<(), DuplicateSelector> {
        let inserted = match &selector {
            Selector::Default => {
                if self.default.is_some() {
                    Err(value)
                } else {
                    self.default = Some(value);
                    Ok(())
                }
            }
            Selector::Service(service) => insert_new(&mut self.services, service.clone(), value),
            Selector::Method { service, method } => {
                insert_new(&mut self.exact, format!("/{service}/{method}"), value)
            }
            Selector::MethodName(method) => insert_new(&mut self.by_name, method.clone(), value),
        };
        inserted.map_err(|_| DuplicateSelector(selector))
    }

    /// Sets the value for `selector`, replacing and returning any value it
    /// had.
    pub fn replace(&mut self, selector: Selector, value: T) -> Option<T> {
        let previous = self.remove(&selector);
        // Cannot be a duplicate: the selector was just removed.
        let _ = self.insert(selector, value);
        previous
    }

    /// Removes and returns the value for `selector`.
    pub fn remove(&mut self, selector: &Selector) -> Option<T> {
        match selector {
            Selector::Default => self.default.take(),
            Selector::Service(service) => self.services.remove(service.as_str()),
            Selector::Method { service, method } => {
                self.exact.remove(format!("/{service}/{method}").as_str())
            }
            Selector::MethodName(method) => self.by_name.remove(method.as_str()),
        }
    }

    /// The value for a method: exact method, then service, then method
    /// name, then default.
    pub fn get(&self, id: &MethodId<'_>) -> Option<&T> {
        self.get_with_selector(id).map(|(_, v)| v)
    }

    /// Like [`MethodMap::get`], mutably.
    pub fn get_mut(&mut self, id: &MethodId<'_>) -> Option<&mut T> {
        // Find which table matches first, then borrow it mutably.
        match self.get_with_selector(id)?.0 {
            MatchedBy::Method => self.exact.get_mut(id.path()),
            MatchedBy::MethodName => self.by_name.get_mut(id.method()),
            MatchedBy::Service => self.services.get_mut(id.service()),
            MatchedBy::Default => self.default.as_mut(),
        }
    }

    /// The value for a request path; a path that is not a gRPC method path
    /// gets the default.
    pub fn get_path(&self, path: &str) -> Option<&T> {
        match MethodId::from_path(path) {
            Ok(id) => self.get(&id),
            Err(_) => self.default.as_ref(),
        }
    }

    /// Like [`MethodMap::get`], and says which kind of selector matched.
    pub fn get_with_selector(&self, id: &MethodId<'_>) -> Option<(MatchedBy, &T)> {
        if let Some(v) = get_nonempty(&self.exact, id.path()) {
            return Some((MatchedBy::Method, v));
        }
        if let Some(v) = get_nonempty(&self.services, id.service()) {
            return Some((MatchedBy::Service, v));
        }
        if let Some(v) = get_nonempty(&self.by_name, id.method()) {
            return Some((MatchedBy::MethodName, v));
        }
        self.default.as_ref().map(|v| (MatchedBy::Default, v))
    }

    /// The default value, if any.
    pub fn default_value(&self) -> Option<&T> {
        self.default.as_ref()
    }

    /// Every entry with its selector, most specific first.
    pub fn entries(&self) -> Vec<(Selector, &T)> {
        let mut out: Vec<(Selector, &T)> = Vec::new();
        for (path, v) in &self.exact {
            let id = MethodId::from_path(path).expect("exact keys are method paths");
            out.push((
                Selector::Method {
                    service: id.service().to_owned(),
                    method: id.method().to_owned(),
                },
                v,
            ));
        }
        for (name, v) in &self.by_name {
            out.push((Selector::MethodName(name.to_string()), v));
        }
        for (service, v) in &self.services {
            out.push((Selector::Service(service.to_string()), v));
        }
        if let Some(v) = &self.default {
            out.push((Selector::Default, v));
        }
        out.sort_by(|a, b| {
            b.0.rank()
                .cmp(&a.0.rank())
                .then_with(|| a.0.to_string().cmp(&b.0.to_string()))
        });
        out
    }

    /// Applies `f` to every value, keeping the selectors.
    pub fn map_values<U>(self, mut f: impl FnMut(T) -> U) -> MethodMap<U> {
        let mut map_table = |t: FxHashMap<Box<str>, T>| {
            t.into_iter()
                .map(|(k, v)| (k, f(v)))
                .collect::<FxHashMap<_, _>>()
        };
        let exact = map_table(self.exact);
        let by_name = map_table(self.by_name);
        let services = map_table(self.services);
        MethodMap {
            default: self.default.map(f),
            exact,
            by_name,
            services,
        }
    }

    /// Whether the map has no value at all.
    pub fn is_empty(&self) -> bool {
        self.default.is_none()
            && self.exact.is_empty()
            && self.by_name.is_empty()
            && self.services.is_empty()
    }
}

/// Which kind of [`Selector`] a lookup matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchedBy {
    /// [`Selector::Method`].
    Method,
    /// [`Selector::MethodName`].
    MethodName,
    /// [`Selector::Service`].
    Service,
    /// [`Selector::Default`].
    Default,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(path: &str) -> MethodId<'_> {
        MethodId::from_path(path).unwrap()
    }

    fn full_map() -> MethodMap<u32> {
        let mut map = MethodMap::new();
        map.insert("*".parse().unwrap(), 0).unwrap();
        map.insert("pkg.A/*".parse().unwrap(), 1).unwrap();
        map.insert("Get".parse().unwrap(), 2).unwrap();
        map.insert("pkg.A/Get".parse().unwrap(), 3).unwrap();
        map
    }

    #[test]
    fn most_specific_selector_wins() {
        let map = full_map();
        assert_eq!(
            map.get_with_selector(&id("/pkg.A/Get")),
            Some((MatchedBy::Method, &3))
        );
        assert_eq!(
            map.get_with_selector(&id("/pkg.B/Get")),
            Some((MatchedBy::MethodName, &2))
        );
        assert_eq!(
            map.get_with_selector(&id("/pkg.A/List")),
            Some((MatchedBy::Service, &1))
        );
        assert_eq!(
            map.get_with_selector(&id("/pkg.B/List")),
            Some((MatchedBy::Default, &0))
        );
    }

    #[test]
    fn a_service_outranks_a_bare_method_name() {
        let mut map = MethodMap::new();
        map.insert("pkg.A/*".parse().unwrap(), 1).unwrap();
        map.insert("Get".parse().unwrap(), 2).unwrap();
        assert_eq!(
            map.get_with_selector(&id("/pkg.A/Get")),
            Some((MatchedBy::Service, &1))
        );
        assert_eq!(map.get_mut(&id("/pkg.A/Get")), Some(&mut 1));
        assert_eq!(
            map.get_with_selector(&id("/pkg.B/Get")),
            Some((MatchedBy::MethodName, &2))
        );
    }

    #[test]
    fn empty_map_finds_nothing_and_non_grpc_paths_get_default() {
        let empty: MethodMap<u32> = MethodMap::new();
        assert!(empty.is_empty());
        assert_eq!(empty.get(&id("/a.B/C")), None);
        assert_eq!(full_map().get_path("/healthz"), Some(&0));
        assert_eq!(full_map().get_path("/pkg.A/Get"), Some(&3));
    }

    #[test]
    fn duplicates_are_errors_naming_the_selector() {
        let mut map = full_map();
        for text in ["*", "pkg.A/*", "Get", "pkg.A/Get"] {
            let err = map.insert(text.parse().unwrap(), 9).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("method selector `{text}` is given more than once")
            );
        }
        assert_eq!(
            map.get(&id("/pkg.A/Get")),
            Some(&3),
            "a failed insert changes nothing"
        );
    }

    #[test]
    fn selectors_match_methods() {
        let get = id("/pkg.A/Get");
        assert!(Selector::Default.matches(&get));
        assert!("pkg.A/*".parse::<Selector>().unwrap().matches(&get));
        assert!(!"pkg.B/*".parse::<Selector>().unwrap().matches(&get));
        assert!("Get".parse::<Selector>().unwrap().matches(&get));
        assert!(!"List".parse::<Selector>().unwrap().matches(&get));
        assert!("pkg.A/Get".parse::<Selector>().unwrap().matches(&get));
        assert!(!"pkg.B/Get".parse::<Selector>().unwrap().matches(&get));
    }

    #[test]
    fn replace_remove_and_get_mut() {
        let mut map = full_map();
        assert_eq!(map.replace("pkg.A/Get".parse().unwrap(), 30), Some(3));
        assert_eq!(map.get(&id("/pkg.A/Get")), Some(&30));
        *map.get_mut(&id("/pkg.B/Get")).unwrap() += 100;
        assert_eq!(map.get(&id("/pkg.C/Get")), Some(&102));
        *map.get_mut(&id("/pkg.A/List")).unwrap() += 100;
        assert_eq!(map.get(&id("/pkg.A/List")), Some(&101));
        assert_eq!(map.remove(&"pkg.A/Get".parse().unwrap()), Some(30));
        assert_eq!(map.remove(&"Get".parse().unwrap()), Some(102));
        assert_eq!(map.get(&id("/pkg.A/Get")), Some(&101));
        assert_eq!(map.remove(&"pkg.A/*".parse().unwrap()), Some(101));
        assert_eq!(map.remove(&"*".parse().unwrap()), Some(0));
        assert!(map.is_empty());
        assert_eq!(map.replace(Selector::Default, 7), None);
        assert_eq!(map.get_mut(&id("/x.Y/Z")), Some(&mut 7));
    }

    #[test]
    fn selector_parsing() {
        assert_eq!("*".parse::<Selector>().unwrap(), Selector::Default);
        assert_eq!(
            "/pkg.A/Get".parse::<Selector>().unwrap(),
            Selector::Method {
                service: "pkg.A".into(),
                method: "Get".into()
            }
        );
        assert_eq!(
            "pkg.A/*".parse::<Selector>().unwrap(),
            Selector::Service("pkg.A".into())
        );
        assert_eq!(
            "Get".parse::<Selector>().unwrap(),
            Selector::MethodName("Get".into())
        );
        for bad in ["", "pkg.A", "a b", "pkg.A/", "pkg.A/B/C", "pkg.A/x.y", "é"] {
            let err = bad.parse::<Selector>().unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[test]
    fn entries_and_map_values_keep_selectors() {
        let map = full_map().map_values(|v| v * 10);
        let entries: Vec<(String, u32)> = map
            .entries()
            .into_iter()
            .map(|(s, v)| (s.to_string(), *v))
            .collect();
        assert_eq!(
            entries,
            vec![
                ("pkg.A/Get".to_string(), 30),
                ("pkg.A/*".to_string(), 10),
                ("Get".to_string(), 20),
                ("*".to_string(), 0),
            ]
        );
    }

    proptest! {
        #[test]
        fn display_parses_back(s in "[a-z][a-z0-9_]{0,6}(\\.[A-Z][a-z]{0,5})?", m in "[A-Z][a-z]{0,8}") {
            for sel in [
                Selector::Default,
                Selector::Service(s.clone()),
                Selector::Method { service: s.clone(), method: m.clone() },
                Selector::MethodName(m.clone()),
            ] {
                prop_assert_eq!(sel.to_string().parse::<Selector>().unwrap(), sel);
            }
        }

        #[test]
        fn parse_never_panics(text in ".{0,30}") {
            let _ = text.parse::<Selector>();
        }
    }
}
