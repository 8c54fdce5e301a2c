//! The request fingerprint checked against a model of it: the layout `src/fingerprint.rs`
//! describes, hashed with plain `sha2` (a constant prefix, each field length-prefixed with a
//! big-endian u64, "no query" and "empty query" told apart, the selected headers with their
//! counts, then the body and its length; with JSON options, a mode byte first, `1` for a
//! canonical body and `0` for one as sent), for random requests, bodies sent in pieces,
//! numbers, JSON Pointers and text that may or may not be JSON. And the parts of a request
//! that are, or are not, the same request: selected headers, percent-encoding, the absolute
//! form. All through the layer (`oneshot` on an axum `Router` over a `MemoryStore`): a retry
//! is either replayed (`201`, `Idempotent-Replayed`, the handler not run again) or another
//! request (`422`, the handler not run).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, Request, StatusCode};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use tower::ServiceExt;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken, MemoryStore, RecordKey,
    StoreError, StoredResponse,
};

/// A store that notes the fingerprint of every `begin`, over a `MemoryStore`.
#[derive(Clone, Default)]
struct Recording {
    inner: MemoryStore,
    seen: Arc<Mutex<Vec<Fingerprint>>>,
}

impl Recording {
    fn last(&self) -> Fingerprint {
        *self.seen.lock().unwrap().last().expect("a begin")
    }
}

impl IdempotencyStore for Recording {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.seen.lock().unwrap().push(*fingerprint);
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

/// A request: its method, target, headers and body.
#[derive(Clone, Debug)]
struct Req {
    method: &'static str,
    uri: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A `POST` of `body` to `uri`.
fn req(uri: &str, body: impl AsRef<[u8]>) -> Req {
    Req {
        method: "POST",
        uri: uri.to_owned(),
        headers: Vec::new(),
        body: body.as_ref().to_vec(),
    }
}

/// A `POST /payments` of the JSON text `body`.
fn json(body: &str) -> Req {
    req("/payments", body).header("content-type", "application/json")
}

impl Req {
    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers
            .push((name.to_owned(), value.as_ref().to_vec()));
        self
    }

    /// The request with `key`, in one tenant's scope.
    fn build(&self, key: &str) -> Request<Body> {
        let mut builder = Request::builder()
            .method(self.method)
            .uri(&self.uri)
            .header("idempotency-key", key)
            .header("authorization", "Bearer sk_test_model");
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        builder.body(Body::from(self.body.clone())).unwrap()
    }
}

/// What a second request with the first's key got.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// `201` replayed, the handler not run again.
    Replayed,
    /// `422 idempotency_key_reuse`, the handler not run.
    Mismatch,
    /// Anything else: the status, whether it was marked replayed, the handler's runs.
    Other(StatusCode, bool, usize),
}

use Seen::{Mismatch, Replayed};

/// One counting handler on every path and method, behind a layer.
struct Layered {
    app: Router,
    runs: Arc<AtomicUsize>,
    next_key: AtomicUsize,
}

impl Layered {
    fn new<St: IdempotencyStore>(layer: IdempotencyLayer<St>) -> Self {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let app = Router::new()
            .fallback(move || {
                let counter = counter.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, format!("run {n}"))
                }
            })
            .layer(layer);
        Self {
            app,
            runs,
            next_key: AtomicUsize::new(0),
        }
    }

    /// Behind a layer over a `MemoryStore`, configured by `configure`.
    fn with(
        configure: impl FnOnce(IdempotencyLayer<MemoryStore>) -> IdempotencyLayer<MemoryStore>,
    ) -> Self {
        Self::new(configure(IdempotencyLayer::new(MemoryStore::new())))
    }

    /// Sends `req` with `key`: the status, whether it was replayed, the body.
    async fn send(&self, req: &Req, key: &str) -> (StatusCode, bool, String) {
        let response = self.app.clone().oneshot(req.build(key)).await.unwrap();
        let status = response.status();
        let replayed = response
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            replayed,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// Sends `first`, then `second` with the same key (a new one for each pair): what the
    /// second got.
    async fn pair(&self, first: &Req, second: &Req) -> Seen {
        let key = format!("fp-{}", self.next_key.fetch_add(1, Ordering::SeqCst));
        let (status, _, body) = self.send(first, &key).await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "first request {first:?}: {body}"
        );
        let ran = self.runs.load(Ordering::SeqCst);
        let (status, replayed, body) = self.send(second, &key).await;
        let ran_again = self.runs.load(Ordering::SeqCst) - ran;
        match (status, replayed, ran_again) {
            (StatusCode::CREATED, true, 0) => Replayed,
            (StatusCode::UNPROCESSABLE_ENTITY, false, 0)
                if body.contains("idempotency_key_reuse") =>
            {
                Mismatch
            }
            (status, replayed, ran) => Seen::Other(status, replayed, ran),
        }
    }

    /// Asserts that `second` replays `first`.
    async fn same(&self, first: &Req, second: &Req) {
        assert_eq!(
            self.pair(first, second).await,
            Replayed,
            "{first:?} then {second:?}"
        );
    }

    /// Asserts that `second` is another request than `first`.
    async fn differ(&self, first: &Req, second: &Req) {
        assert_eq!(
            self.pair(first, second).await,
            Mismatch,
            "{first:?} then {second:?}"
        );
    }

    /// Asserts that each request replays itself, and that no two of them meet.
    async fn all_differ(&self, reqs: &[Req]) {
        for (i, a) in reqs.iter().enumerate() {
            self.same(a, a).await;
            for (j, b) in reqs.iter().enumerate() {
                if i != j {
                    self.differ(a, b).await;
                }
            }
        }
    }
}

