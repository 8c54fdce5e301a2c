//! Canonical JSON, written straight into the fingerprint's hasher.
//!
//! Two passes over the body, no tree of values:
//!
//! 1. [`scan`] checks that the body is one JSON value (RFC 8259, UTF-8), at most
//!    [`MAX_DEPTH`] levels deep, with no key twice in an object. For each object of two or more
//!    members it keeps the offsets of their keys, sorted: 4 bytes per member and 12 per object,
//!    offsets into the body, nothing copied (and, while an object is open, 8 bytes per member
//!    of it). Arrays, scalars and objects of one member are kept nowhere.
//! 2. [`Scanned::write`] walks the body again and writes the canonical form in pieces to a sink
//!    (the hasher), through a small buffer: members in key order, no whitespace, each string
//!    and number in one form (see [`IdempotencyLayer::canonical_json`] for the forms), and the
//!    values the pointers name replaced by `?`.
//!
//! [`IdempotencyLayer::canonical_json`]: crate::IdempotencyLayer::canonical_json

use super::number::Number;
use super::string::{compare_keys, plain_run, unescape};

/// The deepest nesting of arrays and objects that is canonicalised (as `serde_json`'s own
/// limit); a deeper body is fingerprinted as sent.
pub(crate) const MAX_DEPTH: usize = 128;

/// Marks a key offset whose key holds an escape.
pub(super) const ESCAPED: u32 = 1 << 31;

/// Why a body has no canonical form; it is then fingerprinted as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotCanonical {
    /// Not one JSON value, or not UTF-8.
    Invalid,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
    /// An object names a key twice: parsers disagree on what it means.
    DuplicateKey,
    /// 2 GiB or more: offsets are 31 bits.
    TooLarge,
}

/// A body that is valid JSON, with the sorted keys of its objects.
#[derive(Debug)]
pub(crate) struct Scanned<'a> {
    pub(super) body: &'a [u8],
    /// The objects of two or more members, by offset of their `{`.
    pub(super) objects: Vec<Object>,
    /// Their key offsets (just past the opening quote), each object's sorted, one run each.
    pub(super) keys: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Object {
    pub(super) start: u32,
    pub(super) first: u32,
    pub(super) len: u32,
}

/// The first pass: checks `body` and sorts the keys of its objects.
pub(crate) fn scan(body: &[u8]) -> Result<Scanned<'_>, NotCanonical> {
    if body.len() >= ESCAPED as usize {
        return Err(NotCanonical::TooLarge);
    }
    // JSON text is UTF-8; outside strings only ASCII is valid, so checking the whole body
    // checks every string.
    if std::str::from_utf8(body).is_err() {
        return Err(NotCanonical::Invalid);
    }
    let mut scan = Scan {
        body,
        pos: 0,
        open: Vec::new(),
        objects: Vec::new(),
        keys: Vec::new(),
    };
    scan.ws();
    scan.value(0)?;
    scan.ws();
    if scan.pos != body.len() {
        return Err(NotCanonical::Invalid);
    }
    // Objects were recorded as they closed (inner first); the writer finds them by offset.
    scan.objects.sort_unstable_by_key(|object| object.start);
    Ok(Scanned {
        body,
        objects: scan.objects,
        keys: scan.keys,
    })
}

