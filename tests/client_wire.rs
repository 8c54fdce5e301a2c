//! The client side against a raw HTTP/1.1 server on loopback that records every request it
//! reads and misbehaves on purpose: it closes the connection once it has read a request, resets
//! it, closes it after reading only the head, sends half a status line, or cuts a body short.
//! `IdempotentRetryLayer` runs over hyper-util's client, `IdempotentRetryMiddleware` over
//! reqwest. The tests check what reached the server (attempts, keys, bodies) and what the caller
//! got back (the status, the `RetryOutcome`, the error): which failures and statuses are
//! retried, the key, the body buffered once and its size limit, and the tower contract.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_idempotency::{
    IdempotentRetry, IdempotentRetryLayer, IdempotentRetryLayerBuilder, IdempotentRetryMiddleware,
    RetryBody, RetryError, RetryErrorKind, RetryFuture, RetryOutcome,
};

// ---------------------------------------------------------------------------------------------
// The raw server
// ---------------------------------------------------------------------------------------------

/// What the server does with one request, once it has read it.
#[derive(Clone, Debug)]
enum Act {
    /// Answers with this status, these headers and no body, then closes.
    Answer(u16, &'static [(&'static str, &'static str)]),
    /// Answers with this status and a `Retry-After` HTTP-date this far ahead, written as the
    /// answer leaves, then closes.
    AnswerRetryAt(u16, Duration),
    /// Closes the connection without a byte of answer.
    Close,
    /// Resets the connection (`SO_LINGER` 0) without a byte of answer.
    Reset,
    /// Reads the head only, not the body, then closes.
    CloseBeforeBody,
    /// Sends half a status line, then closes.
    HalfStatusLine,
    /// Sends the head of a `200` with a 100-byte body and 4 bytes of that body, then closes.
    CutBody,
}

const NONE: &[(&str, &str)] = &[];

/// Answers `code`, no headers.
fn status(code: u16) -> Act {
    Act::Answer(code, NONE)
}

/// A request as the server read it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// When the server had read it.
    at: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn key(&self) -> Option<&str> {
        self.header("idempotency-key")
    }
}

/// A raw HTTP/1.1 server on loopback, one request per connection: it plays its script for the
/// first requests, then `last` for every other one, and records each request it read and each
/// connection it accepted.
#[derive(Clone)]
struct RawServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl RawServer {
    async fn start(script: impl IntoIterator<Item = Act>, last: Act) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            seen: Arc::default(),
            connections: Arc::default(),
        };
        let script = Arc::new(Mutex::new(script.into_iter().collect::<VecDeque<_>>()));
        let (seen, connections) = (server.seen.clone(), server.connections.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                let act = script.lock().unwrap().pop_front();
                let act = act.unwrap_or_else(|| last.clone());
                tokio::spawn(serve(Connection::new(stream), act, seen.clone()));
            }
        });
        server
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Reads one request off `connection`, records it, and does `act`.
async fn serve(mut connection: Connection, act: Act, seen: Arc<Mutex<Vec<Seen>>>) {
    let Some(head) = connection.until(b"\r\n\r\n").await else {
        return;
    };
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.lines();
    let method = lines.next().unwrap().split(' ').next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = if matches!(act, Act::CloseBeforeBody) {
        Some(Vec::new())
    } else if header("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        connection.chunked().await
    } else {
        let length = header("content-length").map_or(0, |len| len.parse().unwrap());
        connection.exact(length).await
    };
    let Some(body) = body else {
        return; // The client went away half-way through its body.
    };
    seen.lock().unwrap().push(Seen {
        method,
        headers,
        body: body.into(),
        at: Instant::now(),
    });
    let mut stream = connection.stream;
    match act {
        Act::Answer(code, extra) => {
            let extra = extra.iter().map(|(n, v)| (*n, (*v).to_owned())).collect();
            answer(&mut stream, code, extra).await;
        }
        Act::AnswerRetryAt(code, ahead) => {
            let date = httpdate::fmt_http_date(SystemTime::now() + ahead);
            answer(&mut stream, code, vec![("retry-after", date)]).await;
        }
        Act::Close | Act::CloseBeforeBody => {}
        Act::Reset => stream.set_zero_linger().unwrap(),
        Act::HalfStatusLine => {
            let _ = stream.write_all(b"HTTP/1.1 2").await;
        }
        Act::CutBody => {
            let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\nhalf";
            let _ = stream.write_all(head.as_bytes()).await;
        }
    }
}

