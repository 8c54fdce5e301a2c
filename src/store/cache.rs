//! [`ReplayCache`]: completed records kept in process, in front of any store, so that a replay
//! costs no store call.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::{Begin, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;

/// The default bound on cached records.
const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The default bound on the bytes of cached records.
const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// The default longest life of a cached record.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);
/// The estimated bytes of an entry besides its key and response.
const ENTRY_OVERHEAD: usize = 160;
const SHARDS: usize = 16;

/// An in-process cache of completed records in front of any [`IdempotencyStore`]: a replay
/// it holds costs no store call.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore, ReplayCache};
///
/// // In front of a shared store (RedisStore, PostgresStore or your own) in a real fleet.
/// let store = ReplayCache::builder()
///     .max_entries(50_000)
///     .max_bytes(128 << 20)
///     .max_age(Duration::from_secs(30))
///     .build(MemoryStore::new());
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// ```
///
/// # What it keeps
///
/// Only completed records: the response that this process completed (from `complete`), or that
/// the store answered a replay with (from `begin`). Never in-flight state: `begin` goes to the
/// store for every key the cache does not hold as completed, so a `409`, a take-over and the
/// first run are always decided by the store, atomically, for the whole fleet. A cached
/// record answers `begin` by itself: the same fingerprint replays, a different one is
/// `422` (the key is bound to its first request while the record lives).
///
/// To cache what it completes, the cache remembers the fingerprint of each key this process
/// holds, from `begin` until `complete` or `release`; it never answers from it.
///
/// # How long
///
/// An entry lives no longer than [`max_age`](ReplayCacheBuilder::max_age) (60 s by default)
/// and, for a record this process completed, no longer than its TTL. A record learned from a
/// replay is kept for `max_age`: the store does not say how long it still lives, so such an
/// entry can outlive the stored record by up to `max_age` (a retry in the last minute of a
/// record's 24-hour TTL may still be replayed during the next minute).
///
/// A record removed on the store by another process (an operator's
/// [`forget`](IdempotencyStore::forget) on another server, a purge in the database) keeps
/// replaying from this cache for at most `max_age`; a `forget` through this cache drops its
/// entry at once. Keep `max_age` short where operators purge keys for clients to retry.
///
/// # Bounds
///
/// At most [`max_entries`](ReplayCacheBuilder::max_entries) records (10,000 by default) and
/// about [`max_bytes`](ReplayCacheBuilder::max_bytes) bytes of keys and responses (64 MiB by
/// default). When full, the oldest entries make room: dropping one costs a store call on its
/// next replay, never a second run. A response larger than a sixteenth of `max_bytes` is not
/// cached.
///
/// Cloning is cheap and shares the cache.
pub struct ReplayCache<S> {
    store: S,
    inner: Arc<Inner>,
}

/// Settings of a [`ReplayCache`], checked by [`build`](Self::build).
#[derive(Debug, Clone)]
#[must_use]
pub struct ReplayCacheBuilder {
    max_entries: usize,
    max_bytes: usize,
    max_age: Duration,
}

