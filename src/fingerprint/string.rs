//! JSON strings: escapes decoded, keys compared by their decoded bytes, and written back in one
//! form.

use std::cmp::Ordering;

use super::json::ESCAPED;
use super::write::Sink;

/// The offset of the first `"`, `\` or control character from `at` (or the body's end).
pub(super) fn plain_run(body: &[u8], mut at: usize) -> usize {
    // Eight bytes at a time while none of them stops the run.
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v;
    while let Some(chunk) = body.get(at..at + 8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let stops = has_zero(x ^ (ONES * u64::from(b'"')))
            | has_zero(x ^ (ONES * u64::from(b'\\')))
            | (x.wrapping_sub(ONES * 0x20) & !x);
        if stops & HIGH != 0 {
            // The lowest byte flagged is the first that stops the run (a flag can be wrong
            // only above a byte rightly flagged).
            return at + (stops & HIGH).trailing_zeros() as usize / 8;
        }
        at += 8;
    }
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

/// Orders two keys, each its offset (flagged [`ESCAPED`]) and the offset of its closing quote,
/// by their decoded bytes (the order of Rust's `str`).
pub(super) fn compare_keys(body: &[u8], a: (u32, u32), b: (u32, u32)) -> Ordering {
    if (a.0 | b.0) & ESCAPED == 0 {
        let (a, b) = (
            &body[a.0 as usize..a.1 as usize],
            &body[b.0 as usize..b.1 as usize],
        );
        // Keys are short and mostly differ early: cheaper than a call to `memcmp`.
        match a.iter().zip(b).find(|(x, y)| x != y) {
            Some((x, y)) => x.cmp(y),
            None => a.len().cmp(&b.len()),
        }
    } else {
        key_bytes(body, a.0).cmp(key_bytes(body, b.0))
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn naive_run(body: &[u8], at: usize) -> usize {
        at + body[at..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(body.len() - at)
    }

    #[test]
    fn runs_stop_at_quotes_backslashes_and_control_characters() {
        let body = b"abcdefghijklmnop\"q";
        assert_eq!(plain_run(body, 0), 16);
        assert_eq!(plain_run(b"0123456\\", 0), 7);
        assert_eq!(plain_run(b"\x1f2345678", 0), 0);
        assert_eq!(plain_run("ééééééé\u{7f}x".as_bytes(), 0), 16);
        assert_eq!(plain_run(b"short", 0), 5);
        assert_eq!(plain_run(b"", 0), 0);
    }

    #[test]
    fn escapes() {
        let decode = |s: &str| unescape(s.as_bytes(), 0);
        assert_eq!(decode("n"), Some(('\n', 1)));
        assert_eq!(decode("/"), Some(('/', 1)));
        assert_eq!(decode("u00e9"), Some(('é', 5)));
        assert_eq!(decode("uD83D\\uDE00"), Some(('😀', 11)));
        for bad in [
            "x",
            "u12",
            "uD83D",
            "uD83D\\n",
            "uD83D\\u0041",
            "uDE00",
            "u00G0",
            "",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_compare_decoded() {
        // `"b"`, `"\u0061"` (a), `"a"`, `"ab"` in one body.
        let body = br#""b""\u0061""a""ab""#;
        let plain = |at: u32, end: u32| (at, end);
        let escaped = |at: u32, end: u32| (at | ESCAPED, end);
        let (b, a_escaped, a, ab) = (plain(1, 2), escaped(4, 10), plain(12, 13), plain(15, 17));
        assert_eq!(compare_keys(body, a, b), Ordering::Less);
        assert_eq!(compare_keys(body, a_escaped, a), Ordering::Equal);
        assert_eq!(compare_keys(body, a_escaped, b), Ordering::Less);
        assert_eq!(compare_keys(body, ab, a), Ordering::Greater);
        assert_eq!(compare_keys(body, a_escaped, ab), Ordering::Less);
        assert!(key_eq(body, a_escaped.0, b"a"));
        assert!(!key_eq(body, a_escaped.0, b"ab"));
        assert!(key_eq(body, ab.0, b"ab"));
    }

    proptest! {
        #[test]
        fn eight_at_a_time_is_one_at_a_time(body in prop::collection::vec(any::<u8>(), 0..64), at in 0usize..64) {
            let at = at.min(body.len());
            prop_assert_eq!(plain_run(&body, at), naive_run(&body, at));
        }

        #[test]
        fn mostly_plain_runs(prefix in "[a-zé ]{0,40}", stop in prop::sample::select(vec![b'"', b'\\', 0u8, 0x1f, b'\n'])) {
            let mut body = prefix.into_bytes();
            body.push(stop);
            body.extend_from_slice(b"tail after the stop");
            prop_assert_eq!(plain_run(&body, 0), naive_run(&body, 0));
        }
    }
}
