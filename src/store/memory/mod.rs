//! [`MemoryStore`]: a sharded in-memory store for a single server.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use tokio::time::Instant;

use super::background::StartOnce;
use super::{Begin, IdempotencyStore, LockToken, RecordKey, StoreError};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;

/// The default bound on records, live or expired but not yet pruned.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// The default bound on the bytes held by records (keys, stored headers and bodies, and a fixed
/// estimate of each record's own overhead).
pub(crate) const DEFAULT_MAX_BYTES: usize = 1 << 30;
/// The estimated bytes a record takes besides its key and response: the map entry, the record,
/// the stored response's allocation and the header map's table.
const RECORD_OVERHEAD: usize = 256;
/// The estimated bytes a stored header takes besides its name and value.
const HEADER_OVERHEAD: usize = 32;
/// The default period of the background pruning of expired records.
pub(crate) const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// When the store is full, expired records are pruned on demand at most this often, so a flood
/// of new keys against a full store cannot turn every request into a full scan.
const MIN_PRUNE_GAP: Duration = Duration::from_millis(500);

/// An in-memory [`IdempotencyStore`] for a single server: a sharded concurrent map, atomic per
/// record key.
///
/// - An expired record is invisible at once: `begin` treats it as absent.
/// - Expired records are pruned by a background task (every 60 seconds by default), which holds
///   only a weak reference to the store and ends when the store is dropped. It starts on first
///   use, on the Tokio runtime of that call.
/// - The store holds at most [`max_entries`](Self::max_entries) records (1,000,000 by default)
///   and about [`max_bytes`](Self::max_bytes) bytes of keys and stored responses (1 GiB by
///   default). When it is full, expired records are pruned at once; if it is still full, a new
///   key is
///   refused with [`StoreErrorKind::CapacityExceeded`](crate::StoreErrorKind::CapacityExceeded),
///   which the layer answers with `503` and `Retry-After`. A live record is never evicted:
///   that would let a retry run the handler a second time.
///
/// Cloning is cheap and shares the records. For a fleet of servers, use a shared store.
///
/// Its clock is Tokio's, so tests can use `tokio::time::pause` to expire records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: DashMap<RecordKey, Record>,
    len: AtomicUsize,
    bytes: AtomicUsize,
    max_entries: AtomicUsize,
    max_bytes: AtomicUsize,
    prune_interval_ms: AtomicU64,
    pruner: StartOnce,
    /// Milliseconds from `epoch` to the last on-demand prune.
    last_prune_ms: AtomicU64,
    epoch: Instant,
}

struct Record {
    fingerprint: Fingerprint,
    state: State,
    /// The bytes this record counts for in the store's budget.
    size: usize,
}

enum State {
    InFlight {
        token: LockToken,
        lease_until: Instant,
    },
    Completed {
        response: StoredResponse,
        expires_at: Instant,
    },
}

impl Record {
    fn in_flight(
        key: &RecordKey,
        fingerprint: Fingerprint,
        token: LockToken,
        lease_until: Instant,
    ) -> Self {
        Self {
            fingerprint,
            state: State::InFlight { token, lease_until },
            size: RECORD_OVERHEAD + key.key().len(),
        }
    }

    fn completed_size(key: &RecordKey, response: &StoredResponse) -> usize {
        let headers: usize = response
            .header_list()
            .iter()
            .map(|(name, value)| HEADER_OVERHEAD + name.as_str().len() + value.len())
            .sum();
        RECORD_OVERHEAD + key.key().len() + headers + response.body().len()
    }

    /// A record is live while its lease (in flight) or its TTL (completed) lasts.
    fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            State::InFlight { lease_until, .. } => *lease_until > now,
            State::Completed { expires_at, .. } => *expires_at > now,
        }
    }

    /// What `begin` answers for a live record.
    fn decide(&self, fingerprint: &Fingerprint) -> Begin {
        if self.fingerprint != *fingerprint {
            return Begin::Mismatch;
        }
        match &self.state {
            State::InFlight { .. } => Begin::InFlight,
            State::Completed { response, .. } => Begin::Completed(response.clone()),
        }
    }

    fn held_by(&self, token: LockToken) -> bool {
        matches!(self.state, State::InFlight { token: held, .. } if held == token)
    }
}