/// A current-thread runtime for one proptest case.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Only a selected header's values count, each and in order, never running into the body.
#[tokio::test]
async fn selected_headers() {
    let layered =
        Layered::with(|layer| layer.fingerprint_headers([HeaderName::from_static("x-h")]));
    let base = || req("/a", "b");
    layered
        .all_differ(&[
            base(),
            base().header("x-h", ""),
            base().header("x-h", "v"),
            base().header("x-h", "V"),
            base().header("x-h", "v").header("x-h", "w"),
            base().header("x-h", "w").header("x-h", "v"),
            base().header("x-h", "v, w"),
            base().header("x-h", "v").header("x-h", ""),
            base().header("x-h", "").header("x-h", "v"),
        ])
        .await;
    // A header not selected changes nothing; the selected one's name is matched in any case.
    layered
        .same(
            &base().header("x-h", "v"),
            &base().header("X-H", "v").header("x-other", "1"),
        )
        .await;
    layered
        .differ(
            &req("/a", "b").header("x-h", "va"),
            &req("/a", "ab").header("x-h", "v"),
        )
        .await;
}

/// The path and query are hashed as sent: `%62` is not `b`, `+` is not `%20`.
#[tokio::test]
async fn percent_encoding_is_taken_as_sent() {
    let layered = Layered::with(|layer| layer);
    layered.differ(&req("/a%62", ""), &req("/ab", "")).await;
    layered
        .differ(&req("/a?x=%41", ""), &req("/a?x=A", ""))
        .await;
    layered
        .differ(&req("/a?x=%2a", ""), &req("/a?x=%2A", ""))
        .await;
    layered
        .differ(&req("/a?x=a+b", ""), &req("/a?x=a%20b", ""))
        .await;
}

/// An absolute-form target (a forward proxy's, HTTP/2's) is the same request as its origin form.
#[tokio::test]
async fn absolute_form_is_the_origin_form() {
    let layered = Layered::with(|layer| layer);
    for (origin, absolute) in [
        ("/a?x=1", "http://example.com/a?x=1"),
        ("/", "http://example.com/"),
        ("/?x", "http://example.com/?x"),
        ("/", "http://example.com"),
        ("/?x", "http://example.com?x"),
    ] {
        layered.same(&req(origin, "b"), &req(absolute, "b")).await;
    }
}

/// The model's SHA-256: the layout's prefix, then what is added.
struct Model(Sha256);

