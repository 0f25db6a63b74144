//! The `grpc-timeout` request header, per the gRPC HTTP/2 protocol.
//!
//! `Timeout → TimeoutValue TimeoutUnit`, where the value is a positive
//! integer of at most 8 ASCII digits and the unit one of `H` (hours), `M`
//! (minutes), `S` (seconds), `m` (milliseconds), `u` (microseconds) and `n`
//! (nanoseconds).

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `grpc-timeout` header name.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

const MAX_VALUE: u64 = 99_999_999;

/// Units from the finest to the coarsest, with their length in nanoseconds.
const UNITS: [(u8, u128); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Encodes a duration as a `grpc-timeout` value.
///
/// The value picks the finest unit whose count fits in 8 digits and rounds
/// down, so the encoded timeout never exceeds `timeout`. Durations beyond
/// the largest encodable value (99,999,999 hours) are capped to it.
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience_core::timeout_header::encode;
///
/// assert_eq!(encode(Duration::from_millis(50)), "50000000n");
/// assert_eq!(encode(Duration::from_secs(3)), "3000000u");
/// assert_eq!(encode(Duration::from_nanos(1_234_567_891)), "1234567u");
/// ```
pub fn encode(timeout: Duration) -> HeaderValue {
    let mut buf = [0u8; 9];
    let len = encode_to(timeout, &mut buf);
    HeaderValue::from_bytes(&buf[..len]).expect("digits and a unit letter are a valid header value")
}

/// Writes the encoding of `timeout` into `buf`, returning its length.
/// The value and unit letter `timeout` is encoded with: the finest unit
/// whose value fits in 8 digits, rounded down.
fn value_and_unit(timeout: Duration) -> (u64, u8) {
    let nanos = timeout.as_nanos();
    UNITS
        .iter()
        .find_map(|&(unit, per)| {
            let value = u64::try_from(nanos / per).ok()?;
            (value <= MAX_VALUE).then_some((value, unit))
        })
        .unwrap_or((MAX_VALUE, b'H'))
}

/// Whether a `grpc-timeout` value already states `timeout` as precisely as
/// [`encode`]`(timeout)` would: it decodes to within one unit of that
/// encoding (the format's own precision, about one part in 10^7) of
/// `timeout`, above or below, and never need be closer than
/// [`STATES_WITHIN`] (a millisecond).
///
/// A layer that must send a request with the time left at this moment
/// keeps a header that passes, and so skips encoding and inserting a new
/// one (an allocation), when a layer above wrote it a moment ago: across
/// layers called one from the other, across a buffer's task hop, across a
/// store's round trip. The server reads the same deadline to within a
/// millisecond or what the header can express; a wait longer than that (a
/// queue, a backoff) gets a fresh header.
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience_core::timeout_header::states;
///
/// // Written as 5 s; 300 µs later, 4.9997 s are left: within a millisecond.
/// let left = Duration::from_secs(5) - Duration::from_micros(300);
/// assert!(states(b"5000000u", left));
/// // 2 ms later the old header overstates by 2 ms: rewrite it.
/// assert!(!states(b"5000000u", left - Duration::from_millis(2)));
/// // Past 99,999,999 s the unit is a minute, and a minute's rounding stands.
/// assert!(states(b"1666666M", Duration::from_secs(1_666_666 * 60 + 59)));
/// assert!(!states(b"garbage", left));
/// ```
pub fn states(value: &[u8], timeout: Duration) -> bool {
    let Ok(stated) = decode(value) else {
        return false;
    };
    let (_, unit) = value_and_unit(timeout);
    let per = UNITS
        .iter()
        .find_map(|&(u, per)| (u == unit).then_some(per))
        .unwrap_or(1);
    stated.abs_diff(timeout).as_nanos() < per.max(STATES_WITHIN.as_nanos())
}

/// The finest difference [`states`] tells apart: a millisecond, the unit
/// deadlines are set and acted on in, and about one datacenter round trip,
/// which no `grpc-timeout` accounts for anyway (the server starts its timer
/// when the request arrives). Above the microseconds a task hop or a local
/// store call takes, so those do not cost a rewrite on every call.
pub const STATES_WITHIN: Duration = Duration::from_millis(1);

fn encode_to(timeout: Duration, buf: &mut [u8; 9]) -> usize {
    let (value, unit) = value_and_unit(timeout);
    // Render the digits right to left.
    let mut digits = [0u8; 8];
    let mut n = value;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    buf[..len].copy_from_slice(&digits[i..]);
    buf[len] = unit;
    len + 1
}

/// Decodes a `grpc-timeout` value.
///
/// # Errors
///
/// [`InvalidGrpcTimeout`] when the value is empty, has no digits, more than
/// 8 digits, anything but ASCII digits before the unit, or an unknown unit.
///
/// ```
/// use std::time::Duration;
/// use grpc_resilience_core::timeout_header::decode;
///
/// assert_eq!(decode(b"250m").unwrap(), Duration::from_millis(250));
/// assert!(decode(b"123456789S").is_err());
/// assert!(decode(b"5s").is_err()); // the unit for seconds is `S`
/// ```
pub fn decode(value: &[u8]) -> Result<Duration, InvalidGrpcTimeout> {
    let (&unit, digits) = value
        .split_last()
        .ok_or(InvalidGrpcTimeout(Problem::Empty))?;
    if digits.is_empty() {
        return Err(InvalidGrpcTimeout(Problem::NoDigits));
    }
    if digits.len() > 8 {
        return Err(InvalidGrpcTimeout(Problem::TooManyDigits));
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(InvalidGrpcTimeout(Problem::NotADigit));
        }
        n = n * 10 + u64::from(d - b'0');
    }
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return Err(InvalidGrpcTimeout(Problem::UnknownUnit)),
    })
}

