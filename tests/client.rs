//! The client side end to end: `IdempotentRetryLayer` on hyper-util's client (and
//! `IdempotentRetryMiddleware` on reqwest) against this crate's server layer, on real axum
//! servers over loopback TCP, through a proxy that can lose the server's answers; and the
//! retry rules and bounds against in-process services, on paused time.

mod support;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tower::timeout::Timeout;
use tower::{BoxError, Layer, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{
    DetachedRuns, IdempotencyLayer, IdempotencyStore, IdempotentRetry, IdempotentRetryLayer,
    IdempotentRetryLayerBuilder, MemoryStore, RetryBody, RetryError, RetryErrorKind, RetryOutcome,
};

use support::{Fault, FaultyStore, Op, Runs, Server, api};

/// The client's credentials: its keys are scoped to a tenant of its own on the server.
const AUTH: &str = "Bearer client-tests";

// ---------------------------------------------------------------------------------------------
// Servers and the proxy
// ---------------------------------------------------------------------------------------------

/// The test API (`support::api`, counting its runs in the returned `Runs`) behind the server
/// layer over `store`, on a real server on loopback, behind a [`Proxy`].
async fn proxied<St: IdempotencyStore>(store: St) -> (Proxy, Runs) {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(store));
    let server = Server::start(app, DetachedRuns::default()).await;
    (Proxy::start(server).await, runs)
}

/// One request the proxy forwarded, and what the server answered.
#[derive(Debug, Clone)]
struct Exchange {
    start_line: String,
    key: Option<String>,
    body: Bytes,
    /// The server's answer: status, `Idempotent-Replayed`, body; `None` until it came.
    answer: Option<(u16, bool, Bytes)>,
}

impl Exchange {
    fn status(&self) -> Option<u16> {
        self.answer.as_ref().map(|(status, _, _)| *status)
    }

    fn replayed(&self) -> bool {
        self.answer
            .as_ref()
            .is_some_and(|(_, replayed, _)| *replayed)
    }
}

#[derive(Default)]
struct ProxyState {
    exchanges: Vec<Exchange>,
    /// How many of the next answers are read from the server and then lost.
    lose: usize,
    /// How many of the next answers are sent up to half their body, then cut off.
    cut: usize,
}

/// A TCP proxy in front of a server that records every request and can lose answers: it
/// forwards the request, reads the server's whole answer (the handler ran), then drops the
/// client's connection instead of sending it.
#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    /// The server behind it, served as long as the proxy is there.
    _upstream: Arc<Server>,
}

impl Proxy {
    async fn start(upstream: Server) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
            _upstream: Arc::new(upstream),
        };
        let upstream = proxy._upstream.addr;
        let state = proxy.state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(relay(Connection::new(stream), upstream, state.clone()));
            }
        });
        proxy
    }

    /// The server's answers to the next `n` requests are lost.
    fn lose_answers(&self, n: usize) {
        self.state.lock().unwrap().lose = n;
    }

    /// The server's answers to the next `n` requests are cut off half-way through their body.
    fn cut_answers(&self, n: usize) {
        self.state.lock().unwrap().cut = n;
    }

    fn exchanges(&self) -> Vec<Exchange> {
        self.state.lock().unwrap().exchanges.clone()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A `POST` of `body` to `path` through the proxy, with `key` if given.
    fn post(&self, path: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
        post(&self.url(path), key, body)
    }
}

/// Relays the requests of one client connection, each on a fresh connection to `upstream`.
async fn relay(mut client: Connection, upstream: SocketAddr, state: Arc<Mutex<ProxyState>>) {
    while let Some(request) = client.read_message().await {
        let index = {
            let mut state = state.lock().unwrap();
            state.exchanges.push(Exchange {
                start_line: request.start_line().to_owned(),
                key: request.header("idempotency-key").map(str::to_owned),
                body: request.body.clone(),
                answer: None,
            });
            state.exchanges.len() - 1
        };
        let mut server = Connection::new(TcpStream::connect(upstream).await.unwrap());
        server.stream.write_all(&request.raw).await.unwrap();
        let Some(response) = server.read_message().await else {
            return;
        };
        let status = response
            .start_line()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let replayed = response.header("idempotent-replayed") == Some("true");
        let (lose, cut) = {
            let mut state = state.lock().unwrap();
            state.exchanges[index].answer = Some((status, replayed, response.body.clone()));
            let (lose, cut) = (state.lose > 0, state.cut > 0);
            state.lose = state.lose.saturating_sub(1);
            state.cut = state.cut.saturating_sub(1);
            (lose, cut)
        };
        if cut {
            // The head and half the body, then the connection is dropped.
            let sent = response.raw.len() - response.body.len().div_ceil(2);
            let _ = client.stream.write_all(&response.raw[..sent]).await;
            return;
        }
        if lose || client.stream.write_all(&response.raw).await.is_err() {
            return; // The client's connection is dropped without an answer.
        }
    }
}

/// An HTTP/1.1 message read off a connection: head and `Content-Length` body.
struct Message {
    raw: Vec<u8>,
    head: String,
    body: Bytes,
}