impl Model {
    fn new() -> Self {
        Self(Sha256::new_with_prefix(
            b"tower-idempotency:fingerprint:v1\0",
        ))
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn u64(&mut self, n: u64) {
        self.0.update(n.to_be_bytes());
    }

    /// `bytes`, after their length.
    fn field(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.raw(bytes);
    }

    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// The model's fingerprint of `req`, with `headers` selected; `body` is what the body adds
/// (the body itself, or a mode byte and its canonical form).
fn model(req: &Req, headers: &[&str], mode: Option<u8>, body: &[u8]) -> [u8; 32] {
    let mut m = Model::new();
    m.field(req.method.as_bytes());
    let (path, query) = match req.uri.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (req.uri.as_str(), None),
    };
    m.field(path.as_bytes());
    match query {
        None => m.raw(&[0]),
        Some(query) => {
            m.raw(&[1]);
            m.field(query.as_bytes());
        }
    }
    m.u64(headers.len() as u64);
    for name in headers {
        m.field(name.as_bytes());
        let values: Vec<&Vec<u8>> = req
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect();
        m.u64(values.len() as u64);
        for value in values {
            m.field(value);
        }
    }
    if let Some(mode) = mode {
        m.raw(&[mode]);
    }
    m.raw(body);
    m.u64(body.len() as u64);
    m.finish()
}

/// The headers the model tests select.
const SELECTED: [&str; 2] = ["x-a", "content-type"];

/// A request of random method, path, query, headers (selected or not) and bytes of body.
fn arb_req() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(vec!["POST", "PATCH"]),
        "/[a-z0-9%._~-]{0,80}",
        prop::option::of("[a-z0-9=&%+]{0,70}"),
        prop::collection::vec(
            (
                prop::sample::select(vec!["x-a", "content-type", "x-other"]),
                "[ -~]{0,20}",
            ),
            0..4,
        ),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(method, path, query, headers, body)| Req {
            method,
            uri: match query {
                Some(query) => format!("{path}?{query}"),
                None => path,
            },
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.trim().as_bytes().to_vec()))
                .collect(),
            body,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The layer's fingerprint of any request is the model's, with headers selected or not.
    #[test]
    fn the_layer_s_fingerprint_is_the_model_s(req in arb_req()) {
        let rt = runtime();
        let store = Recording::default();
        let layered = Layered::new(
            IdempotencyLayer::new(store.clone())
                .fingerprint_headers(SELECTED.map(HeaderName::from_static)),
        );
        rt.block_on(layered.send(&req, "k"));
        let expected = model(&req, &SELECTED, None, &req.body);
        prop_assert_eq!(*store.last().as_bytes(), expected);
        // Without headers selected, `Fingerprint::of_request` is the layer's.
        let store = Recording::default();
        let layered = Layered::new(IdempotencyLayer::new(store.clone()));
        rt.block_on(layered.send(&req, "k"));
        let (parts, _) = req.build("k").into_parts();
        prop_assert_eq!(store.last(), Fingerprint::of_request(&parts, &req.body));
        prop_assert_eq!(*store.last().as_bytes(), model(&req, &[], None, &req.body));
    }
}

/// A body sent in pieces of random sizes.
fn send_in_pieces(layered: &Layered, req: &Req, cuts: &[usize], rt: &tokio::runtime::Runtime) {
    use futures_util::stream;
    let mut pieces = Vec::new();
    let mut rest = req.body.as_slice();
    for &cut in cuts {
        let (piece, tail) = rest.split_at(cut.min(rest.len()));
        pieces.push(Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(
            piece,
        )));
        rest = tail;
    }
    pieces.push(Ok(bytes::Bytes::copy_from_slice(rest)));
    let mut request = req.build("k");
    *request.body_mut() = Body::from_stream(stream::iter(pieces));
    rt.block_on(layered.app.clone().oneshot(request)).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A body that comes in pieces of any sizes is hashed as the model hashes it whole.
    #[test]
    fn a_body_in_pieces_is_the_model_s(
        req in arb_req(),
        cuts in prop::collection::vec(0usize..130, 0..8),
    ) {
        let rt = runtime();
        let store = Recording::default();
        let layered = Layered::new(
            IdempotencyLayer::new(store.clone())
                .fingerprint_headers(SELECTED.map(HeaderName::from_static)),
        );
        send_in_pieces(&layered, &req, &cuts, &rt);
        prop_assert_eq!(*store.last().as_bytes(), model(&req, &SELECTED, None, &req.body));
        // With JSON options on and a body that is not JSON: a mode byte `0`, then the body.
        let store = Recording::default();
        let layered = Layered::new(IdempotencyLayer::new(store.clone()).ignore_json_pointers(["/x"]));
        let mut plain = req.clone();
        plain.headers = vec![("content-type".into(), b"text/plain".to_vec())];
        send_in_pieces(&layered, &plain, &cuts, &rt);
        prop_assert_eq!(*store.last().as_bytes(), model(&plain, &[], Some(0), &plain.body));
    }
}

/// A JSON number's exact value: zero, or (negative, significant digits with no leading or
/// trailing zero, power of ten of the last digit).
fn exact(text: &str) -> Option<(bool, String, i64)> {
    let negative = text.starts_with('-');
    let text = text.trim_start_matches('-');
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(at) => (&text[..at], text[at + 1..].parse::<i64>().unwrap()),
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let mut power = exp - frac.len() as i64;
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return None;
    }
    let trimmed = digits.trim_end_matches('0');
    power += (digits.len() - trimmed.len()) as i64;
    Some((negative, trimmed.to_owned(), power))
}

