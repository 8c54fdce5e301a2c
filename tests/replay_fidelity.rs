//! What a replay sends back. On the wire, through a real server (`axum::serve` on 127.0.0.1)
//! and a raw `TcpStream` that reads the answer byte for byte: a rich head (repeated, mixed-case
//! and non-UTF-8 fields), bodies of every shape, the response cap, which statuses are stored,
//! cookies in the shared scope and skipped headers, keyed `GET` and `HEAD`, and the echoed key.
//! In process, for arbitrary responses: the first client's answer and its replay agree, less
//! what the layer documents it leaves out. And a record's encoding round-trips, and a damaged
//! one never panics.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use axum::routing::post;
use bytes::Bytes;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome, StoredResponse};

use support::{Runs, Server};

/// An answer as it came over the wire.
#[derive(Clone)]
struct Wire {
    status: u16,
    /// The header lines as sent: name (its case as on the wire) and value bytes, in order.
    headers: Vec<(String, Vec<u8>)>,
    chunked: bool,
    /// The body, its chunks joined.
    body: Vec<u8>,
    trailers: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} chunked={}", self.status, self.chunked)?;
        for (n, v) in &self.headers {
            writeln!(f, "{n}: {}", String::from_utf8_lossy(v))?;
        }
        let shown = &self.body[..self.body.len().min(200)];
        let shown = String::from_utf8_lossy(shown);
        writeln!(f, "body ({} bytes): {shown:?}", self.body.len())?;
        for (n, v) in &self.trailers {
            writeln!(f, "trailer {n}: {}", String::from_utf8_lossy(v))?;
        }
        Ok(())
    }
}