impl Message {
    fn start_line(&self) -> &str {
        self.head.lines().next().unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

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
        let mut chunk = [0; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next message, or `None` when the peer closed the connection.
    async fn read_message(&mut self) -> Option<Message> {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !self.fill().await {
                return None;
            }
        };
        let head = String::from_utf8(self.buf[..head_len].to_vec()).unwrap();
        let mut message = Message {
            raw: Vec::new(),
            head,
            body: Bytes::new(),
        };
        assert!(
            message.header("transfer-encoding").is_none(),
            "the proxy reads Content-Length bodies only: {}",
            message.head
        );
        let body_len: usize = message
            .header("content-length")
            .map_or(0, |len| len.parse().unwrap());
        while self.buf.len() < head_len + body_len {
            if !self.fill().await {
                return None;
            }
        }
        message.raw = self.buf.drain(..head_len + body_len).collect();
        message.body = Bytes::copy_from_slice(&message.raw[head_len..]);
        Some(message)
    }
}

// ---------------------------------------------------------------------------------------------
// The hyper-util client
// ---------------------------------------------------------------------------------------------

type Http = Client<HttpConnector, RetryBody<Full<Bytes>>>;
type Retrying = IdempotentRetry<Timeout<Http>>;

/// Short waits, so that retries are quick on real time.
fn quick() -> IdempotentRetryLayerBuilder {
    IdempotentRetryLayer::builder()
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(200))
}

/// hyper-util's client behind the [`quick`] layer, each attempt bounded by 10 s.
fn quick_client() -> Retrying {
    client(quick().build(), Duration::from_secs(10))
}

/// hyper-util's client, each attempt bounded by `attempt_timeout`, behind `layer`.
fn client(layer: IdempotentRetryLayer, attempt_timeout: Duration) -> Retrying {
    ServiceBuilder::new()
        .layer(layer)
        .timeout(attempt_timeout)
        .service(Client::builder(TokioExecutor::new()).build_http())
}

fn request(
    method: Method,
    url: &str,
    key: Option<&str>,
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .header(header::AUTHORIZATION, AUTH)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn post(url: &str, key: Option<&str>, body: &'static str) -> Request<Full<Bytes>> {
    request(Method::POST, url, key, body)
}

/// A whole response and its outcome.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    outcome: Option<RetryOutcome>,
}

impl Answer {
    fn outcome(&self) -> &RetryOutcome {
        self.outcome
            .as_ref()
            .expect("a covered request's response carries its RetryOutcome")
    }

    fn key(&self) -> &str {
        self.outcome().key().to_str().unwrap()
    }
}

async fn read<B>(response: Response<B>) -> Answer
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let outcome = RetryOutcome::of(&response).cloned();
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        outcome,
    }
}

async fn send(client: &Retrying, request: Request<Full<Bytes>>) -> Result<Answer, RetryError> {
    let response = client.clone().oneshot(request).await?;
    Ok(read(response).await)
}