impl MemoryStore {
    /// An empty store with the default bound (1,000,000 records) and pruning period (60 s).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                map: DashMap::new(),
                len: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_entries: AtomicUsize::new(DEFAULT_MAX_ENTRIES),
                max_bytes: AtomicUsize::new(DEFAULT_MAX_BYTES),
                prune_interval_ms: AtomicU64::new(DEFAULT_PRUNE_INTERVAL.as_millis() as u64),
                pruner: StartOnce::default(),
                last_prune_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// The most records the store holds; past it, new keys are refused (`503`).
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// let store = MemoryStore::new().max_entries(100_000);
    /// ```
    #[must_use]
    pub fn max_entries(self, max: usize) -> Self {
        self.inner.max_entries.store(max, Ordering::Relaxed);
        self
    }

    /// About how many bytes of keys and stored responses the store holds (with a fixed estimate
    /// per record and per header for their own overhead); past it, new keys are refused (`503`).
    /// A response completing while the store is full is still stored, so the bound can be
    /// passed by the responses of the requests already in flight.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// let store = MemoryStore::new().max_bytes(256 * 1024 * 1024);
    /// ```
    #[must_use]
    pub fn max_bytes(self, max: usize) -> Self {
        self.inner.max_bytes.store(max, Ordering::Relaxed);
        self
    }

    /// About how many bytes the records hold, as counted against
    /// [`max_bytes`](Self::max_bytes).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// How often the background task prunes expired records. Takes effect if set before the
    /// store's first use.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    /// let store = MemoryStore::new().prune_interval(Duration::from_secs(10));
    /// ```
    #[must_use]
    pub fn prune_interval(self, interval: Duration) -> Self {
        let ms = interval.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
        self.inner.prune_interval_ms.store(ms, Ordering::Relaxed);
        self
    }

    /// The number of records held, live or expired but not yet pruned.
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// `true` when the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes every expired record now; returns how many were removed.
    pub fn prune(&self) -> usize {
        self.inner.prune(Instant::now())
    }

    fn ensure_pruner(&self) {
        let inner = &self.inner;
        inner.pruner.start(|| {
            let period = Duration::from_millis(inner.prune_interval_ms.load(Ordering::Relaxed));
            prune_periodically(Arc::downgrade(inner), period)
        });
    }
}

/// The background pruner: it holds only a weak reference, so it ends at its first tick after
/// the store is dropped.
async fn prune_periodically(store: Weak<Inner>, period: Duration) {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        inner.prune(Instant::now());
    }
}

