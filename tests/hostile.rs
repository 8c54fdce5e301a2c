//! Hostile input through a real server on loopback: malformed keys and headers, bodies that end
//! early or never end, lying `Content-Length`s, and a flood of distinct keys. Every request gets
//! its documented status, the server stays up, and the store stays under its cap.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{Runs, Server, api, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

const MAX_BODY: usize = 64 * 1024;

/// The test API on a real server, and its handler runs.
struct Hosted {
    _server: Server,
    addr: SocketAddr,
    runs: Runs,
}

async fn start<S: IdempotencyStore>(store: S) -> Hosted {
    let runs = Runs::default();
    let app: Router = api(runs.clone()).layer(
        IdempotencyLayer::new(store)
            .shared_scope(true)
            .max_body_bytes(MAX_BODY),
    );
    let server = Server::start(app, Default::default()).await;
    let addr = server.addr;
    Hosted {
        _server: server,
        addr,
        runs,
    }
}

/// Sends raw bytes on a fresh connection and returns the status of the first response (None
/// when the server closed the connection without one). With `eof`, the client then closes its
/// write half, as a client that dies mid-request does.
async fn send_raw(addr: SocketAddr, bytes: &[u8], eof: bool) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if eof {
        stream.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    status_of(&out)
}

async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<u16> {
    send_raw(addr, bytes, false).await
}

