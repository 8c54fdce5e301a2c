//! The `Idempotency-Key` field through the layer: a reference validator of the field (a bare
//! key, or an RFC 9651 Item whose bare item is a string, with parameters parsed by the RFC's
//! rules and ignored) that the layer must agree with on a table of cases, on every byte at
//! every place and on random values; and the key echoed exactly as sent on every answer to a
//! request with a valid key, never on a `400` for an invalid one.

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::post;
use proptest::prelude::*;
use tokio::sync::Semaphore;
use tower_idempotency::{IdempotencyKey, IdempotencyLayer, MemoryStore};

use support::raw;
use support::{Reply, Server, send};

/// `POST /pay`: `201` naming the run; a body of `hold` waits for a permit of `gate` first.
#[derive(Clone)]
struct Api {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Api {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Waits until the handler has started `n` runs.
    async fn started(&self, n: usize) {
        while self.runs() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn app(&self, layer: IdempotencyLayer<MemoryStore>) -> Router {
        let api = self.clone();
        let pay = move |body: Bytes| {
            let api = api.clone();
            async move {
                let n = api.runs.fetch_add(1, Ordering::SeqCst) + 1;
                if &body[..] == b"hold" {
                    api.gate.acquire().await.unwrap().forget();
                }
                (StatusCode::CREATED, format!("run {n}"))
            }
        };
        Router::new().route("/pay", post(pay)).layer(layer)
    }
}

fn shared_layer() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::new()).shared_scope(true)
}

/// A `POST /pay` of `body` with the key header's value `key`.
fn keyed(key: &[u8], body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::post("/pay").body(body.into()).unwrap();
    let value = HeaderValue::from_bytes(key).unwrap();
    request.headers_mut().insert("idempotency-key", value);
    request
}

/// The echoed key, as bytes.
fn echo(reply: &Reply) -> Option<&[u8]> {
    reply.headers.get("idempotency-key").map(|v| v.as_bytes())
}

/// Asserts a problem+json body with the members DESIGN names, its `status` the response's.
fn assert_problem(reply: &Reply, status: u16, code: &str) {
    assert_eq!(reply.status.as_u16(), status, "{reply:?}");
    assert_eq!(reply.code(), code, "{reply:?}");
    let json = reply.json();
    for member in ["type", "title", "detail"] {
        assert!(json[member].is_string(), "{member} in {reply:?}");
    }
}

/// The key a header value names, or `None` for `400 idempotency_key_invalid`.
///
/// - Surrounding OWS (SP, HTAB) is not part of the value (RFC 9110 §5.5).
/// - A value that starts with `"` is an RFC 9651 Item whose bare item is a string: `"`, then
///   characters %x20-21 / %x23-5B / %x5D-7E or the escapes `\"` and `\\`, then `"`, then its
///   parameters and nothing else (a `,` means combined lines).
/// - Any other value is a bare key: visible ASCII but `,`.
/// - After unquoting: 1..=255 visible ASCII characters, no space.
fn reference(value: &[u8]) -> Option<Vec<u8>> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |e| e + 1);
    let v = &value[start..end];
    let quoted = v.first() == Some(&b'"');
    let key = if quoted {
        let mut key = Vec::new();
        let mut i = 1;
        loop {
            match *v.get(i)? {
                b'\\' => match *v.get(i + 1)? {
                    c @ (b'"' | b'\\') => {
                        key.push(c);
                        i += 2;
                    }
                    _ => return None,
                },
                b'"' => break,
                c @ 0x20..=0x7e => {
                    key.push(c);
                    i += 1;
                }
                _ => return None,
            }
        }
        if !parameters(&v[i + 1..]) {
            return None;
        }
        key
    } else {
        v.to_vec()
    };
    let visible = key.iter().all(|b| (0x21..=0x7e).contains(b));
    let comma_outside = !quoted && key.contains(&b',');
    ((1..=255).contains(&key.len()) && visible && !comma_outside).then_some(key)
}

