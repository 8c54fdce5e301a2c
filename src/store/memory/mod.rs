//! [`MemoryStore`]: a sharded in-memory store for a single server.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use foldhash::fast::SeedableRandomState;
use tokio::time::Instant;

use super::util::{KeepRunning, map_hasher, random_u64};
use super::{LockToken, RecordKey};

mod builder;
mod calls;
mod expiries;
mod shard;
mod snapshot;
#[cfg(test)]
mod tenant_tests;
mod tenants;
#[cfg(test)]
mod tests;
mod upkeep;

#[cfg(test)]
use builder::{DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES};
pub use builder::{MemoryStoreBuilder, MemoryStoreSettings};
use shard::Shard;
pub use snapshot::{SnapshotLoad, SnapshotStatus};
#[cfg(feature = "tracing")]
use upkeep::Report;
use upkeep::prune_periodically;

/// A moment on the store's clock: nanoseconds since the store was built.
type Nanos = u64;

/// The most shards a store has. Each shard is a lock, a hash table, an expiry queue and a share
/// of the bounds; more shards mean less contention between threads and shorter pauses when a
/// table grows, fewer mean less memory that a request finds cold in the CPU's caches (a new
/// key touches its shard's lock, lists and queues).
const MAX_SHARDS: usize = 256;
/// Shards per thread of the machine ([`std::thread::available_parallelism`]), and the fewest a
/// store that the bounds allow more has: on two threads, 32 shards cost a new key about 1 µs
/// less than 256 did, under the same load (BENCHMARKS.md).
const SHARDS_PER_THREAD: usize = 8;
const MIN_SHARDS: usize = 32;
/// The fewest records and bytes a shard's share of the bounds allows. A store whose bounds are
/// below twice these is one shard: its bounds, its evictions (nearest expiry first) and its
/// refusals are exactly the store's. A larger one is split into shares large enough that keys
/// spread by hash fill them within a percent or two of each other: a shard makes room within its
/// own share, so eviction begins that much before the whole bound.
const MIN_SHARD_ENTRIES: usize = 16 * 1024;
const MIN_SHARD_BYTES: usize = 32 << 20;
/// The smallest share of the bound on one tenant's records a shard has, when the bound allows
/// it: the shares of a tenant's records even out across shards, so that it is not held to a
/// share much smaller than its fair part of the bound.
const MIN_SHARD_TENANT_ENTRIES: usize = 64;
/// How many expired records the pruner removes before it lets go of a shard's lock.
const PRUNE_BATCH: usize = 4096;

