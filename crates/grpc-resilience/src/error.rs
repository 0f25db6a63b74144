//! Configuration errors.

use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration that was rejected: it names where (file and line, when
/// the config came from a file), the key path, the value and why.
///
/// ```text
/// config/resilience.toml:7: retry.default.max_attempts = 0: must be at least 1 (1 means no retry)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    file: Option<PathBuf>,
    line: Option<usize>,
    key: String,
    value: Option<String>,
    reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        key: impl Into<String>,
        value: Option<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: None,
            line: None,
            key: key.into(),
            value,
            reason: reason.into(),
        }
    }

    pub(crate) fn at_line(mut self, line: Option<usize>) -> Self {
        if self.line.is_none() {
            self.line = line;
        }
        self
    }

    pub(crate) fn in_file(mut self, file: Option<&Path>) -> Self {
        if self.file.is_none() {
            self.file = file.map(Path::to_path_buf);
        }
        self
    }

    /// The file the config came from, if it came from one.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The 1-based line of the bad key or value, when known.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// The key path, e.g. `retry.default.max_attempts` or
    /// `timeouts.operations."get_product"`; empty for a file that could
    /// not be read or parsed at all.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The rejected value as written, when there is one.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{}:{line}: ", file.display())?,
            (Some(file), None) => write!(f, "{}: ", file.display())?,
            (None, Some(line)) => write!(f, "line {line}: ")?,
            (None, None) => {}
        }
        if !self.key.is_empty() {
            f.write_str(&self.key)?;
            if let Some(value) = &self.value {
                write!(f, " = {value}")?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// Formats a key path from its segments, quoting those that are not bare
/// TOML keys: `timeouts.operations."catalog.v1.QueryService/GetProduct"`.
pub(crate) fn key_path<'a>(segments: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, seg) in segments.into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if !seg.is_empty()
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            out.push_str(seg);
        } else {
            out.push('"');
            out.push_str(&seg.replace('\\', "\\\\").replace('"', "\\\""));
            out.push('"');
        }
    }
    out
}
