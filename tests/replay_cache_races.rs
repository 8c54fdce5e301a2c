//! `ReplayCache` against store answers still in transit (a remote store's reply on its way):
//! a `forget` through the cache, or a newer record this process completed, is never undone by
//! an answer read from the store before it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, LockToken, MemoryStore, RecordInfo, RecordKey,
    ReplayCache, StoreError, StoredResponse, TenantId,
};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn key(name: &str) -> RecordKey {
    RecordKey::new(TenantId::shared(), name)
}

fn response(body: &str) -> StoredResponse {
    StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

/// Runs `key` to completion on `store` directly (another server's run).
async fn run<S: IdempotencyStore>(store: &S, key: &RecordKey, fp: &Fingerprint, body: &str) {
    let Ok(Begin::Acquired(token)) = store.begin(key, fp, LEASE).await else {
        panic!("acquired");
    };
    store
        .complete(key, token, response(body), TTL)
        .await
        .unwrap();
}

/// A store that, when armed, pauses after its inner store answered `begin` or `complete` and
/// before the answer reaches the caller: a reply in transit from a remote store.
#[derive(Clone, Default)]
struct Paused {
    store: MemoryStore,
    arm_begin: Arc<AtomicBool>,
    arm_complete: Arc<AtomicBool>,
    answered: Arc<Notify>,
    resume: Arc<Notify>,
}

impl Paused {
    async fn hold(&self, armed: &AtomicBool) {
        if armed.swap(false, Ordering::SeqCst) {
            self.answered.notify_one();
            self.resume.notified().await;
        }
    }
}

impl IdempotencyStore for Paused {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let answer = self.store.begin(key, fingerprint, lease).await;
        self.hold(&self.arm_begin).await;
        answer
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.store.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let done = self.store.complete(key, token, response, ttl).await;
        self.hold(&self.arm_complete).await;
        done
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.store.release(key, token).await
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        self.store.lookup(key).await
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        self.store.forget(key, force).await
    }
}

/// An operator's `forget` through the cache, while a replay's answer from the store is in
/// transit: the forget answers `Forgotten`, and the late replay does not cache the record
/// again: the next request runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_through_the_cache_racing_a_replay_leaves_no_stale_entry() {
    let store = Paused::default();
    let cache = ReplayCache::new(store.clone());
    let fp = Fingerprint::from_bytes([1; 32]);
    let k = key("raced-replay");
    // Completed by another server: the cache learns it from a replay.
    run(&store.store, &k, &fp, "first").await;

    store.arm_begin.store(true, Ordering::SeqCst);
    let replay = tokio::spawn({
        let cache = cache.clone();
        let k = k.clone();
        async move { cache.begin(&k, &fp, LEASE).await }
    });
    store.answered.notified().await;
    assert_eq!(cache.forget(&k, false).await.unwrap(), Forget::Forgotten);
    store.resume.notify_one();
    assert!(matches!(replay.await.unwrap(), Ok(Begin::Completed(_))));

    // The key is forgotten on the store: the next request must run.
    assert_eq!(store.store.entry_count(), 0, "gone from the store");
    let next = cache.begin(&k, &fp, LEASE).await.unwrap();
    assert!(
        matches!(next, Begin::Acquired(_)),
        "forgotten, yet the cache answers {next:?}; entries: {}",
        cache.entry_count()
    );
}

/// The same race with this process's own `complete`: the forget (after the store completed)
/// answers `Forgotten`, and `complete` does not cache the record it wrote before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_through_the_cache_racing_a_complete_leaves_no_stale_entry() {
    let store = Paused::default();
    let cache = ReplayCache::new(store.clone());
    let fp = Fingerprint::from_bytes([2; 32]);
    let k = key("raced-complete");
    let Ok(Begin::Acquired(token)) = cache.begin(&k, &fp, LEASE).await else {
        panic!("acquired");
    };
    store.arm_complete.store(true, Ordering::SeqCst);
    let complete = tokio::spawn({
        let cache = cache.clone();
        let k = k.clone();
        async move { cache.complete(&k, token, response("first"), TTL).await }
    });
    store.answered.notified().await;
    assert_eq!(cache.forget(&k, false).await.unwrap(), Forget::Forgotten);
    store.resume.notify_one();
    complete.await.unwrap().unwrap();

    assert_eq!(store.store.entry_count(), 0, "gone from the store");
    let other = Fingerprint::from_bytes([3; 32]);
    let next = cache.begin(&k, &other, LEASE).await.unwrap();
    assert!(
        matches!(next, Begin::Acquired(_)),
        "forgotten, yet the cache answers {next:?}"
    );
}