/// An in-memory [`IdempotencyStore`](super::IdempotencyStore) for a single server: a sharded
/// map, atomic per record key.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// // The defaults:
/// let layer = IdempotencyLayer::new(MemoryStore::new());
/// // Other settings, from the builder:
/// let store = MemoryStore::builder()
///     .max_entries(200_000)
///     .max_bytes(256 << 20)
///     .cleanup_interval(Duration::from_secs(30))
///     .build();
/// # let _ = (layer, store);
/// ```
///
/// - An expired record is invisible at once: `begin` treats it as absent.
/// - Expired records are pruned by a background task (every 60 seconds by default,
///   [`cleanup_interval`](MemoryStoreBuilder::cleanup_interval)), which holds only a weak
///   reference to the store and ends when the store is dropped, and only then. It starts on
///   first use, on the Tokio runtime of that call. Each shard keeps its completed records in
///   order of expiry, so pruning and making room never scan the whole store.
/// - The store holds at most [`max_entries`](MemoryStoreBuilder::max_entries) records
///   (1,000,000 by default) and about [`max_bytes`](MemoryStoreBuilder::max_bytes) bytes of
///   keys and stored responses (1 GiB by default). When it is full, a new key makes room: the
///   completed records nearest their expiry (the least likely to be retried) are dropped,
///   counted by [`evicted`](Self::evicted), by the `idempotency_evicted_total` metric (feature
///   `metrics`) and, at most every 10 seconds, by a `tracing` warning (feature `tracing`). A
///   retry of a dropped record runs the handler again. An in-flight record is never dropped:
///   only when in-flight records alone fill the store is a new key refused, with
///   [`StoreErrorKind::CapacityExceeded`](super::StoreErrorKind::CapacityExceeded), which the
///   layer answers with `503` and `Retry-After`.
/// - While the store has room, no tenant is bounded: one tenant alone can fill it. Once it is
///   full, each tenant has a share,
///   [`max_entries_per_tenant`](MemoryStoreBuilder::max_entries_per_tenant) (an eighth of
///   `max_entries` by default, at least 1), and the same part of `max_bytes`: dead records go
///   first, then a tenant at its share of either or over it makes room from its own completed
///   records first, and a tenant within its share from those of the tenant that holds the most
///   of its share, while that one is over it; otherwise the store's nearest expiry goes. So one
///   caller's flood of keys, or of large responses, costs that caller alone.
/// - The bounds are shared evenly by the store's shards (eight per thread of the machine, at
///   least 32 and at most 256, each with a share of at least 16,384 records, 32 MiB and 64
///   records of a tenant); a key's shard makes room within its own share. A store whose bounds
///   are below twice a share (fewer than 32,768 records, or less than 64 MiB) is one shard: its
///   bounds and its eviction order are exact.
/// - Nothing is kept across a restart, unless the store has a
///   [`snapshot`](MemoryStoreBuilder::snapshot) file: then what the last snapshot held.
///
/// Cloning is cheap and shares the records. For a fleet of servers, use a shared store.
///
/// Its clock is Tokio's, so tests can use `tokio::time::pause` to expire records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Padded<RwLock<Shard>>]>,
    /// The shard of a hash is `(hash >> SHARD_SHIFT) & mask`: bits the tables do not use for
    /// their buckets (the low bits) nor for their tags (the top 7 bits).
    mask: u64,
    hasher: SeedableRandomState,
    /// What a lock token's high half is xored with: the hash of its record's key, which the
    /// calls that hold the token (renew, complete, release) read back rather than compute.
    token_key: u64,
    /// What the store was built from: its settings, and what rebuilds it.
    builder: MemoryStoreBuilder,
    settings: MemoryStoreSettings,
    pruner: KeepRunning,
    /// The store's time zero, and the wall-clock time then: a record's deadline read back by
    /// `lookup` is `wall_epoch + deadline`, the same at every call. Read at the store's first
    /// call rather than when it is built, so that it is on the clock of the runtime that uses
    /// the store (a paused test clock starts before a store built outside its runtime).
    epoch: OnceLock<(Instant, SystemTime)>,
    evicted: AtomicU64,
    #[cfg(feature = "tracing")]
    report: Report,
    /// The snapshot file, when the store keeps its records across a restart.
    snapshot: Option<snapshot::Snapshot>,
}

const SHARD_SHIFT: u32 = 40;

/// A shard on a cache line pair of its own, so that two threads working on neighbouring shards
/// do not contend for one line.
#[repr(align(128))]
struct Padded<T>(T);

impl MemoryStore {
    /// An empty store with the default settings: 1,000,000 records, 1 GiB, expired records
    /// pruned every 60 s. [`builder`](Self::builder) sets others.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::new();
    /// # let _ = store;
    /// ```
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// Settings for a store, with the defaults; [`build`](MemoryStoreBuilder::build) checks
    /// them and makes the store.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    ///
    /// let store = MemoryStore::builder()
    ///     .max_entries(100_000)
    ///     .cleanup_interval(Duration::from_secs(10))
    ///     .build();
    /// # let _ = store;
    /// ```
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    pub(super) fn with_builder(builder: MemoryStoreBuilder) -> Self {
        let settings = builder.settings();
        let per_tenant = settings.max_entries_per_tenant();
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let count = shard_count(
            settings.max_entries(),
            settings.max_bytes(),
            per_tenant,
            max_shards(threads),
        );
        let token_key = random_u64();
        let hasher = map_hasher();
        let shards = (0..count)
            .map(|i| {
                let entries = share(settings.max_entries(), count, i);
                let bytes = share(settings.max_bytes(), count, i);
                let tenant = share(per_tenant, count, i);
                let limits = shard::Limits {
                    len: entries,
                    bytes,
                    per_tenant: tenant,
                    capacity: share(settings.initial_capacity(), count, i),
                };
                let shard = Shard::new(limits, token_key, hasher.clone());
                Padded(RwLock::new(shard))
            })
            .collect();
        // A snapshot is read whole before it is cut to the bounds: one larger than this (from a
        // store with far larger bounds, or not one at all) would cost that much memory to read.
        let max_file = (settings.max_bytes() as u64)
            .saturating_mul(16)
            .saturating_add(1 << 20);
        let snapshot = builder
            .snapshot
            .clone()
            .map(|path| snapshot::Snapshot::open(path, max_file));
        Self {
            inner: Arc::new(Inner {
                snapshot,
                shards,
                mask: count as u64 - 1,
                hasher,
                token_key,
                builder,
                settings,
                pruner: KeepRunning::default(),
                epoch: OnceLock::new(),
                evicted: AtomicU64::new(0),
                #[cfg(feature = "tracing")]
                report: Report::default(),
            }),
        }
    }

