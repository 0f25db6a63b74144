//! Where each key of a TOML document is, to point errors at a line.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// Any TOML value, with the span of every nested value.
#[derive(Debug)]
pub(crate) enum Node {
    Table(Vec<(String, Spanned<Node>)>),
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
                Ok(Node::Leaf)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<Node>>()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Spanned<Node>>()? {
                    entries.push((k, v));
                }
                Ok(Node::Table(entries))
            }
        }
        d.deserialize_any(V)
    }
}

/// The spans of a document's values.
#[derive(Debug)]
pub(crate) struct SpanIndex<'t> {
    text: &'t str,
    root: Option<Node>,
}

impl<'t> SpanIndex<'t> {
    pub(crate) fn new(text: &'t str) -> Self {
        SpanIndex {
            text,
            root: toml::from_str::<Node>(text).ok(),
        }
    }

    /// The 1-based line of a byte offset.
    pub(crate) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The line of the deepest existing value on `path`.
    pub(crate) fn line_of_path(&self, path: &[&str]) -> Option<usize> {
        let mut node = self.root.as_ref()?;
        let mut span: Option<Range<usize>> = None;
        for seg in path {
            let Node::Table(entries) = node else { break };
            let Some((_, child)) = entries.iter().find(|(k, _)| k == seg) else {
                break;
            };
            span = Some(child.span());
            node = child.get_ref();
        }
        span.map(|s| self.line_of(s.start))
    }

    /// The key path of the value at `span`: the narrowest value containing
    /// it, or else (for a key, whose own span is not kept) the first value
    /// after it on the same line.
    pub(crate) fn path_at(&self, span: &Range<usize>) -> Vec<String> {
        let Some(root) = self.root.as_ref() else {
            return Vec::new();
        };
        let mut all = Vec::new();
        collect(root, &mut Vec::new(), &mut all);
        let containing = all
            .iter()
            .filter(|(_, s)| s.start <= span.start && span.end <= s.end)
            .min_by_key(|(_, s)| s.end - s.start);
        if let Some((path, _)) = containing {
            return path.clone();
        }
        let line = self.line_of(span.start);
        all.iter()
            .filter(|(_, s)| s.start >= span.start && self.line_of(s.start) == line)
            .min_by_key(|(_, s)| s.start)
            .map(|(path, _)| path.clone())
            .unwrap_or_default()
    }

    /// The source text of a span, trimmed.
    pub(crate) fn text_of(&self, span: &Range<usize>) -> Option<&'t str> {
        self.text.get(span.clone()).map(str::trim)
    }
}

/// Every value's path and span, depth first.
fn collect(node: &Node, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, Range<usize>)>) {
    let children: Vec<(String, &Spanned<Node>)> = match node {
        Node::Table(entries) => entries.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Node::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        Node::Leaf => return,
    };
    for (key, child) in children {
        path.push(key);
        out.push((path.clone(), child.span()));
        collect(child.get_ref(), path, out);
        path.pop();
    }
}