// ---------------------------------------------------------------------------------------------
// End to end, on real time
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lost_answer_is_retried_with_the_same_key_and_replayed() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    proxy.lose_answers(1);
    let client = quick_client();

    let answer = send(&client, proxy.post("/payments", None, r#"{"amount":100}"#))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1, "the handler ran once");
    assert!(answer.outcome().replayed());
    assert_eq!(answer.outcome().attempts(), 2);
    assert_eq!(answer.headers["idempotent-replayed"], "true");

    let exchanges = proxy.exchanges();
    assert_eq!(exchanges.len(), 2, "{exchanges:?}");
    let (lost, retry) = (&exchanges[0], &exchanges[1]);
    assert_eq!(
        lost.key.as_deref(),
        Some(answer.key()),
        "the key the layer made"
    );
    assert_eq!(retry.key, lost.key, "the retry carries the same key");
    assert_eq!(retry.body, lost.body, "and the same body");
    assert_eq!(lost.body, r#"{"amount":100}"#);
    assert_eq!((lost.status(), lost.replayed()), (Some(201), false));
    assert_eq!((retry.status(), retry.replayed()), (Some(201), true));
    assert_eq!(
        answer.body,
        lost.answer.as_ref().unwrap().2,
        "the replay is the answer that was lost"
    );
    assert_eq!(answer.key().len(), 36, "a UUID: {}", answer.key());
}

/// An answer cut off in its body reaches the caller as its head and a body error, not a retry:
/// the operation ran. Sent again with the key its `RetryOutcome` gave, it is replayed.
#[tokio::test]
async fn an_answer_cut_in_its_body_is_sent_again_with_its_key_and_replayed() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    proxy.cut_answers(1);
    let client = quick_client();

    let response = client
        .clone()
        .oneshot(proxy.post("/payments", None, r#"{"amount":5}"#))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let key = RetryOutcome::of(&response).unwrap().key().clone();
    assert!(response.into_body().collect().await.is_err(), "cut off");
    assert_eq!(runs.get(), 1);

    let key = key.to_str().unwrap();
    let again = send(
        &client,
        proxy.post("/payments", Some(key), r#"{"amount":5}"#),
    )
    .await
    .unwrap();
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.outcome().replayed());
    assert_eq!(runs.get(), 1, "never run twice");
}

#[tokio::test]
async fn a_slow_first_attempt_times_out_then_409_then_the_replay() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let layer = quick()
        .max_retries(50)
        .deadline(Duration::from_secs(30))
        .build();
    // The handler takes a second; each attempt gets 300 ms.
    let client = client(layer, Duration::from_millis(300));

    let answer = send(&client, proxy.post("/slow/1000", None, "{}"))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.outcome().replayed());
    assert_eq!(runs.get(), 1, "the handler ran once");
    let exchanges = proxy.exchanges();
    assert_eq!(answer.outcome().attempts() as usize, exchanges.len());
    assert!(
        exchanges
            .iter()
            .all(|e| e.key.as_deref() == Some(answer.key())),
        "every attempt carries the same key: {exchanges:?}"
    );
    assert!(
        exchanges.iter().any(|e| e.status() == Some(409)),
        "a request while the first one ran got 409: {exchanges:?}"
    );
    let last = exchanges.last().unwrap();
    assert_eq!((last.status(), last.replayed()), (Some(201), true));
    assert_eq!(answer.body, "slow run 1");
}

#[tokio::test]
async fn a_store_outage_is_retried_until_the_store_is_back() {
    let store = FaultyStore::default();
    // The store is down for the next two requests.
    store.times(Op::Begin, Fault::Fail, 2);
    let (proxy, runs) = proxied(store.clone()).await;
    let client = quick_client();

    let answer = send(&client, proxy.post("/payments", None, "{}"))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(!answer.outcome().replayed());
    assert_eq!(answer.outcome().attempts(), 3);
    assert_eq!(runs.get(), 1);
    let exchanges = proxy.exchanges();
    let statuses: Vec<_> = exchanges.iter().map(Exchange::status).collect();
    assert_eq!(statuses, [Some(503), Some(503), Some(201)]);
    assert!(
        exchanges
            .iter()
            .all(|e| e.key.as_deref() == Some(answer.key()))
    );
}

#[tokio::test]
async fn a_422_and_the_other_4xx_are_returned_at_once() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let client = quick_client();
    let url = proxy.url("/payments");

    let first = send(&client, post(&url, Some("reused-1"), r#"{"amount":1}"#))
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let reuse = send(&client, post(&url, Some("reused-1"), r#"{"amount":2}"#))
        .await
        .unwrap();
    assert_eq!(reuse.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reuse.outcome().attempts(), 1, "a 422 is never retried");
    assert!(!reuse.outcome().replayed());
    assert_eq!(runs.get(), 1);

    for (i, code) in [400u16, 401, 403, 404, 408, 410, 413]
        .into_iter()
        .enumerate()
    {
        let url = proxy.url(&format!("/status/{code}"));
        let answer = send(&client, post(&url, None, "{}")).await.unwrap();
        assert_eq!(answer.status.as_u16(), code);
        assert_eq!(answer.outcome().attempts(), 1, "{code} is not retried");
        assert_eq!(runs.get(), 2 + i, "{code} ran once");
    }
    assert_eq!(proxy.exchanges().len(), 9, "one request each");
}

/// A `409` without `Retry-After` is final: an application's own conflict (answered by a server
/// without the layer, or stored by the layer and replayed), and the layer's
/// `409 idempotency_response_not_stored`; each sent once, the handler run once. With
/// `retry_conflicts_without_retry_after(true)`, a bare `409` is retried.
#[tokio::test]
async fn a_409_without_retry_after_is_final() {
    let runs = Runs::default();
    let bare = Server::start(api(runs.clone()), DetachedRuns::default()).await;
    let once = quick_client();
    let url = format!("http://{}/status/409", bare.addr);
    let conflict = send(&once, post(&url, None, "{}")).await.unwrap();
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(conflict.outcome().attempts(), 1);
    assert_eq!(runs.get(), 1, "the application's own conflict ran once");

    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let stored = send(&once, post(&proxy.url("/status/409"), None, "{}"))
        .await
        .unwrap();
    assert_eq!(stored.status, StatusCode::CONFLICT);
    assert_eq!(
        (stored.outcome().attempts(), stored.outcome().replayed()),
        (1, false),
        "the operation's own answer, not a replay"
    );
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).max_response_bytes(4);
    let small = Server::start(api(runs.clone()).layer(layer), DetachedRuns::default()).await;
    let url = format!("http://{}/payments", small.addr);
    let first = send(&once, post(&url, Some("too-large"), "{}"))
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&once, post(&url, Some("too-large"), "{}"))
        .await
        .unwrap();
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert!(retry.headers.get(header::RETRY_AFTER).is_none());
    assert_eq!(retry.outcome().attempts(), 1, "not_stored is final");
    assert_eq!(runs.get(), 1);

    let runs = Runs::default();
    let bare = Server::start(api(runs.clone()), DetachedRuns::default()).await;
    let eager = client(
        quick()
            .max_retries(2)
            .retry_conflicts_without_retry_after(true)
            .build(),
        Duration::from_secs(10),
    );
    let url = format!("http://{}/status/409", bare.addr);
    let retried = send(&eager, post(&url, None, "{}")).await.unwrap();
    assert_eq!(retried.status, StatusCode::CONFLICT);
    assert_eq!(retried.outcome().attempts(), 3);
    assert_eq!(runs.get(), 3);
}

/// Retries end at the deadline: with the last answer when the next wait would end past it, or
/// with `RetryErrorKind::Deadline` when an attempt was still in flight then.
#[tokio::test]
async fn the_deadline_ends_the_retries() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let layer = quick()
        .max_retries(1_000)
        .max_delay(Duration::from_millis(50))
        .deadline(Duration::from_secs(2))
        .build();
    let client = client(layer, Duration::from_secs(10));

    let started = Instant::now();
    let attempts = match send(&client, proxy.post("/status/503", None, "{}")).await {
        Ok(answer) => {
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "the last answer"
            );
            assert_eq!(answer.body, format!("status 503 run {}", runs.get()));
            answer.outcome().attempts()
        }
        Err(error) => {
            assert_eq!(error.kind(), RetryErrorKind::Deadline, "{error}");
            error.attempts()
        }
    };
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(attempts >= 2, "{attempts}");
    assert!(
        attempts < 1_000,
        "the deadline, not the count, ended it: {attempts}"
    );
    let runs = runs.get();
    assert!(
        runs == attempts as usize || runs + 1 == attempts as usize,
        "the server released the key each time it answered: {runs} runs, {attempts} attempts"
    );
}