/// Writes an answer without a body and ends the connection.
async fn answer(stream: &mut TcpStream, code: u16, headers: Vec<(&str, String)>) {
    let status = StatusCode::from_u16(code).unwrap();
    let reason = status.canonical_reason().unwrap_or("Other");
    let mut out = format!("HTTP/1.1 {code} {reason}\r\nconnection: close\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    // A 204 or a 304 has no body and says nothing of its length.
    if !matches!(code, 204 | 304) {
        out.push_str("content-length: 0\r\n");
    }
    out.push_str("\r\n");
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// One accepted connection and the bytes read off it but not yet taken.
struct Connection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The bytes up to and including `delimiter`; `None` if the peer closed first.
    async fn until(&mut self, delimiter: &[u8]) -> Option<Vec<u8>> {
        loop {
            let found = self
                .buf
                .windows(delimiter.len())
                .position(|w| w == delimiter);
            if let Some(i) = found {
                return Some(self.buf.drain(..i + delimiter.len()).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next `n` bytes; `None` if the peer closed first.
    async fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// A chunked body, decoded; its trailers are read and dropped.
    async fn chunked(&mut self) -> Option<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = String::from_utf8(self.until(b"\r\n").await?).ok()?;
            let size = line.trim_end().split(';').next()?.trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                while self.until(b"\r\n").await?.len() > 2 {}
                return Some(body);
            }
            body.extend(self.exact(size).await?);
            self.exact(2).await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, BoxError>;
type Http = Client<HttpConnector, RetryBody<Body>>;

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Short waits, so that retries are quick on real time.
fn quick() -> IdempotentRetryLayerBuilder {
    IdempotentRetryLayer::builder()
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(100))
}

/// A request with a body known in full, and `key` if given.
fn request(method: Method, url: &str, key: Option<&str>, body: impl Into<Bytes>) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(url);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let body = Full::new(body.into()).map_err(|e| match e {}).boxed();
    request.body(body).unwrap()
}

/// A body read chunk by chunk, its length unknown until its end; an `Err` chunk fails it.
fn streamed(chunks: &[Result<&'static str, &'static str>]) -> Body {
    let frames: Vec<_> = chunks
        .iter()
        .map(|chunk| {
            chunk
                .map(|data| Frame::data(Bytes::from_static(data.as_bytes())))
                .map_err(BoxError::from)
        })
        .collect();
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// `request` through `layer` over hyper-util's client.
async fn send(
    layer: IdempotentRetryLayer,
    request: Request<Body>,
) -> Result<Response<Incoming>, RetryError> {
    layer.layer(http()).oneshot(request).await
}

fn outcome<B>(response: &Response<B>) -> &RetryOutcome {
    RetryOutcome::of(response).expect("a covered request's response carries its RetryOutcome")
}

/// reqwest behind the middleware with `layer`'s settings; each attempt bounded by 10 s, no
/// redirect followed.
fn reqwest_client(layer: IdempotentRetryLayer) -> ClientWithMiddleware {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    ClientBuilder::new(client)
        .with(IdempotentRetryMiddleware::new(layer))
        .build()
}

fn reqwest_outcome(response: &reqwest::Response) -> &RetryOutcome {
    response
        .extensions()
        .get::<RetryOutcome>()
        .expect("a covered request's response carries its RetryOutcome")
}

/// The layer's error inside reqwest-middleware's.
fn retry_error(error: &reqwest_middleware::Error) -> &RetryError {
    let reqwest_middleware::Error::Middleware(inner) = error else {
        panic!("the layer's error: {error:?}");
    };
    inner.downcast_ref::<RetryError>().unwrap()
}

/// A UUID v4 in its lowercase hyphenated form.
fn is_uuid_v4(text: &str) -> bool {
    let groups: Vec<_> = text.split('-').map(str::len).collect();
    groups == [8, 4, 4, 4, 12]
        && text
            .bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && &text[14..15] == "4"
        && matches!(&text[19..20], "8" | "9" | "a" | "b")
}

/// The kinds of lost connection the server plays, none of them with an answer.
const LOST: [Act; 4] = [
    Act::Close,
    Act::Reset,
    Act::CloseBeforeBody,
    Act::HalfStatusLine,
];

/// Statuses worth retrying, with the headers that make them so.
const RETRIED: [(u16, &[(&str, &str)]); 8] = [
    (409, &[("retry-after", "0")]),
    (429, NONE),
    (500, NONE),
    (502, NONE),
    (503, NONE),
    (504, NONE),
    (507, NONE),
    (599, NONE),
];

/// Statuses returned at once: the answer of an operation, or a request that cannot succeed.
const FINAL: [u16; 32] = [
    200, 201, 202, 204, 301, 302, 303, 304, 307, 308, 400, 401, 402, 403, 404, 405, 406, 408, 409,
    410, 411, 412, 413, 415, 418, 422, 425, 428, 431, 451, 501, 505,
];

// ---------------------------------------------------------------------------------------------
// What is retried, through the layer
// ---------------------------------------------------------------------------------------------

/// Closed, reset, closed before the body, half a status line: retried, same key, whole body.
#[tokio::test]
async fn lost_connections_are_retried_with_the_same_key_and_the_whole_body() {
    let body = Bytes::from("0123456789".repeat(1_000));
    for act in LOST {
        let server = RawServer::start([act.clone(), act.clone()], status(201)).await;
        let response = send(
            quick().build(),
            request(Method::POST, &server.url("/payments"), None, body.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("{act:?}: {e}"));

        assert_eq!(response.status(), StatusCode::CREATED, "{act:?}");
        let outcome = outcome(&response);
        assert_eq!(
            (outcome.attempts(), outcome.replayed()),
            (3, false),
            "{act:?}"
        );
        let key = outcome.key().to_str().unwrap();
        let seen = server.seen();
        assert_eq!(seen.len(), 3, "{act:?}");
        assert!(seen.iter().all(|s| s.key() == Some(key)), "{act:?}");
        assert!(seen.iter().all(|s| s.method == "POST"), "{act:?}");
        assert_eq!(seen[2].body, body, "{act:?}: the last attempt");
        if !matches!(act, Act::CloseBeforeBody) {
            assert_eq!(seen[0].body, body, "{act:?}: the first attempt");
        }
    }
}

/// 409 with `Retry-After`, 429, 500, 502, 503, 504, 507 and 599 are retried with the same key.
#[tokio::test]
async fn the_statuses_worth_retrying_are_retried() {
    for (code, headers) in RETRIED {
        let server = RawServer::start([Act::Answer(code, headers)], status(201)).await;
        let response = send(
            quick().build(),
            request(Method::POST, &server.url("/payments"), None, "{}"),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{code} is retried");
        assert_eq!(outcome(&response).attempts(), 2, "{code}");
        let seen = server.seen();
        assert_eq!(seen.len(), 2, "{code}");
        assert_eq!(seen[0].key(), seen[1].key(), "{code}");
    }
}

/// 2xx, 3xx, 409 without `Retry-After`, 422, the other 4xx, 501 and 505 are returned at once.
#[tokio::test]
async fn the_other_statuses_are_returned_at_once() {
    for code in FINAL {
        let server = RawServer::start([], status(code)).await;
        let response = send(
            quick().build(),
            request(Method::POST, &server.url("/payments"), None, "{}"),
        )
        .await
        .unwrap();
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(outcome(&response).attempts(), 1, "{code} is not retried");
        assert_eq!(server.seen().len(), 1, "{code} is sent once");
    }
}

/// A `503` marked `Idempotent-Replayed: true` is final, and the outcome says replayed.
#[tokio::test]
async fn a_replayed_503_is_final() {
    let replayed = Act::Answer(503, &[("idempotent-replayed", "true")]);
    let server = RawServer::start([status(503)], replayed).await;
    let response = send(
        quick().build(),
        request(Method::POST, &server.url("/payments"), None, "{}"),
    )
    .await
    .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let outcome = outcome(&response);
    assert_eq!((outcome.attempts(), outcome.replayed()), (2, true));
    assert_eq!(server.seen().len(), 2, "no retry after the replay");
}

/// TIMING: a `Retry-After` given as an HTTP-date is waited for, not the (10 ms) backoff.
#[tokio::test]
async fn a_retry_after_http_date_is_waited_for() {
    // Written in whole seconds as the answer leaves: between 1 and 2 s after the request came.
    let server = RawServer::start(
        [Act::AnswerRetryAt(429, Duration::from_secs(2))],
        status(201),
    )
    .await;
    let layer = IdempotentRetryLayer::builder()
        .base_delay(Duration::from_millis(10))
        .build();
    let response = send(
        layer,
        request(Method::POST, &server.url("/payments"), None, "{}"),
    )
    .await
    .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(outcome(&response).attempts(), 2);
    let seen = server.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(900), "retried after {gap:?}");
}

/// An answer cut after its head is the caller's, with a body error: the request is sent once.
#[tokio::test]
async fn a_body_cut_after_the_head_is_not_retried() {
    let server = RawServer::start([], Act::CutBody).await;
    let response = send(
        quick().build(),
        request(Method::POST, &server.url("/payments"), None, "{}"),
    )
    .await
    .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(outcome(&response).attempts(), 1);
    assert!(response.into_body().collect().await.is_err(), "cut off");
    assert_eq!(server.connections(), 1, "sent once");
    assert_eq!(server.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Keys, methods and retry count
// ---------------------------------------------------------------------------------------------

/// A `POST` or `PATCH` without a key gets a new UUID v4, kept across its retries.
#[tokio::test]
async fn a_generated_key_is_a_uuid_v4_per_request() {
    let server = RawServer::start([status(503), status(201), status(503)], status(201)).await;
    let layer = quick().build();
    let mut keys = Vec::new();
    for method in [Method::POST, Method::PATCH] {
        let response = send(
            layer.clone(),
            request(method.clone(), &server.url("/payments"), None, "{}"),
        )
        .await
        .unwrap();
        let key = outcome(&response).key().to_str().unwrap().to_owned();
        assert!(is_uuid_v4(&key), "{method}: {key}");
        keys.push(key);
    }
    let seen = server.seen();
    let sent: Vec<_> = seen.iter().map(|s| (s.method.as_str(), s.key())).collect();
    assert_eq!(
        sent,
        [
            ("POST", Some(&*keys[0])),
            ("POST", Some(&*keys[0])),
            ("PATCH", Some(&*keys[1])),
            ("PATCH", Some(&*keys[1])),
        ]
    );
    assert_ne!(keys[0], keys[1]);
}

/// With `max_retries(0)` a `503` is sent once, still with a key, in the configured header.
#[tokio::test]
async fn zero_retries_sends_once_with_a_key() {
    let server = RawServer::start([], status(503)).await;
    let layer = quick()
        .max_retries(0)
        .header_name(HeaderName::from_static("x-request-key"))
        .build();
    let response = send(
        layer,
        request(Method::POST, &server.url("/payments"), None, "{}"),
    )
    .await
    .unwrap();

    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome(&response).attempts(), 1);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("x-request-key"),
        Some(outcome(&response).key().to_str().unwrap())
    );
    assert_eq!(seen[0].key(), None);
}

/// `.methods([POST, PUT])` covers `PUT`, not `PATCH`; an uncovered request keeps its own key.
#[tokio::test]
async fn the_configured_methods_are_covered_and_no_other() {
    let layer = quick().methods([Method::POST, Method::PUT]).build();

    let server = RawServer::start([status(503)], status(200)).await;
    let response = send(
        layer.clone(),
        request(Method::PUT, &server.url("/p"), None, "b"),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(outcome(&response).attempts(), 2);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].key().is_some() && seen[0].key() == seen[1].key());

    let server = RawServer::start([], status(503)).await;
    let response = send(
        layer.clone(),
        request(Method::PATCH, &server.url("/p"), None, "b"),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(RetryOutcome::of(&response).is_none());
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "PATCH is sent once");
    assert_eq!(seen[0].key(), None, "and gets no key");

    let server = RawServer::start([], status(200)).await;
    send(
        layer,
        request(Method::DELETE, &server.url("/p"), Some("k-1"), ""),
    )
    .await
    .unwrap();
    assert_eq!(server.seen()[0].key(), Some("k-1"));
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// An empty body goes out empty on every attempt, never chunked.
#[tokio::test]
async fn an_empty_body_is_sent_empty_on_every_attempt() {
    let server = RawServer::start([status(503)], status(201)).await;
    send(
        quick().build(),
        request(Method::POST, &server.url("/payments"), None, ""),
    )
    .await
    .unwrap();

    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert!(s.body.is_empty());
        assert!(
            matches!(s.header("content-length"), None | Some("0")),
            "{s:?}"
        );
        assert_eq!(s.header("transfer-encoding"), None);
    }
}

/// A streamed body is read once and sent whole, with its length, on every attempt.
#[tokio::test]
async fn a_streamed_body_is_sent_whole_with_its_length_on_every_attempt() {
    let server = RawServer::start([Act::Close, status(503)], status(201)).await;
    let body = streamed(&[Ok("alpha-"), Ok("beta-"), Ok("gamma")]);
    let request = Request::post(server.url("/payments")).body(body).unwrap();
    let response = send(quick().build(), request).await.unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(outcome(&response).attempts(), 3);
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.body, "alpha-beta-gamma");
        assert_eq!(s.header("content-length"), Some("16"));
        assert_eq!(s.header("transfer-encoding"), None);
    }
}

/// A body that fails while read is a `Body` error with the key and its cause; nothing is sent.
#[tokio::test]
async fn a_body_that_fails_while_read_is_an_error_and_nothing_is_sent() {
    let server = RawServer::start([], status(201)).await;
    let body = streamed(&[Ok("alpha-"), Err("disk gone")]);
    let request = Request::post(server.url("/payments")).body(body).unwrap();
    let error = send(quick().build(), request).await.unwrap_err();

    assert_eq!(error.kind(), RetryErrorKind::Body);
    assert_eq!(error.attempts(), 0);
    assert!(error.key().is_some());
    let source = std::error::Error::source(&error).unwrap();
    assert_eq!(source.to_string(), "disk gone");
    assert_eq!(server.connections(), 0);
}

/// A body of exactly `max_body_bytes` is sent, one byte more refused unsent, unless uncovered.
#[tokio::test]
async fn the_body_limit_is_exact() {
    let server = RawServer::start([], status(201)).await;
    let layer = quick().max_body_bytes(10).build();
    let at_limit = streamed(&[Ok("01234"), Ok("56789")]);
    let request = Request::post(server.url("/payments")).body(at_limit);
    let response = send(layer.clone(), request.unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(server.seen()[0].body, "0123456789");

    let over = streamed(&[Ok("01234"), Ok("567890")]);
    let request = Request::post(server.url("/payments")).body(over);
    let error = send(layer.clone(), request.unwrap()).await.unwrap_err();
    assert_eq!(error.kind(), RetryErrorKind::BodyTooLarge);
    assert_eq!(error.attempts(), 0);
    assert!(error.to_string().contains("10-byte limit"), "{error}");
    assert_eq!(server.connections(), 1, "the larger body was never sent");

    let over = streamed(&[Ok("01234"), Ok("567890")]);
    let request = Request::put(server.url("/payments")).body(over);
    let response = send(layer, request.unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].body, "01234567890");
    assert_eq!(seen[1].key(), None);
}

// ---------------------------------------------------------------------------------------------
// The tower contract
// ---------------------------------------------------------------------------------------------

/// The layer, its service and the middleware are `Clone + Send + Sync`; the service boxes.
#[test]
fn the_layer_and_its_service_are_clone_send_sync() {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    clone_send_sync::<IdempotentRetryLayer>();
    clone_send_sync::<IdempotentRetryLayerBuilder>();
    clone_send_sync::<IdempotentRetry<Http>>();
    clone_send_sync::<IdempotentRetryMiddleware>();
    send::<RetryFuture<hyper_util::client::legacy::ResponseFuture, Incoming>>();
    send_sync::<RetryError>();
    send_sync::<RetryOutcome>();

    let boxed: BoxCloneSyncService<Request<Body>, Response<Incoming>, RetryError> =
        BoxCloneSyncService::new(IdempotentRetryLayer::new().layer(http()));
    let _ = boxed.clone();
}

/// A real client that checks tower's contract: `call` only once `poll_ready` made it ready, once
/// per readiness; a clone is not ready.
struct Strict<S> {
    inner: S,
    ready: bool,
    calls: Arc<AtomicUsize>,
}

impl<S: Clone> Clone for Strict<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ready: false,
            calls: self.calls.clone(),
        }
    }
}

