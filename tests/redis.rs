//! `RedisStore` against a real Redis at `REDIS_URL` (skipped when it is not set; run through
//! `scripts/test-services`).

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use redis::AsyncCommands;
use support::shared::redis as store;
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, RecordKey, RedisStore, StoreErrorKind, StoredResponse,
    TenantId,
};

// The conformance suite, and the fleet scenarios every shared store runs.
fleet_scenarios!(store);

/// A replica wait that a server without replicas cannot meet: `begin` fails and frees the key
/// it wrote; `complete` keeps the record as the server has it and reports the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_wait_without_replicas_fails_and_frees_the_key() {
    let Some(store) = store().await else { return };
    let waiting = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(20))
        .share(&store);
    let fp = Fingerprint::from_bytes([8; 32]);
    let lease = Duration::from_secs(30);
    let key = RecordKey::new(TenantId::shared(), unique_key("wait"));
    let err = waiting.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(store.lookup(&key).await.unwrap().is_none(), "released");

    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, lease).await else {
        panic!("the key is free again");
    };
    let response = StoredResponse::omitted(StatusCode::OK);
    let err = waiting
        .complete(&key, token, response, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(
        matches!(store.begin(&key, &fp, lease).await, Ok(Begin::Completed(_))),
        "the record stays completed on the primary"
    );
}

async fn raw_connection() -> redis::aio::MultiplexedConnection {
    let url = std::env::var("REDIS_URL").unwrap();
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// The record lives at `<prefix>{<tenant hex>:<key>}`, and its expiry is the lease while in
/// flight, then the TTL: Redis keeps the time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_use_the_documented_key_and_server_side_expiry() {
    let Some(store) = store().await else { return };
    let mut raw = raw_connection().await;
    let tenant = TenantId::hashed("layout");
    let key = RecordKey::new(tenant, unique_key("layout{x}:y%"));
    // `%` and `}` are percent-encoded, so that no key ends the hash tag early.
    let redis_key = redis_key(&key);
    let exists: bool = raw.exists(&redis_key).await.unwrap();
    assert!(!exists);

    let fp = Fingerprint::from_bytes([1; 32]);
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await else {
        panic!("expected Acquired");
    };
    let pttl: i64 = raw.pttl(&redis_key).await.unwrap();
    assert!(
        (1..=30_000).contains(&pttl),
        "in-flight expiry is the lease: {pttl}"
    );
    let value: Vec<u8> = raw.get(&redis_key).await.unwrap();
    assert_eq!(&value[..2], b"\x01f");
    assert_eq!(&value[2..34], fp.as_bytes());
    assert_eq!(value[34..50], token.as_u128().to_be_bytes());

    let response = StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(b"\0body\xff"),
    );
    store
        .complete(&key, token, response.clone(), Duration::from_secs(3600))
        .await
        .unwrap();
    let pttl: i64 = raw.pttl(&redis_key).await.unwrap();
    assert!(
        (3_000_000..=3_600_000).contains(&pttl),
        "completed expiry is the TTL: {pttl}"
    );
    let value: Vec<u8> = raw.get(&redis_key).await.unwrap();
    assert_eq!(&value[..2], b"\x01c");
    assert_eq!(&value[50..], &response.encode()[..]);
}

/// Stores with different prefixes never meet; stores with the same prefix share records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_separate_fleets() {
    let (Some(a), Some(b), Some(c)) = (store().await, store().await, store().await) else {
        return;
    };
    let a = RedisStore::builder().prefix("fleet-a:").share(&a);
    let b = RedisStore::builder().prefix("fleet-b:").share(&b);
    let c = RedisStore::builder().prefix("fleet-a:").share(&c);
    assert_eq!((a.prefix(), b.prefix()), ("fleet-a:", "fleet-b:"));
    let key = RecordKey::new(TenantId::shared(), unique_key("prefix"));
    let fp = Fingerprint::from_bytes([2; 32]);
    let lease = Duration::from_secs(30);
    assert!(matches!(
        a.begin(&key, &fp, lease).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        b.begin(&key, &fp, lease).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        c.begin(&key, &fp, lease).await,
        Ok(Begin::InFlight)
    ));
}

/// The Redis key of a record, as documented: `idempotency:{<tenant hex>:<key>}`, with `%` and
/// `}` in the key percent-encoded.
fn redis_key(key: &RecordKey) -> String {
    let escaped = key.key().replace('%', "%25").replace('}', "%7D");
    format!("idempotency:{{{}:{escaped}}}", key.tenant())
}

/// A key that holds something else than a record is `Corrupt`, never a panic or a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_values_are_corrupt() {
    let Some(store) = store().await else { return };
    let mut raw = raw_connection().await;
    let fp = Fingerprint::from_bytes([3; 32]);
    let lease = Duration::from_secs(30);

    let key = RecordKey::new(TenantId::shared(), unique_key("garbage"));
    let _: () = raw
        .set_ex(redis_key(&key), "not a record", 60)
        .await
        .unwrap();
    let err = store.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");

    let key = RecordKey::new(TenantId::shared(), unique_key("bad-response"));
    let mut value = vec![1, b'c'];
    value.extend_from_slice(fp.as_bytes());
    value.extend_from_slice(&[0; 16]);
    value.extend_from_slice(b"\x01\x00truncated");
    let _: () = raw.set_ex(redis_key(&key), value, 60).await.unwrap();
    let err = store.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");

    let key = RecordKey::new(TenantId::shared(), unique_key("hash"));
    let _: () = raw.hset(redis_key(&key), "field", "value").await.unwrap();
    let _: () = raw.expire(redis_key(&key), 60).await.unwrap();
    let err = store.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
}