/// Whether `rest` is RFC 9651 §4.2.3.2 parameters and nothing else:
/// `*( ";" *SP key [ "=" bare-item ] )`, no whitespace before a `;`, only SP after it.
fn parameters(mut rest: &[u8]) -> bool {
    loop {
        match rest.split_first() {
            None => return true,
            Some((b';', after)) => {
                rest = after;
                while let Some((b' ', after)) = rest.split_first() {
                    rest = after;
                }
            }
            Some(_) => return false,
        }
        // key = ( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )
        if !matches!(rest.first(), Some(b'a'..=b'z' | b'*')) {
            return false;
        }
        let is_key = |b: &u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' | b'*');
        let n = rest.iter().position(|b| !is_key(b)).unwrap_or(rest.len());
        rest = &rest[n..];
        let Some(after) = rest.strip_prefix(b"=") else {
            continue;
        };
        let Some(len) = bare_item(after) else {
            return false;
        };
        rest = &after[len..];
    }
}

/// The length of the RFC 9651 §4.2.3.1 bare item at the start of `s`, or `None`: an integer,
/// a decimal, a string, a token, a byte sequence, a boolean, a date or a display string.
fn bare_item(s: &[u8]) -> Option<usize> {
    let span = |pred: &dyn Fn(u8) -> bool, from: usize| {
        from + s[from..]
            .iter()
            .position(|&b| !pred(b))
            .unwrap_or(s.len() - from)
    };
    // An integer (at most 15 digits), or when `decimal` a decimal (at most 12 digits, `.`, 1
    // to 3 digits), from `from`.
    let number = |from: usize, decimal: bool| {
        let from = from + usize::from(s.get(from) == Some(&b'-'));
        let int_end = span(&|b| b.is_ascii_digit(), from);
        let digits = int_end - from;
        if decimal && s.get(int_end) == Some(&b'.') {
            let frac_end = span(&|b| b.is_ascii_digit(), int_end + 1);
            let frac = frac_end - int_end - 1;
            ((1..=12).contains(&digits) && (1..=3).contains(&frac)).then_some(frac_end)
        } else {
            (1..=15).contains(&digits).then_some(int_end)
        }
    };
    match *s.first()? {
        b'-' | b'0'..=b'9' => number(0, true),
        b'"' => {
            let mut i = 1;
            loop {
                match *s.get(i)? {
                    b'\\' => match *s.get(i + 1)? {
                        b'"' | b'\\' => i += 2,
                        _ => return None,
                    },
                    b'"' => return Some(i + 1),
                    0x20..=0x7e => i += 1,
                    _ => return None,
                }
            }
        }
        // Token: ( ALPHA / "*" ) *( tchar / ":" / "/" ).
        b'A'..=b'Z' | b'a'..=b'z' | b'*' => {
            let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b);
            Some(span(&tchar, 1))
        }
        // Byte sequence: ":" *( base64 ) ":".
        b':' => {
            let base64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=';
            let end = span(&base64, 1);
            (s.get(end) == Some(&b':')).then_some(end + 1)
        }
        // Boolean.
        b'?' => matches!(s.get(1), Some(b'0' | b'1')).then_some(2),
        // Date: "@" and an integer.
        b'@' => number(1, false),
        // Display string: `%"`, printable ASCII but `%` and `"`, or `%` and two lowercase hex
        // digits, which spell UTF-8; then `"`.
        b'%' => {
            if s.get(1) != Some(&b'"') {
                return None;
            }
            let hex = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
            let mut decoded = Vec::new();
            let mut i = 2;
            loop {
                match *s.get(i)? {
                    b'"' => break,
                    b'%' => {
                        let (high, low) = (*s.get(i + 1)?, *s.get(i + 2)?);
                        if !hex(high) || !hex(low) {
                            return None;
                        }
                        let text = std::str::from_utf8(&s[i + 1..i + 3]).unwrap();
                        decoded.push(u8::from_str_radix(text, 16).unwrap());
                        i += 3;
                    }
                    c @ 0x20..=0x7e => {
                        decoded.push(c);
                        i += 1;
                    }
                    _ => return None,
                }
            }
            std::str::from_utf8(&decoded).ok()?;
            Some(i + 1)
        }
        _ => None,
    }
}

/// An app whose handler answers the unquoted key it was given (in `x-key`), `201`. Nothing
/// is stored: every request is new, so a value's answer is the parser's alone.
fn key_echo_app() -> (Router, Api) {
    let api = Api::default();
    let runs = api.runs.clone();
    let handler = move |axum::Extension(key): axum::Extension<IdempotencyKey>| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let value = HeaderValue::from_str(key.as_str()).unwrap();
            (StatusCode::CREATED, [("x-key", value)], "ok")
        }
    };
    let layer = shared_layer()
        .ttl(Duration::from_millis(1))
        .cache_policy(|_| false);
    (Router::new().route("/pay", post(handler)).layer(layer), api)
}

