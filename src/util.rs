//! Small helpers the whole crate shares: SHA-256 for short messages, hex, decimal, random
//! bytes, and shares of a process-wide bound.

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

/// SHA-256 (FIPS 180-4) on `sha2`'s block function, for the short messages of every keyed
/// request (a tenant id, a fingerprint's head): a prefix known when the crate is compiled
/// starts in the buffer ([`chain`](Self::chain) is `const`), a piece is copied into the
/// buffer until a block fills, and the last block or two are compressed in one call. Its
/// digests are `sha2::Sha256`'s, byte for byte.
#[derive(Clone)]
pub(crate) struct Sha256 {
    state: [u32; 8],
    /// Bytes hashed so far; the last `len % 64` of them wait in `buf`.
    len: u64,
    /// The block being filled; past its `len % 64` bytes, zeros.
    buf: [u8; 64],
}

/// SHA-256's initial state (FIPS 180-4, 5.3.3).
pub(crate) const SHA256_INITIAL: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

impl Sha256 {
    /// A hasher that has hashed nothing.
    pub(crate) const fn new() -> Self {
        Self::after_blocks(SHA256_INITIAL, 0)
    }

    /// A hasher whose state is `state` after `blocks` whole blocks (an HMAC key's block).
    pub(crate) const fn after_blocks(state: [u32; 8], blocks: u64) -> Self {
        Self {
            state,
            len: blocks * 64,
            buf: [0; 64],
        }
    }

    /// This hasher after `bytes`, which must fit in its block (for constants).
    ///
    /// # Panics
    ///
    /// When `bytes` do not fit before the block's end: at compile time, in a constant.
    pub(crate) const fn chain(mut self, bytes: &[u8]) -> Self {
        let at = (self.len % 64) as usize;
        assert!(at + bytes.len() < 64, "a constant prefix fits in one block");
        let mut i = 0;
        while i < bytes.len() {
            self.buf[at + i] = bytes[i];
            i += 1;
        }
        self.len += bytes.len() as u64;
        self
    }

    /// Hashes `bytes`.
    #[inline]
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        let at = (self.len % 64) as usize;
        self.len += bytes.len() as u64;
        if at + bytes.len() < 64 {
            // It leaves room in the block: a copy (the block is compressed once it is full).
            self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        } else {
            self.fill(at, bytes);
        }
    }

    /// Hashes `n`, big-endian.
    #[inline]
    pub(crate) fn update_u64(&mut self, n: u64) {
        self.update(&n.to_be_bytes());
    }

    /// Hashes `bytes`, which fill the block from `at` on and maybe more.
    #[inline(never)]
    fn fill(&mut self, at: usize, bytes: &[u8]) {
        use sha2::block_api::compress256;
        let mut rest = bytes;
        if at > 0 {
            let (head, tail) = rest.split_at(64 - at);
            self.buf[at..].copy_from_slice(head);
            compress256(&mut self.state, std::slice::from_ref(&self.buf));
            rest = tail;
        }
        let (blocks, tail) = rest.as_chunks::<64>();
        if !blocks.is_empty() {
            compress256(&mut self.state, blocks);
        }
        self.buf = [0; 64];
        self.buf[..tail.len()].copy_from_slice(tail);
    }

    /// The digest: the rest, `0x80`, zeros and the length in bits, in one block or two,
    /// compressed in one call.
    pub(crate) fn finish(self) -> [u8; 32] {
        let at = (self.len % 64) as usize;
        // Past `at`, the buffer holds zeros already.
        let mut last = [self.buf, [0; 64]];
        last[0][at] = 0x80;
        let used = if at < 56 { 1 } else { 2 };
        last[used - 1][56..].copy_from_slice(&(self.len * 8).to_be_bytes());
        let mut state = self.state;
        sha2::block_api::compress256(&mut state, &last[..used]);
        be_bytes(state)
    }
}

/// SHA-256's state words as digest bytes (big-endian).
#[inline]
pub(crate) fn be_bytes(state: [u32; 8]) -> [u8; 32] {
    let mut digest = [0; 32];
    for (bytes, word) in digest.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    digest
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

/// The first two values of the `name` field in `headers`: the one to read, and one more when
/// the field was sent more than once. Most messages have a few fields: a look at their names
/// costs less than the map's lookup, which hashes `name` first (a custom name byte by byte).
#[inline]
pub(crate) fn first_two<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
) -> (Option<&'a http::HeaderValue>, Option<&'a http::HeaderValue>) {
    if headers.keys_len() <= FEW_FIELDS {
        let mut values = headers.iter().filter(|(field, _)| *field == name);
        (values.next().map(|(_, v)| v), values.next().map(|(_, v)| v))
    } else {
        let mut values = headers.get_all(name).iter();
        (values.next(), values.next())
    }
}

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

    /// The digest of every length around a block and its padding (55, 56, 63, 64, 119, 120,
    /// 128 bytes), after a constant prefix of every length and in pieces of every size, is
    /// `sha2`'s.
    #[test]
    fn sha256_is_sha2_s() {
        use sha2::Digest;
        const PREFIX: super::Sha256 = super::Sha256::new().chain(b"a prefix of 23 bytes...");
        let message: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..message.len() {
            let message = &message[..len];
            let expected: [u8; 32] = sha2::Sha256::digest(message).into();
            for piece in [1, 3, 8, 55, 63, 64, 65, 200, 300] {
                let mut sha = super::Sha256::new();
                message.chunks(piece).for_each(|chunk| sha.update(chunk));
                assert_eq!(sha.finish(), expected, "{len} in pieces of {piece}");
            }
            let mut prefixed = PREFIX;
            prefixed.update(message);
            let expected: [u8; 32] = sha2::Sha256::new_with_prefix(b"a prefix of 23 bytes...")
                .chain_update(message)
                .finalize()
                .into();
            assert_eq!(prefixed.finish(), expected, "{len} after a prefix");
        }
        let mut numbers = super::Sha256::new().chain(b"x");
        numbers.update_u64(7);
        numbers.update_u64(u64::MAX);
        let expected = sha2::Sha256::new_with_prefix(b"x")
            .chain_update(7u64.to_be_bytes())
            .chain_update(u64::MAX.to_be_bytes())
            .finalize();
        assert_eq!(numbers.finish()[..], expected[..]);
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
