//! The request fingerprint: SHA-256 over method, path, query, selected headers and body.
//!
//! Every field is length-prefixed, so fields cannot run into each other (`/a` + `?bc` never
//! equals `/ab` + `?c`). The body comes last and is hashed as it arrives, in one pass, followed
//! by its length; or, with the layer's JSON options, in canonical form ([`json`]); or as a
//! [`Fingerprinter`] of the application's makes it.

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, header};

use crate::util::Sha256;

pub(crate) mod json;
mod number;
pub(crate) mod pointer;
mod string;
mod write;

use pointer::Pointers;

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
    /// default options (no headers, body hashed as sent; with the `axum` feature, the path of
    /// axum's `OriginalUri` when the request carries one).
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
        crate::util::Hex(&self.0).fmt(f)
    }
}

/// The URI the request was sent to. Behind axum's `Router::nest`, a layer on a nested route
/// sees the path without the prefix (`/payments` for `/v1/payments` and `/v2/payments` alike);
/// with the `axum` feature, the path the app was sent is read from axum's `OriginalUri`, so
/// that a key reused on another nested route is still another request.
fn sent_uri(parts: &Parts) -> &http::Uri {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = parts.extensions.get() {
        return uri;
    }
    &parts.uri
}

/// What every fingerprint's hash starts with.
const FINGERPRINT: Sha256 = Sha256::new().chain(b"tower-idempotency:fingerprint:v1\0");

/// An incremental fingerprint: the request head first, then the body chunk by chunk.
pub(crate) struct Hasher {
    sha: Sha256,
    body_len: u64,
}

impl Hasher {
    /// Starts a fingerprint with the request head: method, path and query (as sent, see
    /// [`sent_uri`]) and the values of `headers` (in the order given, each with its count of
    /// values).
    pub(crate) fn new(parts: &Parts, headers: &[HeaderName]) -> Self {
        let mut sha = FINGERPRINT;
        let uri = sent_uri(parts);
        field(&mut sha, parts.method.as_str().as_bytes());
        field(&mut sha, uri.path().as_bytes());
        match uri.query() {
            // "no query" and "empty query" are different requests.
            None => sha.update(&[0]),
            Some(query) => {
                sha.update(&[1]);
                field(&mut sha, query.as_bytes());
            }
        }
        sha.update_u64(headers.len() as u64);
        for name in headers {
            field(&mut sha, name.as_str().as_bytes());
            header_values(&mut sha, parts, uri, name);
        }
        Self { sha, body_len: 0 }
    }

    /// Hashes the next chunk of the body.
    pub(crate) fn body(&mut self, chunk: &[u8]) {
        self.sha.update(chunk);
        self.body_len += chunk.len() as u64;
    }

    /// Hashes a whole JSON body in canonical form, leaving out the values `ignore` points at;
    /// a body that has no canonical form (see [`json::scan`]) is hashed as sent.
    pub(crate) fn json_body(&mut self, body: &[u8], ignore: Option<&Pointers>) {
        match json::scan(body) {
            Ok(scanned) => {
                self.sha.update(&[1]);
                scanned.write(ignore, |piece| self.body(piece));
            }
            Err(_) => {
                self.sha.update(&[0]);
                self.body(body);
            }
        }
    }

    /// Hashes what a [`Fingerprinter`] made of the body, in place of the body.
    fn made_body(&mut self, made: &[u8]) {
        self.sha.update(&[2]);
        self.body(made);
    }

    pub(crate) fn finish(mut self) -> Fingerprint {
        self.sha.update_u64(self.body_len);
        Fingerprint(self.sha.finish())
    }
}