/// The deadline bounds the whole request, an attempt in flight included: a handler that runs
/// past it is cut off on the client's side (`RetryErrorKind::Deadline`, with the key), runs to
/// its end on the server, and the request sent again later with the key is replayed, never run
/// twice. (The deadline used to bound only the retries: with no timeout of the caller's under
/// the layer, a server that stalls held the request for good.)
#[tokio::test]
async fn the_deadline_cuts_off_an_attempt_in_flight() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let layer = quick().deadline(Duration::from_millis(500)).build();
    let client = client(layer, Duration::from_secs(60));

    let started = Instant::now();
    let error = send(&client, proxy.post("/slow/1500", None, "{}"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(error.kind(), RetryErrorKind::Deadline, "{error}");
    assert!(
        took < Duration::from_millis(1400),
        "answered after {took:?}"
    );
    assert_eq!(error.attempts(), 1);
    assert!(error.inner().is_none());
    let key = error.key().expect("the key, to send the request again");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut again = proxy.post("/slow/1500", None, "{}");
    again.headers_mut().insert("idempotency-key", key.clone());
    let answer = send(&client, again).await.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.outcome().replayed(), "the first run's answer");
    assert_eq!(answer.body, "slow run 1");
    assert_eq!(runs.get(), 1, "never run twice");
}

/// A server that takes the connection and never answers: the deadline ends the request.
#[tokio::test]
async fn a_server_that_never_answers_ends_at_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let layer = quick().deadline(Duration::from_millis(300)).build();
    let client = client(layer, Duration::from_secs(60));

    let sent = send(
        &client,
        post(&format!("http://{addr}/payments"), None, "{}"),
    );
    let error = tokio::time::timeout(Duration::from_secs(5), sent)
        .await
        .expect("the deadline ends the request")
        .unwrap_err();
    assert_eq!(error.kind(), RetryErrorKind::Deadline);
    assert_eq!(error.attempts(), 1);
    assert!(error.to_string().contains("deadline"), "{error}");
    held.abort();
}

#[tokio::test]
async fn a_callers_key_is_kept() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let client = quick_client();

    let answer = send(&client, proxy.post("/payments", Some("caller-key-7"), "{}"))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.key(), "caller-key-7");
    assert_eq!(answer.headers["idempotency-key"], "caller-key-7");
    assert_eq!(proxy.exchanges()[0].key.as_deref(), Some("caller-key-7"));

    // The same key later: the stored answer.
    let again = send(&client, proxy.post("/payments", Some("caller-key-7"), "{}"))
        .await
        .unwrap();
    assert!(again.outcome().replayed());
    assert_eq!(again.outcome().attempts(), 1);
    assert_eq!(again.body, answer.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_get_passes_through_untouched() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let client = quick_client();

    let answer = send(
        &client,
        request(Method::GET, &proxy.url("/payments"), None, ""),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.outcome.is_none(),
        "no outcome for a request passed through"
    );
    let exchanges = proxy.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert!(exchanges[0].start_line.starts_with("GET /payments "));
    assert_eq!(exchanges[0].key, None, "no key was added");
    assert_eq!(runs.get(), 1, "the GET ran once");
}

#[tokio::test]
async fn a_body_over_the_cap_is_an_error_and_nothing_is_sent() {
    let (proxy, runs) = proxied(MemoryStore::new()).await;
    let client = client(quick().max_body_bytes(16).build(), Duration::from_secs(10));

    let error = send(&client, proxy.post("/payments", None, "0123456789abcdefg"))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), RetryErrorKind::BodyTooLarge);
    assert_eq!(error.attempts(), 0);
    assert!(error.to_string().contains("16-byte limit"), "{error}");

    let fits = send(&client, proxy.post("/payments", None, "0123456789abcdef"))
        .await
        .unwrap();
    assert_eq!(fits.status, StatusCode::CREATED);
    assert_eq!(proxy.exchanges().len(), 1, "the large body was never sent");
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_returned() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let client = client(quick().max_retries(2).build(), Duration::from_secs(10));

    let error = send(
        &client,
        post(&format!("http://{closed}/payments"), None, "{}"),
    )
    .await
    .unwrap_err();
    assert_eq!(error.kind(), RetryErrorKind::Service);
    assert_eq!(error.attempts(), 3, "the first attempt and two retries");
    assert_eq!(error.key().unwrap().len(), 36, "the key, to retry later");
    let inner = error.inner().unwrap();
    let hyper = inner
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .unwrap();
    assert!(hyper.is_connect(), "{hyper:?}");
    assert!(std::error::Error::source(&error).is_some());
}

