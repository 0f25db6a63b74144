//! How durations, code sets and jitter are written in a config file.

use std::fmt;
use std::time::Duration;

use grpc_resilience_core::CodeSet;
use grpc_resilience_core::codes::parse_code;
use grpc_retry::Jitter;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};

/// Parses a duration as written in a config: integer milliseconds, or a
/// string with units (`"100ms"`, `"30s"`, `"1m 30s"`).
pub(crate) fn parse_duration_text(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if let Ok(ms) = trimmed.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(trimmed).map_err(|e| {
        format!(
            "invalid duration `{text}` ({e}): write integer milliseconds (100) or a string with a unit (\"100ms\", \"30s\")"
        )
    })
}

/// Writes a duration as a string with units, `"100ms"`, `"5s"`.
pub(crate) fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

struct DurationVisitor;

impl<'de> Visitor<'de> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration: integer milliseconds or a string such as \"100ms\" or \"30s\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        Ok(Duration::from_millis(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        u64::try_from(v)
            .map(Duration::from_millis)
            .map_err(|_| E::custom(format!("a duration cannot be negative ({v})")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "a duration in milliseconds must be an integer ({v}); for fractions write a string such as \"1.5s\""
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
        parse_duration_text(v).map_err(E::custom)
    }
}

/// `Option<Duration>` fields.
pub(crate) mod opt_duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&duration_text(*d)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor).map(Some)
    }
}

/// A timeout that may be `"none"` (no timeout for those methods).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MaybeTimeout(pub(crate) Option<Duration>);

impl serde::Serialize for MaybeTimeout {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(d) => s.serialize_str(&duration_text(d)),
            None => s.serialize_str("none"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for MaybeTimeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeTimeout;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration (integer milliseconds or \"100ms\") or \"none\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MaybeTimeout, E> {
                DurationVisitor.visit_u64(v).map(|d| MaybeTimeout(Some(d)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MaybeTimeout, E> {
                DurationVisitor.visit_i64(v).map(|d| MaybeTimeout(Some(d)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<MaybeTimeout, E> {
                DurationVisitor.visit_f64(v).map(|d| MaybeTimeout(Some(d)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MaybeTimeout, E> {
                if v.trim().eq_ignore_ascii_case("none") {
                    return Ok(MaybeTimeout(None));
                }
                DurationVisitor.visit_str(v).map(|d| MaybeTimeout(Some(d)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `Option<CodeSet>` fields: a list of code names (any case, snake or
/// screaming: `unavailable`, `DEADLINE_EXCEEDED`), numbers, or one string
/// of names separated by commas.
pub(crate) mod opt_codes {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Option<CodeSet>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(set) => {
                let names: Vec<&str> = set
                    .iter()
                    .map(grpc_resilience_core::codes::code_name)
                    .collect();
                let mut seq = s.serialize_seq(Some(names.len()))?;
                for n in names {
                    seq.serialize_element(n)?;
                }
                seq.end()
            }
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<CodeSet>, D::Error> {
        d.deserialize_any(CodesVisitor).map(Some)
    }
}

pub(crate) fn code_from_number(n: i64) -> Option<tonic::Code> {
    let code = i32::try_from(n).ok().map(tonic::Code::from_i32)?;
    // `from_i32` maps anything unknown to Unknown (2).
    (code != tonic::Code::Unknown || n == 2).then_some(code)
}

struct CodesVisitor;

impl<'de> Visitor<'de> for CodesVisitor {
    type Value = CodeSet;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a list of gRPC status code names, such as [\"UNAVAILABLE\", \"deadline_exceeded\"]",
        )
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<CodeSet, E> {
        v.parse::<CodeSet>().map_err(|e| E::custom(e.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CodeSet, A::Error> {
        let mut set = CodeSet::EMPTY;
        while let Some(item) = seq.next_element::<CodeItem>()? {
            set = set.with(item.0);
        }
        Ok(set)
    }
}

struct CodeItem(tonic::Code);

impl<'de> serde::Deserialize<'de> for CodeItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CodeItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a gRPC status code name (such as UNAVAILABLE) or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CodeItem, E> {
                parse_code(v)
                    .map(CodeItem)
                    .map_err(|e| E::custom(e.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CodeItem, E> {
                code_from_number(v).map(CodeItem).ok_or_else(|| {
                    E::custom(format!("{v} is not a gRPC status code number (0 to 16)"))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CodeItem, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

/// `Option<Jitter>` fields: `true` (gRPC's ±20 %), `false` (none),
/// `"full"`, or a fraction such as `0.1` (±10 %).
pub(crate) mod opt_jitter {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Option<Jitter>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(Jitter::None) => s.serialize_bool(false),
            Some(Jitter::Full) => s.serialize_str("full"),
            Some(Jitter::Proportional(f)) if *f == 0.2 => s.serialize_bool(true),
            Some(Jitter::Proportional(f)) => s.serialize_f64(*f),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Jitter>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Jitter;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, \"full\", \"none\" or a fraction such as 0.2")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Jitter, E> {
                Ok(if v {
                    Jitter::Proportional(0.2)
                } else {
                    Jitter::None
                })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Jitter, E> {
                Ok(Jitter::Proportional(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Jitter, E> {
                Ok(Jitter::Proportional(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Jitter, E> {
                Ok(Jitter::Proportional(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Jitter, E> {
                match v.trim().to_ascii_lowercase().as_str() {
                    "full" => Ok(Jitter::Full),
                    "none" | "off" => Ok(Jitter::None),
                    "proportional" | "on" => Ok(Jitter::Proportional(0.2)),
                    _ => Err(E::custom(format!(
                        "unknown jitter `{v}`: write true, false, \"full\", \"none\" or a fraction such as 0.2"
                    ))),
                }
            }
        }
        d.deserialize_any(V).map(Some)
    }
}
