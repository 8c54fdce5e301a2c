//! Limits and bad input: body size, response size, unreadable bodies, the entry cap.

#[macro_use]
mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use support::{Runs, api, post_with_key, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome};

#[tokio::test]
async fn announced_body_over_the_limit_is_413_and_nothing_runs_or_is_stored() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_body_bytes(16),
    );
    let reply = send(
        &app,
        post_with_key("/payments", "k", r#"{"amount":1000000000}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.code(), "request_body_too_large");
    assert_eq!(reply.header("idempotency-key"), Some("k"));
    assert_eq!(reply.outcome, Some(Outcome::TooLarge));
    assert_eq!(runs.get(), 0);
    // Nothing was stored: the same key with a small body runs.
    let ok = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn streamed_body_over_the_limit_is_413() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_body_bytes(1024),
    );
    // No Content-Length: chunks of 400 bytes, four of them.
    let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'a'; 400])));
    let body = Body::from_stream(futures_stream(chunks.collect()));
    let request = Request::post("/payments")
        .header("idempotency-key", "k")
        .body(body)
        .unwrap();
    let reply = send(&app, request).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.get(), 0);
    // Exactly at the limit is fine.
    let request = Request::post("/payments")
        .header("idempotency-key", "k2")
        .body(Body::from(vec![b'a'; 1024]))
        .unwrap();
    assert_eq!(send(&app, request).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn requests_without_key_are_not_capped() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_body_bytes(8),
    );
    let request = Request::post("/payments")
        .body(Body::from(vec![b'a'; 4096]))
        .unwrap();
    assert_eq!(send(&app, request).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn multi_chunk_bodies_reach_the_handler_whole_and_fingerprint_alike() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let chunked = |parts: Vec<&'static str>| {
        let chunks = parts
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(Bytes::from(p)));
        Request::post("/payments")
            .header("idempotency-key", "k")
            .body(Body::from_stream(futures_stream(chunks.collect())))
            .unwrap()
    };
    let first = send(&app, chunked(vec!["{\"amo", "unt\":", "5}"])).await;
    assert_eq!(first.json()["request"], r#"{"amount":5}"#);
    // The same bytes in other chunks are the same request.
    let retry = send(&app, post_with_key("/payments", "k", r#"{"amount":5}"#)).await;
    assert!(retry.replayed());
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_body_that_fails_midway_is_400_and_nothing_runs() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let chunks = vec![
        Ok(Bytes::from_static(b"{\"amount\"")),
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection reset",
        )),
    ];
    let request = Request::post("/payments")
        .header("idempotency-key", "k")
        .body(Body::from_stream(futures_stream(chunks)))
        .unwrap();
    let reply = send(&app, request).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.code(), "request_body_incomplete");
    assert_eq!(runs.get(), 0);
    // The key was never taken.
    assert_eq!(
        send(&app, post_with_key("/payments", "k", "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn response_over_the_cap_reaches_the_client_but_is_never_rerun() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_response_bytes(1000),
    );
    let first = send(&app, post_with_key("/big/5000", "k", "")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.body.len(),
        5000,
        "the first client gets the whole response"
    );
    assert_eq!(first.outcome, Some(Outcome::Executed));
    let retry = send(&app, post_with_key("/big/5000", "k", "")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "idempotency_response_not_stored");
    assert_eq!(retry.header("idempotency-key"), Some("k"));
    assert_eq!(retry.header("retry-after"), None);
    assert_eq!(runs.get(), 1);
    // A response at the cap is stored.
    send(&app, post_with_key("/big/1000", "k2", "")).await;
    let retry = send(&app, post_with_key("/big/1000", "k2", "")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body.len(), 1000);
}

#[tokio::test(start_paused = true)]
async fn the_entry_cap_holds_and_a_full_store_makes_room() {
    let runs = Runs::default();
    let store = MemoryStore::new().max_entries(3);
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .ttl(Duration::from_secs(60)),
    );
    for key in ["a", "b", "c"] {
        let reply = send(&app, post_with_key("/payments", key, "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let d = send(&app, post_with_key("/payments", "d", "{}")).await;
    assert_eq!(d.status, StatusCode::CREATED, "a full store makes room");
    assert_eq!(store.entry_count(), 3, "the cap holds");
    assert_eq!(store.evicted(), 1);
    // The record nearest its expiry made room; the others still replay.
    for key in ["b", "c", "d"] {
        let retry = send(&app, post_with_key("/payments", key, "{}")).await;
        assert!(retry.replayed(), "{key}");
    }
    assert_eq!(runs.get(), 4);
}

/// A stream of ready items.
fn futures_stream<T: Send + 'static>(
    items: Vec<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::iter(items)
}

/// A keyed `POST /payments` whose body streams (no `Content-Length`).
fn streamed(key: &str, len: usize) -> Request<Body> {
    let chunks = vec![Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; len]))];
    Request::post("/payments")
        .header("idempotency-key", key)
        .header(http::header::AUTHORIZATION, "Bearer limits")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// A body limit outside the layer (tower-http's `RequestBodyLimitLayer`) that cuts a streamed
/// body off while the layer reads it: `413 request_body_too_large`, as without the layer (not
/// `400 request_body_incomplete`), nothing runs and the key stays free.
#[tokio::test]
async fn a_body_limit_outside_the_layer_answers_413() {
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(16));
    let over = send(&app, streamed("outer-limit", 100)).await;
    assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE, "{over:?}");
    assert_eq!(over.code(), "request_body_too_large");
    assert_eq!(over.outcome, Some(Outcome::TooLarge));
    assert_eq!(over.header("idempotency-key"), Some("outer-limit"));
    assert_eq!(runs.get(), 0);
    let within = send(&app, streamed("outer-limit", 10)).await;
    assert_eq!(within.status, StatusCode::CREATED, "the key stayed free");
    assert_eq!(runs.get(), 1);
}

/// The same on the wire: a chunked body over the outer limit, through a real server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_limit_outside_the_layer_answers_413_on_the_wire() {
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(16));
    let server = support::server::Server::start(app, Default::default()).await;
    let chunked = format!(
        "POST /payments HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer limits\r\n\
         Idempotency-Key: wire\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         64\r\n{}\r\n0\r\n\r\n",
        "x".repeat(100)
    );
    let reply = support::raw::exchange(server.addr, &chunked).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert_eq!(runs.get(), 0);
}
