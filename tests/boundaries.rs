//! Boundaries and defaults that users rely on: a body of exactly `max_body_bytes`, the default
//! body limit and TTL, whitespace around a key, an empty tenant header, and a full memory store
//! that prunes a dead holder's record beside a live one. Each test names the change in `src/`
//! it fails on.

#[macro_use]
mod support;

use std::time::Duration;

use axum::http::{StatusCode, header};
use support::{Runs, api, post_with_key, send};
use tower_idempotency::IdempotencyLayer;

/// A keyed POST of `body` that announces its length in `Content-Length`, as every HTTP/1.1
/// client does for a body it has whole.
fn announced(key: &str, body: &'static str) -> axum::http::Request<axum::body::Body> {
    let mut request = post_with_key("/payments", key, body);
    request
        .headers_mut()
        .insert(header::CONTENT_LENGTH, body.len().into());
    request
}

/// DESIGN.md §Request flow 4: the body is buffered *up to* `max_body_bytes`; only a body over
/// it is `413`. A body of exactly the limit, announced by `Content-Length`, runs.
///
/// Fails if `src/service.rs`'s `call` refuses an announced length `>= max_body_bytes`.
#[tokio::test]
async fn an_announced_body_of_exactly_max_body_bytes_runs() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(tower_idempotency::MemoryStore::new())
            .shared_scope(true)
            .max_body_bytes(16),
    );
    let body = r#"{"amount":12345}"#;
    assert_eq!(body.len(), 16);
    let reply = send(&app, announced("exact", body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    assert_eq!(runs.get(), 1);
    // One byte more is over the limit.
    let over = send(&app, announced("over", r#"{"amount":123456}"#)).await;
    assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.get(), 1);
}

/// DESIGN.md "Details": a full `MemoryStore` makes room by dropping completed records and the
/// in-flight ones whose holder died, "never an in-flight one" that is alive. Here a dead
/// holder's record is pruned to make room for a new key while another record is in flight
/// under a live lease: that one must stay in flight (its duplicate gets `InFlight`, not a
/// second `Acquired`, which would run the handler twice), and its holder must still complete.
///
/// Fails if `src/store/memory/shard/room.rs`'s `prune_in_flight` drops every in-flight record,
/// live or not, once one lease has run out. `tests/memory_store.rs` passes on it; only the
/// record counts of two `src/store/memory` unit tests notice.
#[tokio::test(start_paused = true)]
async fn pruning_a_dead_holder_never_drops_a_live_in_flight_record() {
    use bytes::Bytes;
    use tower_idempotency::{
        Begin, Fingerprint, IdempotencyStore, MemoryStore, RecordKey, StoredResponse, TenantId,
    };
    let store = MemoryStore::new().max_entries(2);
    let fp = Fingerprint::from_bytes([7; 32]);
    let key = |k: &str| RecordKey::new(TenantId::shared(), k);
    let lease = Duration::from_secs(30);
    let Begin::Acquired(_) = store
        .begin(&key("dead"), &fp, Duration::from_secs(1))
        .await
        .unwrap()
    else {
        panic!("dead acquires")
    };
    let Begin::Acquired(live) = store.begin(&key("live"), &fp, lease).await.unwrap() else {
        panic!("live acquires")
    };
    // The first holder died: its lease ran out. The live one is well within its lease.
    tokio::time::advance(Duration::from_secs(2)).await;
    let Begin::Acquired(_) = store.begin(&key("new"), &fp, lease).await.unwrap() else {
        panic!("the dead holder's record makes room for a new key")
    };
    assert!(
        matches!(
            store.begin(&key("live"), &fp, lease).await.unwrap(),
            Begin::InFlight
        ),
        "the live in-flight record was dropped: its duplicate would run the handler again"
    );
    let response = StoredResponse::new(
        StatusCode::CREATED,
        axum::http::HeaderMap::new(),
        Bytes::from_static(b"done"),
    );
    store
        .complete(&key("live"), live, response, Duration::from_secs(60))
        .await
        .expect("the live holder still holds its key and completes it");
    assert!(matches!(
        store.begin(&key("live"), &fp, lease).await.unwrap(),
        Begin::Completed(_)
    ));
}

/// A field value's surrounding whitespace is not part of it (RFC 9110 §5.5), and the key
/// parser trims it (`src/key.rs` `parse_value`): a key sent as `" k-ws "` (as a proxy or a
/// hand-built `HeaderValue` may leave it) is the key `k-ws`, the same key as a bare `k-ws`,
/// and is echoed exactly as sent.
///
/// Fails if `src/key.rs`'s `parse_value` drops its `trim_ascii()` (the padded key is then `400`).
#[tokio::test]
async fn whitespace_around_the_key_is_not_part_of_it() {
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(tower_idempotency::MemoryStore::new()).shared_scope(true));
    let mut padded = post_with_key("/payments", "k-ws", "{}");
    padded.headers_mut().insert(
        "idempotency-key",
        axum::http::HeaderValue::from_static(" k-ws\t"),
    );
    let first = send(&app, padded).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.header("idempotency-key"), Some(" k-ws\t"));
    let bare = send(&app, post_with_key("/payments", "k-ws", "{}")).await;
    assert!(bare.replayed(), "the same key: {bare:?}");
    assert_eq!(runs.get(), 1);
}