impl Wire {
    /// Every value of the field `name` (any case), in order.
    fn all(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    fn one(&self, name: &str) -> Option<&[u8]> {
        self.all(name).first().copied()
    }

    fn replayed(&self) -> bool {
        self.one("idempotent-replayed") == Some(b"true")
    }

    /// The headers a replay must repeat: all but the framing, the hop-by-hop ones, `Date`
    /// and what the layer adds.
    fn comparable(&self) -> Vec<(String, Vec<u8>)> {
        const LEFT_OUT: &[&str] = &[
            "date",
            "connection",
            "keep-alive",
            "transfer-encoding",
            "content-length",
            "idempotent-replayed",
            "x-hop",
        ];
        self.headers
            .iter()
            .filter(|(n, _)| !LEFT_OUT.iter().any(|l| n.eq_ignore_ascii_case(l)))
            .cloned()
            .collect()
    }

    /// Whether `Content-Length`, when sent, is the body's length, and a body without it is
    /// chunked; a `204` or `304` has no body at all.
    fn framing_ok(&self) -> bool {
        if matches!(self.status, 100..=199 | 204 | 304) {
            return self.body.is_empty() && !self.chunked;
        }
        match self.one("content-length") {
            Some(len) => {
                let len = std::str::from_utf8(len).ok().and_then(|l| l.parse().ok());
                !self.chunked && len == Some(self.body.len())
            }
            None => self.chunked || self.body.is_empty(),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Header or trailer lines: names and value bytes.
fn parse_fields(block: &[u8]) -> Vec<(String, Vec<u8>)> {
    block
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .map(|line| {
            let colon = line.iter().position(|&b| b == b':').expect("a field line");
            let name = String::from_utf8(line[..colon].to_vec()).unwrap();
            (name, line[colon + 1..].trim_ascii().to_vec())
        })
        .collect()
}

/// Parses a whole answer; the answer to a `HEAD` has no body, whatever its head says.
fn parse(bytes: &[u8], head_request: bool) -> Wire {
    let end = find(bytes, b"\r\n\r\n").expect("a whole head");
    let head = &bytes[..end];
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let status_line = std::str::from_utf8(&head[..line_end]).unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = parse_fields(&head[(line_end + 2).min(head.len())..]);
    let rest = &bytes[end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case(b"chunked")
    });
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    if head_request {
    } else if chunked {
        let mut at = 0;
        loop {
            let line_end = at + find(&rest[at..], b"\r\n").expect("a chunk size line");
            let size = std::str::from_utf8(&rest[at..line_end]).unwrap();
            let size = size.split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size, 16).expect("a chunk size");
            at = line_end + 2;
            if size == 0 {
                let end = find(&rest[at..], b"\r\n\r\n")
                    .map(|e| at + e)
                    .or_else(|| rest[at..].starts_with(b"\r\n").then_some(at));
                if let Some(end) = end {
                    trailers = parse_fields(&rest[at..end]);
                }
                break;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    } else {
        body = rest.to_vec();
    }
    Wire {
        status,
        headers,
        chunked,
        body,
        trailers,
    }
}

/// Sends one request on a connection of its own (`Connection: close`) and reads the answer
/// until the server closes it.
async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Wire {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
    for (name, value) in headers {
        request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let framing = format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    request.extend_from_slice(framing.as_bytes());
    request.extend_from_slice(body);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("an answer in time")
        .unwrap();
    parse(&answer, method == "HEAD")
}

/// A header value that is not UTF-8 (obs-text), as an upstream may send it.
const OPAQUE: &[u8] = &[b'o', 0x80, 0x9f, 0xa0, 0xc3, 0xa9, 0xfe, 0xff, b'!'];
const MIB: usize = 1024 * 1024;
/// The `Date` the handlers set, which a replay never repeats.
const STORED_DATE: &[u8] = b"Mon, 23 Nov 2026 10:00:00 GMT";

/// 4 KiB of every byte value.
fn binary() -> Vec<u8> {
    (0..=255u8).cycle().take(4096).collect()
}

/// 1 MiB of bytes that do not repeat for a while.
fn large() -> Vec<u8> {
    (0..MIB).map(|i| (i * 31 % 251) as u8).collect()
}

/// `201` with the head most cases share: `Location`, two `Set-Cookie`, a non-UTF-8 value, a
/// mixed-case name, caching headers, two request ids, a hop-by-hop header that `Connection`
/// names, and a `Date`.
fn rich() -> axum::http::response::Builder {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, "/payments/pay_123")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::SET_COOKIE, "sid=abc; Path=/; HttpOnly")
        .header(header::SET_COOKIE, "csrf=xyz; Path=/; Secure")
        .header("x-opaque", HeaderValue::from_bytes(OPAQUE).unwrap())
        .header(HeaderName::from_bytes(b"X-Mixed-Case").unwrap(), "Mixed")
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::ETAG, "\"v1-abc\"")
        .header("X-Request-Id", "req_01HXY")
        .header("Request-Id", "req_02ABC")
        .header(header::CONNECTION, "x-hop")
        .header("x-hop", "hop-value")
        .header(
            header::DATE,
            HeaderValue::from_static("Mon, 23 Nov 2026 10:00:00 GMT"),
        )
}

/// `/case/{name}`: the rich head, with the body `name` says.
async fn case(State(runs): State<Runs>, Path(name): Path<String>) -> Response<Body> {
    runs.bump();
    let json = "{\"id\":\"pay_123\"}";
    match name.as_str() {
        "rich" => rich().body(Body::from(json)).unwrap(),
        // The handler's own chunked framing, in three pieces.
        "streamed" => {
            let chunks = ["{\"id\":", "\"pay_", "123\"}"]
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes())));
            rich()
                .header(header::TRANSFER_ENCODING, "chunked")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
                .unwrap()
        }
        "content-length" => rich()
            .header(header::CONTENT_LENGTH, "16")
            .body(Body::from(json))
            .unwrap(),
        "empty" => rich().body(Body::empty()).unwrap(),
        "no-content" => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .header("x-custom", "1")
            .body(Body::empty())
            .unwrap(),
        "large" => rich().body(Body::from(large())).unwrap(),
        "binary" => rich()
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(Body::from(binary()))
            .unwrap(),
        "over-cap" => rich().body(Body::from(vec![b'z'; MIB + 1])).unwrap(),
        other => panic!("no case {other}"),
    }
}

