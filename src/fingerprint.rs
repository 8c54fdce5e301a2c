//! The request fingerprint: SHA-256 over method, path, query, selected headers and body.
//!
//! Every field is length-prefixed, so fields cannot run into each other (`/a` + `?bc` never
//! equals `/ab` + `?c`). The body comes last and is hashed as it arrives, in one pass, followed
//! by its length.

use std::fmt;

use http::HeaderName;
use http::request::Parts;
use sha2::{Digest, Sha256};

/// The SHA-256 fingerprint of a request. A key is bound to the fingerprint of its first request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Rebuilds a fingerprint from its 32 bytes, as read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes of the hash.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The fingerprint of a whole request, computed the way the layer computes it with its
    /// default options (no headers, body hashed as sent).
    pub fn of_request(parts: &Parts, body: &[u8]) -> Self {
        let mut hasher = Hasher::new(parts, &[]);
        hasher.body(body);
        hasher.finish()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Lowercase hex of the 32 bytes.
impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// An incremental fingerprint: the request head first, then the body chunk by chunk.
pub(crate) struct Hasher {
    sha: Sha256,
    body_len: u64,
}

impl Hasher {
    /// Starts a fingerprint with the request head: method, path, query and the values of
    /// `headers` (in the order given, each with its count of values).
    pub(crate) fn new(parts: &Parts, headers: &[HeaderName]) -> Self {
        let mut sha = Sha256::new_with_prefix(b"tower-idempotency:fingerprint:v1\0");
        field(&mut sha, parts.method.as_str().as_bytes());
        field(&mut sha, parts.uri.path().as_bytes());
        match parts.uri.query() {
            // "no query" and "empty query" are different requests.
            None => sha.update([0]),
            Some(query) => {
                sha.update([1]);
                field(&mut sha, query.as_bytes());
            }
        }
        sha.update((headers.len() as u64).to_be_bytes());
        for name in headers {
            let values = parts.headers.get_all(name);
            field(&mut sha, name.as_str().as_bytes());
            sha.update((values.iter().count() as u64).to_be_bytes());
            for value in values {
                field(&mut sha, value.as_bytes());
            }
        }
        Self { sha, body_len: 0 }
    }

    /// Hashes the next chunk of the body.
    pub(crate) fn body(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.body_len += chunk.len() as u64;
    }

    /// Hashes a whole JSON body in canonical form (object keys sorted, insignificant whitespace
    /// dropped); a body that is not JSON is hashed as sent.
    pub(crate) fn json_body(&mut self, body: &[u8]) {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(value) => {
                self.sha.update([1]);
                self.canonical(&value);
            }
            Err(_) => {
                self.sha.update([0]);
                self.body(body);
            }
        }
    }

    /// Writes `value` with object keys sorted and no whitespace. Keys are sorted here, not left
    /// to `serde_json`, whose maps keep insertion order when its `preserve_order` feature is on.
    fn canonical(&mut self, value: &serde_json::Value) {
        use serde_json::Value;
        match value {
            Value::Array(items) => {
                self.body(b"[");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.body(b",");
                    }
                    self.canonical(item);
                }
                self.body(b"]");
            }
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                self.body(b"{");
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        self.body(b",");
                    }
                    // Writing into a hasher cannot fail.
                    let _ = serde_json::to_writer(ShaWriter(self), key);
                    self.body(b":");
                    self.canonical(item);
                }
                self.body(b"}");
            }
            scalar => {
                let _ = serde_json::to_writer(ShaWriter(self), scalar);
            }
        }
    }

    pub(crate) fn finish(mut self) -> Fingerprint {
        self.sha.update(self.body_len.to_be_bytes());
        Fingerprint(self.sha.finalize().into())
    }
}

fn field(sha: &mut Sha256, bytes: &[u8]) {
    sha.update((bytes.len() as u64).to_be_bytes());
    sha.update(bytes);
}

struct ShaWriter<'a>(&'a mut Hasher);

impl std::io::Write for ShaWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.body(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn parts(method: &str, uri: &str) -> Parts {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn fp(method: &str, uri: &str, body: &[u8]) -> Fingerprint {
        Fingerprint::of_request(&parts(method, uri), body)
    }

    #[test]
    fn every_field_counts() {
        let base = fp("POST", "/a?x=1", b"body");
        assert_eq!(base, fp("POST", "/a?x=1", b"body"));
        assert_ne!(base, fp("PATCH", "/a?x=1", b"body"));
        assert_ne!(base, fp("POST", "/b?x=1", b"body"));
        assert_ne!(base, fp("POST", "/a?x=2", b"body"));
        assert_ne!(base, fp("POST", "/a?x=1", b"bodz"));
        assert_ne!(fp("POST", "/a", b""), fp("POST", "/a?", b""));
    }

    #[test]
    fn fields_cannot_run_into_each_other() {
        assert_ne!(fp("POST", "/ab?c", b""), fp("POST", "/a?bc", b""));
        assert_ne!(fp("POST", "/a?b", b"c"), fp("POST", "/a?bc", b""));
    }

    #[test]
    fn chunking_does_not_matter() {
        let p = parts("POST", "/a");
        let mut h = Hasher::new(&p, &[]);
        h.body(b"hel");
        h.body(b"");
        h.body(b"lo");
        assert_eq!(h.finish(), Fingerprint::of_request(&p, b"hello"));
    }

    #[test]
    fn selected_headers() {
        let ct = [http::header::CONTENT_TYPE];
        let a = parts("POST", "/a");
        let mut b = parts("POST", "/a");
        b.headers
            .insert("content-type", "text/plain".parse().unwrap());
        let hash = |p: &Parts, names: &[HeaderName]| Hasher::new(p, names).finish();
        assert_ne!(hash(&a, &ct), hash(&b, &ct));
        assert_eq!(hash(&a, &[]), hash(&b, &[]));
    }

    #[test]
    fn canonical_json() {
        let p = parts("POST", "/a");
        let json = |body: &[u8]| {
            let mut h = Hasher::new(&p, &[]);
            h.json_body(body);
            h.finish()
        };
        assert_eq!(json(br#"{"a":1,"b":2}"#), json(br#"{ "b": 2, "a": 1 }"#));
        assert_ne!(json(br#"{"a":1,"b":2}"#), json(br#"{"a":1,"b":3}"#));
        assert_ne!(json(br#"[1,2]"#), json(br#"[2,1]"#));
        assert_eq!(
            json(br#"{"z":[{"b":1,"a":"x\"y"}],"a":null}"#),
            json(br#"{"a":null,"z":[{"a":"x\"y","b":1}]}"#)
        );
        assert_ne!(json(br#"{"a":"1"}"#), json(br#"{"a":1}"#));
        assert_eq!(json(b"not json"), json(b"not json"));
        assert_ne!(json(b"not json"), json(b"not json "));
    }
}