/// A text of the number `digits × 10^power` (digits with no leading zero), the point placed
/// `point` digits from the end and `zeros` more zeros appended, with the exponent that makes
/// up for them.
fn render(
    negative: bool,
    digits: &str,
    power: i64,
    point: usize,
    zeros: usize,
    upper: bool,
    plus: bool,
) -> String {
    let mut digits = format!("{digits}{}", "0".repeat(zeros));
    let point = point.min(digits.len());
    let exp = power - zeros as i64 + point as i64;
    if point == digits.len() {
        digits.insert(0, '0');
    }
    let at = digits.len() - point;
    let (int, frac) = digits.split_at(at);
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    out.push_str(int);
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if exp != 0 || plus {
        out.push(if upper { 'E' } else { 'e' });
        if plus && exp >= 0 {
            out.push('+');
        }
        out.push_str(&exp.to_string());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// With canonical JSON, two numbers meet exactly when their decimal values are equal.
    #[test]
    fn numbers_meet_exactly_when_their_values_do(
        neg in any::<bool>(),
        digits in "[1-9]([0-9]{0,30}[1-9])?",
        power in -40i64..40,
        a in (0usize..40, 0usize..6, any::<bool>(), any::<bool>()),
        b in (0usize..40, 0usize..6, any::<bool>(), any::<bool>()),
        change in 0..4usize,
    ) {
        let first = render(neg, &digits, power, a.0, a.1, a.2, a.3);
        let (neg2, digits2, power2) = match change {
            0 => (neg, digits.clone(), power),
            1 => (!neg, digits.clone(), power),
            2 => (neg, format!("{digits}1"), power),
            _ => (neg, digits.clone(), power + 1),
        };
        let second = render(neg2, &digits2, power2, b.0, b.1, b.2, b.3);
        prop_assert_eq!(exact(&first), Some((neg, digits.clone(), power)), "{}", first);
        let equal = exact(&first) == exact(&second);
        let rt = runtime();
        let layered = Layered::with(|layer| layer.canonical_json(true));
        let seen = rt.block_on(layered.pair(&json(&first), &json(&second)));
        prop_assert_eq!(seen, if equal { Replayed } else { Mismatch }, "{} then {}", first, second);
    }
}

/// `value` as a client might send it: members in reverse order, whitespace around every
/// token, every non-ASCII character and every `/` escaped, integers with a fraction and an
/// exponent.
fn scrambled(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    let string = |s: &str, out: &mut String| {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '/' => out.push_str("\\/"),
                c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
                c => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04X}"));
                    }
                }
            }
        }
        out.push('"');
    };
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| b.0.as_bytes().cmp(a.0.as_bytes()));
            out.push_str("{ ");
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(" ,\n");
                }
                string(k, out);
                out.push_str(" :\t");
                scrambled(v, out);
            }
            out.push_str("\r\n}");
        }
        Value::Array(items) => {
            out.push_str("[ ");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                scrambled(v, out);
            }
            out.push_str(" ]");
        }
        Value::String(s) => string(s, out),
        Value::Number(n) => out.push_str(&format!("{n}0e-1")),
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// The pointers' tokens (RFC 6901, unescaped).
fn tokens(pointer: &str) -> Vec<String> {
    pointer[1..]
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Whether the value at `path` is named by one of `pointers` (or lies under one).
fn named(path: &[String], pointers: &[Vec<String>]) -> bool {
    pointers
        .iter()
        .any(|p| p.len() <= path.len() && p[..] == path[..p.len()])
}

/// The canonical form with `?` for each value named, walking the value.
fn canonical_ignoring(
    value: &serde_json::Value,
    path: &mut Vec<String>,
    pointers: &[Vec<String>],
    out: &mut String,
) {
    use serde_json::Value;
    if !path.is_empty() && named(path, pointers) {
        out.push('?');
        return;
    }
    match value {
        Value::Object(map) => {
            let mut members: Vec<_> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                path.push(k.clone());
                canonical_ignoring(v, path, pointers, out);
                path.pop();
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                path.push(i.to_string());
                canonical_ignoring(v, path, pointers, out);
                path.pop();
            }
            out.push(']');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap()),
    }
}