/// The layer's answer to a key header's value: the key the handler was given, or `None` for
/// `400 idempotency_key_invalid` (no echo, nothing run).
async fn layer_answer(app: &Router, api: &Api, value: &[u8]) -> Option<Vec<u8>> {
    let runs = api.runs();
    let reply = send(app, keyed(value, "x")).await;
    if reply.status == StatusCode::BAD_REQUEST {
        assert_problem(&reply, 400, "idempotency_key_invalid");
        assert_eq!(echo(&reply), None, "no echo of an invalid key");
        assert_eq!(api.runs(), runs, "nothing ran");
        return None;
    }
    let shown = String::from_utf8_lossy(value);
    assert_eq!(reply.status, StatusCode::CREATED, "{shown:?}: {reply:?}");
    assert_eq!(echo(&reply), Some(value), "{shown:?}");
    Some(reply.headers["x-key"].as_bytes().to_vec())
}

/// The layer and the reference read each value of a table as the contract says.
#[tokio::test]
async fn the_layer_and_the_reference_read_each_case_as_the_contract_says() {
    let (app, api) = key_echo_app();
    let k = |n: usize| vec![b'k'; n];
    let quoted = |inner: &[u8]| [&b"\""[..], inner, b"\""].concat();
    let abc = Some(b"abc".to_vec());
    let cases: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
        (k(0), None),
        (b"  ".to_vec(), None),
        (quoted(b""), None),
        (k(1), Some(b"k".to_vec())),
        (k(255), Some(k(255))),
        (k(256), None),
        (quoted(&k(255)), Some(k(255))),
        (quoted(&k(256)), None),
        // 254 characters and one escape: 255 after unquoting, 256 inside the quotes.
        (
            quoted(&[k(254), b"\\\\".to_vec()].concat()),
            Some([k(254), b"\\".to_vec()].concat()),
        ),
        (quoted(&[k(255), b"\\\"".to_vec()].concat()), None),
        (b"\"abc\"".to_vec(), abc.clone()),
        (b"\"a\\\"b\"".to_vec(), Some(b"a\"b".to_vec())),
        (b"\"a\\\\b\"".to_vec(), Some(b"a\\b".to_vec())),
        (b"\"a\\b\"".to_vec(), None),
        (b"\"a\\".to_vec(), None),
        (b"\"a,b\"".to_vec(), Some(b"a,b".to_vec())),
        (b"a,b".to_vec(), None),
        (b"\"a\",\"b\"".to_vec(), None),
        (b"\"a\", b".to_vec(), None),
        (b" \tabc\t ".to_vec(), abc.clone()),
        (b" \"abc\" ".to_vec(), abc.clone()),
        (b"\"a b\"".to_vec(), None),
        (b"a b".to_vec(), None),
        (b"a\tb".to_vec(), None),
        (b"\x80abcdefgh".to_vec(), None),
        (b"abcdefg\x80".to_vec(), None),
        (b"\"ab\xc3\xa9\"".to_vec(), None),
        (b"\"abc\"x".to_vec(), None),
        (b"abc\"".to_vec(), Some(b"abc\"".to_vec())),
        (b"a\"b".to_vec(), Some(b"a\"b".to_vec())),
        (b"~!".to_vec(), Some(b"~!".to_vec())),
        // Parameters, ignored when they parse; a field that does not parse is no key.
        (b"\"abc\";p=1".to_vec(), abc.clone()),
        (b"\"abc\";p".to_vec(), abc.clone()),
        (b"\"abc\"; p=\"x,y\"".to_vec(), abc.clone()),
        (
            b"\"abc\";d=@1659578233;s=%\"f%c3%bc\"".to_vec(),
            abc.clone(),
        ),
        (b"\"abc\";P=1".to_vec(), None),
        (b"\"abc\";p=1,".to_vec(), None),
        (b"\"abc\" ;p=1".to_vec(), None),
        (b"\"abc\";\tp=1".to_vec(), None),
        (b"\"abc\";p=@".to_vec(), None),
        (b"\"abc\";p=1.2.3".to_vec(), None),
        (b"\"abc\";p=%\"%C3%BC\"".to_vec(), None),
    ];
    for (value, expected) in cases {
        let shown = String::from_utf8_lossy(&value);
        assert_eq!(reference(&value), expected, "the reference: {shown:?}");
        let got = layer_answer(&app, &api, &value).await;
        assert_eq!(got, expected, "the layer: {shown:?}");
    }
}