/// `/status/{code}`: `code`, with `x-status` and a body naming it.
async fn status(State(runs): State<Runs>, Path(code): Path<u16>) -> Response<Body> {
    runs.bump();
    Response::builder()
        .status(code)
        .header("x-status", code.to_string())
        .body(Body::from(format!("status {code}")))
        .unwrap()
}

fn app(runs: &Runs) -> Router {
    Router::new()
        .route("/case/{name}", post(case).get(case).head(case))
        .route("/status/{code}", post(status))
        .with_state(runs.clone())
}

/// [`app`] behind a layer over a `MemoryStore`, on a real server.
async fn start(runs: &Runs, layer: IdempotencyLayer<MemoryStore>) -> Server {
    Server::start(app(runs).layer(layer), Default::default()).await
}

const AUTH: (&str, &str) = ("Authorization", "Bearer tenant-one");

/// A request and its retry, with one key and one body.
async fn twice(addr: SocketAddr, path: &str, key: &str) -> (Wire, Wire) {
    let headers = [
        AUTH,
        ("Idempotency-Key", key),
        ("Content-Type", "text/plain"),
    ];
    let first = send(addr, "POST", path, &headers, b"same body").await;
    let retry = send(addr, "POST", path, &headers, b"same body").await;
    (first, retry)
}

/// Asserts that `retry` replays `first` on the wire: same status, headers, cookies, body and
/// trailers, each framed right; the replay marked once, the key echoed on both; no
/// hop-by-hop header and not the stored `Date` replayed.
fn assert_replay(first: &Wire, retry: &Wire, key: &str) {
    assert_eq!(first.status, retry.status, "status");
    assert!(
        !first.replayed(),
        "the first answer is no replay: {first:#?}"
    );
    assert!(retry.replayed(), "the retry is a replay: {retry:#?}");
    assert_eq!(first.all("idempotent-replayed").len(), 0);
    assert_eq!(retry.all("idempotent-replayed").len(), 1);
    assert_eq!(first.one("idempotency-key"), Some(key.as_bytes()));
    assert_eq!(retry.one("idempotency-key"), Some(key.as_bytes()));
    assert_eq!(first.comparable(), retry.comparable(), "headers differ");
    assert_eq!(first.all("set-cookie"), retry.all("set-cookie"));
    assert_eq!(first.body, retry.body, "body differs");
    assert_eq!(first.trailers, retry.trailers, "trailers differ");
    assert!(first.framing_ok(), "first framing: {first:#?}");
    assert!(retry.framing_ok(), "replay framing: {retry:#?}");
    assert!(retry.one("x-hop").is_none(), "x-hop replayed");
    assert!(retry.all("date").len() <= 1, "one Date");
    assert_ne!(
        retry.one("date"),
        Some(STORED_DATE),
        "the stored Date replayed"
    );
}

/// Asserts the rich head the handler set reached the first client.
fn assert_rich_head(first: &Wire) {
    assert_eq!(first.status, 201);
    assert_eq!(first.one("location"), Some(&b"/payments/pay_123"[..]));
    assert_eq!(
        first.all("set-cookie"),
        [
            &b"sid=abc; Path=/; HttpOnly"[..],
            b"csrf=xyz; Path=/; Secure"
        ]
    );
    assert_eq!(first.one("x-opaque"), Some(OPAQUE));
    assert_eq!(first.one("x-mixed-case"), Some(&b"Mixed"[..]));
    assert_eq!(first.one("request-id"), Some(&b"req_02ABC"[..]));
    assert_eq!(first.one("x-request-id"), Some(&b"req_01HXY"[..]));
}

/// A rich head replays on the wire as sent, less the hop-by-hop header and `Date`; one run.
#[tokio::test]
async fn a_rich_head_replays_on_the_wire() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    let (first, retry) = twice(server.addr, "/case/rich", "k-rich").await;
    assert_rich_head(&first);
    assert_eq!(first.body, b"{\"id\":\"pay_123\"}");
    assert_replay(&first, &retry, "k-rich");
    assert_eq!(runs.get(), 1);
}

