//! What the layer records for a key: the request's fingerprint and the
//! handler's whole response, with a compact binary encoding for stores that
//! keep bytes (Redis, a database).

use std::fmt;
use std::hash::Hasher;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use grpc_resilience_core::{Outcome, classify_head, classify_trailers};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use siphasher::sip128::{Hasher128, SipHasher24};
use tonic::Code;

use crate::error::DecodeError;

/// A 128-bit digest of a request: its method path and its body.
///
/// Two requests with the same key must have the same fingerprint; a key
/// reused with another fingerprint is refused with `FAILED_PRECONDITION`.
/// The digest is SipHash-2-4 with a 128-bit output and fixed keys, so every
/// replica of a fleet computes the same value. It is not a cryptographic
/// hash: it guards against a client's mistakes (a key reused for another
/// request), where an accidental collision has a probability near 2^-128.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(u128);

impl Fingerprint {
    /// The fingerprint of a request to `path` with message bytes `body`.
    pub fn of(path: &str, body: &[u8]) -> Self {
        let mut hasher = SipHasher24::new_with_keys(0x6772_7063_2d69_6465, 0x6d70_6f74_656e_6379);
        // Length-prefixed, so `("/a", "bc")` and `("/ab", "c")` differ.
        hasher.write_u64(path.len() as u64);
        hasher.write(path.as_bytes());
        hasher.write(body);
        Fingerprint(hasher.finish128().as_u128())
    }

    /// A fingerprint from its 128 bits (as a store kept them).
    pub const fn from_u128(bits: u128) -> Self {
        Fingerprint(bits)
    }

    /// The 128 bits of the fingerprint.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:032x})", self.0)
    }
}

/// The recorded outcome of a handler for one key: the fingerprint of the
/// request that produced it, and the response (HTTP status, headers, the
/// body's bytes, trailers) to replay to repeats.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    fingerprint: Fingerprint,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

/// The first byte of an encoded record: the format's version.
const FORMAT_V1: u8 = 1;

impl Record {
    /// A record of a response.
    pub fn new(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Record {
            fingerprint,
            status,
            headers,
            body,
            trailers,
        }
    }

    /// The fingerprint of the request that produced the response.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The HTTP status of the response (200 for every gRPC answer).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response headers (for a Trailers-Only error they hold
    /// `grpc-status`).
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The response body's bytes (length-prefixed gRPC messages).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The trailers, if the response had any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// The gRPC code of the recorded call: from the headers of a
    /// Trailers-Only response, else from the trailers (`UNKNOWN` when they
    /// hold none).
    pub fn code(&self) -> Code {
        let outcome = classify_head(self.status, &self.headers).unwrap_or_else(|| {
            self.trailers
                .as_ref()
                .map_or(Outcome::Status(Code::Unknown), classify_trailers)
        });
        outcome.code()
    }

    /// About how many bytes the record takes: its body and its headers.
    pub fn size(&self) -> usize {
        let map_size = |map: &HeaderMap| {
            map.iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 8)
                .sum::<usize>()
        };
        self.body.len() + map_size(&self.headers) + self.trailers.as_ref().map_or(0, map_size) + 32
    }

    /// Encodes the record as bytes, for a store that keeps bytes;
    /// [`Record::decode`] reads them back.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.size() + 16);
        out.put_u8(FORMAT_V1);
        out.put_u128(self.fingerprint.0);
        out.put_u16(self.status.as_u16());
        put_map(&mut out, &self.headers);
        match &self.trailers {
            Some(trailers) => {
                out.put_u8(1);
                put_map(&mut out, trailers);
            }
            None => out.put_u8(0),
        }
        out.put_u32(self.body.len() as u32);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decodes a record written by [`Record::encode`].
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when the bytes are not such a record (another
    /// version, truncated, an invalid header), naming what was wrong.
    pub fn decode(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let buf = &mut bytes;
        let version = take_u8(buf)?;
        if version != FORMAT_V1 {
            return Err(DecodeError::new(format!(
                "unknown record format version {version}"
            )));
        }
        need(buf, 18)?;
        let fingerprint = Fingerprint(buf.get_u128());
        let status = StatusCode::from_u16(buf.get_u16())
            .map_err(|_| DecodeError::new("invalid HTTP status"))?;
        let headers = take_map(buf)?;
        let trailers = match take_u8(buf)? {
            0 => None,
            1 => Some(take_map(buf)?),
            other => return Err(DecodeError::new(format!("invalid trailers flag {other}"))),
        };
        let body = Bytes::copy_from_slice(take_bytes(buf)?);
        if !buf.is_empty() {
            return Err(DecodeError::new(format!(
                "{} bytes after the end of the record",
                buf.len()
            )));
        }
        Ok(Record {
            fingerprint,
            status,
            headers,
            body,
            trailers,
        })
    }
}

