//! The second pass of canonical JSON: the canonical form, written in pieces.

use super::json::{ESCAPED, Object, Scanned, skip_ws};
use super::number::Number;
use super::pointer::Pointers;
use super::string::{key_eq, plain_run, skip_string, unescape, write_char};

/// What stands for a value left out by a pointer: a byte that starts no JSON value, so that a
/// left-out value never looks like a value that was sent.
const LEFT_OUT: u8 = b'?';

impl Scanned<'_> {
    /// The second pass: writes the canonical form to `sink`, in pieces, with `?` for each
    /// value `ignore` points at.
    pub(crate) fn write(&self, ignore: Option<&Pointers>, sink: impl FnMut(&[u8])) {
        let mut writer = Writer {
            scanned: self,
            out: Out {
                buf: [0; OUT_BUF],
                len: 0,
                sink,
            },
        };
        let start = skip_ws(self.body, 0);
        writer.value(start, ignore);
        writer.out.flush();
    }
}

const OUT_BUF: usize = 512;

/// Where the canonical form goes, piece by piece.
pub(super) trait Sink {
    fn byte(&mut self, byte: u8);
    fn bytes(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn byte(&mut self, byte: u8) {
        self.push(byte);
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Collects small pieces into one call of the sink.
struct Out<F: FnMut(&[u8])> {
    buf: [u8; OUT_BUF],
    len: usize,
    sink: F,
}

impl<F: FnMut(&[u8])> Out<F> {
    fn flush(&mut self) {
        if self.len > 0 {
            (self.sink)(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl<F: FnMut(&[u8])> Sink for Out<F> {
    fn byte(&mut self, byte: u8) {
        if self.len == OUT_BUF {
            self.flush();
        }
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        if bytes.len() > OUT_BUF - self.len {
            self.flush();
            if bytes.len() >= OUT_BUF {
                (self.sink)(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

/// Walks a body the scan accepted, so it reads without checking again.
struct Writer<'s, 'a, F: FnMut(&[u8])> {
    scanned: &'s Scanned<'a>,
    out: Out<F>,
}

impl<F: FnMut(&[u8])> Writer<'_, '_, F> {
    /// Writes the value at `at`; returns the offset just past it.
    fn value(&mut self, at: usize, ignore: Option<&Pointers>) -> usize {
        if ignore.is_some_and(Pointers::ignored) {
            self.out.byte(LEFT_OUT);
            return skip_value(self.scanned.body, at);
        }
        match self.scanned.body[at] {
            b'{' => self.object(at, ignore),
            b'[' => self.array(at, ignore),
            b'"' => self.string(at),
            b't' => self.word(at, b"true"),
            b'f' => self.word(at, b"false"),
            b'n' => self.word(at, b"null"),
            _ => self.number(at),
        }
    }

    fn word(&mut self, at: usize, word: &[u8]) -> usize {
        self.out.bytes(word);
        at + word.len()
    }

    fn array(&mut self, at: usize, ignore: Option<&Pointers>) -> usize {
        let body = self.scanned.body;
        self.out.byte(b'[');
        let mut at = skip_ws(body, at + 1);
        let mut index = 0;
        while body[at] != b']' {
            if index > 0 {
                self.out.byte(b',');
            }
            at = self.value(at, ignore.and_then(|node| node.element(index)));
            at = skip_ws(body, at);
            if body[at] == b',' {
                at = skip_ws(body, at + 1);
            }
            index += 1;
        }
        self.out.byte(b']');
        at + 1
    }

    fn object(&mut self, at: usize, ignore: Option<&Pointers>) -> usize {
        let Scanned {
            body,
            objects,
            keys,
        } = self.scanned;
        self.out.byte(b'{');
        let end = match objects.binary_search_by_key(&(at as u32), |object| object.start) {
            Ok(found) => {
                let Object { first, len, .. } = objects[found];
                let mut end = 0;
                for (i, &key) in keys[first as usize..][..len as usize].iter().enumerate() {
                    if i > 0 {
                        self.out.byte(b',');
                    }
                    // The member written last is not the one sent last.
                    end = end.max(self.member(key, ignore));
                }
                skip_ws(body, end)
            }
            // Not recorded: no member, or one.
            Err(_) => {
                let at = skip_ws(body, at + 1);
                if body[at] == b'}' {
                    at
                } else {
                    let key = at as u32 + 1;
                    let escaped = body[plain_run(body, at + 1)] == b'\\';
                    let key = if escaped { key | ESCAPED } else { key };
                    let end = self.member(key, ignore);
                    skip_ws(body, end)
                }
            }
        };
        self.out.byte(b'}');
        end + 1
    }

    /// Writes the member whose key starts at `key`; returns the offset past its value.
    fn member(&mut self, key: u32, ignore: Option<&Pointers>) -> usize {
        let body = self.scanned.body;
        let child = ignore.and_then(|node| node.member(|token| key_eq(body, key, token)));
        let at = (key & !ESCAPED) as usize - 1;
        let at = self.string(at);
        self.out.byte(b':');
        // Past the whitespace, the colon and the whitespace again.
        let at = skip_ws(body, skip_ws(body, at) + 1);
        self.value(at, child)
    }

    /// Writes the string at `at` in its one form: escapes decoded, then `"`, `\` and control
    /// characters escaped as `serde_json` writes them; returns the offset past it.
    fn string(&mut self, at: usize) -> usize {
        let body = self.scanned.body;
        let run = plain_run(body, at + 1);
        if body[run] == b'"' {
            // No escape: the string as sent, quotes included.
            self.out.bytes(&body[at..=run]);
            return run + 1;
        }
        self.out.byte(b'"');
        let mut at = at + 1;
        loop {
            let run = plain_run(body, at);
            self.out.bytes(&body[at..run]);
            if body[run] == b'"' {
                self.out.byte(b'"');
                return run + 1;
            }
            let (c, next) = unescape(body, run + 1).expect("checked by the scan");
            write_char(&mut self.out, c);
            at = next;
        }
    }

    fn number(&mut self, at: usize) -> usize {
        let number = Number::parse(self.scanned.body, at).expect("checked by the scan");
        number.write(self.scanned.body, &mut self.out);
        number.end
    }
}

/// The offset past the value at `at`, in a body the scan accepted.
fn skip_value(body: &[u8], at: usize) -> usize {
    match body[at] {
        b'"' => skip_string(body, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut at = at;
            loop {
                match body[at] {
                    b'"' => {
                        at = skip_string(body, at);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return at + 1;
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
        }
        b't' | b'n' => at + 4,
        b'f' => at + 5,
        _ => Number::parse(body, at).expect("checked by the scan").end,
    }
}
