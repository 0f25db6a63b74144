//! Sets of gRPC status codes (retryable codes, failure codes).

use std::fmt;
use std::str::FromStr;

use tonic::Code;

const ALL: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

/// The canonical name of a code, as gRPC writes it: `UNAVAILABLE`,
/// `DEADLINE_EXCEEDED`, ...
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Parses a code name: `UNAVAILABLE`, `unavailable`, `Unavailable` and
/// `DeadlineExceeded` / `deadline_exceeded` all work.
///
/// # Errors
///
/// [`UnknownCode`] naming the text.
pub fn parse_code(text: &str) -> Result<Code, UnknownCode> {
    let wanted: String = text.chars().filter(|c| *c != '_').collect();
    ALL.iter()
        .copied()
        .find(|&code| {
            code_name(code)
                .replace('_', "")
                .eq_ignore_ascii_case(&wanted)
        })
        .ok_or_else(|| UnknownCode(text.to_owned()))
}

/// A status code name that is not one of gRPC's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownCode(pub String);

impl fmt::Display for UnknownCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a gRPC status code name (such as UNAVAILABLE)",
            self.0
        )
    }
}

impl std::error::Error for UnknownCode {}

/// A set of gRPC status codes: a bit set, so membership costs one AND.
///
/// ```
/// use grpc_resilience_core::CodeSet;
/// use tonic::Code;
///
/// let retryable: CodeSet = "UNAVAILABLE, deadline_exceeded".parse()?;
/// assert!(retryable.contains(Code::DeadlineExceeded));
/// assert!(!retryable.contains(Code::NotFound));
/// # Ok::<(), grpc_resilience_core::codes::UnknownCode>(())
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CodeSet(u32);

impl CodeSet {
    /// No code.
    pub const EMPTY: CodeSet = CodeSet(0);

    /// A set of these codes.
    pub fn of(codes: &[Code]) -> Self {
        codes.iter().fold(CodeSet::EMPTY, |set, &c| set.with(c))
    }

    /// The set with `code` added.
    #[must_use]
    pub const fn with(self, code: Code) -> Self {
        CodeSet(self.0 | (1 << code as u32))
    }

    /// The set without `code`.
    #[must_use]
    pub const fn without(self, code: Code) -> Self {
        CodeSet(self.0 & !(1 << code as u32))
    }

    /// Whether `code` is in the set.
    #[inline]
    pub const fn contains(self, code: Code) -> bool {
        self.0 & (1 << code as u32) != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The codes in the set, in numeric order.
    pub fn iter(self) -> impl Iterator<Item = Code> {
        ALL.into_iter().filter(move |&c| self.contains(c))
    }
}

impl FromIterator<Code> for CodeSet {
    fn from_iter<I: IntoIterator<Item = Code>>(iter: I) -> Self {
        iter.into_iter().fold(CodeSet::EMPTY, CodeSet::with)
    }
}

impl FromStr for CodeSet {
    type Err = UnknownCode;

    /// Code names separated by commas or spaces.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split([',', ' '])
            .filter(|s| !s.is_empty())
            .map(parse_code)
            .collect()
    }
}

impl fmt::Debug for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(code_name)).finish()
    }
}

impl fmt::Display for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(code_name).collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_in_every_spelling() {
        for code in ALL {
            let name = code_name(code);
            assert_eq!(parse_code(name), Ok(code));
            assert_eq!(parse_code(&name.to_lowercase()), Ok(code));
            assert_eq!(parse_code(&format!("{code:?}")), Ok(code), "{code:?}");
        }
        let err = parse_code("UNAVAILIBLE").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`UNAVAILIBLE` is not a gRPC status code name (such as UNAVAILABLE)"
        );
    }

    #[test]
    fn sets() {
        let set: CodeSet = "UNAVAILABLE, INTERNAL  DataLoss".parse().unwrap();
        assert_eq!(
            set,
            CodeSet::of(&[Code::Unavailable, Code::Internal, Code::DataLoss])
        );
        assert_eq!(set.to_string(), "INTERNAL, UNAVAILABLE, DATA_LOSS");
        assert!(
            set.without(Code::Internal)
                .iter()
                .eq([Code::Unavailable, Code::DataLoss])
        );
        assert!("".parse::<CodeSet>().unwrap().is_empty());
        assert!("OK, nope".parse::<CodeSet>().is_err());
        for code in ALL {
            assert!(CodeSet::EMPTY.with(code).contains(code));
            assert_eq!(CodeSet::EMPTY.with(code).iter().count(), 1);
        }
    }
}