/// Every shape of body (streamed, sized, empty, `204`, 1 MiB, binary) replays byte for byte.
#[tokio::test]
async fn every_body_shape_replays_on_the_wire() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    let json = b"{\"id\":\"pay_123\"}".to_vec();
    let cases = [
        ("streamed", 201, json.clone()),
        ("content-length", 201, json),
        ("empty", 201, Vec::new()),
        ("no-content", 204, Vec::new()),
        ("large", 201, large()),
        ("binary", 201, binary()),
    ];
    for (ran, (name, status, body)) in cases.into_iter().enumerate() {
        let key = format!("k-{name}");
        let (first, retry) = twice(server.addr, &format!("/case/{name}"), &key).await;
        assert_eq!(first.status, status, "{name}: {first:#?}");
        assert_eq!(first.body, body, "{name}");
        assert_replay(&first, &retry, &key);
        assert_eq!(runs.get(), ran + 1, "{name} ran once");
    }
}

/// A response over the 1 MiB cap reaches its client whole; its retry is `409`, never a second run.
#[tokio::test]
async fn a_response_over_the_cap_reaches_its_client_whole_and_is_never_run_again() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    let (first, retry) = twice(server.addr, "/case/over-cap", "k-over").await;
    assert_eq!(first.status, 201);
    assert_eq!(first.body.len(), MIB + 1);
    assert!(first.body.iter().all(|&b| b == b'z'));
    assert!(first.framing_ok(), "{first:#?}");
    assert_eq!(first.one("idempotency-key"), Some(&b"k-over"[..]));
    assert_eq!(retry.status, 409, "{retry:#?}");
    let problem = Some(&b"application/problem+json"[..]);
    assert_eq!(retry.one("content-type"), problem);
    let problem: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(problem["code"], "idempotency_response_not_stored");
    assert_eq!(retry.one("idempotency-key"), Some(&b"k-over"[..]));
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 1);
}

/// Successes, redirects and the client errors that say the operation ran replay; one run each.
#[tokio::test]
async fn stored_statuses_replay_on_the_wire_and_run_once() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    let codes = [200, 201, 202, 204, 301, 302, 303, 307, 402, 404, 409, 410];
    for (ran, code) in codes.into_iter().enumerate() {
        let key = format!("k-stored-{code}");
        let (first, retry) = twice(server.addr, &format!("/status/{code}"), &key).await;
        assert_eq!(first.status, code);
        assert_replay(&first, &retry, &key);
        assert_eq!(runs.get(), ran + 1, "{code} ran again");
    }
}

/// Refusals and failures are not stored: the retry runs again, unmarked, its key echoed.
#[tokio::test]
async fn refusals_and_failures_run_again_on_the_wire() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    let codes = [400, 401, 403, 408, 413, 415, 422, 429, 500, 502, 503, 504];
    for (ran, code) in codes.into_iter().enumerate() {
        let key = format!("k-released-{code}");
        let (first, retry) = twice(server.addr, &format!("/status/{code}"), &key).await;
        assert_eq!((first.status, retry.status), (code, code));
        assert!(!first.replayed() && !retry.replayed(), "{code}");
        assert_eq!(first.one("idempotency-key"), Some(key.as_bytes()), "{code}");
        assert_eq!(retry.one("idempotency-key"), Some(key.as_bytes()), "{code}");
        assert_eq!(first.body, retry.body);
        assert_eq!(runs.get(), 2 * (ran + 1), "{code} not run again");
    }
}