fn status_of(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn keyed(key: &[u8], body: &str) -> Vec<u8> {
    let mut request = b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: ".to_vec();
    request.extend_from_slice(key);
    request.extend_from_slice(
        format!(
            "\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    request
}

/// The server still answers a well-formed request.
async fn assert_up(server: &Hosted) {
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<Bytes>>();
    let request = http::Request::get(format!("http://{}/payments", server.addr))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.expect("the server is up");
    assert_eq!(response.status(), 200);
}

/// Keys reach every store: a shared store must keep any valid key apart from its neighbours.
/// Each store is wrapped in a `FaultyStore` without faults, which gives the run a namespace of
/// its own on a shared server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_around_the_limits_and_with_bad_bytes() {
    keys_around_the_limits(MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_around_the_limits_and_with_bad_bytes_on_redis() {
    if let Some(store) = support::shared::redis().await {
        keys_around_the_limits(support::FaultyStore::new(store)).await;
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_around_the_limits_and_with_bad_bytes_on_postgres() {
    if let Some(store) = support::shared::postgres().await {
        keys_around_the_limits(support::FaultyStore::new(store)).await;
    }
}

async fn keys_around_the_limits<S: IdempotencyStore>(store: S) {
    let server = start(store).await;
    let k = |n: usize| vec![b'k'; n];
    let mut quoted_255 = b"\"".to_vec();
    quoted_255.extend([b'q'; 255]);
    quoted_255.push(b'"');
    let mut quoted_256 = b"\"".to_vec();
    quoted_256.extend(k(256));
    quoted_256.push(b'"');
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (k(0), 400),
        (k(1), 201),
        (k(254), 201),
        (k(255), 201),
        (k(256), 400),
        (k(8000), 400),
        (quoted_255, 201),
        (quoted_256, 400),
        (b"a b".to_vec(), 400),
        (b"a\tb".to_vec(), 400),
        (b"a\x01b".to_vec(), 400),
        (b"a\x7fb".to_vec(), 400),
        (b"caf\xc3\xa9".to_vec(), 400),
        (b"\xff\xfe".to_vec(), 400),
        (b"a,b".to_vec(), 400),
        (b"\"a\",\"b\"".to_vec(), 400),
        (b"\"a".to_vec(), 400),
    ];
    for (i, (key, status)) in cases.into_iter().enumerate() {
        // A distinct body per case keeps equal keys from meeting.
        let got = raw(server.addr, &keyed(&key, &format!("{{\"case\":{i}}}"))).await;
        assert_eq!(
            got,
            Some(status),
            "case {i}: key {:?}",
            String::from_utf8_lossy(&key)
        );
    }
    assert_eq!(server.runs.get(), 4);
    assert_up(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_folded_headers() {
    let server = start(MemoryStore::new()).await;
    let repeated = b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\r\nIdempotency-Key: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(raw(server.addr, repeated).await, Some(400));
    let folded = b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: a\r\n b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(raw(server.addr, folded).await, Some(400));
    let lower = b"POST /payments HTTP/1.1\r\nHost: x\r\nidempotency-key: a\r\nIDEMPOTENCY-KEY: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(
        raw(server.addr, lower).await,
        Some(400),
        "header names are case-insensitive"
    );
    assert_eq!(server.runs.get(), 0);
    assert_up(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_end_early_or_lie_about_their_length() {
    let server = start(MemoryStore::new()).await;
    // Announces 100 bytes, sends 10, then closes: the handler never runs, the key is not taken.
    let short = b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: early\r\nContent-Length: 100\r\n\r\n0123456789";
    let status = send_raw(server.addr, short, true).await;
    assert!(matches!(status, Some(400) | None), "{status:?}");
    assert_eq!(server.runs.get(), 0);
    assert_eq!(raw(server.addr, &keyed(b"early", "{}")).await, Some(201));

    // Announces fewer bytes than it sends: the request is the announced bytes; the rest is
    // not a valid next request, so the connection ends with a 400 (or is closed).
    let long = b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: lie\r\nContent-Length: 2\r\n\r\n{}garbage that is not http\r\n\r\n";
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(long).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    assert_eq!(status_of(&out), Some(201));
    assert_eq!(server.runs.get(), 2);

    // Over the limit, announced: 413 at once, without reading the body.
    let big = format!(
        "POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: big\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        MAX_BODY + 1
    );
    assert_eq!(raw(server.addr, big.as_bytes()).await, Some(413));
    assert_eq!(server.runs.get(), 2);
    assert_up(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_sent_slowly_is_refused_before_it_ends() {
    let server = start(MemoryStore::new()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let (mut read, mut write) = stream.into_split();
    // The client means to send 64 × the limit, 1 KiB every 2 ms (8 s at least), far more than
    // the sockets' buffers hold: a server that read it all before answering would answer only
    // once the client is done.
    const INTENT: usize = 64 * MAX_BODY;
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn({
        let sent = sent.clone();
        async move {
            let chunk = format!("400\r\n{}\r\n", "a".repeat(0x400));
            while sent.load(Ordering::SeqCst) < INTENT {
                // Stops when the server closes the connection.
                if write.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
                sent.fetch_add(0x400, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let mut head = vec![0; 12];
    read.read_exact(&mut head).await.unwrap();
    assert_eq!(status_of(&head), Some(413));
    let sent_when_refused = sent.load(Ordering::SeqCst);
    sender.abort();
    assert!(
        sent_when_refused < INTENT,
        "refused only once the client had sent its whole body ({sent_when_refused} bytes)"
    );
    assert_eq!(server.runs.get(), 0);
    assert_up(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_keys_stays_under_the_cap() {
    const CAP: usize = 20_000;
    const KEYS: usize = 100_000;
    let runs = Runs::default();
    // One tenant (the shared scope) sends every key: its bound is the store's.
    let store = MemoryStore::builder()
        .max_entries(CAP)
        .max_entries_per_tenant(CAP)
        .build();
    let app: Router =
        api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).shared_scope(true));
    let rss_before = rss_kib();
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let app = app.clone();
            tokio::spawn(async move {
                let (mut created, mut refused) = (0, 0);
                for i in (w..KEYS).step_by(4) {
                    let request = http::Request::post("/status/201")
                        .header("idempotency-key", format!("flood-{i}"))
                        .body(Body::empty())
                        .unwrap();
                    let response = app.clone().oneshot(request).await.unwrap();
                    match response.status().as_u16() {
                        201 => created += 1,
                        503 => {
                            assert!(response.headers().contains_key("retry-after"));
                            refused += 1;
                        }
                        other => panic!("unexpected {other}"),
                    }
                    let _ = response.into_body().collect().await;
                }
                (created, refused)
            })
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for worker in workers {
        let (c, r) = worker.await.unwrap();
        created += c;
        refused += r;
    }
    let elapsed = started.elapsed();
    let rss_after = rss_kib();
    println!(
        "flood: {KEYS} distinct keys in {elapsed:?} ({:.0} keys/s); {created} created, {refused} refused (503); \
         store holds {} records (cap {CAP}), {} evicted; RSS {rss_before} KiB -> {rss_after} KiB",
        KEYS as f64 / elapsed.as_secs_f64(),
        store.entry_count(),
        store.evicted(),
    );
    assert_eq!(created, KEYS, "a full store makes room: every new key runs");
    assert_eq!(refused, 0);
    assert_eq!(store.entry_count(), CAP, "the cap holds");
    assert_eq!(
        store.evicted(),
        (KEYS - CAP) as u64,
        "the oldest completed records made room"
    );
    assert_eq!(runs.get(), KEYS);
    // Each record holds a short response; 20,000 of them stay far below this bound.
    assert!(
        rss_after.saturating_sub(rss_before) < 256 * 1024,
        "memory stays bounded"
    );
}