/// A replay's answer in transit, while the record expires on the store and this process runs
/// the key again to completion: the late replay (of the old record) does not take the place of
/// the newer entry this process cached, so the new request's retry replays its own response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_replay_does_not_overwrite_a_newer_entry() {
    let store = Paused::default();
    let cache = ReplayCache::new(store.clone());
    let old = Fingerprint::from_bytes([1; 32]);
    let new = Fingerprint::from_bytes([2; 32]);
    let k = key("late-replay");
    let Ok(Begin::Acquired(token)) = store.store.begin(&k, &old, LEASE).await else {
        panic!("acquired");
    };
    store
        .store
        .complete(&k, token, response("old"), Duration::from_millis(50))
        .await
        .unwrap();

    store.arm_begin.store(true, Ordering::SeqCst);
    let replay = tokio::spawn({
        let cache = cache.clone();
        let k = k.clone();
        async move { cache.begin(&k, &old, LEASE).await }
    });
    store.answered.notified().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Expired on the store: a new request runs, through this cache, to completion.
    let Ok(Begin::Acquired(token)) = cache.begin(&k, &new, LEASE).await else {
        panic!("the expired key runs again");
    };
    cache
        .complete(&k, token, response("new"), TTL)
        .await
        .unwrap();
    store.resume.notify_one();
    assert!(matches!(replay.await.unwrap(), Ok(Begin::Completed(_))));

    // The store holds the new record: its retry must replay it.
    assert!(matches!(
        store.store.begin(&k, &new, LEASE).await,
        Ok(Begin::Completed(_))
    ));
    let retry = cache.begin(&k, &new, LEASE).await.unwrap();
    assert!(
        matches!(&retry, Begin::Completed(r) if r.body() == &Bytes::from_static(b"new")),
        "the new request's retry got {retry:?}"
    );
}

/// Keys of three tenants, every fifth too long to be kept inline.
fn keys(count: usize) -> Vec<RecordKey> {
    (0..count)
        .map(|i| {
            let tenant = match i % 3 {
                0 => TenantId::shared(),
                1 => TenantId::hashed("a"),
                _ => TenantId::hashed("b"),
            };
            let text = if i % 5 == 4 {
                format!("{i}-{}", "long".repeat(20))
            } else {
                format!("k{i}")
            };
            RecordKey::new(tenant, text)
        })
        .collect()
}

/// Four tasks on two threads begin, complete, release, cut short and forget keys through a
/// small cache, and complete some on the store directly (another server), with short TTLs and
/// `max_age`: the cache stays within its bounds at every step, and once every key is forgotten
/// it holds no entry and counts no byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_threads_keeps_the_bounds_and_counts_every_byte() {
    let store = MemoryStore::new();
    let cache = ReplayCache::builder()
        .max_entries(32)
        .max_bytes(64 << 10)
        .max_age(Duration::from_millis(50))
        .build(store.clone());
    let keys = Arc::new(keys(60));
    let bodies = [0, 100, 2000, 3900, 5000];
    let mut tasks = Vec::new();
    for task in 0..4u64 {
        let (cache, store, keys) = (cache.clone(), store.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut seed = task.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |n: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % n as u64) as usize
            };
            for _ in 0..3000 {
                let key = &keys[next(keys.len())];
                let fp = Fingerprint::from_bytes([next(2) as u8; 32]);
                match next(10) {
                    0..=5 => {
                        let lease = Duration::from_millis(20);
                        if let Ok(Begin::Acquired(token)) = cache.begin(key, &fp, lease).await {
                            match next(4) {
                                0 => {
                                    let _ = cache.release(key, token).await;
                                }
                                1 => {} // cut short: neither completed nor released
                                _ => {
                                    let body = "b".repeat(bodies[next(bodies.len())]);
                                    let ttl = Duration::from_millis(1 + next(200) as u64);
                                    let _ = cache.complete(key, token, response(&body), ttl).await;
                                }
                            }
                        }
                    }
                    6 | 7 => {
                        let _ = cache.forget(key, next(2) == 0).await;
                    }
                    8 => {
                        if let Ok(Begin::Acquired(token)) = store.begin(key, &fp, LEASE).await {
                            let body = "b".repeat(next(3000));
                            let _ = store.complete(key, token, response(&body), TTL).await;
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(1)).await,
                }
                assert!(cache.entry_count() <= 32, "{} entries", cache.entry_count());
                let bytes = cache.weighted_size();
                assert!(bytes <= 64 << 10, "{bytes} bytes");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for key in keys.iter() {
        cache.forget(key, true).await.unwrap();
    }
    assert_eq!(cache.entry_count(), 0);
    assert_eq!(cache.weighted_size(), 0);
}
