//! Operation selectors as a config file writes them.

use grpc_resilience_core::Selector;

/// `GetProduct` -> `get_product`.
pub(crate) fn to_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.char_indices() {
        if c.is_ascii_uppercase() {
            if i > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `get_product` -> `GetProduct`.
pub(crate) fn to_pascal(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut chars = p.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

/// Methods the application calls, to check short names against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KnownMethods {
    methods: Vec<(String, String)>,
}

impl KnownMethods {
    pub(crate) fn new<I, T>(paths: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let mut methods = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let full = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            let id = grpc_resilience_core::MethodId::from_path(&full).map_err(|e| e.to_string())?;
            methods.push((id.service().to_owned(), id.method().to_owned()));
        }
        methods.sort();
        methods.dedup();
        Ok(KnownMethods { methods })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.methods.is_empty()
    }

    pub(crate) fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.methods.iter().map(|(s, m)| format!("/{s}/{m}"))
    }
}

/// Resolves a selector as written in a config file to the form the layer
/// crates take. Returns the reason on failure.
///
/// * `*`, `package.Service/*`, `package.Service/Method` (a leading `/` is
///   allowed) as gRPC writes them;
/// * `package.Service` (a whole service);
/// * `GetProduct` or `get_product`: a method by its short name.
///
/// When the application's methods are known, a short name must name
/// exactly one of them (a name found in two services is ambiguous and the
/// error lists both) and resolves to its full form; a full form must name a
/// known method or service. When they are not known, a short name means a
/// method of that name in any service.
pub(crate) fn resolve(text: &str, known: &KnownMethods) -> Result<String, String> {
    let trimmed = text.trim();
    if trimmed == "*" {
        return Ok("*".into());
    }
    let body = trimmed.strip_prefix('/').unwrap_or(trimmed);
    let canonical = if body.contains('/') {
        body.to_owned()
    } else if body.contains('.') {
        format!("{body}/*")
    } else {
        let pascal = if body.contains('_') || body.starts_with(|c: char| c.is_ascii_lowercase()) {
            to_pascal(body)
        } else {
            body.to_owned()
        };
        if pascal.is_empty() {
            return Err(format!(
                "invalid method selector `{text}`: the name is empty"
            ));
        }
        if known.is_empty() {
            pascal
        } else {
            let candidates: Vec<&(String, String)> = known
                .methods
                .iter()
                .filter(|(_, m)| *m == pascal || to_snake(m) == body)
                .collect();
            match candidates.as_slice() {
                [] => {
                    return Err(format!(
                        "`{text}` names no known method (known: {})",
                        known.paths().collect::<Vec<_>>().join(", ")
                    ));
                }
                [(service, method)] => format!("{service}/{method}"),
                many => {
                    return Err(format!(
                        "`{text}` is ambiguous: it matches {}; write `package.Service/Method` to pick one",
                        many.iter()
                            .map(|(s, m)| format!("{s}/{m}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
    };
    let selector: Selector = canonical.parse().map_err(|e| {
        if canonical == trimmed {
            format!("{e}")
        } else {
            format!("`{text}` is not a valid selector ({e})")
        }
    })?;
    if !known.is_empty() {
        let found = match &selector {
            Selector::Method { service, method } => known
                .methods
                .iter()
                .any(|(s, m)| s == service && m == method),
            Selector::Service(service) => known.methods.iter().any(|(s, _)| s == service),
            Selector::MethodName(_) | Selector::Default => true,
        };
        if !found {
            return Err(format!(
                "`{text}` names no known method or service (known: {})",
                known.paths().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(selector.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> KnownMethods {
        KnownMethods::new([
            "/catalog.v1.QueryService/GetProduct",
            "/catalog.v1.QueryService/ListProducts",
            "/catalog.v1.CommandService/CreateProduct",
            "catalog.v2.QueryService/GetProduct",
        ])
        .unwrap()
    }

    #[test]
    fn case_conversions() {
        assert_eq!(to_snake("GetProduct"), "get_product");
        assert_eq!(to_pascal("get_product"), "GetProduct");
        assert_eq!(to_pascal("list_products"), "ListProducts");
    }

    #[test]
    fn forms_without_known_methods() {
        let none = KnownMethods::default();
        for (text, expected) in [
            ("*", "*"),
            ("get_product", "GetProduct"),
            ("GetProduct", "GetProduct"),
            ("catalog.v1.QueryService", "catalog.v1.QueryService/*"),
            ("catalog.v1.QueryService/*", "catalog.v1.QueryService/*"),
            (
                "/catalog.v1.QueryService/GetProduct",
                "catalog.v1.QueryService/GetProduct",
            ),
        ] {
            assert_eq!(resolve(text, &none).unwrap(), expected, "{text}");
        }
        assert!(
            resolve("get product", &none)
                .unwrap_err()
                .contains("`get product`")
        );
        assert!(resolve("_", &none).is_err());
    }

    #[test]
    fn short_names_resolve_against_known_methods() {
        let known = catalog();
        assert_eq!(
            resolve("create_product", &known).unwrap(),
            "catalog.v1.CommandService/CreateProduct"
        );
        assert_eq!(
            resolve("ListProducts", &known).unwrap(),
            "catalog.v1.QueryService/ListProducts"
        );
        let err = resolve("get_product", &known).unwrap_err();
        assert_eq!(
            err,
            "`get_product` is ambiguous: it matches catalog.v1.QueryService/GetProduct, \
             catalog.v2.QueryService/GetProduct; write `package.Service/Method` to pick one"
        );
        let err = resolve("delete_product", &known).unwrap_err();
        assert!(
            err.starts_with("`delete_product` names no known method"),
            "{err}"
        );
        let err = resolve("catalog.v1.QueryService/DeleteProduct", &known).unwrap_err();
        assert!(err.contains("names no known method or service"), "{err}");
        assert_eq!(
            resolve("catalog.v2.QueryService/GetProduct", &known).unwrap(),
            "catalog.v2.QueryService/GetProduct"
        );
    }
}