    /// This store rebuilt with one setting changed, for the shorthands. Settings belong to a
    /// new store: once it is cloned or used, they cannot change.
    fn rebuild(
        self,
        name: &str,
        set: impl FnOnce(MemoryStoreBuilder) -> MemoryStoreBuilder,
    ) -> Self {
        let unused = Arc::strong_count(&self.inner) == 1
            && Arc::weak_count(&self.inner) == 0
            && self.inner.epoch.get().is_none();
        assert!(
            unused,
            "MemoryStore::{name} must be called on a new store, before it is cloned or used; \
             MemoryStore::builder() sets every option before the store exists"
        );
        set(self.inner.builder.clone()).build()
    }

    /// A shorthand for [`MemoryStore::builder`]`().max_entries(max).build()`, on a store just
    /// made: see [`MemoryStoreBuilder::max_entries`]. To set several options, use the builder.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// let store = MemoryStore::new().max_entries(100_000);
    /// assert_eq!(store.settings().max_entries(), 100_000);
    /// ```
    ///
    /// # Panics
    ///
    /// As [`MemoryStoreBuilder::build`] when `max` is 0, and if the store was already cloned or
    /// used.
    #[must_use]
    pub fn max_entries(self, max: usize) -> Self {
        self.rebuild("max_entries", |builder| builder.max_entries(max))
    }

    /// A shorthand for [`MemoryStore::builder`]`().max_bytes(max).build()`, on a store just
    /// made: see [`MemoryStoreBuilder::max_bytes`]. To set several options, use the builder.
    ///
    /// ```
    /// use tower_idempotency::MemoryStore;
    /// let store = MemoryStore::new().max_bytes(256 * 1024 * 1024);
    /// assert_eq!(store.settings().max_bytes(), 256 << 20);
    /// ```
    ///
    /// # Panics
    ///
    /// As [`MemoryStoreBuilder::build`] when `max` is 0, and if the store was already cloned or
    /// used.
    #[must_use]
    pub fn max_bytes(self, max: usize) -> Self {
        self.rebuild("max_bytes", |builder| builder.max_bytes(max))
    }

    /// What the store was built with.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_idempotency::MemoryStore;
    ///
    /// let store = MemoryStore::builder().cleanup_interval(Duration::from_secs(5)).build();
    /// assert_eq!(store.settings().cleanup_interval(), Duration::from_secs(5));
    /// ```
    pub fn settings(&self) -> MemoryStoreSettings {
        self.inner.settings
    }

    /// The number of records held, live or expired but not yet pruned.
    pub fn entry_count(&self) -> usize {
        self.inner.shards().map(|shard| read(shard).len()).sum()
    }

    /// `true` when the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.entry_count() == 0
    }

    /// How many records `tenant` holds, live or expired but not yet pruned, as counted against
    /// [`max_entries_per_tenant`](MemoryStoreBuilder::max_entries_per_tenant).
    ///
    /// ```
    /// use tower_idempotency::{MemoryStore, TenantId};
    /// assert_eq!(MemoryStore::new().tenant_entry_count(&TenantId::shared()), 0);
    /// ```
    pub fn tenant_entry_count(&self, tenant: &crate::tenant::TenantId) -> usize {
        self.inner
            .shards()
            .map(|shard| read(shard).tenant_len(tenant))
            .sum()
    }

    /// About how many bytes the records hold, as counted against
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes).
    pub fn weighted_size(&self) -> usize {
        self.inner.shards().map(|shard| read(shard).bytes()).sum()
    }

    /// How many completed records were dropped before their expiry to make room, since the
    /// store was built. A store that keeps evicting needs a larger
    /// [`max_entries`](MemoryStoreBuilder::max_entries) or
    /// [`max_bytes`](MemoryStoreBuilder::max_bytes), or a shorter TTL.
    pub fn evicted(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }

    /// Removes every expired record now; returns how many were removed.
    pub fn prune(&self) -> usize {
        self.inner.prune(self.inner.now()) as usize
    }

    #[inline]
    fn ensure_tasks(&self) {
        let inner = &self.inner;
        inner
            .pruner
            .start(|| prune_periodically(Arc::downgrade(inner), inner.settings.cleanup_interval()));
        if let Some(snapshot) = &inner.snapshot {
            let period = inner.settings.snapshot_interval();
            snapshot
                .task
                .start(|| snapshot::save_periodically(Arc::downgrade(inner), period));
        }
    }
}