/// Any byte at any place of a bare or quoted key: the layer agrees with the reference.
#[tokio::test]
async fn every_byte_at_every_place() {
    let (app, api) = key_echo_app();
    for len in [1usize, 7, 8, 9, 15, 16, 17, 255] {
        let places: Vec<usize> = if len > 20 {
            vec![0, 7, 8, 247, 248, 254]
        } else {
            (0..len).collect()
        };
        for at in places {
            for byte in 0..=255u8 {
                let mut key = vec![b'k'; len];
                key[at] = byte;
                for value in [key.clone(), [&b"\""[..], &key, b"\""].concat()] {
                    // Controls but HTAB, and DEL, never make a header value.
                    if HeaderValue::from_bytes(&value).is_err() {
                        continue;
                    }
                    let got = layer_answer(&app, &api, &value).await;
                    let shown = String::from_utf8_lossy(&value);
                    assert_eq!(got, reference(&value), "{shown:?}");
                }
            }
        }
    }
}

/// Bytes that sit on the field's edges, most of the time.
fn edge_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => prop::sample::select(vec![
            b' ', b'!', b'"', b',', b'\\', b'~', 0x7f, 0x80, b'\t', b';', b'=', 0xff,
        ]),
        6 => prop::sample::select(b"abkz019-_.*AZ".to_vec()),
        1 => any::<u8>(),
    ]
}

/// Key lengths, most of them around the 8-byte steps and the limit.
fn edge_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 6, 7, 8, 9, 15, 16, 17, 24]),
        prop::sample::select(vec![253usize, 254, 255, 256, 257]),
        0usize..40,
    ]
}

/// A header value: mostly bare or quoted keys of edge lengths, with edge bytes sprinkled in,
/// sometimes with surrounding whitespace or parameters, well-formed or not.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    (
        edge_len(),
        prop::collection::vec((0usize..300, edge_byte()), 0..4),
        0u8..5,
        prop::option::weighted(
            0.3,
            prop::sample::select(vec![
                &b";p=1"[..],
                b";p",
                b";a=?1;b=tok",
                b"; p=\"x\"",
                b";d=@-1;e=1.5;f=:AQ==:",
                b";s=%\"f%c3%bc\"",
                b";p=,",
                b";P=1",
                b" ;p=1",
                b";\tp=1",
                b";p=@",
                b";p=@1.5",
                b";p=1.1234",
                b";p=\"\\x\"",
                b";s=%\"%c3\"",
            ]),
        ),
        any::<bool>(),
    )
        .prop_map(|(len, edits, form, parameters, pad)| {
            let mut key = vec![b'k'; len];
            for (at, byte) in edits {
                if !key.is_empty() {
                    let at = at % key.len();
                    key[at] = byte;
                }
            }
            let mut value = match form {
                // Quoted, escaping what needs it.
                0 | 1 => {
                    let mut v = vec![b'"'];
                    for b in key {
                        if b == b'"' || b == b'\\' {
                            v.push(b'\\');
                        }
                        v.push(b);
                    }
                    v.push(b'"');
                    v
                }
                // Quoted as it comes: unescaped quotes and backslashes, invalid escapes.
                2 => [&b"\""[..], &key, b"\""].concat(),
                _ => key,
            };
            if let Some(parameters) = parameters {
                value.extend_from_slice(parameters);
            }
            if pad {
                value.insert(0, b' ');
                value.push(b'\t');
            }
            value
        })
        .prop_filter("a header value", |v| HeaderValue::from_bytes(v).is_ok())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// On random values near the field's edges, the layer agrees with the reference.
    #[test]
    fn the_layer_agrees_with_the_reference(value in header_value()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (app, api) = key_echo_app();
        let got = rt.block_on(layer_answer(&app, &api, &value));
        prop_assert_eq!(got, reference(&value), "{:?}", String::from_utf8_lossy(&value));
    }
}

