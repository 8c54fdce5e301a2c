//! Small helpers the whole crate shares: hex, decimal, random bytes, and shares of a
//! process-wide bound.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A share of a process-wide bound (background tasks under way, bytes they keep), counted in
/// its total while it lives.
pub(crate) struct Share {
    total: &'static AtomicUsize,
    amount: usize,
}

impl Share {
    /// Takes `amount` of `total`, if `total` stays within `most`.
    pub(crate) fn take(total: &'static AtomicUsize, amount: usize, most: usize) -> Option<Self> {
        if total.fetch_add(amount, Ordering::Relaxed) + amount <= most {
            return Some(Self { total, amount });
        }
        total.fetch_sub(amount, Ordering::Relaxed);
        None
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.total.fetch_sub(self.amount, Ordering::Relaxed);
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    Hex(bytes).to_string()
}

/// Displays bytes as lowercase hex, without an intermediate string.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Up to 32 bytes at a time, in one write: a tenant id or a fingerprint is one.
        self.0
            .chunks(32)
            .try_for_each(|chunk| f.write_str(hex_chunk(chunk, &mut [0; 64])))
    }
}

/// The 64 lowercase hex digits of 32 bytes (a tenant id), without going through `fmt`: each
/// byte's two digits are one look-up.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn hex32(bytes: &[u8; 32]) -> [u8; 64] {
    let mut digits = [0; 64];
    for (i, &byte) in bytes.iter().enumerate() {
        [digits[2 * i], digits[2 * i + 1]] = HEX_PAIRS[usize::from(byte)];
    }
    digits
}

/// The two lowercase hex digits of every byte.
static HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [DIGITS[byte >> 4], DIGITS[byte & 0xf]];
        byte += 1;
    }
    pairs
};

/// Writes `chunk` (at most 32 bytes) as hex into `buf`, and returns the digits.
fn hex_chunk<'a>(chunk: &[u8], buf: &'a mut [u8; 64]) -> &'a str {
    for (pair, &byte) in buf.chunks_exact_mut(2).zip(chunk) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    let digits = &buf[..chunk.len().min(32) * 2];
    // Only ASCII hex digits: this never fails.
    std::str::from_utf8(digits).unwrap_or_default()
}

/// A `u64` in decimal, in a buffer of its own.
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub(crate) fn of(mut n: u64) -> Self {
        let mut digits = [0; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Self { digits, start }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

#[cfg(test)]
impl PartialEq<&str> for Decimal {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

#[cfg(test)]
impl std::fmt::Debug for Decimal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only ASCII digits.
        f.write_str(std::str::from_utf8(self.as_bytes()).map_err(|_| std::fmt::Error)?)
    }
}

/// The most fields a map may have for a field to be found by looking at their names rather than
/// by the map's lookup, which hashes the name first (a custom name byte by byte): a look at a
/// few names costs less.
pub(crate) const FEW_FIELDS: usize = 16;

/// Whether `headers` has a `name` field. Most messages have a few fields: a look at their names
/// costs less than hashing `name` for the map's lookup (a custom name is hashed byte by byte), so
/// the map is asked only when the fields are many.
#[inline]
pub(crate) fn has_header(headers: &http::HeaderMap, name: &http::HeaderName) -> bool {
    if headers.keys_len() > FEW_FIELDS {
        headers.contains_key(name)
    } else {
        headers.keys().any(|field| field == name)
    }
}

/// Removes every `name` field from `headers`. Most responses lack this one: the map is asked to
/// remove it only when [`has_header`] finds it.
#[inline]
pub(crate) fn remove_header(headers: &mut http::HeaderMap, name: &http::HeaderName) {
    if has_header(headers, name) {
        headers.remove(name);
    }
}

/// 32 bytes from the operating system's cryptographically secure random source. Should it
/// fail (no such source in this environment), each 8 come from a standard-library
/// `RandomState` instead, whose SipHash keys std draws from the same source (or the clock).
#[cfg(any(feature = "tracing", feature = "client"))]
pub(crate) fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    if getrandom::fill(&mut bytes).is_err() {
        use std::hash::{BuildHasher, Hasher};
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_usize(i);
            chunk.copy_from_slice(&hasher.finish().to_le_bytes());
        }
    }
    bytes
}

/// A map of `count` fields, `x-field-0` and on, for tests of lookups among few fields and many.
#[cfg(test)]
pub(crate) fn other_fields(count: usize) -> http::HeaderMap {
    (0..count)
        .map(|i| {
            let name = http::HeaderName::from_bytes(format!("x-field-{i}").as_bytes()).unwrap();
            (name, http::HeaderValue::from(i))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// Every value of the name goes, whether the map has a few fields or many, and nothing
    /// else does.
    #[test]
    fn remove_header_removes_every_value_of_the_name_alone() {
        use http::{HeaderName, HeaderValue};
        let name = HeaderName::from_static("idempotent-replayed");
        for others in [0, 3, super::FEW_FIELDS, 40] {
            let mut headers = super::other_fields(others);
            super::remove_header(&mut headers, &name);
            assert_eq!(headers.len(), others, "nothing to remove among {others}");
            headers.append(&name, HeaderValue::from_static("true"));
            headers.append(&name, HeaderValue::from_static("false"));
            headers.append(http::header::CONTENT_TYPE, HeaderValue::from_static("a/b"));
            super::remove_header(&mut headers, &name);
            assert!(!headers.contains_key(&name), "removed among {others}");
            assert_eq!(headers.len(), others + 1, "the rest kept among {others}");
        }
    }

    #[test]
    fn hex_is_lowercase_pairs() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
        // Past one chunk of 32 bytes, and ending inside one.
        for len in [1, 31, 32, 33, 64, 70] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(super::hex(&bytes), expected, "{len}");
        }
        // Every byte's pair, in each of the 32 places.
        for first in 0..=255u8 {
            let bytes: [u8; 32] = std::array::from_fn(|i| first.wrapping_add(i as u8 * 8));
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(super::hex32(&bytes), expected.as_bytes(), "{first}");
        }
    }

    #[test]
    fn decimal_digits() {
        for n in [0, 9, 10, 99, 1_000, 123_456_789, u64::MAX] {
            assert_eq!(super::Decimal::of(n), &*n.to_string());
        }
    }

    #[test]
    #[cfg(any(feature = "tracing", feature = "client"))]
    fn random_bytes_differ() {
        assert_ne!(super::random_bytes(), super::random_bytes());
    }
}
