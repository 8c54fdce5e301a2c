//! `ReplayCache`: the conformance suite through the cache, replays without store calls,
//! fingerprints checked on a hit, only completed records kept, expiry by TTL and by its cap,
//! bounds, and `forget`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use http::HeaderMap;
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, LockToken, MemoryStore, RecordInfo, RecordKey,
    ReplayCache, StoreError, StoredResponse, TenantId,
};

async fn cached() -> Option<ReplayCache<MemoryStore>> {
    Some(ReplayCache::new(MemoryStore::new()))
}

mod conformance {
    tower_idempotency::conformance_tests!(super::cached);
}

/// A store that counts the calls it forwards, by kind.
#[derive(Clone, Default)]
struct Counting<S> {
    store: S,
    begins: Arc<AtomicUsize>,
    others: Arc<AtomicUsize>,
}

impl<S> Counting<S> {
    fn new(store: S) -> Self {
        Self {
            store,
            begins: Arc::default(),
            others: Arc::default(),
        }
    }

    fn begins(&self) -> usize {
        self.begins.load(Ordering::SeqCst)
    }

    fn others(&self) -> usize {
        self.others.load(Ordering::SeqCst)
    }
}

impl<S: IdempotencyStore> IdempotencyStore for Counting<S> {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        self.store.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.others.fetch_add(1, Ordering::SeqCst);
        self.store.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.others.fetch_add(1, Ordering::SeqCst);
        self.store.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.others.fetch_add(1, Ordering::SeqCst);
        self.store.release(key, token).await
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        self.others.fetch_add(1, Ordering::SeqCst);
        self.store.lookup(key).await
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        self.others.fetch_add(1, Ordering::SeqCst);
        self.store.forget(key, force).await
    }
}

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn key(name: &str) -> RecordKey {
    RecordKey::new(TenantId::shared(), name)
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(body.as_bytes()),
    )
}

/// Runs a request through `store` to completion with `response`.
async fn run<S: IdempotencyStore>(
    store: &S,
    key: &RecordKey,
    fp: &Fingerprint,
    body: &'static str,
) {
    let Ok(Begin::Acquired(token)) = store.begin(key, fp, LEASE).await else {
        panic!("acquired");
    };
    store
        .complete(key, token, response(body), TTL)
        .await
        .unwrap();
}

/// A replay of a record this process completed costs no store call; a record completed by
/// another process costs one, then none.
#[tokio::test]
async fn replays_it_holds_cost_no_store_call() {
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::new(store.clone());
    let fp = Fingerprint::from_bytes([1; 32]);

    run(&cache, &key("mine"), &fp, "mine").await;
    assert_eq!((store.begins(), store.others()), (1, 1));
    for _ in 0..5 {
        let Ok(Begin::Completed(replay)) = cache.begin(&key("mine"), &fp, LEASE).await else {
            panic!("replay");
        };
        assert_eq!(replay, response("mine"));
    }
    assert_eq!(store.begins(), 1, "replays from the cache");

    // Completed through another server: the first replay asks the store.
    run(&store, &key("theirs"), &fp, "theirs").await;
    let before = store.begins();
    for _ in 0..3 {
        assert!(
            matches!(cache.begin(&key("theirs"), &fp, LEASE).await, Ok(Begin::Completed(r)) if r == response("theirs"))
        );
    }
    assert_eq!(store.begins(), before + 1, "one store call, then the cache");
    assert_eq!(cache.entry_count(), 2);
}

/// A cached key with another request's fingerprint is a mismatch, without a store call.
#[tokio::test]
async fn hits_check_the_fingerprint() {
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::new(store.clone());
    run(&cache, &key("k"), &Fingerprint::from_bytes([1; 32]), "k").await;
    let before = store.begins();
    let other = Fingerprint::from_bytes([2; 32]);
    assert!(matches!(
        cache.begin(&key("k"), &other, LEASE).await,
        Ok(Begin::Mismatch)
    ));
    assert_eq!(store.begins(), before);
}

/// In-flight state is never cached: every `begin` of a key in flight goes to the store, and so
/// do mismatches and released keys.
#[tokio::test]
async fn only_completed_records_are_kept() {
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::new(store.clone());
    let fp = Fingerprint::from_bytes([1; 32]);
    let Ok(Begin::Acquired(token)) = cache.begin(&key("k"), &fp, LEASE).await else {
        panic!("acquired");
    };
    for _ in 0..3 {
        assert!(matches!(
            cache.begin(&key("k"), &fp, LEASE).await,
            Ok(Begin::InFlight)
        ));
    }
    assert_eq!(store.begins(), 4);
    assert_eq!(cache.entry_count(), 0);

    cache.release(&key("k"), token).await.unwrap();
    assert!(matches!(
        cache.begin(&key("k"), &fp, LEASE).await,
        Ok(Begin::Acquired(_))
    ));
    assert_eq!(cache.entry_count(), 0, "a released key is not cached");
}