/// A small value with keys from a few names (so that pointers hit), nested.
fn arb_small_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let key = prop::sample::select(vec!["a", "b", "0", "1", "a/b", "m~n", "", "~1", "é"]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i32>().prop_map(Value::from),
        "[a-z]{0,3}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..4).prop_map(|members| {
                let mut map = serde_json::Map::new();
                for (k, v) in members {
                    map.insert(k.to_owned(), v);
                }
                Value::Object(map)
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `ignore_json_pointers` leaves out exactly the values the pointers name, as the model does.
    #[test]
    fn pointers_are_the_model_s(
        value in arb_small_value(),
        pointers in prop::collection::vec(
            prop::collection::vec(
                prop::sample::select(vec!["a", "b", "0", "1", "01", "-", "a~1b", "m~0n", "", "~01", "é"]),
                1..4,
            ),
            1..4,
        ),
    ) {
        let pointers: Vec<String> = pointers
            .iter()
            .map(|tokens| tokens.iter().map(|t| format!("/{t}")).collect())
            .collect();
        let parsed: Vec<Vec<String>> = pointers.iter().map(|p| tokens(p)).collect();
        let mut form = String::new();
        canonical_ignoring(&value, &mut Vec::new(), &parsed, &mut form);
        let mut sent = String::new();
        scrambled(&value, &mut sent);
        let rt = runtime();
        let store = Recording::default();
        let layered = Layered::new(IdempotencyLayer::new(store.clone()).ignore_json_pointers(pointers.clone()));
        let r = json(&sent);
        rt.block_on(layered.send(&r, "k"));
        prop_assert_eq!(
            *store.last().as_bytes(),
            model(&r, &[], Some(1), form.as_bytes()),
            "{} with {:?}: expected {}", sent, pointers, form
        );
    }
}

/// A JSON value that refuses an object with a key twice (serde_json alone keeps the last).
struct NoDuplicates;

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = NoDuplicates;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_i64<E>(self, _: i64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_u64<E>(self, _: u64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_f64<E>(self, _: f64) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_str<E>(self, _: &str) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
                Ok(NoDuplicates)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NoDuplicates, A::Error> {
                while seq.next_element::<NoDuplicates>()?.is_some() {}
                Ok(NoDuplicates)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NoDuplicates, A::Error> {
                let mut keys = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !keys.insert(key) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    map.next_value::<NoDuplicates>()?;
                }
                Ok(NoDuplicates)
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn arb_soup() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        " ",
        "\n",
        "\t",
        "\u{c}",
        "\u{a0}",
        "\"a\"",
        "\"\\u0061\"",
        "\"\\ud800\"",
        "\"\\ud83d\\ude00\"",
        "\"x\\\"y\"",
        "\"\\\\\"",
        "\"\\/\"",
        "\"",
        "\\",
        "\"é\"",
        "0",
        "-0",
        "1.5e3",
        "01",
        "1.",
        "-",
        "1e",
        "1E+2",
        "true",
        "nul",
        "null",
        "\"b\"",
        "\u{feff}",
        "\"\u{1}\"",
        "NaN",
    ]);
    prop::collection::vec(token, 0..24).prop_map(|tokens| tokens.concat())
}

/// A valid value with one token dropped, doubled or inserted, or left as it is.
fn arb_near_json() -> impl Strategy<Value = String> {
    (
        arb_small_value(),
        0..4usize,
        any::<prop::sample::Index>(),
        prop::sample::select(vec!["{", "}", ",", "\"", ":", "]", "[", "\"a\":1"]),
    )
        .prop_map(|(value, how, at, token)| {
            let mut text = String::new();
            scrambled(&value, &mut text);
            let chars: Vec<char> = text.chars().collect();
            if chars.is_empty() {
                return text;
            }
            let i = at.index(chars.len());
            let (head, tail) = chars.split_at(i);
            let (head, tail): (String, String) = (head.iter().collect(), tail.iter().collect());
            match how {
                0 => text,
                1 => format!("{head}{}", tail.chars().skip(1).collect::<String>()),
                2 => format!("{head}{token}{tail}"),
                _ => format!("{head}{}{tail}", tail.chars().next().unwrap()),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// A body is canonicalised exactly when it is one JSON value with no key twice in an object.
    #[test]
    fn canonicalised_exactly_when_json_without_duplicates(body in prop_oneof![arb_soup(), arb_near_json()]) {
        let expected = serde_json::from_str::<NoDuplicates>(&body).is_ok();
        let rt = runtime();
        let store = Recording::default();
        let layered = Layered::new(IdempotencyLayer::new(store.clone()).ignore_json_pointers(["/a", "/0", "/a/0"]));
        let r = json(&body);
        let (status, _, _) = rt.block_on(layered.send(&r, "k"));
        prop_assert_eq!(status, StatusCode::CREATED);
        let raw = *store.last().as_bytes() == model(&r, &[], Some(0), body.as_bytes());
        prop_assert_eq!(!raw, expected, "{:?}", body);
    }
}