/// `TenantFromHeader` (src/tenant.rs docs): "A request without the header, or with an empty
/// one, is rejected with `401`". An empty (or blank) value is the missing header: the same
/// `401 idempotency_tenant_rejected`, the key echoed, nothing run.
///
/// Fails if `src/tenant.rs`'s `TenantFromHeader::extract` counts an empty value as a named tenant
/// (it then falls to the shared scope and a `400 idempotency_tenant_missing`).
/// `tests/tenants_and_errors.rs` and `tests/tenant_scope.rs` pass on it; the unit test
/// `tenant::tests::an_empty_tenant_header_counts_as_none` catches it.
#[tokio::test]
async fn an_empty_tenant_header_is_rejected_as_a_missing_one() {
    use axum::http::HeaderName;
    use tower_idempotency::{MemoryStore, TenantFromHeader};
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .tenant(TenantFromHeader::new(HeaderName::from_static("x-api-key"))),
    );
    let missing = send(&app, post_with_key("/payments", "k-empty", "{}")).await;
    for value in ["", "   "] {
        let mut request = post_with_key("/payments", "k-empty", "{}");
        request
            .headers_mut()
            .insert("x-api-key", axum::http::HeaderValue::from_static(value));
        let reply = send(&app, request).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{value:?}: {reply:?}"
        );
        assert_eq!(reply.code(), "idempotency_tenant_rejected");
        assert_eq!(reply.code(), missing.code(), "as without the header");
        assert_eq!(reply.header("idempotency-key"), Some("k-empty"));
    }
    assert_eq!(runs.get(), 0);
}

/// A keyed `POST /big/1` (whose handler ignores the body) with a body of `len` bytes, its
/// length announced, or not.
fn sized(key: &str, len: usize, announce: bool) -> axum::http::Request<axum::body::Body> {
    let mut request = axum::http::Request::post("/big/1")
        .header("idempotency-key", key)
        .body(axum::body::Body::from(vec![b'x'; len]))
        .unwrap();
    if announce {
        request
            .headers_mut()
            .insert(header::CONTENT_LENGTH, len.into());
    }
    request
}

/// DESIGN.md §Request flow 4 and the README's option table: `max_body_bytes` is 2 MiB by
/// default. A body of exactly 2 MiB runs, announced or streamed; one byte more is `413`.
///
/// Fails if `src/config.rs`'s `Config::default` has `max_body_bytes: 1024 * 1024`.
#[tokio::test]
async fn the_default_body_limit_is_2_mib() {
    const TWO_MIB: usize = 2 * 1024 * 1024;
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(tower_idempotency::MemoryStore::new()).shared_scope(true));
    for (key, announce) in [("announced", true), ("streamed", false)] {
        let reply = send(&app, sized(key, TWO_MIB, announce)).await;
        assert_eq!(reply.status, StatusCode::OK, "{key}: {reply:?}");
        let over = send(&app, sized(&format!("{key}-over"), TWO_MIB + 1, announce)).await;
        assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE, "{key}");
    }
    assert_eq!(runs.get(), 2);
}

/// README: "records expire `.ttl()` after completion (24 hours by default)". A retry a minute
/// short of 24 hours after completion replays; one past 24 hours runs again.
///
/// Fails if `src/config.rs`'s `Config::default` has a TTL of one hour.
#[tokio::test(start_paused = true)]
async fn the_default_ttl_is_24_hours() {
    let runs = Runs::default();
    let app = api(runs.clone())
        .layer(IdempotencyLayer::new(tower_idempotency::MemoryStore::new()).shared_scope(true));
    let first = send(&app, post_with_key("/payments", "k-ttl", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::advance(Duration::from_secs(24 * 60 * 60 - 60)).await;
    let retry = send(&app, post_with_key("/payments", "k-ttl", "{}")).await;
    assert!(retry.replayed(), "still within 24 h: {retry:?}");
    assert_eq!(runs.get(), 1);
    tokio::time::advance(Duration::from_secs(2 * 60)).await;
    let late = send(&app, post_with_key("/payments", "k-ttl", "{}")).await;
    assert_eq!(late.status, StatusCode::CREATED);
    assert!(!late.replayed(), "past 24 h the record is gone: {late:?}");
    assert_eq!(runs.get(), 2);
}