fn put_map(out: &mut BytesMut, map: &HeaderMap) {
    out.put_u32(map.len() as u32);
    for (name, value) in map {
        out.put_u32(name.as_str().len() as u32);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
}

fn need(buf: &[u8], n: usize) -> Result<(), DecodeError> {
    if buf.len() < n {
        Err(DecodeError::new("the record is truncated"))
    } else {
        Ok(())
    }
}

fn take_u8(buf: &mut &[u8]) -> Result<u8, DecodeError> {
    need(buf, 1)?;
    Ok(buf.get_u8())
}

fn take_bytes<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    need(buf, 4)?;
    let len = buf.get_u32() as usize;
    need(buf, len)?;
    let (bytes, rest) = buf.split_at(len);
    *buf = rest;
    Ok(bytes)
}

fn take_map(buf: &mut &[u8]) -> Result<HeaderMap, DecodeError> {
    need(buf, 4)?;
    let count = buf.get_u32() as usize;
    // Each entry takes at least 8 bytes: do not trust a count the bytes
    // cannot hold.
    need(buf, count.saturating_mul(8))?;
    let mut map = HeaderMap::with_capacity(count);
    for _ in 0..count {
        let name = HeaderName::from_bytes(take_bytes(buf)?)
            .map_err(|_| DecodeError::new("invalid header name"))?;
        let value = HeaderValue::from_bytes(take_bytes(buf)?)
            .map_err(|_| DecodeError::new("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Record::new(
            Fingerprint::of("/pkg.Svc/Create", b"hello"),
            StatusCode::OK,
            headers,
            Bytes::from_static(b"\0\0\0\0\x02hi"),
            Some(trailers),
        )
    }

    #[test]
    fn encoding_round_trips() {
        let record = sample();
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(decoded.code(), Code::Ok);
        let trailers_only = Record::new(
            Fingerprint::from_u128(7),
            StatusCode::OK,
            {
                let mut h = HeaderMap::new();
                h.insert("grpc-status", HeaderValue::from_static("6"));
                h
            },
            Bytes::new(),
            None,
        );
        let decoded = Record::decode(&trailers_only.encode()).unwrap();
        assert_eq!(decoded, trailers_only);
        assert_eq!(decoded.code(), Code::AlreadyExists);
    }

    #[test]
    fn decoding_rejects_every_truncation_and_garbage_without_panicking() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            let err = Record::decode(&bytes[..len]).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(
            Record::decode(&longer)
                .unwrap_err()
                .to_string()
                .contains("after the end")
        );
        let mut other_version = bytes.to_vec();
        other_version[0] = 9;
        assert!(
            Record::decode(&other_version)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        // A header count the bytes cannot hold.
        let mut huge = vec![FORMAT_V1];
        huge.extend_from_slice(&[0; 16]);
        huge.extend_from_slice(&200u16.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(Record::decode(&huge).is_err());
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn records_round_trip(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), bits in proptest::prelude::any::<u128>()) {
            let record = Record::new(Fingerprint::from_u128(bits), StatusCode::OK, HeaderMap::new(), Bytes::from(body), None);
            proptest::prop_assert_eq!(Record::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn fingerprints_separate_paths_and_bodies() {
        let a = Fingerprint::of("/a", b"bc");
        assert_eq!(a, Fingerprint::of("/a", b"bc"));
        assert_ne!(a, Fingerprint::of("/ab", b"c"));
        assert_ne!(a, Fingerprint::of("/a", b"bd"));
        assert_eq!(Fingerprint::from_u128(a.as_u128()), a);
    }
}