/// Shared-scope `Set-Cookie` replays only when asked; skipped headers reach the first client only.
#[tokio::test]
async fn cookies_in_the_shared_scope_and_skipped_headers_on_the_wire() {
    let shared = [("Idempotency-Key", "k-shared")];
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    let server = start(&runs, layer).await;
    let first = send(server.addr, "POST", "/case/rich", &shared, b"x").await;
    let retry = send(server.addr, "POST", "/case/rich", &shared, b"x").await;
    assert_rich_head(&first);
    assert!(retry.replayed());
    assert!(retry.all("set-cookie").is_empty(), "{retry:#?}");
    assert_eq!(retry.one("location"), first.one("location"));
    assert_eq!(retry.one("x-opaque"), Some(OPAQUE));
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .replay_cookies_in_shared_scope(true);
    let server = start(&runs, layer).await;
    let first = send(server.addr, "POST", "/case/rich", &shared, b"x").await;
    let retry = send(server.addr, "POST", "/case/rich", &shared, b"x").await;
    assert_replay(&first, &retry, "k-shared");
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let skipped = [header::SET_COOKIE, HeaderName::from_static("x-opaque")];
    let layer = IdempotencyLayer::new(MemoryStore::new()).skip_response_headers(skipped);
    let server = start(&runs, layer).await;
    let (first, retry) = twice(server.addr, "/case/rich", "k-skip").await;
    assert_rich_head(&first);
    assert!(retry.replayed());
    assert!(retry.all("set-cookie").is_empty(), "{retry:?}");
    assert!(retry.one("x-opaque").is_none(), "{retry:?}");
    assert_eq!(retry.one("location"), first.one("location"));
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

/// A keyed `GET` or `HEAD` runs every time, its head untouched and no key echoed.
#[tokio::test]
async fn keyed_get_and_head_pass_through_untouched() {
    let runs = Runs::default();
    let server = start(&runs, IdempotencyLayer::new(MemoryStore::new())).await;
    for method in ["GET", "HEAD"] {
        let headers = [AUTH, ("Idempotency-Key", "k-get")];
        for _ in 0..2 {
            let wire = send(server.addr, method, "/case/rich", &headers, b"").await;
            assert_eq!(wire.status, 201);
            assert!(!wire.replayed());
            assert!(wire.one("idempotency-key").is_none(), "{method}: {wire:#?}");
            assert_eq!(wire.one("x-hop"), Some(&b"hop-value"[..]));
            assert_eq!(wire.one("date"), Some(STORED_DATE));
        }
    }
    assert_eq!(runs.get(), 4);
}

/// `POST /own-headers`: `201` with the handler's own `Idempotent-Replayed: true`,
/// `Idempotency-Key` and `X-Idem`.
async fn own_headers(State(runs): State<Runs>) -> Response<Body> {
    runs.bump();
    Response::builder()
        .status(StatusCode::CREATED)
        .header("Idempotent-Replayed", "true")
        .header("Idempotency-Key", "not-the-client-s")
        .header("X-Idem", "handler-own")
        .body(Body::from("ok"))
        .unwrap()
}

/// Only the layer says `Idempotent-Replayed`; the echoed key is the client's, not the handler's.
#[tokio::test]
async fn only_the_layer_says_replayed_and_the_key_echoed_is_the_client_s() {
    let own = |runs: &Runs| {
        Router::new()
            .route("/own-headers", post(own_headers))
            .with_state(runs.clone())
    };
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new());
    let server = Server::start(own(&runs).layer(layer), Default::default()).await;
    let (first, retry) = twice(server.addr, "/own-headers", "\"sf-key\"").await;
    assert!(!first.replayed(), "{first:?}");
    assert_eq!(first.all("idempotency-key"), [&b"\"sf-key\""[..]]);
    assert_eq!(retry.all("idempotency-key"), [&b"\"sf-key\""[..]]);
    assert_eq!(retry.all("idempotent-replayed"), [&b"true"[..]]);
    assert_eq!(retry.body, b"ok");
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let layer =
        IdempotencyLayer::new(MemoryStore::new()).header_name(HeaderName::from_static("x-idem"));
    let server = Server::start(own(&runs).layer(layer), Default::default()).await;
    let headers = [AUTH, ("X-Idem", "k-custom")];
    let first = send(server.addr, "POST", "/own-headers", &headers, b"b").await;
    let retry = send(server.addr, "POST", "/own-headers", &headers, b"b").await;
    assert_eq!(first.all("x-idem"), [&b"k-custom"[..]]);
    assert_eq!(retry.all("x-idem"), [&b"k-custom"[..]]);
    assert!(retry.replayed());
    // The handler's `Idempotency-Key` is just a header here: replayed as it was sent.
    assert_eq!(first.all("idempotency-key"), [&b"not-the-client-s"[..]]);
    assert_eq!(retry.all("idempotency-key"), [&b"not-the-client-s"[..]]);
    assert_eq!(runs.get(), 1);
}