struct Inner {
    max_age: Duration,
    /// Per shard.
    max_entries: usize,
    /// Per shard.
    max_bytes: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

#[derive(Default)]
struct Shard {
    records: HashMap<RecordKey, Cached>,
    /// Keys in the order they were cached, with the generation that was cached: the front is
    /// dropped first. A key replaced or removed since leaves a stale entry, skipped.
    order: VecDeque<(RecordKey, u64)>,
    /// The fingerprint of each key this process holds, by its lock token.
    held: HashMap<LockToken, (Fingerprint, Instant)>,
    bytes: usize,
    generation: u64,
}

struct Cached {
    fingerprint: Fingerprint,
    response: StoredResponse,
    expires_at: Instant,
    size: usize,
    generation: u64,
}

impl Default for ReplayCacheBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

impl ReplayCacheBuilder {
    /// The most records cached. Default: 10,000.
    ///
    /// ```
    /// let builder = tower_idempotency::ReplayCache::builder().max_entries(100_000);
    /// # let _ = builder;
    /// ```
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// About the most bytes of keys and responses cached. Default: 64 MiB.
    ///
    /// ```
    /// let builder = tower_idempotency::ReplayCache::builder().max_bytes(256 << 20);
    /// # let _ = builder;
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The longest an entry lives, whatever the record's TTL. Default: 60 s. It bounds how
    /// long a record removed on the store by another process keeps replaying here.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = tower_idempotency::ReplayCache::builder().max_age(Duration::from_secs(10));
    /// # let _ = builder;
    /// ```
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The cache, in front of `store`.
    ///
    /// # Panics
    ///
    /// If `max_entries` is smaller than 16 (one per shard), `max_bytes` smaller than 64 KiB,
    /// or `max_age` is zero.
    pub fn build<S: IdempotencyStore>(self, store: S) -> ReplayCache<S> {
        assert!(
            self.max_entries >= SHARDS,
            "ReplayCache: max_entries must be at least {SHARDS}"
        );
        assert!(
            self.max_bytes >= 64 << 10,
            "ReplayCache: max_bytes must be at least 64 KiB"
        );
        assert!(
            !self.max_age.is_zero(),
            "ReplayCache: max_age must be longer than zero"
        );
        let inner = Inner {
            max_age: self.max_age,
            max_entries: self.max_entries / SHARDS,
            max_bytes: self.max_bytes / SHARDS,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        };
        ReplayCache {
            store,
            inner: Arc::new(inner),
        }
    }
}

impl<S: IdempotencyStore> ReplayCache<S> {
    /// The cache with its default settings, in front of `store`.
    ///
    /// ```
    /// use tower_idempotency::{MemoryStore, ReplayCache};
    ///
    /// let store = ReplayCache::new(MemoryStore::new());
    /// # let _ = store;
    /// ```
    pub fn new(store: S) -> Self {
        ReplayCacheBuilder::default().build(store)
    }
}

impl ReplayCache<()> {
    /// Settings for a cache, with the defaults.
    pub fn builder() -> ReplayCacheBuilder {
        ReplayCacheBuilder::default()
    }
}

impl<S> ReplayCache<S> {
    /// The store behind the cache.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The number of cached records, expired ones not yet dropped included.
    pub fn entry_count(&self) -> usize {
        self.inner.shards().map(|s| s.records.len()).sum()
    }

    /// The estimated bytes of the cached records.
    pub fn weighted_size(&self) -> usize {
        self.inner.shards().map(|s| s.bytes).sum()
    }
}

impl Inner {
    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn shards(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock)
    }

    /// The answer of a cached, live record of `key`.
    fn answer(&self, key: &RecordKey, fingerprint: &Fingerprint) -> Option<Begin> {
        let mut shard = self.shard(key);
        let cached = shard.records.get(key)?;
        if cached.expires_at <= Instant::now() {
            shard.remove(key);
            return None;
        }
        Some(if cached.fingerprint == *fingerprint {
            Begin::Completed(cached.response.clone())
        } else {
            Begin::Mismatch
        })
    }

    fn insert(&self, key: &RecordKey, cached: Cached) {
        if cached.size > self.max_bytes {
            return;
        }
        let mut shard = self.shard(key);
        shard.insert(key.clone(), cached, self.max_entries, self.max_bytes);
    }

    fn hold(&self, key: &RecordKey, token: LockToken, fingerprint: Fingerprint) {
        let now = Instant::now();
        let max_age = self.max_age;
        let limit = self.max_entries;
        let mut shard = self.shard(key);
        if shard.held.len() >= limit {
            // Holders that never completed nor released (their task was cut short): forget the
            // long-gone ones; if it is still full, this record will not be cached on complete.
            shard
                .held
                .retain(|_, (_, since)| now.duration_since(*since) < max_age * 10);
            if shard.held.len() >= limit {
                return;
            }
        }
        shard.held.insert(token, (fingerprint, now));
    }

    fn unhold(&self, key: &RecordKey, token: LockToken) -> Option<Fingerprint> {
        self.shard(key).held.remove(&token).map(|(fp, _)| fp)
    }
}

impl Shard {
    fn remove(&mut self, key: &RecordKey) {
        if let Some(cached) = self.records.remove(key) {
            self.bytes -= cached.size;
        }
    }