/// The key is echoed as sent on every answer to a valid key, never on a `400` for an invalid one.
#[tokio::test]
async fn the_key_is_echoed_as_sent_on_every_answer() {
    let sent: &[u8] = b"\"echo-1\";v=2";
    let api = Api::default();
    let app = api.app(shared_layer().max_body_bytes(8).max_in_flight(2));

    let created = send(&app, keyed(sent, "{}")).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(echo(&created), Some(sent));

    let replay = send(&app, keyed(sent, "{}")).await;
    assert!(replay.replayed());
    assert_eq!(echo(&replay), Some(sent));

    let reuse = send(&app, keyed(sent, "{\"a\":1}")).await;
    assert_problem(&reuse, 422, "idempotency_key_reuse");
    assert_eq!(echo(&reuse), Some(sent));

    let mut announced = keyed(sent, "123456789");
    let nine = HeaderValue::from_static("9");
    announced.headers_mut().insert("content-length", nine);
    let announced = send(&app, announced).await;
    assert_problem(&announced, 413, "request_body_too_large");
    assert_eq!(echo(&announced), Some(sent));

    let chunks: Vec<Result<Bytes, Infallible>> = vec![Ok(Bytes::from_static(b"12345")); 2];
    let streamed = Body::from_stream(futures_util::stream::iter(chunks));
    let streamed = send(&app, keyed(sent, streamed)).await;
    assert_problem(&streamed, 413, "request_body_too_large");
    assert_eq!(echo(&streamed), Some(sent));

    // `409` while the first runs; `503` for a third key past `max_in_flight(2)`.
    let held: &[u8] = b" \"held\" ";
    let hold = |key: &'static [u8]| {
        let app = app.clone();
        tokio::spawn(async move { send(&app, keyed(key, "hold")).await })
    };
    let first = hold(held);
    api.started(2).await;
    let in_progress = send(&app, keyed(held, "hold")).await;
    assert_problem(&in_progress, 409, "idempotency_key_in_progress");
    assert_eq!(echo(&in_progress), Some(held));
    assert!(in_progress.headers.contains_key("retry-after"));
    let second = hold(b"held-2");
    api.started(3).await;
    let overloaded = send(&app, keyed(b"\"other\"", "{}")).await;
    assert_problem(&overloaded, 503, "idempotency_overloaded");
    assert_eq!(echo(&overloaded), Some(&b"\"other\""[..]));
    assert!(overloaded.headers.contains_key("retry-after"));
    api.gate.add_permits(2);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(echo(&first), Some(held));
    assert_eq!(echo(&second.await.unwrap()), Some(&b"held-2"[..]));

    let invalid = send(&app, keyed(b"\"open", "{}")).await;
    assert_problem(&invalid, 400, "idempotency_key_invalid");
    assert_eq!(echo(&invalid), None);
    assert_eq!(api.runs(), 3);
}

/// Through a real server, the echoed key is the bytes the client sent.
#[tokio::test]
async fn the_key_is_echoed_as_sent_through_a_real_server() {
    let api = Api::default();
    let server = Server::start(api.app(shared_layer()), Default::default()).await;
    for value in ["\"srv-a\"", "srv-b", "\"srv-c\";x=?1", "\"s\\\"q\""] {
        let request = raw::post("/pay", &[("Idempotency-Key", value)], "{}");
        let reply = raw::exchange(server.addr, request).await;
        assert_eq!(reply.status, 201, "{reply:?}");
        assert_eq!(reply.header("idempotency-key"), Some(value), "{reply:?}");
    }
    assert_eq!(api.runs(), 4);
}

/// A full store's `503 idempotency_store_unavailable` echoes the key as sent, with `Retry-After`.
#[tokio::test]
async fn the_key_is_echoed_on_a_store_full_503() {
    let api = Api::default();
    let store = MemoryStore::new().max_entries(1);
    let app = api.app(IdempotencyLayer::new(store).shared_scope(true));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, keyed(b"full-1", "hold")).await }
    });
    api.started(1).await;
    let full = send(&app, keyed(b"\"full-2\"", "{}")).await;
    assert_problem(&full, 503, "idempotency_store_unavailable");
    assert_eq!(echo(&full), Some(&b"\"full-2\""[..]));
    assert!(full.headers.contains_key("retry-after"));
    api.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(api.runs(), 1);
}