/// An entry lives no longer than the record's TTL, nor than the cap.
#[tokio::test(start_paused = true)]
async fn entries_expire_with_the_ttl_and_the_cap() {
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::builder()
        .max_age(Duration::from_secs(10))
        .build(store.clone());
    let fp = Fingerprint::from_bytes([1; 32]);

    // TTL 2 s, under the cap: gone from the cache (and the store) after 2 s.
    let Ok(Begin::Acquired(token)) = cache.begin(&key("short"), &fp, LEASE).await else {
        panic!("acquired");
    };
    cache
        .complete(
            &key("short"),
            token,
            response("short"),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
    tokio::time::advance(Duration::from_millis(1900)).await;
    assert!(matches!(
        cache.begin(&key("short"), &fp, LEASE).await,
        Ok(Begin::Completed(_))
    ));
    let before = store.begins();
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(matches!(
        cache.begin(&key("short"), &fp, LEASE).await,
        Ok(Begin::Acquired(_))
    ));
    assert_eq!(
        store.begins(),
        before + 1,
        "the expired key went to the store"
    );

    // TTL 1 h, over the cap: the store is asked again after 10 s (so a record purged on the
    // store stops replaying then).
    run(&cache, &key("long"), &fp, "long").await;
    let before = store.begins();
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(matches!(
        cache.begin(&key("long"), &fp, LEASE).await,
        Ok(Begin::Completed(_))
    ));
    assert_eq!(store.begins(), before, "cached up to the cap");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(matches!(
        cache.begin(&key("long"), &fp, LEASE).await,
        Ok(Begin::Completed(_))
    ));
    assert_eq!(
        store.begins(),
        before + 1,
        "past the cap, the store answers"
    );
}

/// `forget` drops the cached entry and forwards.
#[tokio::test]
async fn forget_drops_the_entry_and_forwards() {
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::new(store.clone());
    let fp = Fingerprint::from_bytes([1; 32]);
    run(&cache, &key("k"), &fp, "k").await;
    assert_eq!(cache.entry_count(), 1);
    match cache.forget(&key("k"), false).await {
        // MemoryStore may not implement `forget`: the cache still dropped its entry.
        Ok(forget) => assert_eq!(forget, Forget::Forgotten),
        Err(err) => assert_eq!(err.kind(), tower_idempotency::StoreErrorKind::Unsupported),
    }
    assert_eq!(cache.entry_count(), 0);
    let before = store.others();
    let _ = cache.lookup(&key("k")).await;
    assert_eq!(store.others(), before + 1, "lookup asks the store");
}

/// Bounded by entries and by bytes; the oldest entries make room.
#[tokio::test]
async fn bounded_by_entries_and_bytes() {
    let cache = ReplayCache::builder()
        .max_entries(64)
        .build(MemoryStore::new());
    let fp = Fingerprint::from_bytes([1; 32]);
    for i in 0..1000 {
        run(&cache, &key(&format!("k{i}")), &fp, "x").await;
        assert!(cache.entry_count() <= 64);
    }
    assert!(cache.entry_count() >= 32, "{}", cache.entry_count());

    let cache = ReplayCache::builder()
        .max_bytes(1 << 20)
        .build(MemoryStore::new());
    let body: &'static str = Box::leak("b".repeat(20_000).into_boxed_str());
    for i in 0..500 {
        run(&cache, &key(&format!("k{i}")), &fp, body).await;
        assert!(
            cache.weighted_size() <= 1 << 20,
            "{}",
            cache.weighted_size()
        );
    }
    assert!(cache.entry_count() >= 20, "{}", cache.entry_count());

    // Too large to cache at all: a sixteenth of the bytes.
    let big: &'static str = Box::leak("b".repeat(100_000).into_boxed_str());
    let store = Counting::new(MemoryStore::new());
    let cache = ReplayCache::builder()
        .max_bytes(1 << 20)
        .build(store.clone());
    run(&cache, &key("big"), &fp, big).await;
    assert_eq!(cache.entry_count(), 0);
    assert!(matches!(
        cache.begin(&key("big"), &fp, LEASE).await,
        Ok(Begin::Completed(_))
    ));
    assert_eq!(store.begins(), 2);
}

#[test]
#[should_panic(expected = "max_age")]
fn nonsense_settings_panic() {
    let _ = ReplayCache::builder()
        .max_age(Duration::ZERO)
        .build(MemoryStore::new());
}

/// Through the layer: the replay from the cache is the original response, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_replays_from_the_cache() {
    let store = Counting::new(MemoryStore::new());
    let runs = Runs::default();
    let app = server(
        ReplayCache::new(store.clone()),
        &runs,
        Duration::ZERO,
        |l| l,
    );
    let first = send(&app, payment("cached", r#"{"amount":1}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let begins = store.begins();
    for _ in 0..3 {
        send(&app, payment("cached", r#"{"amount":1}"#))
            .await
            .assert_replay_of(&first);
    }
    assert_eq!(store.begins(), begins, "replayed from the cache");
    let reuse = send(&app, payment("cached", r#"{"amount":2}"#)).await;
    assert_eq!(reuse.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.get(), 1);
}