    fn insert(&mut self, key: RecordKey, mut cached: Cached, max_entries: usize, max_bytes: usize) {
        self.generation += 1;
        cached.generation = self.generation;
        self.bytes += cached.size;
        self.order.push_back((key.clone(), cached.generation));
        match self.records.entry(key) {
            MapEntry::Occupied(mut entry) => {
                self.bytes -= entry.get().size;
                entry.insert(cached);
            }
            MapEntry::Vacant(entry) => {
                entry.insert(cached);
            }
        }
        while self.records.len() > max_entries || self.bytes > max_bytes {
            let Some((key, generation)) = self.order.pop_front() else {
                break;
            };
            if self
                .records
                .get(&key)
                .is_some_and(|c| c.generation == generation)
            {
                self.remove(&key);
            }
        }
        // Stale order entries (keys replaced or removed since) are dropped once they outnumber
        // the live ones.
        if self.order.len() > 2 * self.records.len() + SHARDS {
            let records = &self.records;
            self.order.retain(|(key, generation)| {
                records
                    .get(key)
                    .is_some_and(|c| c.generation == *generation)
            });
        }
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard leaves it consistent enough: at worst a byte count off.
    shard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The estimated bytes of a cached record.
fn weight(key: &RecordKey, response: &StoredResponse) -> usize {
    let headers: usize = response
        .header_list()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    ENTRY_OVERHEAD + key.key().len() + headers + response.body().len()
}

impl<S: IdempotencyStore> IdempotencyStore for ReplayCache<S> {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        if let Some(answer) = self.inner.answer(key, fingerprint) {
            return Ok(answer);
        }
        let begin = self.store.begin(key, fingerprint, lease).await?;
        match &begin {
            Begin::Acquired(token) => self.inner.hold(key, *token, *fingerprint),
            Begin::Completed(response) => {
                let cached = Cached {
                    fingerprint: *fingerprint,
                    response: response.clone(),
                    expires_at: Instant::now() + self.inner.max_age,
                    size: weight(key, response),
                    generation: 0,
                };
                self.inner.insert(key, cached);
            }
            Begin::InFlight | Begin::Mismatch => {}
        }
        Ok(begin)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.store.renew(key, token, lease)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // Counted from before the store wrote, so the entry never outlives the record.
        let started = Instant::now();
        let fingerprint = self.inner.unhold(key, token);
        let size = weight(key, &response);
        let cached = fingerprint.map(|fingerprint| Cached {
            fingerprint,
            response: response.clone(),
            expires_at: started + ttl.min(self.inner.max_age),
            size,
            generation: 0,
        });
        self.store.complete(key, token, response, ttl).await?;
        if let Some(cached) = cached {
            self.inner.insert(key, cached);
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.inner.unhold(key, token);
        self.store.release(key, token).await
    }

    fn lookup(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<RecordInfo>, StoreError>> + Send {
        self.store.lookup(key)
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        self.inner.shard(key).remove(key);
        let forgotten = self.store.forget(key, force).await;
        // Again: a replay may have cached the record while the store was removing it.
        self.inner.shard(key).remove(key);
        forgotten
    }
}

impl<S: Clone> Clone for ReplayCache<S> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ReplayCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayCache")
            .field("store", &self.store)
            .field("max_age", &self.inner.max_age)
            .field("max_entries", &(self.inner.max_entries * SHARDS))
            .field("max_bytes", &(self.inner.max_bytes * SHARDS))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn cached(size: usize) -> Cached {
        Cached {
            fingerprint: Fingerprint::from_bytes([0; 32]),
            response: StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new()),
            expires_at: Instant::now() + Duration::from_secs(60),
            size,
            generation: 0,
        }
    }

    fn key(n: usize) -> RecordKey {
        RecordKey::new(TenantId::shared(), n.to_string())
    }

    #[test]
    fn shards_keep_their_bounds_and_count_bytes_exactly() {
        let mut shard = Shard::default();
        for n in 0..100 {
            shard.insert(key(n), cached(10), 8, 1_000);
            assert!(shard.records.len() <= 8);
            let bytes: usize = shard.records.values().map(|c| c.size).sum();
            assert_eq!(shard.bytes, bytes);
        }
        // The oldest made room: the last eight remain.
        assert!((92..100).all(|n| shard.records.contains_key(&key(n))));

        // Replacing a key counts its bytes once; the stale order entry is skipped, then
        // compacted away.
        for _ in 0..100 {
            shard.insert(key(99), cached(20), 8, 1_000);
        }
        assert_eq!(shard.records.len(), 8);
        assert_eq!(shard.bytes, 7 * 10 + 20);
        assert!(shard.order.len() <= 2 * 8 + SHARDS);

        // By bytes.
        shard.insert(key(1000), cached(950), 8, 1_000);
        assert!(shard.bytes <= 1_000);
        assert!(shard.records.contains_key(&key(1000)));
        shard.remove(&key(1000));
        let bytes: usize = shard.records.values().map(|c| c.size).sum();
        assert_eq!(shard.bytes, bytes);
    }

    #[test]
    fn weights_count_key_headers_and_body() {
        let mut headers = HeaderMap::new();
        headers.insert("location", "/p/1".parse().unwrap());
        let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from_static(b"12345"));
        let key = RecordKey::new(TenantId::shared(), "abc");
        assert_eq!(
            weight(&key, &response),
            ENTRY_OVERHEAD + 3 + ("location".len() + 4 + 32) + 5
        );
    }
}