/// The most shards a store has on a machine of `threads` threads: [`SHARDS_PER_THREAD`] each,
/// a power of two from [`MIN_SHARDS`] to [`MAX_SHARDS`].
fn max_shards(threads: usize) -> usize {
    threads
        .saturating_mul(SHARDS_PER_THREAD)
        .clamp(MIN_SHARDS, MAX_SHARDS)
        .next_power_of_two()
}

/// How many shards a store of these bounds has: a power of two, at most `max`, each with a
/// share of at least [`MIN_SHARD_ENTRIES`], [`MIN_SHARD_BYTES`] and
/// [`MIN_SHARD_TENANT_ENTRIES`] when the bounds allow it.
fn shard_count(max_entries: usize, max_bytes: usize, max_per_tenant: usize, max: usize) -> usize {
    let by_entries = max_entries / MIN_SHARD_ENTRIES;
    let by_bytes = max_bytes / MIN_SHARD_BYTES;
    let by_tenant = max_per_tenant / MIN_SHARD_TENANT_ENTRIES;
    let count = by_entries.min(by_bytes).min(by_tenant).clamp(1, max);
    // The largest power of two not above `count`.
    1 << count.ilog2()
}

/// Shard `i`'s share of `total` split `count` ways; the shares add up to `total`.
fn share(total: usize, count: usize, i: usize) -> usize {
    total / count + usize::from(i < total % count)
}

use super::util::{read, write};

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> Nanos {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Inner {
    fn now(&self) -> Nanos {
        let now = Instant::now();
        let &(epoch, wall) = self.epoch.get_or_init(|| (now, SystemTime::now()));
        let now = nanos(now.saturating_duration_since(epoch));
        // The records read from a snapshot enter at the first use, once the clock has started;
        // every caller waits for them. No caller holds a shard's lock here.
        if let Some(snapshot) = &self.snapshot {
            snapshot
                .restored
                .get_or_init(|| self.restore(snapshot, now, wall));
        }
        now
    }

    /// The wall-clock time at the store's time zero.
    fn wall_epoch(&self) -> SystemTime {
        let _ = self.now();
        self.epoch
            .get()
            .map_or_else(SystemTime::now, |&(_, wall)| wall)
    }

    fn shards(&self) -> impl Iterator<Item = &RwLock<Shard>> {
        self.shards.iter().map(|padded| &padded.0)
    }

    /// The hash of `key` in the store's tables: 8 bytes of the tenant (a SHA-256 digest
    /// already) as one word, and the key's bytes. The word waits in the hasher's buffer and is
    /// folded in once, at the end, with the key's hash: one pass over bytes rather than two.
    fn hash(&self, key: &RecordKey) -> u64 {
        super::util::record_hash(&self.hasher, key)
    }

    /// The hash of the record `token` was handed out for, if the store handed it out.
    fn token_hash(&self, token: LockToken) -> u64 {
        (token.as_u128() >> 64) as u64 ^ self.token_key
    }

    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[((hash >> SHARD_SHIFT) & self.mask) as usize].0
    }

    fn prune(&self, now: Nanos) -> u64 {
        let mut removed = 0;
        for shard in self.shards() {
            // In batches, so that requests on this shard wait for one batch at most.
            loop {
                let (count, more) = write(shard).prune(now, PRUNE_BATCH);
                removed += count;
                if !more {
                    break;
                }
            }
        }
        removed
    }

    /// Counts records dropped early, for the accessor, the metric and the log.
    fn evicted(&self, count: u64, now: Nanos) {
        self.evicted.fetch_add(count, Ordering::Relaxed);
        crate::metrics::evicted(count);
        #[cfg(feature = "tracing")]
        self.report
            .evicted(count, now, self.evicted.load(Ordering::Relaxed));
        #[cfg(not(feature = "tracing"))]
        let _ = now;
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
            .field("entry_count", &self.entry_count())
            .field("weighted_size", &self.weighted_size())
            .field("evicted", &self.evicted())
            .field("settings", &self.inner.settings)
            .field("snapshot", &self.snapshot_path())
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}