impl<S: Service<R>, R> Service<R> for Strict<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let poll = self.inner.poll_ready(cx);
        if let Poll::Ready(Ok(())) = poll {
            self.ready = true;
        }
        poll
    }

    fn call(&mut self, request: R) -> S::Future {
        assert!(self.ready, "called before poll_ready made it ready");
        self.ready = false;
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.call(request)
    }
}

/// The inner service is made ready before every attempt and every request passed through.
#[tokio::test]
async fn the_inner_service_is_made_ready_before_every_attempt() {
    let server = RawServer::start([status(503), Act::Close], status(200)).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let strict = Strict {
        inner: http(),
        ready: false,
        calls: calls.clone(),
    };
    let mut client = quick().build().layer(strict);

    let post = request(Method::POST, &server.url("/p"), None, "b");
    let response = client.ready().await.unwrap().call(post).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(outcome(&response).attempts(), 3);

    let get = request(Method::GET, &server.url("/p"), None, "");
    let response = client.ready().await.unwrap().call(get).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "three attempts and the GET"
    );
    assert_eq!(server.seen().len(), 4);
}

/// hyper-util's client, whose readiness fails from its second `poll_ready` on.
#[derive(Clone)]
struct ReadyOnce {
    inner: Http,
    readies: Arc<AtomicUsize>,
}