struct Scan<'a> {
    body: &'a [u8],
    pos: usize,
    /// The keys of the objects still open, innermost last: offset (flagged [`ESCAPED`]) and
    /// the offset of the closing quote.
    open: Vec<(u32, u32)>,
    objects: Vec<Object>,
    keys: Vec<u32>,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.body.get(self.pos).copied()
    }

    fn ws(&mut self) {
        self.pos = skip_ws(self.body, self.pos);
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.peek() == Some(byte);
        self.pos += usize::from(found);
        found
    }

    fn value(&mut self, depth: usize) -> Result<(), NotCanonical> {
        let rest = &self.body[self.pos..];
        let len = match rest.first() {
            Some(b'{') => return self.object(depth + 1),
            Some(b'[') => return self.array(depth + 1),
            Some(b'"') => return self.string().map(drop),
            Some(b't') if rest.starts_with(b"true") => 4,
            Some(b'f') if rest.starts_with(b"false") => 5,
            Some(b'n') if rest.starts_with(b"null") => 4,
            Some(b'-' | b'0'..=b'9') => {
                let number = Number::parse(self.body, self.pos).ok_or(NotCanonical::Invalid)?;
                number.end - self.pos
            }
            _ => return Err(NotCanonical::Invalid),
        };
        self.pos += len;
        Ok(())
    }

    fn array(&mut self, depth: usize) -> Result<(), NotCanonical> {
        if depth > MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.pos += 1;
        self.ws();
        if self.eat(b']') {
            return Ok(());
        }
        loop {
            self.value(depth)?;
            self.ws();
            if self.eat(b']') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(NotCanonical::Invalid);
            }
            self.ws();
        }
    }

    fn object(&mut self, depth: usize) -> Result<(), NotCanonical> {
        if depth > MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        let start = self.pos;
        self.pos += 1;
        self.ws();
        if self.eat(b'}') {
            return Ok(());
        }
        let base = self.open.len();
        loop {
            if self.peek() != Some(b'"') {
                return Err(NotCanonical::Invalid);
            }
            let key = self.pos as u32 + 1;
            let escaped = self.string()?;
            let end = self.pos as u32 - 1;
            if self.open.capacity() == 0 {
                // Once, instead of growing from 4 on every body with objects.
                self.open.reserve(32);
            }
            self.open
                .push((if escaped { key | ESCAPED } else { key }, end));
            self.ws();
            if !self.eat(b':') {
                return Err(NotCanonical::Invalid);
            }
            self.ws();
            self.value(depth)?;
            self.ws();
            if self.eat(b'}') {
                break;
            }
            if !self.eat(b',') {
                return Err(NotCanonical::Invalid);
            }
            self.ws();
        }
        let members = &mut self.open[base..];
        if members.len() > 1 {
            let body = self.body;
            let compare = |a: &(u32, u32), b: &(u32, u32)| compare_keys(body, *a, *b);
            // Many clients send keys in order already: then one pass checks both.
            if !members.is_sorted_by(|a, b| compare(a, b).is_lt()) {
                members.sort_unstable_by(compare);
                if members
                    .windows(2)
                    .any(|pair| compare(&pair[0], &pair[1]).is_eq())
                {
                    return Err(NotCanonical::DuplicateKey);
                }
            }
            if self.objects.capacity() == 0 {
                self.objects.reserve(8);
                self.keys.reserve(32);
            }
            self.objects.push(Object {
                start: start as u32,
                first: self.keys.len() as u32,
                len: members.len() as u32,
            });
            self.keys.extend(members.iter().map(|&(key, _)| key));
        }
        self.open.truncate(base);
        Ok(())
    }

    /// Checks a string from its opening quote; returns whether it holds an escape.
    fn string(&mut self) -> Result<bool, NotCanonical> {
        let body = self.body;
        let mut at = self.pos + 1;
        let mut escaped = false;
        loop {
            at = plain_run(body, at);
            match body.get(at) {
                Some(b'"') => {
                    self.pos = at + 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    at = unescape(body, at + 1).ok_or(NotCanonical::Invalid)?.1;
                }
                // A control character, or the end of the body.
                _ => return Err(NotCanonical::Invalid),
            }
        }
    }
}

