//! JSON strings: escapes decoded, keys compared by their decoded bytes, and written back in one
//! form.

use std::cmp::Ordering;

use super::json::ESCAPED;
use super::write::Sink;

/// The offset of the first `"`, `\` or control character from `at` (or the body's end).
pub(super) fn plain_run(body: &[u8], at: usize) -> usize {
    at + body[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(body.len() - at)
}

/// Decodes the escape whose letter is at `at` (just past the `\`): the character and the
/// offset past the escape; `None` when it is not a valid escape (a lone surrogate included).
pub(super) fn unescape(body: &[u8], at: usize) -> Option<(char, usize)> {
    let c = match *body.get(at)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let high = hex4(body, at + 1)?;
            if (0xDC00..0xE000).contains(&high) {
                return None;
            }
            if !(0xD800..0xDC00).contains(&high) {
                return Some((char::from_u32(high)?, at + 5));
            }
            if body.get(at + 5..at + 7) != Some(b"\\u") {
                return None;
            }
            let low = hex4(body, at + 7)?;
            if !(0xDC00..0xE000).contains(&low) {
                return None;
            }
            let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return Some((char::from_u32(c)?, at + 11));
        }
        _ => return None,
    };
    Some((c, at + 1))
}

fn hex4(body: &[u8], at: usize) -> Option<u32> {
    body.get(at..at + 4)?
        .iter()
        .try_fold(0, |n, &b| Some(n * 16 + char::from(b).to_digit(16)?))
}

/// The decoded bytes (UTF-8) of the key that starts at `key`.
fn key_bytes(body: &[u8], key: u32) -> KeyBytes<'_> {
    KeyBytes {
        body,
        at: (key & !ESCAPED) as usize,
        pending: [0; 4],
        pending_at: 0,
        pending_len: 0,
    }
}

/// The raw bytes of a key with no escape.
fn plain_key(body: &[u8], key: u32) -> &[u8] {
    let at = key as usize;
    &body[at..plain_run(body, at)]
}

/// Orders two keys by their decoded bytes (the order of Rust's `str`).
pub(super) fn compare_keys(body: &[u8], a: u32, b: u32) -> Ordering {
    if (a | b) & ESCAPED == 0 {
        plain_key(body, a).cmp(plain_key(body, b))
    } else {
        key_bytes(body, a).cmp(key_bytes(body, b))
    }
}

/// Whether the key at `key`, decoded, is `token`.
pub(super) fn key_eq(body: &[u8], key: u32, token: &[u8]) -> bool {
    if key & ESCAPED == 0 {
        plain_key(body, key) == token
    } else {
        key_bytes(body, key).eq(token.iter().copied())
    }
}

struct KeyBytes<'a> {
    body: &'a [u8],
    at: usize,
    pending: [u8; 4],
    pending_at: u8,
    pending_len: u8,
}

impl Iterator for KeyBytes<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        if self.pending_at < self.pending_len {
            self.pending_at += 1;
            return Some(self.pending[usize::from(self.pending_at - 1)]);
        }
        match self.body[self.at] {
            b'"' => None,
            b'\\' => {
                let (c, next) = unescape(self.body, self.at + 1).expect("checked by the scan");
                self.at = next;
                let len = c.encode_utf8(&mut self.pending).len();
                self.pending_at = 1;
                self.pending_len = len as u8;
                Some(self.pending[0])
            }
            byte => {
                self.at += 1;
                Some(byte)
            }
        }
    }
}

/// Writes one character of a string's content the way `serde_json` does.
pub(super) fn write_char(out: &mut impl Sink, c: char) {
    let escaped: &[u8] = match c {
        '"' => b"\\\"",
        '\\' => b"\\\\",
        '\u{8}' => b"\\b",
        '\u{c}' => b"\\f",
        '\n' => b"\\n",
        '\r' => b"\\r",
        '\t' => b"\\t",
        c if (c as u32) < 0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let n = c as usize;
            out.bytes(&[b'\\', b'u', b'0', b'0', HEX[n >> 4], HEX[n & 0xf]]);
            return;
        }
        c => {
            out.bytes(c.encode_utf8(&mut [0; 4]).as_bytes());
            return;
        }
    };
    out.bytes(escaped);
}

/// The offset past the string whose opening quote is at `at`.
pub(super) fn skip_string(body: &[u8], at: usize) -> usize {
    let mut at = at + 1;
    loop {
        match body[at] {
            b'"' => return at + 1,
            b'\\' => at += 2,
            _ => at += 1,
        }
    }
}