/// A header name: the ones matched without parsing, other standard ones, near misses, and
/// any token.
fn name() -> impl Strategy<Value = HeaderName> {
    let known = prop::sample::select(vec![
        "content-type",
        "content-length",
        "location",
        "set-cookie",
        "cache-control",
        "etag",
        "last-modified",
        "expires",
        "vary",
        "link",
        "content-encoding",
        "content-language",
        "content-location",
        "content-disposition",
        "content-security-policy",
        "retry-after",
        "www-authenticate",
        "access-control-allow-origin",
        "access-control-allow-credentials",
        "access-control-expose-headers",
        "strict-transport-security",
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
        "server",
        "trailer",
        "x-request-id",
        "request-id",
        "age",
        "accept-ranges",
        "allow",
        "x-xss-protection",
        "x-request-ids",
        "request-i",
        "etags",
    ]);
    prop_oneof![
        known.prop_map(HeaderName::from_static),
        "[a-z0-9!#$%&'*+.^_`|~-]{1,24}".prop_map(|s| HeaderName::from_bytes(s.as_bytes()).unwrap()),
    ]
}

/// A header value: HTAB, visible ASCII, spaces and obs-text.
fn value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff];
    prop::collection::vec(byte, 0..40).prop_map(|v| HeaderValue::from_bytes(&v).unwrap())
}

/// Up to `max` fields, names repeated at random.
fn headers(max: usize) -> impl Strategy<Value = HeaderMap> {
    prop::collection::vec((name(), value()), 0..max).prop_map(|fields| {
        let mut map = HeaderMap::new();
        for (n, v) in fields {
            map.append(n, v);
        }
        map
    })
}

/// What a replay leaves out of a response's headers (DESIGN, "Replay fidelity"): the
/// hop-by-hop ones, those `Connection` names, `Date`, and the replay marker the layer adds.
fn replayable(headers: &HeaderMap) -> HeaderMap {
    const NEVER: &[&str] = &[
        "connection",
        "date",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "idempotent-replayed",
    ];
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = HeaderMap::new();
    for (n, v) in headers {
        if NEVER.contains(&n.as_str()) || named.iter().any(|t| t == n.as_str()) {
            continue;
        }
        out.append(n.clone(), v.clone());
    }
    out
}