impl Inner {
    fn prune(&self, now: Instant) -> usize {
        let (mut removed, mut bytes) = (0, 0);
        self.map.retain(|_, record| {
            let live = record.is_live(now);
            if !live {
                removed += 1;
                bytes += record.size;
            }
            live
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        removed
    }

    fn is_full(&self) -> bool {
        self.len.load(Ordering::Relaxed) >= self.max_entries.load(Ordering::Relaxed)
            || self.bytes.load(Ordering::Relaxed) >= self.max_bytes.load(Ordering::Relaxed)
    }

    /// Moves the byte count from a record's old size to its new one.
    fn resize(&self, old: usize, new: usize) {
        if new >= old {
            self.bytes.fetch_add(new - old, Ordering::Relaxed);
        } else {
            self.bytes.fetch_sub(old - new, Ordering::Relaxed);
        }
    }

    /// Prunes when the store is full, at most once per [`MIN_PRUNE_GAP`].
    fn prune_if_full(&self, now: Instant) {
        if !self.is_full() {
            return;
        }
        let now_ms = now.duration_since(self.epoch).as_millis() as u64;
        let last = self.last_prune_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= MIN_PRUNE_GAP.as_millis() as u64;
        if due
            && self
                .last_prune_ms
                .compare_exchange(last, now_ms.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.prune(now);
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("len", &self.len())
            .field(
                "max_entries",
                &self.inner.max_entries.load(Ordering::Relaxed),
            )
            .field("bytes", &self.bytes())
            .field("max_bytes", &self.inner.max_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_pruner();
        let inner = &*self.inner;
        let now = Instant::now();
        // Replays, 409 and 422 only read: a shared lock, and no copy of the key.
        if let Some(record) = inner.map.get(key) {
            if record.is_live(now) {
                return Ok(record.decide(fingerprint));
            }
        }
        inner.prune_if_full(now);
        let token = LockToken::random();
        let fresh = Record::in_flight(key, *fingerprint, token, now + lease);
        // The entry holds the shard's write lock: the decision and the write are one step.
        match inner.map.entry(key.clone()) {
            MapEntry::Occupied(mut entry) => {
                if entry.get().is_live(now) {
                    return Ok(entry.get().decide(fingerprint));
                }
                // Expired, or in flight with its holder gone: the key is free again.
                inner.resize(entry.get().size, fresh.size);
                entry.insert(fresh);
            }
            MapEntry::Vacant(entry) => {
                let max = inner.max_entries.load(Ordering::Relaxed);
                let over_bytes =
                    inner.bytes.load(Ordering::Relaxed) >= inner.max_bytes.load(Ordering::Relaxed);
                if inner.len.fetch_add(1, Ordering::Relaxed) >= max || over_bytes {
                    inner.len.fetch_sub(1, Ordering::Relaxed);
                    return Err(StoreError::capacity_exceeded());
                }
                inner.bytes.fetch_add(fresh.size, Ordering::Relaxed);
                entry.insert(fresh);
            }
        }
        Ok(Begin::Acquired(token))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        match self.inner.map.get_mut(key) {
            Some(mut record) if record.held_by(token) => {
                record.state = State::InFlight {
                    token,
                    lease_until: Instant::now() + lease,
                };
                Ok(())
            }
            _ => Err(StoreError::lease_lost()),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        match self.inner.map.get_mut(key) {
            Some(mut record) if record.held_by(token) => {
                let size = Record::completed_size(key, &response);
                self.inner.resize(record.size, size);
                record.size = size;
                record.state = State::Completed {
                    response,
                    expires_at: Instant::now() + ttl,
                };
                Ok(())
            }
            _ => Err(StoreError::lease_lost()),
        }
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        match self
            .inner
            .map
            .remove_if(key, |_, record| record.held_by(token))
        {
            Some((_, record)) => {
                self.inner.len.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(record.size, Ordering::Relaxed);
                Ok(())
            }
            None => Err(StoreError::lease_lost()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn key(k: &str) -> RecordKey {
        RecordKey::new(TenantId::shared(), k)
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    fn response() -> StoredResponse {
        StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"))
    }

    const LEASE: Duration = Duration::from_secs(10);
    const TTL: Duration = Duration::from_secs(100);

    async fn acquire(store: &MemoryStore, k: &str, n: u8) -> LockToken {
        match store.begin(&key(k), &fp(n), LEASE).await.unwrap() {
            Begin::Acquired(token) => token,
            other => panic!("expected Acquired, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_are_invisible_at_once() {
        let store = MemoryStore::new();
        let token = acquire(&store, "a", 1).await;
        store
            .complete(&key("a"), token, response(), TTL)
            .await
            .unwrap();
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert!(matches!(
            store.begin(&key("a"), &fp(2), LEASE).await.unwrap(),
            Begin::Mismatch
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        // Expired but not yet pruned: a new request takes the key, even a different one.
        assert_eq!(store.len(), 1);
        acquire(&store, "a", 2).await;
        assert_eq!(store.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn renew_release_and_fencing() {
        let store = MemoryStore::new();
        let token = acquire(&store, "a", 1).await;
        tokio::time::advance(LEASE / 2).await;
        store.renew(&key("a"), token, LEASE).await.unwrap();
        tokio::time::advance(LEASE / 2 + LEASE / 4).await;
        assert!(matches!(
            store.begin(&key("a"), &fp(1), LEASE).await.unwrap(),
            Begin::InFlight
        ));
        tokio::time::advance(LEASE).await;
        let taken = acquire(&store, "a", 1).await;
        for result in [
            store.renew(&key("a"), token, LEASE).await,
            store.complete(&key("a"), token, response(), TTL).await,
            store.release(&key("a"), token).await,
        ] {
            assert_eq!(result.unwrap_err().kind(), crate::StoreErrorKind::LeaseLost);
        }
        store.release(&key("a"), taken).await.unwrap();
        assert!(store.is_empty());
        assert_eq!(
            store.release(&key("a"), taken).await.unwrap_err().kind(),
            crate::StoreErrorKind::LeaseLost
        );
        // A completed record cannot be released.
        let token = acquire(&store, "b", 1).await;
        store
            .complete(&key("b"), token, response(), TTL)
            .await
            .unwrap();
        assert!(store.release(&key("b"), token).await.is_err());
        assert!(matches!(
            store.begin(&key("b"), &fp(1), LEASE).await.unwrap(),
            Begin::Completed(r) if r.body() == "ok"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_pruner_prunes_and_ends_with_the_store() {
        let store = MemoryStore::new().prune_interval(Duration::from_secs(5));
        let token = acquire(&store, "a", 1).await;
        store
            .complete(&key("a"), token, response(), Duration::from_secs(1))
            .await
            .unwrap();
        acquire(&store, "b", 1).await; // in flight, lease 10 s
        assert_eq!(store.len(), 2);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(store.len(), 1, "the expired completed record was pruned");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(store.is_empty(), "the dead in-flight record was pruned");

        let weak = Arc::downgrade(&store.inner);
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1, "the pruner is running");
        drop(store);
        assert!(
            weak.upgrade().is_none(),
            "the pruner holds no strong reference"
        );
        tokio::time::sleep(Duration::from_secs(6)).await;
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 0, "the pruner ended with the store");
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_refuses_new_keys_and_is_given_back() {
        let store = MemoryStore::new().max_bytes(10_000);
        let body = Bytes::from(vec![0; 9_600]);
        let big = StoredResponse::new(StatusCode::OK, HeaderMap::new(), body);
        let token = acquire(&store, "a", 1).await;
        assert_eq!(store.bytes(), RECORD_OVERHEAD + 1);
        let ttl = Duration::from_secs(1);
        store.complete(&key("a"), token, big, ttl).await.unwrap();
        assert_eq!(store.bytes(), RECORD_OVERHEAD + 1 + 9_600);
        let token = acquire(&store, "b", 1).await;
        store
            .complete(&key("b"), token, response(), TTL)
            .await
            .unwrap();
        // Over the budget: a new key is refused, known keys still answer.
        let err = store.begin(&key("c"), &fp(1), LEASE).await.unwrap_err();
        assert_eq!(err.kind(), crate::StoreErrorKind::CapacityExceeded);
        let known = store.begin(&key("b"), &fp(1), LEASE).await.unwrap();
        assert!(matches!(known, Begin::Completed(_)));
        // Once "a" expires, pruning on demand gives its bytes back.
        tokio::time::advance(Duration::from_secs(2)).await;
        acquire(&store, "c", 1).await;
        let b = Record::completed_size(&key("b"), &response());
        assert_eq!(store.bytes(), b + RECORD_OVERHEAD + 1);
        assert_eq!(store.len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_bound_holds_under_concurrent_inserts() {
        let store = MemoryStore::new().max_entries(100);
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.begin(&key(&i.to_string()), &fp(1), LEASE).await })
            })
            .collect();
        let mut acquired = 0;
        let mut refused = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(Begin::Acquired(_)) => acquired += 1,
                Err(e) if e.kind() == crate::StoreErrorKind::CapacityExceeded => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(acquired, 100);
        assert_eq!(refused, 900);
        assert_eq!(store.len(), 100);
    }
}