// ---------------------------------------------------------------------------------------------
// The rules, against an in-process service on paused time
// ---------------------------------------------------------------------------------------------

/// What a scripted service answers: a status and headers, or a transport error.
#[derive(Clone)]
enum Reply {
    Status(u16, &'static [(&'static str, &'static str)]),
    Fails,
}

/// A request the scripted service received.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: Method,
    key: Option<String>,
    body: Bytes,
}

/// Answers its script in order, then `last` forever; records every request.
#[derive(Clone)]
struct Scripted {
    script: Arc<Mutex<VecDeque<Reply>>>,
    last: Reply,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    fn new(script: impl IntoIterator<Item = Reply>, last: Reply) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into_iter().collect())),
            last,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl<B> Service<Request<RetryBody<B>>> for Scripted
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RetryBody<B>>) -> Self::Future {
        let reply = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.last.clone());
        let seen = self.seen.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.map_err(Into::into)?.to_bytes();
            seen.lock().unwrap().push(Seen {
                method: parts.method,
                key: parts
                    .headers
                    .get("idempotency-key")
                    .map(|k| k.to_str().unwrap().to_owned()),
                body,
            });
            match reply {
                Reply::Fails => Err("connection reset".into()),
                Reply::Status(code, headers) => {
                    let mut response = Response::new(Full::new(Bytes::from(code.to_string())));
                    *response.status_mut() = StatusCode::from_u16(code).unwrap();
                    for (name, value) in headers {
                        response.headers_mut().insert(*name, value.parse().unwrap());
                    }
                    Ok(response)
                }
            }
        })
    }
}

const NONE: &[(&str, &str)] = &[];

fn mock_request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
    request(method, "http://mock/payments", None, body)
}

/// A `POST /payments` of `{}` to the scripted service.
fn mock_post() -> Request<Full<Bytes>> {
    mock_request(Method::POST, "{}")
}