pub(super) fn skip_ws(body: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = body.get(at) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::fingerprint::pointer::Pointers;

    /// The canonical form of `body` with `?` for the values `pointers` name.
    fn ignoring(body: impl AsRef<[u8]>, pointers: &[&str]) -> Result<String, NotCanonical> {
        let ignore = Pointers::parse(pointers).unwrap();
        let scanned = scan(body.as_ref())?;
        let mut out = Vec::new();
        scanned.write(ignore.as_ref(), |piece| out.extend_from_slice(piece));
        Ok(String::from_utf8(out).unwrap())
    }

    fn canonical(body: impl AsRef<[u8]>) -> Result<String, NotCanonical> {
        ignoring(body, &[])
    }

    fn same(a: &str, b: &str) {
        assert_eq!(canonical(a).unwrap(), canonical(b).unwrap(), "{a} vs {b}");
    }

    fn differ(a: &str, b: &str) {
        assert_ne!(canonical(a).unwrap(), canonical(b).unwrap(), "{a} vs {b}");
    }

    #[test]
    fn keys_sorted_whitespace_dropped() {
        assert_eq!(
            canonical(
                " {\n\t\"b\" : 2 ,\r\n \"a\" : [ 1 , { \"d\" : 1 , \"c\" : 2 } , [ ] , { } ] } "
            )
            .unwrap(),
            r#"{"a":[1,{"c":2,"d":1},[],{}],"b":2}"#
        );
        same(r#"{"a":1,"b":2}"#, r#"{ "b": 2, "a": 1 }"#);
        differ("[1,2]", "[2,1]");
        differ(r#"{"a":"1"}"#, r#"{"a":1}"#);
        differ(r#"{"a":null}"#, "{}");
        // Keys are ordered by their bytes: upper case first, then longer after its prefix.
        assert_eq!(
            canonical(r#"{"b":0,"a":0,"B":0,"ab":0,"é":0,"":0}"#).unwrap(),
            r#"{"":0,"B":0,"a":0,"ab":0,"b":0,"é":0}"#
        );
        // A member is not glued to the next by the order: values stay with their keys.
        assert_eq!(
            canonical(r#"{"z":{"y":[{"b":true,"a":false}]},"a":null}"#).unwrap(),
            r#"{"a":null,"z":{"y":[{"a":false,"b":true}]}}"#
        );
        for scalar in ["true", "false", "null", "\"x\"", "0"] {
            assert_eq!(canonical(format!(" {scalar}\n")).unwrap(), scalar);
        }
    }

    #[test]
    fn numbers_by_value() {
        same(r#"{"amount":1}"#, r#"{"amount":1.0}"#);
        same("[1, 1.0, 1e0, 10e-1, 0.1E+1]", "[1,1,1,1,1]");
        same("[-0, 0.0, -0.0e5]", "[0,0,0]");
        same("2.50", "25e-1");
        differ("100000000000000000001", "100000000000000000002");
        differ("[1.5]", "[1.50001]");
        differ("1", "-1");
        assert_eq!(
            canonical("[12.340, 1e2, -0.5]").unwrap(),
            "[1234e-2,100,-5e-1]"
        );
    }

    #[test]
    fn escapes_decoded() {
        same(r#""\u0041""#, r#""A""#);
        same(r#""\/""#, r#""/""#);
        same(r#""\u00e9\u00E9""#, r#""éé""#);
        same(r#""\ud83d\ude00""#, r#""😀""#);
        same(r#""\u005c\u0022""#, r#""\\\"""#);
        same(r#"{"\u0062":1,"a":2}"#, r#"{"a":2,"b":1}"#);
        // Written back as serde_json writes them.
        assert_eq!(
            canonical(r#""\u0008\u000c\u000A\u000d\u0009\u0001\u001F\u007f""#).unwrap(),
            "\"\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}\""
        );
        assert_eq!(canonical(r#"{"\u0041":"\u0042"}"#).unwrap(), r#"{"A":"B"}"#);
        // Not the same characters: no Unicode normalisation.
        differ(r#""é""#, r#""e\u0301""#);
        for bad in [
            r#""\ud800""#,
            r#""\ud800\u0041""#,
            r#""\udc00""#,
            r#""\x41""#,
            r#""\u00g1""#,
            r#""\u00""#,
            "\"tab\there\"",
            "\"line\nbreak\"",
        ] {
            assert_eq!(canonical(bad), Err(NotCanonical::Invalid), "{bad}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused() {
        for dup in [
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"a":1}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"{"b":0,"a":1,"c":0,"a":2}"#,
            r#"[{"x":{"k":1,"k":2}}]"#,
        ] {
            assert_eq!(canonical(dup), Err(NotCanonical::DuplicateKey), "{dup}");
        }
        // The same key in two objects is no duplicate.
        same(r#"[{"a":1},{"a":2}]"#, r#"[{"a":1},{"a":2}]"#);
        same(
            r#"{"a":{"x":1},"b":{"x":2}}"#,
            r#"{"b":{"x":2},"a":{"x":1}}"#,
        );
    }

    #[test]
    fn depth_is_bounded() {
        let nested = |depth: usize, open: &str, close: &str| {
            format!("{}0{}", open.repeat(depth), close.repeat(depth))
        };
        assert!(canonical(nested(MAX_DEPTH, "[", "]")).is_ok());
        assert!(canonical(nested(MAX_DEPTH, "{\"a\":", "}")).is_ok());
        assert_eq!(
            canonical(nested(MAX_DEPTH + 1, "[", "]")),
            Err(NotCanonical::TooDeep)
        );
        assert_eq!(
            canonical(nested(MAX_DEPTH + 1, "{\"a\":", "}")),
            Err(NotCanonical::TooDeep)
        );
        // 2 MiB of brackets: refused at the bound, on a small stack.
        let deep = "[".repeat(2 << 20);
        let on_small_stack = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || canonical(deep))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(on_small_stack, Err(NotCanonical::TooDeep));
    }

    #[test]
    fn invalid_json() {
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "[,1]",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{a:1}",
            "01",
            "1.",
            "nul",
            "True",
            "[1] x",
            "[1][2]",
            "\"abc",
            "'a'",
            "\u{feff}{}",
            "[\u{a0}]",
            "{\"a\":1 \"b\":2}",
            "NaN",
            "Infinity",
            "-",
        ] {
            assert_eq!(canonical(bad), Err(NotCanonical::Invalid), "{bad:?}");
        }
        assert_eq!(canonical(b"\"\xff\""), Err(NotCanonical::Invalid));
        assert_eq!(canonical(b"{\"\xc3\":1}"), Err(NotCanonical::Invalid));
    }

    #[test]
    fn pointers_leave_values_out() {
        let body = r#"{"amount":100,"timestamp":"2026-12-06T10:00:00Z","metadata":{"trace_id":"abc","note":"x"},"items":[{"nonce":1,"sku":"a"},{"nonce":2,"sku":"b"}],"a/b":1,"m~n":2}"#;
        let pointers = [
            "/timestamp",
            "/metadata/trace_id",
            "/items/0/nonce",
            "/a~1b",
            "/m~0n",
            "/absent/deeper",
            "/amount/0",
        ];
        assert_eq!(
            ignoring(body, &pointers).unwrap(),
            r#"{"a/b":?,"amount":100,"items":[{"nonce":?,"sku":"a"},{"nonce":2,"sku":"b"}],"metadata":{"note":"x","trace_id":?},"m~n":?,"timestamp":?}"#
        );
        // A value left out may be anything, a whole tree included.
        let other = body
            .replace(r#""2026-12-06T10:00:00Z""#, r#"{"deep":[1,{"x":"}"}]}"#)
            .replace(r#""abc""#, "[]")
            .replace(r#""nonce":1"#, r#""nonce":"one""#);
        assert_eq!(ignoring(&other, &pointers), ignoring(body, &pointers));
        // The members themselves still count.
        let without = r#"{"amount":100}"#;
        assert_ne!(
            ignoring(without, &["/timestamp"]),
            ignoring(r#"{"amount":100,"timestamp":1}"#, &["/timestamp"])
        );
        // Array elements keep their places.
        assert_eq!(ignoring("[1,2,3]", &["/1"]).unwrap(), "[1,?,3]");
        assert_ne!(ignoring("[1,2,3]", &["/1"]), ignoring("[1,3]", &["/1"]));
        assert_eq!(ignoring("[1,2]", &["/-", "/01", "/2"]).unwrap(), "[1,2]");
        // An index token names an object's key too.
        assert_eq!(
            ignoring(r#"{"0":1,"1":2}"#, &["/0"]).unwrap(),
            r#"{"0":?,"1":2}"#
        );
        // Keys are matched decoded; a single member is matched as well as many.
        assert_eq!(
            ignoring(r#"{"\u0074s":1}"#, &["/ts"]).unwrap(),
            r#"{"ts":?}"#
        );
        assert_eq!(ignoring(r#"{"ts":1}"#, &["/ts"]).unwrap(), r#"{"ts":?}"#);
        assert_eq!(
            ignoring(r#"{"":1,"x":2}"#, &["/"]).unwrap(),
            r#"{"":?,"x":2}"#
        );
        // A body that is a scalar has nothing to leave out.
        assert_eq!(ignoring("5", &["/a"]).unwrap(), "5");
    }

    #[test]
    fn arrays_of_small_arrays_keep_nothing() {
        let body = format!("[{}[0]]", "[0],".repeat(100_000));
        let scanned = scan(body.as_bytes()).unwrap();
        assert_eq!(scanned.objects.capacity(), 0);
        assert_eq!(scanned.keys.capacity(), 0);
        // Objects of one member are written as they come, and kept nowhere either.
        let body = format!("[{}{{\"a\":0}}]", "{\"a\":[0]},".repeat(10_000));
        let scanned = scan(body.as_bytes()).unwrap();
        assert_eq!(scanned.objects.capacity() + scanned.keys.capacity(), 0);
        // Objects of two or more: 4 bytes per member, 12 per object.
        let body = format!("[{}{{\"a\":0,\"b\":1}}]", "{\"b\":1,\"a\":0},".repeat(1000));
        let scanned = scan(body.as_bytes()).unwrap();
        assert_eq!((scanned.objects.len(), scanned.keys.len()), (1001, 2002));
    }

    #[test]
    fn long_pieces_cross_the_buffer() {
        let long = "x".repeat(3 * OUT_BUF_PROBE) + "\\n" + &"é".repeat(OUT_BUF_PROBE);
        let body = format!(r#"{{"b":"{long}","a":[{}]}}"#, "12.5,".repeat(300) + "0");
        let value: Value = serde_json::from_str(&body).unwrap();
        let expected = serde_json::to_string(&value)
            .unwrap()
            .replace("12.5", "125e-1");
        assert_eq!(canonical(&body).unwrap(), expected);
    }

    const OUT_BUF_PROBE: usize = 700;

    /// A JSON value without floats (their text is another test's), nested a few levels.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(5, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    /// `s` as a JSON string with every character written as `\uXXXX`.
    fn all_escaped(s: &str) -> String {
        let mut out = String::from("\"");
        for unit in s.encode_utf16() {
            out.push_str(&format!("\\u{unit:04X}"));
        }
        out.push('"');
        out
    }

    proptest! {
        #[test]
        fn reformatting_changes_nothing(value in value()) {
            let compact = serde_json::to_string(&value).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let canonical_form = canonical(&compact).unwrap();
            prop_assert_eq!(&canonical(&pretty).unwrap(), &canonical_form);
            // Idempotent.
            prop_assert_eq!(&canonical(&canonical_form).unwrap(), &canonical_form);
            // The same text serde_json writes with sorted keys: floats aside, the form the
            // fingerprint had when it went through `serde_json::Value`.
            prop_assert_eq!(&canonical_form, &compact);
        }

        #[test]
        fn escaped_strings_are_their_characters(s in any::<String>()) {
            let plain = serde_json::to_string(&s).unwrap();
            prop_assert_eq!(canonical(all_escaped(&s)).unwrap(), canonical(&plain).unwrap());
            prop_assert_eq!(canonical(&plain).unwrap(), plain);
        }

        #[test]
        fn numbers_are_their_values(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            // Two texts of the same decimal: in full, and with an exponent.
            let full = format!("{x}");
            let form = canonical(&full).unwrap();
            prop_assert_eq!(&canonical(format!("{x:e}")).unwrap(), &form);
            prop_assert_eq!(&canonical(format!("{x:E}")).unwrap(), &form);
            prop_assert_eq!(&canonical(&form).unwrap(), &form);
            // Still the same number (Rust's parser rounds correctly), and so is serde_json's
            // text of it (whose shortest digits may end differently).
            prop_assert_eq!(form.parse::<f64>().unwrap(), x);
            let serde = canonical(serde_json::to_string(&x).unwrap()).unwrap();
            prop_assert_eq!(serde.parse::<f64>().unwrap(), x);
        }

        #[test]
        fn big_integers_are_their_digits(a in "[1-9][0-9]{0,60}", b in "[1-9][0-9]{0,60}") {
            prop_assert_eq!(canonical(&a) == canonical(&b), a == b);
            prop_assert_eq!(canonical(format!("{a}.000")).unwrap(), canonical(&a).unwrap());
            prop_assert_eq!(canonical(format!("{a}0e-1")).unwrap(), canonical(&a).unwrap());
        }

        #[test]
        fn a_left_out_value_may_be_anything(
            key in any::<String>(),
            first in value(),
            second in value(),
            rest in value(),
        ) {
            let pointer = format!("/{}", key.replace('~', "~0").replace('/', "~1"));
            let body = |v: &Value| {
                let mut map = serde_json::Map::new();
                map.insert("rest".into(), rest.clone());
                map.insert(key.clone(), v.clone());
                serde_json::to_string_pretty(&Value::Object(map)).unwrap()
            };
            prop_assert_eq!(
                ignoring(body(&first), &[&pointer]).unwrap(),
                ignoring(body(&second), &[&pointer]).unwrap()
            );
        }
    }
}