/// The fields of `map` in order, as text and bytes.
fn ordered(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any stored response: the replay is the first answer less what is never replayed; one run.
    #[test]
    fn the_first_answer_and_its_replay_agree(
        headers in headers(24),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        code in prop::sample::select(vec![200u16, 201, 202, 204, 302, 402, 404, 409, 410]),
        connection in prop::option::of(prop::sample::select(vec![
            "close", "x-a, Set-Cookie", "Location", "etag ,  x-b", "keep-alive",
        ])),
    ) {
        use http_body_util::{BodyExt, Full};
        use tower::{Layer, Service, ServiceExt};

        #[derive(Clone, Debug, PartialEq)]
        struct Principal(&'static str);

        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut headers = headers;
        headers.remove("idempotency-key");
        if let Some(c) = connection {
            headers.append(header::CONNECTION, HeaderValue::from_static(c));
        }
        let runs = Runs::default();
        let handler = {
            let (headers, body, runs) = (headers.clone(), body.clone(), runs.clone());
            tower::service_fn(move |_: axum::http::Request<_>| {
                runs.bump();
                let mut response = Response::new(Full::new(Bytes::from(body.clone())));
                *response.status_mut() = StatusCode::from_u16(code).unwrap();
                *response.headers_mut() = headers.clone();
                async move { Ok::<_, std::convert::Infallible>(response) }
            })
        };
        let mut svc = IdempotencyLayer::new(MemoryStore::new()).layer(handler);
        let request = || {
            axum::http::Request::post("/x")
                .header("authorization", "Bearer t")
                .header("idempotency-key", "k")
                .extension(Principal("alice"))
                .body(Full::new(Bytes::from_static(b"req")))
                .unwrap()
        };
        let (first, replay) = rt.block_on(async {
            let first = svc.ready().await.unwrap().call(request()).await.unwrap();
            let replay = svc.ready().await.unwrap().call(request()).await.unwrap();
            (first, replay)
        });
        prop_assert_eq!(runs.get(), 1);
        prop_assert_eq!(first.extensions().get::<Outcome>(), Some(&Outcome::Executed));
        prop_assert_eq!(replay.extensions().get::<Outcome>(), Some(&Outcome::Replayed));
        prop_assert_eq!(replay.extensions().get::<Principal>(), None);
        prop_assert_eq!(replay.extensions().len(), 1);
        prop_assert_eq!(first.status(), replay.status());
        let mut expected_first = headers.clone();
        expected_first.remove(header::TRANSFER_ENCODING);
        expected_first.remove("idempotent-replayed");
        expected_first.insert("idempotency-key", HeaderValue::from_static("k"));
        prop_assert_eq!(ordered(first.headers()), ordered(&expected_first));
        let mut expected_replay = replayable(&headers);
        expected_replay.insert("idempotent-replayed", HeaderValue::from_static("true"));
        expected_replay.insert("idempotency-key", HeaderValue::from_static("k"));
        prop_assert_eq!(ordered(replay.headers()), ordered(&expected_replay));
        let (a, b) = rt.block_on(async {
            let a = first.into_body().collect().await.unwrap().to_bytes();
            let b = replay.into_body().collect().await.unwrap().to_bytes();
            (a, b)
        });
        prop_assert_eq!(&a[..], &body[..]);
        prop_assert_eq!(&b[..], &body[..]);
    }
}

/// Any status, headers, body and trailers, as a record holds them.
fn stored() -> impl Strategy<Value = (StatusCode, HeaderMap, Vec<u8>, Option<HeaderMap>)> {
    (
        (100u16..1000).prop_map(|c| StatusCode::from_u16(c).unwrap()),
        headers(40),
        prop::collection::vec(any::<u8>(), 0..1024),
        prop::option::of(headers(6)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any record decodes to itself and encodes to the same bytes; its cuts are refused.
    #[test]
    fn a_record_round_trips_through_its_encoding((status, headers, body, trailers) in stored()) {
        let mut response = StoredResponse::new(status, headers.clone(), Bytes::from(body.clone()));
        if let Some(t) = &trailers {
            response = response.with_trailers(t.clone());
        }
        let expected_trailers = trailers.filter(|t| !t.is_empty());
        for record in [response.clone(), StoredResponse::decode(&response.encode()).unwrap()] {
            prop_assert_eq!(&record, &response);
            prop_assert_eq!(record.status(), status);
            prop_assert_eq!(ordered(record.headers()), ordered(&headers));
            prop_assert_eq!(&record.body()[..], &body[..]);
            prop_assert_eq!(record.trailers().map(ordered), expected_trailers.as_ref().map(ordered));
            prop_assert!(!record.is_omitted());
            prop_assert_eq!(record.encode(), response.encode());
        }
        // Every cut through the fields, and some through the body (which comes last).
        let bytes = response.encode();
        let body_at = bytes.len() - body.len();
        for len in (0..bytes.len()).filter(|&len| len <= body_at || len % 97 == 0) {
            prop_assert!(StoredResponse::decode(&bytes[..len]).is_err(), "cut at {}", len);
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        prop_assert!(StoredResponse::decode(&longer).is_err());
    }

    /// A damaged record is refused, or decodes without a panic to a record that round-trips.
    #[test]
    fn a_damaged_record_is_refused_or_round_trips(
        (status, headers, body, trailers) in stored(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut response = StoredResponse::new(status, headers, Bytes::from(body));
        if let Some(t) = trailers {
            response = response.with_trailers(t);
        }
        let mut bytes = response.encode().to_vec();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        if let Ok(record) = StoredResponse::decode(&bytes) {
            let _ = (record.headers().len(), record.body().len(), record.trailers());
            prop_assert_eq!(StoredResponse::decode(&record.encode()).unwrap(), record);
        }
    }
}