/// Hashes the values of header `name`, after their count, as HTTP/1.1 sends them, whatever
/// the protocol the request came by: a retry that comes by another (through a proxy that speaks
/// HTTP/2 to one server and HTTP/1.1 to another) is the same request.
fn header_values(sha: &mut Sha256, parts: &Parts, uri: &http::Uri, name: &HeaderName) {
    let values = parts.headers.get_all(name);
    let count = values.iter().count();
    if count == 0 && name == header::HOST {
        // HTTP/2 and HTTP/3 carry the host in `:authority`, which the URI holds.
        if let Some(authority) = uri.authority() {
            sha.update_u64(1);
            field(sha, authority.as_str().as_bytes());
            return;
        }
    }
    if count > 1 && name == header::COOKIE {
        // HTTP/2 may split a cookie into crumbs, a field each (RFC 9113 §8.2.3); HTTP/1.1 sends
        // one field, the crumbs joined with "; ".
        let len = values.iter().map(|v| v.len()).sum::<usize>() + 2 * (count - 1);
        sha.update_u64(1);
        sha.update_u64(len as u64);
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                sha.update(b"; ");
            }
            sha.update(value.as_bytes());
        }
        return;
    }
    sha.update_u64(count as u64);
    for value in values {
        field(sha, value.as_bytes());
    }
}

fn field(sha: &mut Sha256, bytes: &[u8]) {
    sha.update_u64(bytes.len() as u64);
    sha.update(bytes);
}

/// How the body enters the fingerprint: as sent (the default), in canonical form when it is
/// JSON, or as a [`Fingerprinter`] makes it. Set on the layer; immutable once the layer is
/// built.
#[derive(Clone, Default)]
pub(crate) struct BodyFingerprint {
    pub(crate) canonical_json: bool,
    pub(crate) ignore: Option<Arc<Pointers>>,
    pub(crate) custom: Option<Arc<dyn Fingerprinter>>,
}

impl BodyFingerprint {
    /// Starts the body's part of `hasher`: returns `true` when the body is hashed whole, once
    /// read, by [`whole`](Self::whole), `false` when it is hashed chunk by chunk with
    /// [`Hasher::body`] as it arrives.
    pub(crate) fn start(&self, hasher: &mut Hasher, parts: &Parts) -> bool {
        if self.custom.is_some() {
            return true;
        }
        if !self.canonical_json && self.ignore.is_none() {
            return false;
        }
        if is_json(parts) {
            return true;
        }
        // Hashed as sent, the way a JSON body that does not parse is.
        hasher.sha.update(&[0]);
        false
    }

    /// Hashes the whole body, after [`start`](Self::start) returned `true`.
    pub(crate) fn whole(&self, hasher: &mut Hasher, parts: &Parts, body: &[u8]) {
        match &self.custom {
            Some(custom) => hasher.made_body(&custom.fingerprint(parts, body)),
            None => hasher.json_body(body, self.ignore.as_deref()),
        }
    }
}