/// Reads the `grpc-timeout` header of a request.
///
/// `Ok(None)` when there is none; the first value counts when the header is
/// repeated.
///
/// # Errors
///
/// As [`decode`].
pub fn from_headers(headers: &HeaderMap) -> Result<Option<Duration>, InvalidGrpcTimeout> {
    crate::headers::get(headers, &GRPC_TIMEOUT)
        .map(|v| decode(v.as_bytes()))
        .transpose()
}

/// A `grpc-timeout` value that breaks the protocol's grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidGrpcTimeout(Problem);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    Empty,
    NoDigits,
    TooManyDigits,
    NotADigit,
    UnknownUnit,
}

impl fmt::Display for InvalidGrpcTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self.0 {
            Problem::Empty => "the value is empty",
            Problem::NoDigits => "there are no digits before the unit",
            Problem::TooManyDigits => "more than 8 digits",
            Problem::NotADigit => "a character before the unit is not an ASCII digit",
            Problem::UnknownUnit => "the unit is not one of H, M, S, m, u, n",
        };
        write!(f, "invalid grpc-timeout header: {reason}")
    }
}

impl std::error::Error for InvalidGrpcTimeout {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_every_unit() {
        assert_eq!(decode(b"2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(decode(b"3M").unwrap(), Duration::from_secs(180));
        assert_eq!(decode(b"4S").unwrap(), Duration::from_secs(4));
        assert_eq!(decode(b"5m").unwrap(), Duration::from_millis(5));
        assert_eq!(decode(b"6u").unwrap(), Duration::from_micros(6));
        assert_eq!(decode(b"7n").unwrap(), Duration::from_nanos(7));
        assert_eq!(decode(b"0n").unwrap(), Duration::ZERO);
        assert_eq!(
            decode(b"99999999H").unwrap(),
            Duration::from_secs(99_999_999 * 3600)
        );
    }

    #[test]
    fn rejects_malformed_values_with_a_reason() {
        for (bad, reason) in [
            (&b""[..], "empty"),
            (b"S", "no digits"),
            (b"123456789S", "more than 8 digits"),
            (b"-1S", "not an ASCII digit"),
            (b"1.5S", "not an ASCII digit"),
            (b" 1S", "not an ASCII digit"),
            (b"10", "unit"),
            (b"10s", "unit"),
            (b"10x", "unit"),
        ] {
            let err = decode(bad).unwrap_err();
            assert!(err.to_string().contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn encodes_with_the_finest_unit_that_fits() {
        assert_eq!(encode(Duration::ZERO), "0n");
        assert_eq!(encode(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(encode(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(encode(Duration::from_secs(5)), "5000000u");
        assert_eq!(encode(Duration::from_secs(100_000)), "100000S");
        assert_eq!(encode(Duration::from_secs(100_000_000)), "1666666M");
        assert_eq!(encode(Duration::MAX), "99999999H");
    }

    #[test]
    fn reads_the_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_headers(&headers), Ok(None));
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("10m"));
        assert_eq!(from_headers(&headers), Ok(Some(Duration::from_millis(10))));
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("ten"));
        assert!(from_headers(&headers).is_err());
    }

    proptest! {
        #[test]
        fn a_fresh_encoding_states_its_timeout_and_a_stated_one_is_as_precise(
            // Half below 200 ms, where the finer units are.
            nanos in prop_oneof![any::<u64>(), 0u64..200_000_000],
            drift in 0u64..2_000,
        ) {
            let t = Duration::from_nanos(nanos);
            let fresh = encode(t);
            prop_assert!(states(fresh.as_bytes(), t));
            // The same header a moment later: kept only while it is within
            // one unit of what a fresh encoding would say, or a millisecond.
            let later = t.saturating_sub(Duration::from_nanos(drift));
            let stated = decode(fresh.as_bytes()).unwrap();
            let (_, unit) = value_and_unit(later);
            let per = UNITS.iter().find(|u| u.0 == unit).unwrap().1.max(1_000_000);
            let within = stated.abs_diff(later).as_nanos() < per;
            prop_assert_eq!(states(fresh.as_bytes(), later), within);
            let again = decode(encode(later).as_bytes()).unwrap();
            prop_assert!(again.abs_diff(later).as_nanos() < per);
        }

        #[test]
        fn encoding_never_exceeds_and_round_trips(nanos in any::<u64>(), secs in 0u64..1u64 << 50) {
            for d in [Duration::from_nanos(nanos), Duration::from_secs(secs)] {
                let value = encode(d);
                prop_assert!(value.len() <= 9);
                let back = decode(value.as_bytes()).unwrap();
                prop_assert!(back <= d, "{:?} encoded as {:?} decodes to {:?}", d, value, back);
                // Precision: the loss is less than one unit of the chosen scale,
                // and the chosen scale is the finest that fits.
                let unit = *value.as_bytes().last().unwrap();
                let per = UNITS.iter().find(|u| u.0 == unit).unwrap().1;
                if d.as_nanos() <= u128::from(MAX_VALUE) * 3_600_000_000_000 {
                    prop_assert!(d.as_nanos() - back.as_nanos() < per);
                }
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = decode(&bytes);
        }
    }
}