/// `begin` on a key that holds a record answers from that record and writes nothing: another
/// request's record in flight is `InFlight` and keeps its lease and token (its holder completes
/// it), another request's is `Mismatch`, an unknown state is `Corrupt`; a completed record
/// replays, and the key keeps its expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_on_a_held_key_answers_and_writes_nothing() {
    let Some(store) = store().await else { return };
    let mut raw = raw_connection().await;
    let fp = Fingerprint::from_bytes([5; 32]);
    let lease = Duration::from_secs(30);

    let key = RecordKey::new(TenantId::shared(), unique_key("held"));
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(7)).await else {
        panic!("a new key is acquired");
    };
    let written: Vec<u8> = raw.get(redis_key(&key)).await.unwrap();
    let ttl: i64 = raw.pttl(redis_key(&key)).await.unwrap();
    assert!((1..=7_000).contains(&ttl), "the lease: {ttl} ms");
    assert!(matches!(
        store.begin(&key, &fp, lease).await,
        Ok(Begin::InFlight)
    ));
    let other = Fingerprint::from_bytes([6; 32]);
    assert!(matches!(
        store.begin(&key, &other, lease).await,
        Ok(Begin::Mismatch)
    ));
    let unchanged: Vec<u8> = raw.get(redis_key(&key)).await.unwrap();
    assert_eq!(unchanged, written, "the holder's record, token included");
    let after: i64 = raw.pttl(redis_key(&key)).await.unwrap();
    assert!(
        after <= ttl,
        "the lease is not extended: {after} > {ttl} ms"
    );
    let response = StoredResponse::new(StatusCode::CREATED, HeaderMap::new(), Bytes::from("ok"));
    store
        .complete(&key, token, response.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let Ok(Begin::Completed(replayed)) = store.begin(&key, &fp, lease).await else {
        panic!("a completed record replays");
    };
    assert_eq!(replayed, response);
    let ttl: i64 = raw.pttl(redis_key(&key)).await.unwrap();
    assert!(ttl > 50_000, "the TTL, not the lease: {ttl} ms");

    let key = RecordKey::new(TenantId::shared(), unique_key("unknown-state"));
    let mut value = vec![1, b'x'];
    value.extend_from_slice(fp.as_bytes());
    value.extend_from_slice(&[0; 16]);
    let _: () = raw.set_ex(redis_key(&key), &value, 60).await.unwrap();
    let err = store.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    let kept: Vec<u8> = raw.get(redis_key(&key)).await.unwrap();
    assert_eq!(kept, value);
}

/// A completed record the store cannot decode (another version's format, or damaged) says its
/// request may have run: a retry gets `503`, never a second run, even failing open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_it_cannot_decode_is_never_run_past_even_failing_open() {
    let Some(store) = store().await else { return };
    let mut raw = raw_connection().await;
    let runs = Runs::default();
    let layer = tower_idempotency::IdempotencyLayer::new(store)
        .shared_scope(true)
        .fail_open(true);
    let app = api(runs.clone()).layer(layer);
    let key = unique_key("undecodable");
    let first = send(&app, post_with_key("/payments", &key, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);

    let redis_key = redis_key(&RecordKey::new(TenantId::shared(), key.clone()));
    let mut value: Vec<u8> = raw.get(&redis_key).await.unwrap();
    value[0] = value[0].wrapping_add(1);
    let _: () = redis::cmd("SET")
        .arg(&redis_key)
        .arg(value)
        .arg("KEEPTTL")
        .query_async(&mut raw)
        .await
        .unwrap();

    let retry = send(&app, post_with_key("/payments", &key, "{}")).await;
    assert_eq!(retry.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(retry.outcome, Some(tower_idempotency::Outcome::StoreError));
    assert_eq!(retry.header("idempotency-bypassed"), None);
    assert_eq!(runs.get(), 1, "the completed operation never runs again");
}

/// The scripts are loaded again by themselves after the server forgot them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_survive_script_flush() {
    let Some(store) = store().await else { return };
    let mut raw = raw_connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let key = RecordKey::new(TenantId::shared(), unique_key("flush"));
    let fp = Fingerprint::from_bytes([4; 32]);
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await else {
        panic!("expected Acquired after SCRIPT FLUSH");
    };
    store.release(&key, token).await.unwrap();
}

#[tokio::test]
async fn invalid_urls_and_unreachable_servers_fail_clearly() {
    let err = RedisStore::connect("not a url").await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other, "{err}");
    // Port 1 on loopback: nothing listens there.
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the redis error is kept"
    );
}