/// Sends `request` through `layer` around `service`; the answer and the virtual time it took.
async fn through<B>(
    layer: IdempotentRetryLayer,
    service: &Scripted,
    request: Request<B>,
) -> (Result<Answer, RetryError>, Duration)
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let result = layer.layer(service.clone()).oneshot(request).await;
    let elapsed = started.elapsed();
    match result {
        Ok(response) => (Ok(read(response).await), elapsed),
        Err(error) => (Err(error), elapsed),
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_capped() {
    let service = Scripted::new(
        [Reply::Status(429, &[("retry-after", "2")])],
        Reply::Status(201, NONE),
    );
    let (answer, elapsed) = through(IdempotentRetryLayer::new(), &service, mock_post()).await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.outcome().attempts(), 2);
    assert_eq!(elapsed, Duration::from_secs(2), "Retry-After: 2");

    // A Retry-After over max_delay waits max_delay.
    let service = Scripted::new(
        [Reply::Status(503, &[("retry-after", "60")])],
        Reply::Status(201, NONE),
    );
    let (answer, elapsed) = through(IdempotentRetryLayer::new(), &service, mock_post()).await;
    assert_eq!(answer.unwrap().outcome().attempts(), 2);
    assert_eq!(
        elapsed,
        Duration::from_secs(5),
        "capped at the 5 s max_delay"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_retries_and_any_wait() {
    // Always 503, Retry-After: 1; a 10 s deadline: attempts at 0, 1, ..., 9 s.
    let service = Scripted::new([], Reply::Status(503, &[("retry-after", "1")]));
    let layer = IdempotentRetryLayer::builder()
        .max_retries(1_000)
        .deadline(Duration::from_secs(10))
        .build();
    let (answer, elapsed) = through(layer, &service, mock_post()).await;
    let answer = answer.unwrap();
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the last answer"
    );
    assert_eq!(answer.outcome().attempts(), 10);
    assert_eq!(service.seen().len(), 10);
    assert_eq!(elapsed, Duration::from_secs(9), "no wait past the deadline");

    // A Retry-After that would end past the deadline is not waited for at all.
    let service = Scripted::new([], Reply::Status(503, &[("retry-after", "60")]));
    let layer = IdempotentRetryLayer::builder()
        .max_delay(Duration::from_secs(120))
        .deadline(Duration::from_secs(30))
        .build();
    let (answer, elapsed) = through(layer, &service, mock_post()).await;
    assert_eq!(answer.unwrap().outcome().attempts(), 1);
    assert_eq!(elapsed, Duration::ZERO);
}

/// A service that is ready once: after its first call it is never ready again (a concurrency
/// limit's only slot that another request holds, a rate limit).
#[derive(Clone)]
struct ReadyOnce {
    inner: Scripted,
    called: bool,
}

impl<B> Service<Request<RetryBody<B>>> for ReadyOnce
where
    Scripted: Service<Request<RetryBody<B>>>,
{
    type Response = <Scripted as Service<Request<RetryBody<B>>>>::Response;
    type Error = <Scripted as Service<Request<RetryBody<B>>>>::Error;
    type Future = <Scripted as Service<Request<RetryBody<B>>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.called {
            return Poll::Pending;
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<RetryBody<B>>) -> Self::Future {
        self.called = true;
        self.inner.call(request)
    }
}

/// The deadline bounds the wait for the service to be ready before a retry too: past it, the
/// last attempt's answer is returned, instead of a wait as long as the service's.
#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_the_wait_for_a_ready_service() {
    let service = Scripted::new([], Reply::Status(503, &[("retry-after", "1")]));
    let layer = IdempotentRetryLayer::builder()
        .deadline(Duration::from_secs(2))
        .build();
    let ready_once = ReadyOnce {
        inner: service.clone(),
        called: false,
    };
    let started = Instant::now();
    let call = layer.layer(ready_once).oneshot(mock_post());
    let response = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the request ends by its deadline, not when the service is ready")
        .unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(2), "the deadline");
    let answer = read(response).await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the last answer"
    );
    assert_eq!(answer.outcome().attempts(), 1);
    assert_eq!(service.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn errors_are_retried_up_to_the_count_with_backoff() {
    let service = Scripted::new([], Reply::Fails);
    let (error, elapsed) = through(IdempotentRetryLayer::new(), &service, mock_post()).await;
    let error = error.unwrap_err();
    assert_eq!(error.kind(), RetryErrorKind::Service);
    assert_eq!(error.attempts(), 4, "the first attempt and 3 retries");
    assert_eq!(error.inner().unwrap().to_string(), "connection reset");
    // Full jitter: each wait is at most 100, 200 and 400 ms.
    assert!(elapsed <= Duration::from_millis(700), "{elapsed:?}");
    let seen = service.seen();
    assert_eq!(seen.len(), 4);
    assert!(
        seen.iter().all(|s| s == &seen[0]),
        "same key and body: {seen:?}"
    );
    assert_eq!(
        seen[0].key.as_deref(),
        error.key().map(|k| k.to_str().unwrap())
    );

    let layer = IdempotentRetryLayer::builder().max_retries(0).build();
    let (error, _) = through(layer, &service, mock_post()).await;
    assert_eq!(error.unwrap_err().attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_409_then_the_replay() {
    let service = Scripted::new(
        [Reply::Status(409, &[("retry-after", "1")])],
        Reply::Status(201, &[("idempotent-replayed", "true")]),
    );
    let (answer, elapsed) = through(
        IdempotentRetryLayer::new(),
        &service,
        mock_request(Method::PATCH, "{}"),
    )
    .await;
    let answer = answer.unwrap();
    assert_eq!(answer.status, StatusCode::CREATED);
    assert!(answer.outcome().replayed());
    assert_eq!(answer.outcome().attempts(), 2);
    assert_eq!(elapsed, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_replayed_answer_is_final_whatever_its_status() {
    for code in [409, 500, 503] {
        let service = Scripted::new([], Reply::Status(code, &[("idempotent-replayed", "true")]));
        let (answer, _) = through(IdempotentRetryLayer::new(), &service, mock_post()).await;
        let answer = answer.unwrap();
        assert_eq!(answer.status.as_u16(), code);
        assert_eq!(answer.outcome().attempts(), 1, "a replayed {code}");
        assert!(answer.outcome().replayed());
    }
}

#[tokio::test(start_paused = true)]
async fn uncovered_methods_are_never_retried_nor_keyed() {
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let service = Scripted::new([], Reply::Status(503, NONE));
        let (answer, _) = through(
            IdempotentRetryLayer::new(),
            &service,
            mock_request(method.clone(), "x"),
        )
        .await;
        let answer = answer.unwrap();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(answer.outcome.is_none());
        let seen = service.seen();
        assert_eq!(seen.len(), 1, "{method} was sent once");
        assert_eq!(seen[0].key, None, "{method} got no key");
        assert_eq!(seen[0].body, "x", "its body untouched");
    }

    // Covered when configured.
    let service = Scripted::new([Reply::Status(503, NONE)], Reply::Status(200, NONE));
    let layer = IdempotentRetryLayer::builder()
        .methods([Method::PUT])
        .build();
    let (answer, _) = through(layer.clone(), &service, mock_request(Method::PUT, "x")).await;
    assert_eq!(answer.unwrap().outcome().attempts(), 2);
    let (answer, _) = through(layer, &service, mock_request(Method::POST, "x")).await;
    assert!(
        answer.unwrap().outcome.is_none(),
        "POST is no longer covered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_is_read_once_and_sent_whole_on_every_attempt() {
    let service = Scripted::new(
        [Reply::Fails, Reply::Status(502, NONE)],
        Reply::Status(201, NONE),
    );
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = ["ab", "cd", "ef"]
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let request = Request::post("http://mock/payments")
        .header("x-request-key", "mine")
        .body(body)
        .unwrap();
    let layer = IdempotentRetryLayer::builder()
        .header_name(http::HeaderName::from_static("x-request-key"))
        .build();
    let (answer, _) = through(layer, &service, request).await;
    assert_eq!(answer.unwrap().outcome().attempts(), 3);
    let seen = service.seen();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        assert_eq!(s.body, "abcdef");
    }

    // A streamed body over the cap, its size unknown until read: an error, nothing sent.
    let service = Scripted::new([], Reply::Status(201, NONE));
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..10)
        .map(|_| Ok(Frame::data(Bytes::from_static(b"0123456789"))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks));
    let layer = IdempotentRetryLayer::builder().max_body_bytes(64).build();
    let request = Request::post("http://mock/payments").body(body).unwrap();
    let (error, _) = through(layer, &service, request).await;
    assert_eq!(error.unwrap_err().kind(), RetryErrorKind::BodyTooLarge);
    assert!(service.seen().is_empty());
}

/// A covered request's trailers reach the server on every attempt, over a real connection: the
/// buffered body leaves its length open, so hyper sends it chunked rather than with a
/// `Content-Length`, which cannot carry trailers.
#[tokio::test]
async fn a_covered_requests_trailers_reach_the_server() {
    async fn echo_trailer(request: Request<axum::body::Body>) -> String {
        let collected = request.into_body().collect().await.unwrap();
        let trailer = collected
            .trailers()
            .and_then(|t| t.get("x-checksum"))
            .cloned();
        let body = collected.to_bytes();
        format!(
            "{} {}",
            String::from_utf8_lossy(&body),
            trailer.map_or("none".into(), |t| t.to_str().unwrap().to_owned())
        )
    }
    let app = axum::Router::new().route("/upload", axum::routing::post(echo_trailer));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    type Frames = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;
    let client: IdempotentRetry<Client<HttpConnector, RetryBody<Frames>>> = ServiceBuilder::new()
        .layer(quick().build())
        .service(Client::builder(TokioExecutor::new()).build_http());
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(b"payload"))),
        Ok(Frame::trailers(trailers)),
    ];
    let request = Request::post(format!("http://{addr}/upload"))
        .header(header::TRAILER, "x-checksum")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let response = client.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(RetryOutcome::of(&response).is_some(), "a covered request");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"payload abc123");
}