impl fmt::Debug for BodyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyFingerprint")
            .field("canonical_json", &self.canonical_json)
            .field("ignore_json_pointers", &self.ignore.is_some())
            .field("fingerprint_with", &self.custom.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

/// Whether the request's body may be JSON: `Content-Type` `application/json` or any type
/// with the `+json` suffix (`application/problem+json`, `application/vnd.api+json`), in any
/// case, with or without parameters; or no `Content-Type` at all (many clients send JSON
/// without one: the body is then JSON if it parses as JSON, and fingerprinted as sent if not).
pub(crate) fn is_json(parts: &Parts) -> bool {
    let Some(value) = parts.headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let essence = value
        .as_bytes()
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    let essence = essence.trim_ascii();
    let Some(slash) = essence.iter().position(|&b| b == b'/') else {
        return false;
    };
    let (kind, subtype) = (&essence[..slash], &essence[slash + 1..]);
    let valid = |part: &[u8]| {
        !part.is_empty()
            && part
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    valid(kind)
        && valid(subtype)
        && (kind.eq_ignore_ascii_case(b"application") && subtype.eq_ignore_ascii_case(b"json")
            || subtype.len() > 5 && subtype[subtype.len() - 5..].eq_ignore_ascii_case(b"+json"))
}

/// Decides what a request's body adds to its fingerprint, in place of the body as sent: see
/// [`IdempotencyLayer::fingerprint_with`](crate::IdempotencyLayer::fingerprint_with).
///
/// Implemented for closures `Fn(&Parts, &[u8]) -> Vec<u8>`. The method, path and query, and
/// the [`fingerprint_headers`](crate::IdempotencyLayer::fingerprint_headers), are hashed
/// beside the bytes it returns, always.
///
/// ```
/// use http::request::Parts;
/// use tower_idempotency::{Fingerprinter, IdempotencyLayer, MemoryStore};
///
/// /// A payment is the same payment when its amount, currency and payee are, whatever else
/// /// the client sends (a body that is not such JSON counts as sent).
/// // serde_json's `Value` keeps a number past 64 bits as an `f64`: two such amounts would give
/// // one fingerprint. Here amounts fit in 64 bits (or are sent as strings).
/// struct PaymentFields;
///
/// impl Fingerprinter for PaymentFields {
///     fn fingerprint(&self, _parts: &Parts, body: &[u8]) -> Vec<u8> {
///         match serde_json::from_slice::<serde_json::Value>(body) {
///             Ok(json) => {
///                 let fields = [&json["amount"], &json["currency"], &json["payee"]];
///                 serde_json::to_vec(&fields).unwrap_or_default()
///             }
///             Err(_) => body.to_vec(),
///         }
///     }
/// }
///
/// let layer = IdempotencyLayer::new(MemoryStore::new()).fingerprint_with(PaymentFields);
/// ```
pub trait Fingerprinter: Send + Sync + 'static {
    /// The bytes that stand for the request's body in its fingerprint. `parts` is the request
    /// head, `body` the whole body as read (up to
    /// [`max_body_bytes`](crate::IdempotencyLayer::max_body_bytes)).
    fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Vec<u8>;
}

impl<F> Fingerprinter for F
where
    F: Fn(&Parts, &[u8]) -> Vec<u8> + Send + Sync + 'static,
{
    fn fingerprint(&self, parts: &Parts, body: &[u8]) -> Vec<u8> {
        self(parts, body)
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
            h.json_body(body, None);
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

    /// The fingerprint of `body` sent with `content_type`, under `options`, in `chunks`.
    fn with(options: &BodyFingerprint, content_type: &str, body: &[u8]) -> Fingerprint {
        let mut p = parts("POST", "/a");
        p.headers
            .insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        let mut hasher = Hasher::new(&p, &[]);
        if options.start(&mut hasher, &p) {
            options.whole(&mut hasher, &p, body);
        } else {
            for chunk in body.chunks(3) {
                hasher.body(chunk);
            }
        }
        hasher.finish()
    }

    fn canonical() -> BodyFingerprint {
        BodyFingerprint {
            canonical_json: true,
            ..BodyFingerprint::default()
        }
    }

    #[test]
    fn json_content_types() {
        let json = |ct: &str| {
            let mut p = parts("POST", "/a");
            p.headers.insert(header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&p)
        };
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            " application/json ;charset=UTF-8",
            "application/problem+json",
            "application/vnd.api+json",
            "application/merge-patch+JSON",
            "text/x-report+json",
        ] {
            assert!(json(yes), "{yes}");
        }
        for no in [
            "text/plain",
            "application/jsonx",
            "application/x-json-stream",
            "application/json-seq",
            "json",
            "application/+json",
            "/json",
            "application/",
            "multipart/form-data; boundary=\"+json\"",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!json(no), "{no}");
        }
        let mut p = parts("POST", "/a");
        p.headers.remove(header::CONTENT_TYPE);
        assert!(
            is_json(&p),
            "without a Content-Type, a body that parses is JSON"
        );
    }

    #[test]
    fn json_options_apply_to_json_bodies_only() {
        let options = canonical();
        let (a, b) = (br#"{"a":1,"b":2}"#, br#"{ "b": 2, "a": 1 }"#);
        assert_eq!(
            with(&options, "application/json", a),
            with(&options, "application/json", b)
        );
        assert_ne!(
            with(&options, "text/plain", a),
            with(&options, "text/plain", b)
        );
        // A body that was canonicalised never meets one that was not.
        assert_ne!(
            with(&options, "application/json", a),
            with(&options, "text/plain", a)
        );
        // A JSON body that does not parse is hashed as sent, as a body of another type is.
        assert_eq!(
            with(&options, "application/json", b"{oops"),
            with(&options, "text/plain", b"{oops")
        );
        // Without options, the content type changes nothing.
        let none = BodyFingerprint::default();
        assert_eq!(
            with(&none, "application/json", a),
            with(&none, "text/plain", a)
        );
        assert_eq!(
            with(&none, "application/json", a),
            Fingerprint::of_request(&parts("POST", "/a"), a)
        );
    }

    #[test]
    fn pointers_imply_canonical_json() {
        let options = BodyFingerprint {
            ignore: Pointers::parse(["/ts"]).unwrap().map(Arc::new),
            ..BodyFingerprint::default()
        };
        let first = with(&options, "application/json", br#"{"amount":1,"ts":1}"#);
        assert_eq!(
            first,
            with(&options, "application/json", br#"{"ts":2, "amount":1.0}"#)
        );
        assert_ne!(
            first,
            with(&options, "application/json", br#"{"ts":2,"amount":2}"#)
        );
        assert_ne!(
            with(&options, "text/plain", br#"{"amount":1,"ts":1}"#),
            with(&options, "text/plain", br#"{"amount":1,"ts":2}"#)
        );
    }

    #[test]
    fn a_fingerprinter_replaces_the_body() {
        let options = BodyFingerprint {
            // The body up to its first `;`, whatever its type; JSON options do not apply.
            custom: Some(Arc::new(|_: &Parts, body: &[u8]| {
                body.split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .to_vec()
            })),
            ..canonical()
        };
        let first = with(&options, "text/plain", b"pay 10;trace 1");
        assert_eq!(first, with(&options, "application/json", b"pay 10;trace 2"));
        assert_ne!(first, with(&options, "text/plain", b"pay 11;trace 1"));
        // Its bytes never equal a body's: `pay 10` as sent is another fingerprint.
        assert_ne!(
            first,
            with(&BodyFingerprint::default(), "text/plain", b"pay 10")
        );
        // The path is still in.
        let mut other = parts("POST", "/b");
        other
            .headers
            .insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        let mut hasher = Hasher::new(&other, &[]);
        assert!(options.start(&mut hasher, &other));
        options.whole(&mut hasher, &other, b"pay 10;trace 1");
        assert_ne!(hasher.finish(), first);
        assert!(format!("{options:?}").contains("<fn>"));
    }

    /// What a request's fingerprint is stored as does not change from one version to the next
    /// (these values were computed by the versions before this test): a retry that spans an
    /// upgrade still matches its record. Fields across block boundaries, selected headers (the
    /// host from the URI, cookie crumbs joined), bodies in chunks and in canonical form.
    #[test]
    fn stored_fingerprints_do_not_change() {
        let payment = br#"{"amount":1000,"currency":"usd","customer":"cus_123","note":"x"}"#;
        let long_path = format!("/{}", "p".repeat(70));
        let mut cookies = Request::post("http://example.com/a/b?x=1&y=2")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-many", "1")
            .header("x-many", "2")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let names = [
            header::HOST,
            header::COOKIE,
            HeaderName::from_static("x-many"),
            header::CONTENT_TYPE,
        ];
        let mut headed = Hasher::new(&cookies, &names);
        for chunk in payment.chunks(7) {
            headed.body(chunk);
        }
        let canonical = with(&canonical(), "application/json", br#"{ "b": 2, "a": 1 }"#);
        cookies.method = http::Method::PATCH;
        let fingerprints = [
            (
                Fingerprint::of_request(&parts("POST", "/payments"), payment),
                "2161f4d17449d0327f6b023622c50ae0bcf79d0c01ae4f7acc3a18a3521c41e7",
            ),
            (
                Fingerprint::of_request(&parts("POST", &long_path), &[7; 200]),
                "7593c493406ffbf8b15128f097690a00298621930ab55fb292cb07d567a0fd36",
            ),
            (
                Fingerprint::of_request(&parts("PATCH", "/a?"), b""),
                "22cd0d2f414f3f6d906ae9f062d8e44cbfc38da97552b286a9e0087ee7bb5f6d",
            ),
            (
                headed.finish(),
                "cf0139bc7125ff99143dadc31f0fc38968bf433f7650c9010e2ca6e9636cabbb",
            ),
            (
                canonical,
                "b1a38a1ce4907c24ab616625562181b976f8044e06ae86b2e6693a8919be9478",
            ),
            (
                Hasher::new(&cookies, &names[..1]).finish(),
                "d3bb2836300719c6d5ec02c4b43a841327d76126692756960c83eca922751fc7",
            ),
        ];
        for (i, (fingerprint, hex)) in fingerprints.into_iter().enumerate() {
            assert_eq!(fingerprint.to_string(), hex, "{i}");
        }
    }
}