impl Service<Request<RetryBody<Body>>> for ReadyOnce {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.readies.fetch_add(1, Ordering::SeqCst) == 0 {
            Poll::Ready(Ok(()))
        } else {
            Poll::Ready(Err("pool closed".into()))
        }
    }

    fn call(&mut self, request: Request<RetryBody<Body>>) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move { future.await.map_err(BoxError::from) })
    }
}

/// A readiness error before a retry ends the request with it, the attempts made and the key.
#[tokio::test]
async fn a_readiness_error_before_a_retry_ends_the_request() {
    let server = RawServer::start([], status(503)).await;
    let client = quick().build().layer(ReadyOnce {
        inner: http(),
        readies: Arc::default(),
    });
    let error = client
        .oneshot(request(Method::POST, &server.url("/p"), Some("k-2"), "b"))
        .await
        .unwrap_err();

    assert_eq!(error.kind(), RetryErrorKind::Service);
    assert_eq!(error.attempts(), 1);
    assert_eq!(error.key().unwrap(), "k-2");
    assert_eq!(error.inner().unwrap().to_string(), "pool closed");
    assert_eq!(server.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// reqwest through the middleware
// ---------------------------------------------------------------------------------------------

/// The middleware retries the four lost connections with the same key and the whole body.
#[tokio::test]
async fn reqwest_lost_connections_are_retried_with_the_same_key_and_the_whole_body() {
    let body = Bytes::from("0123456789".repeat(1_000));
    let client = reqwest_client(quick().build());
    for act in LOST {
        let server = RawServer::start([act.clone(), act.clone()], status(201)).await;
        let request = client
            .post(server.url("/payments"))
            .body(body.clone())
            .build()
            .unwrap();
        let mut extensions = http::Extensions::new();
        let response = client
            .execute_with_extensions(request, &mut extensions)
            .await
            .unwrap_or_else(|e| panic!("{act:?}: {e:?}"));

        assert_eq!(response.status(), StatusCode::CREATED, "{act:?}");
        let outcome = reqwest_outcome(&response);
        assert_eq!(outcome.attempts(), 3, "{act:?}");
        assert_eq!(extensions.get::<RetryOutcome>(), Some(outcome), "{act:?}");
        let key = outcome.key().to_str().unwrap();
        assert!(is_uuid_v4(key), "{key}");
        let seen = server.seen();
        assert_eq!(seen.len(), 3, "{act:?}");
        assert!(seen.iter().all(|s| s.key() == Some(key)), "{act:?}");
        assert_eq!(seen[2].body, body, "{act:?}: the last attempt");
    }
}

/// A refused connection is reqwest's error; its outcome and key are in the caller's extensions.
#[tokio::test]
async fn reqwest_a_refused_connection_leaves_its_outcome_in_the_callers_extensions() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let client = reqwest_client(quick().max_retries(2).build());
    let request = client
        .post(format!("http://{closed}/payments"))
        .body("{}")
        .build()
        .unwrap();
    let mut extensions = http::Extensions::new();
    let error = client
        .execute_with_extensions(request, &mut extensions)
        .await
        .unwrap_err();

    assert!(error.is_connect(), "{error:?}");
    let outcome = extensions
        .get::<RetryOutcome>()
        .expect("the key is handed back");
    assert_eq!((outcome.attempts(), outcome.replayed()), (3, false));
    assert!(is_uuid_v4(outcome.key().to_str().unwrap()));
}

/// The middleware retries and returns the same statuses as the layer.
#[tokio::test]
async fn reqwest_the_same_statuses_are_retried() {
    let client = reqwest_client(quick().build());
    let retried = RETRIED
        .into_iter()
        .map(|(code, h)| (Act::Answer(code, h), 2));
    let kept = FINAL.into_iter().map(|code| (status(code), 1));
    for (first, attempts) in retried.chain(kept) {
        let server = RawServer::start([first.clone()], status(201)).await;
        let response = client
            .post(server.url("/payments"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(reqwest_outcome(&response).attempts(), attempts, "{first:?}");
        assert_eq!(server.seen().len(), attempts as usize, "{first:?}");
    }
}

/// TIMING: the middleware waits the `Retry-After` it is given, capped at `max_delay`.
#[tokio::test]
async fn reqwest_retry_after_is_waited_for_up_to_max_delay() {
    let server = RawServer::start([Act::Answer(503, &[("retry-after", "1")])], status(201)).await;
    let response = reqwest_client(quick().max_delay(Duration::from_secs(5)).build())
        .post(server.url("/payments"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let seen = server.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");

    let server =
        RawServer::start([Act::Answer(429, &[("retry-after", "3600")])], status(201)).await;
    let started = Instant::now();
    let response = reqwest_client(quick().max_delay(Duration::from_millis(300)).build())
        .post(server.url("/payments"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(reqwest_outcome(&response).attempts(), 2);
    let seen = server.seen();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(250), "retried after {gap:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "not the hour");
}

/// A streamed reqwest body is read once and sent whole, with its length, on every attempt.
#[tokio::test]
async fn reqwest_a_streamed_body_is_sent_whole_on_every_attempt() {
    let server = RawServer::start([Act::Close], status(201)).await;
    let body = reqwest::Body::wrap(streamed(&[Ok("alpha-"), Ok("beta-"), Ok("gamma")]));
    let response = reqwest_client(quick().build())
        .post(server.url("/payments"))
        .body(body)
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(reqwest_outcome(&response).attempts(), 2);
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.body, "alpha-beta-gamma");
        assert_eq!(s.header("content-length"), Some("16"));
    }
}

/// Through the middleware, a body at the limit is sent; one byte over, or failing, is never sent.
#[tokio::test]
async fn reqwest_the_body_limit_is_exact_and_a_failing_body_is_never_sent() {
    let server = RawServer::start([], status(201)).await;
    let client = reqwest_client(quick().max_body_bytes(10).build());
    let send = |chunks: &[Result<&'static str, &'static str>]| {
        client
            .post(server.url("/payments"))
            .body(reqwest::Body::wrap(streamed(chunks)))
            .send()
    };

    let response = send(&[Ok("01234"), Ok("56789")]).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(server.seen()[0].body, "0123456789");

    let error = send(&[Ok("01234"), Ok("567890")]).await.unwrap_err();
    let error = retry_error(&error);
    assert_eq!(error.kind(), RetryErrorKind::BodyTooLarge);
    assert!(error.key().is_some());

    let error = send(&[Ok("01234"), Err("disk gone")]).await.unwrap_err();
    let error = retry_error(&error);
    assert_eq!(error.kind(), RetryErrorKind::Body);
    let causes = std::iter::successors(std::error::Error::source(error), |e| e.source());
    assert!(
        causes.map(ToString::to_string).any(|c| c == "disk gone"),
        "{error:?}"
    );

    assert_eq!(server.connections(), 1, "only the body that fit was sent");
}