// ---------------------------------------------------------------------------------------------
// reqwest-middleware
// ---------------------------------------------------------------------------------------------

#[cfg(feature = "reqwest")]
mod reqwest_middleware_adapter {
    use super::*;
    use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
    use tower_idempotency::IdempotentRetryMiddleware;

    /// reqwest behind the [`quick`] layer, each attempt bounded by 10 s.
    fn reqwest_quick_client() -> ClientWithMiddleware {
        reqwest_client(quick().build(), Duration::from_secs(10))
    }

    fn reqwest_client(layer: IdempotentRetryLayer, timeout: Duration) -> ClientWithMiddleware {
        let client = reqwest::Client::builder().timeout(timeout).build().unwrap();
        ClientBuilder::new(client)
            .with(IdempotentRetryMiddleware::new(layer))
            .build()
    }

    fn post(
        client: &ClientWithMiddleware,
        url: &str,
        body: &'static str,
    ) -> reqwest_middleware::RequestBuilder {
        client
            .post(url)
            .header(header::AUTHORIZATION, AUTH)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
    }

    fn outcome(response: &reqwest::Response) -> RetryOutcome {
        response
            .extensions()
            .get::<RetryOutcome>()
            .cloned()
            .expect("a covered request's response carries its RetryOutcome")
    }

