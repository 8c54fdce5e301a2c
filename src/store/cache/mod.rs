//! [`ReplayCache`]: completed records kept in process, in front of any store, so that a replay
//! costs no store call.

mod shard;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use self::shard::{Cached, Inner, SHARDS, Write, weight};
use super::{
    Begin, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, Settled, StoreError,
};
use crate::fingerprint::Fingerprint;
use crate::stored::StoredResponse;

/// The default bound on cached records.
const DEFAULT_MAX_ENTRIES: usize = 10_000;
/// The default bound on the bytes of cached records.
const DEFAULT_MAX_BYTES: usize = 64 << 20;
/// The default longest life of a cached record.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

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
    /// or `max_age` is zero or longer than a year.
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
        // Longer ages overflow the clock's arithmetic, and no cache should replay that long.
        assert!(
            self.max_age <= Duration::from_secs(365 * 24 * 3600),
            "ReplayCache: max_age must be at most a year"
        );
        let inner = Inner::new(self.max_entries, self.max_bytes, self.max_age);
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
        self.inner.entry_count()
    }

    /// The estimated bytes of the cached records.
    pub fn weighted_size(&self) -> usize {
        self.inner.weighted_size()
    }
}

impl<S: IdempotencyStore> IdempotencyStore for ReplayCache<S> {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let hash = self.inner.hash(key);
        let stamp = match self.inner.answer(hash, key, fingerprint) {
            Ok(answer) => return Ok(answer),
            Err(stamp) => stamp,
        };
        let begin = self.store.begin(key, fingerprint, lease).await?;
        match &begin {
            Begin::Acquired(token) => self.inner.hold(hash, *token, *fingerprint),
            Begin::Completed(response) => {
                let cached = Cached {
                    fingerprint: *fingerprint,
                    response: response.clone(),
                    expires_at: Instant::now() + self.inner.max_age,
                    size: weight(key, response),
                };
                // A replay may be of an old record: it never takes the place of an entry.
                self.inner.insert(hash, key, cached, stamp, Write::IfAbsent);
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
        let hash = self.inner.hash(key);
        let (fingerprint, stamp) = self.inner.unhold(hash, token);
        let size = weight(key, &response);
        let cached = fingerprint.map(|fingerprint| Cached {
            fingerprint,
            response: response.clone(),
            expires_at: started + ttl.min(self.inner.max_age),
            size,
        });
        self.store.complete(key, token, response, ttl).await?;
        if let Some(cached) = cached {
            self.inner.insert(hash, key, cached, stamp, Write::Replace);
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let _ = self.inner.unhold(self.inner.hash(key), token);
        self.store.release(key, token).await
    }

    fn lookup(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<RecordInfo>, StoreError>> + Send {
        self.store.lookup(key)
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let hash = self.inner.hash(key);
        self.inner.forget(hash, key);
        let forgotten = self.store.forget(key, force).await;
        // Again: a replay may have cached the record while the store was removing it. A store
        // call still under way keeps what it read out of the cache (its stamp is older).
        self.inner.forget(hash, key);
        forgotten
    }

    async fn settle(&self, key: &RecordKey, token: LockToken) -> Result<Settled, StoreError> {
        // Completed in a transaction, the response never passed through here: the cache
        // learns it from the first replay.
        let _ = self.inner.unhold(self.inner.hash(key), token);
        self.store.settle(key, token).await
    }

    #[cfg(any(feature = "postgres", feature = "sqlx"))]
    fn claim_target(&self) -> Option<crate::store::ClaimTarget> {
        self.store.claim_target()
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