    #[tokio::test]
    async fn a_lost_answer_is_retried_with_the_same_key_and_replayed() {
        let (proxy, runs) = proxied(MemoryStore::new()).await;
        proxy.lose_answers(1);
        let client = reqwest_quick_client();

        let response = post(&client, &proxy.url("/payments"), r#"{"amount":7}"#)
            .send()
            .await
            .unwrap();
        let outcome = outcome(&response);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(outcome.replayed());
        assert_eq!(outcome.attempts(), 2);
        let body = response.bytes().await.unwrap();
        assert_eq!(runs.get(), 1);

        let exchanges = proxy.exchanges();
        assert_eq!(exchanges.len(), 2);
        let key = outcome.key().to_str().unwrap();
        assert!(exchanges.iter().all(|e| e.key.as_deref() == Some(key)));
        assert!(exchanges.iter().all(|e| e.body == r#"{"amount":7}"#));
        assert_eq!(body, exchanges[0].answer.as_ref().unwrap().2);
    }

    #[tokio::test]
    async fn a_timed_out_attempt_gets_409_then_the_replay() {
        let (proxy, runs) = proxied(MemoryStore::new()).await;
        let layer = quick().max_retries(50).build();
        let client = reqwest_client(layer, Duration::from_millis(300));

        let response = post(&client, &proxy.url("/slow/1000"), "{}")
            .send()
            .await
            .unwrap();
        let outcome = outcome(&response);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(outcome.replayed());
        assert_eq!(runs.get(), 1);
        let exchanges = proxy.exchanges();
        assert_eq!(outcome.attempts() as usize, exchanges.len());
        assert!(exchanges.iter().any(|e| e.status() == Some(409)));
        let last = exchanges.last().unwrap();
        assert_eq!((last.status(), last.replayed()), (Some(201), true));
    }

    #[tokio::test]
    async fn a_store_outage_is_retried_until_the_store_is_back() {
        let store = FaultyStore::default();
        store.times(Op::Begin, Fault::Fail, 2);
        let (proxy, runs) = proxied(store).await;
        let client = reqwest_quick_client();

        let response = post(&client, &proxy.url("/payments"), "{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(outcome(&response).attempts(), 3);
        assert_eq!(runs.get(), 1);
    }

    /// Every attempt's answer lost after the handler ran: the error comes back as it is, and
    /// the key is in the caller's extensions; sent again later with it, the request is replayed,
    /// never run twice.
    #[tokio::test]
    async fn a_request_whose_every_attempt_failed_hands_its_key_back() {
        let (proxy, runs) = proxied(MemoryStore::new()).await;
        proxy.lose_answers(2);
        let client = reqwest_client(quick().max_retries(1).build(), Duration::from_secs(10));
        let url = proxy.url("/payments");

        let request = post(&client, &url, r#"{"amount":9}"#).build().unwrap();
        let mut extensions = http::Extensions::new();
        let error = client
            .execute_with_extensions(request, &mut extensions)
            .await
            .unwrap_err();
        assert!(
            matches!(error, reqwest_middleware::Error::Reqwest(_)),
            "{error:?}"
        );
        let handed = extensions
            .get::<RetryOutcome>()
            .expect("the key is handed back");
        assert_eq!(handed.attempts(), 2);
        assert!(!handed.replayed());
        assert_eq!(runs.get(), 1, "the handler ran; its answers were lost");

        let later = post(&client, &url, r#"{"amount":9}"#)
            .header("idempotency-key", handed.key().clone())
            .send()
            .await
            .unwrap();
        assert_eq!(later.status(), StatusCode::CREATED);
        assert!(outcome(&later).replayed());
        assert_eq!(runs.get(), 1, "never run twice");
    }

    /// The deadline cuts off an attempt in flight here too: the error is the layer's
    /// (`RetryErrorKind::Deadline`), and the key is in the caller's extensions.
    #[tokio::test]
    async fn the_deadline_cuts_off_an_attempt_in_flight() {
        let (proxy, runs) = proxied(MemoryStore::new()).await;
        let client = reqwest_client(
            quick().deadline(Duration::from_millis(500)).build(),
            Duration::from_secs(60),
        );
        let url = proxy.url("/slow/1500");

        let request = post(&client, &url, "{}").build().unwrap();
        let mut extensions = http::Extensions::new();
        let error = client
            .execute_with_extensions(request, &mut extensions)
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("the layer's error: {error:?}");
        };
        let error = error.downcast_ref::<RetryError>().unwrap();
        assert_eq!(error.kind(), RetryErrorKind::Deadline);
        let handed = extensions.get::<RetryOutcome>().unwrap();
        assert_eq!((handed.attempts(), Some(handed.key())), (1, error.key()));

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = post(&client, &url, "{}")
            .header("idempotency-key", handed.key().clone())
            .send()
            .await
            .unwrap();
        assert!(outcome(&later).replayed());
        assert_eq!(runs.get(), 1, "never run twice");
    }

    #[tokio::test]
    async fn the_rules_a_422_a_callers_key_a_get_and_the_cap() {
        let (proxy, runs) = proxied(MemoryStore::new()).await;
        let client = reqwest_client(quick().max_body_bytes(32).build(), Duration::from_secs(10));
        let url = proxy.url("/payments");

        let first = post(&client, &url, r#"{"amount":1}"#)
            .header("idempotency-key", "reqwest-key-1")
            .send()
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::CREATED);
        assert_eq!(
            outcome(&first).key(),
            "reqwest-key-1",
            "the caller's key is kept"
        );

        let reuse = post(&client, &url, r#"{"amount":2}"#)
            .header("idempotency-key", "reqwest-key-1")
            .send()
            .await
            .unwrap();
        assert_eq!(reuse.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(outcome(&reuse).attempts(), 1, "a 422 is never retried");

        let get = client
            .get(&url)
            .header(header::AUTHORIZATION, AUTH)
            .send()
            .await
            .unwrap();
        assert_eq!(get.status(), StatusCode::OK);
        assert!(get.extensions().get::<RetryOutcome>().is_none());

        let error = post(&client, &url, "a body longer than thirty-two bytes")
            .send()
            .await
            .unwrap_err();
        let reqwest_middleware::Error::Middleware(error) = error else {
            panic!("a middleware error: {error:?}");
        };
        let error = error.downcast_ref::<RetryError>().unwrap();
        assert_eq!(error.kind(), RetryErrorKind::BodyTooLarge);

        let exchanges = proxy.exchanges();
        assert_eq!(exchanges.len(), 3, "the large body was never sent");
        assert_eq!(exchanges[0].key.as_deref(), Some("reqwest-key-1"));
        assert_eq!(exchanges[2].key, None, "the GET got no key");
        assert_eq!(runs.get(), 2, "the payment and the GET");
    }
}
