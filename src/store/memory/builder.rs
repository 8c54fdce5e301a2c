//! [`MemoryStoreBuilder`]: a [`MemoryStore`]'s settings, checked once, in `build`.

use std::path::PathBuf;
use std::time::Duration;

use super::MemoryStore;

/// The default bound on records, live or expired but not yet pruned.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// The default bound on the bytes held by records (keys, stored headers and bodies, and a fixed
/// estimate of each record's own overhead).
pub(crate) const DEFAULT_MAX_BYTES: usize = 1 << 30;
/// The default period of the background pruning of expired records.
pub(crate) const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// The default share of one tenant in a full store is `max_entries / DEFAULT_TENANT_SHARE`.
pub(crate) const DEFAULT_TENANT_SHARE: usize = 8;
/// The default period of the snapshot's periodic write.
pub(crate) const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(30);
/// The longest period a background task accepts (one year): longer ones are refused in
/// `build` rather than left to overflow the timer and end the task.
#[cfg(test)]
pub(crate) const MAX_INTERVAL: Duration = crate::store::util::MAX_PERIOD;

/// Settings of a [`MemoryStore`], checked by [`build`](Self::build). Once built, a store's
/// settings do not change.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::MemoryStore;
///
/// let store = MemoryStore::builder()
///     .max_entries(200_000)
///     .max_bytes(256 << 20)
///     .cleanup_interval(Duration::from_secs(30))
///     .build();
/// assert_eq!(store.settings().max_entries(), 200_000);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    pub(super) max_entries: usize,
    pub(super) max_bytes: usize,
    /// `None`: the default, from `max_entries`.
    pub(super) max_entries_per_tenant: Option<usize>,
    pub(super) cleanup_interval: Duration,
    pub(super) snapshot: Option<PathBuf>,
    pub(super) snapshot_interval: Duration,
    pub(super) initial_capacity: usize,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_entries_per_tenant: None,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
            snapshot: None,
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            initial_capacity: 0,
        }
    }
}

impl MemoryStoreBuilder {
    /// The most records the store holds, live or expired but not yet pruned. Default:
    /// 1,000,000. When the store is full, the completed records nearest their expiry are
    /// dropped to make room for new keys.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder().max_entries(100_000).build();
    /// # let _ = store;
    /// ```
    pub fn max_entries(mut self, max: usize) -> Self {
        self.max_entries = max;
        self
    }

    /// About how many bytes of keys and stored responses the store holds, counting a fixed
    /// estimate per record and per header for their own overhead. Default: 1 GiB. When the
    /// store is full, the completed records nearest their expiry are dropped to make room for
    /// new keys. A response completing while the store is full is still stored, so the bound
    /// can be passed by the responses of the requests already in flight.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder().max_bytes(256 << 20).build();
    /// # let _ = store;
    /// ```
    pub fn max_bytes(mut self, max: usize) -> Self {
        self.max_bytes = max;
        self
    }

    /// One tenant's share of a full store (a [`TenantId`](crate::TenantId), the shared scope
    /// included). Default: an eighth of [`max_entries`](Self::max_entries) (at least 1),
    /// 125,000 for the default store.
    ///
    /// A tenant's share of [`max_bytes`](Self::max_bytes) is the same part of it (an eighth by
    /// default: 128 MiB for the default store), and a tenant holds its share when it holds its
    /// part of the records or of the bytes: a tenant whose responses are large reaches its share
    /// with fewer records.
    ///
    /// The share bounds no one while the store has room: an application whose keys all come
    /// from one tenant has the whole store. Once the store is full, a new key makes room
    /// fairly: a tenant that holds its share or more drops its own completed records nearest
    /// expiry (counted by [`evicted`](super::MemoryStore::evicted)) before anyone else's; a
    /// tenant within its share drops completed records of the tenant that holds the most of its
    /// share, while that one is over it. Otherwise (every tenant within its share, or the one at
    /// its share has only requests in flight, which admission bounds) the store drops its
    /// nearest expiry of all; only a store full of in-flight records refuses a new key, with
    /// [`StoreErrorKind::CapacityExceeded`](crate::StoreErrorKind), which the layer answers with
    /// `503`. So a caller that floods the store with keys or with large responses costs itself
    /// replays, not the others: with the default, it takes eight tenants over their share to
    /// crowd the others out. A tenant's records in flight are bounded by the layer's
    /// [`max_in_flight_per_tenant`](crate::IdempotencyLayer::max_in_flight_per_tenant) (1,000),
    /// not by this share: below that (a store of fewer than 8,000 records with the default
    /// share), set it at or below the share, or one tenant's requests in flight at once can
    /// crowd out other tenants' completed records.
    ///
    /// The share is split over the store's shards as `max_entries` is: a tenant's keys are
    /// spread evenly over them, and a full shard holds the tenant to its part.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder()
    ///     .max_entries(1_000_000)
    ///     .max_entries_per_tenant(50_000)
    ///     .build();
    /// assert_eq!(store.settings().max_entries_per_tenant(), 50_000);
    /// ```
    pub fn max_entries_per_tenant(mut self, max: usize) -> Self {
        self.max_entries_per_tenant = Some(max);
        self
    }

    /// Room for this many records, allocated when the store is built. Default: 0, the store
    /// grows as records arrive.
    ///
    /// A store that grows doubles its tables now and then, each time copying them under the
    /// lock of a shard (a short pause for the requests that land on that shard), and asks the
    /// allocator for more memory as it goes. Sized up front, each shard's table has room for
    /// its share of `records` (rounded up by the table), so the tables do not grow until the
    /// store holds about this many: an API that expects about `n` keys per TTL sets `n` here
    /// and pays for the tables once, at start. The records' own keys and responses are still
    /// allocated as they arrive. At most [`max_entries`](Self::max_entries); the tables take
    /// about 40 bytes per record of capacity.
    ///
    /// ```
    /// let store = tower_idempotency::MemoryStore::builder()
    ///     .max_entries(500_000)
    ///     .initial_capacity(500_000)
    ///     .build();
    /// assert_eq!(store.settings().initial_capacity(), 500_000);
    /// ```
    pub fn initial_capacity(mut self, records: usize) -> Self {
        self.initial_capacity = records;
        self
    }

    /// How often the background task removes expired records. Default: 60 s. Expired records
    /// are invisible at once whatever this period; it bounds how long they keep their memory.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let store = tower_idempotency::MemoryStore::builder()
    ///     .cleanup_interval(Duration::from_secs(10))
    ///     .build();
    /// # let _ = store;
    /// ```
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = interval;
        self
    }

    /// Keeps the completed records across a restart, in the file at `path`. Off by default:
    /// a store without it starts empty after a restart, and every retry of a request completed
    /// before it runs the handler again.
    ///
    /// - **Written**: by [`save_snapshot`](super::MemoryStore::save_snapshot), which the app
    ///   calls at graceful shutdown (see there for the sequence), and every
    ///   [`snapshot_interval`](Self::snapshot_interval) by a background task, so that a crash
    ///   loses what completed since the last write, not everything. Only live completed
    ///   records are written, never in-flight ones; the file is replaced whole, never left
    ///   half-written, and created readable by its owner alone (`0600` on Unix). The temporary
    ///   file of a writer killed mid-write is removed by the next `build` on the path, once it
    ///   has not been written for ten minutes.
    /// - **Read**: by [`build`](Self::build), a blocking read of the file. Records that expired
    ///   are dropped; the others are put in the store at its first use, when its clock starts,
    ///   as many as its bounds hold (the nearest expiry left out first, but a tenant within its
    ///   share of a full store gets its own records back in place of those of a tenant over its
    ///   share, as a new key would: see
    ///   [`max_entries_per_tenant`](Self::max_entries_per_tenant)): a file written by a
    ///   store with larger bounds (before a deploy that lowered them) is read whole, then cut,
    ///   up to 16 times this store's [`max_bytes`](Self::max_bytes) (reading it takes about
    ///   twice its size in memory for a moment); a larger one is ignored. A file that is not a
    ///   snapshot is recognised by its first bytes and not read further.
    /// - **A file that cannot be used** (missing, truncated, corrupt: its SHA-256 does not
    ///   match, from another format version, or not a snapshot) is ignored: the store starts
    ///   empty, nothing panics. What was found is in
    ///   [`snapshot_status`](super::MemoryStore::snapshot_status), and a `tracing` event
    ///   (feature `tracing`).
    ///
    /// One store per file: two stores (or two processes) writing one file keep the last
    /// writer's records only. A path that is a symbolic link is written through: the file it
    /// points to is replaced, and the link stays.
    ///
    /// ```
    /// let path = std::env::temp_dir().join("tower-idempotency-doc.snapshot");
    /// let store = tower_idempotency::MemoryStore::builder().snapshot(&path).build();
    /// assert_eq!(store.snapshot_path(), Some(path.as_path()));
    /// ```
    pub fn snapshot(mut self, path: impl Into<PathBuf>) -> Self {
        self.snapshot = Some(path.into());
        self
    }

    /// How often the background task writes the [snapshot](Self::snapshot). Default: 30 s.
    /// Each write copies the completed records (a read lock per shard, a reference count per
    /// response) and writes them off the async threads.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = tower_idempotency::MemoryStore::builder()
    ///     .snapshot(std::env::temp_dir().join("tower-idempotency-doc-interval.snapshot"))
    ///     .snapshot_interval(Duration::from_secs(10));
    /// # let _ = builder;
    /// ```
    pub fn snapshot_interval(mut self, interval: Duration) -> Self {
        self.snapshot_interval = interval;
        self
    }

    /// The store.
    ///
    /// # Panics
    ///
    /// If `max_entries` or `max_bytes` is 0, if `max_entries_per_tenant` is 0 or larger than
    /// `max_entries`, if `initial_capacity` is larger than `max_entries`, if `cleanup_interval` or `snapshot_interval` is zero or longer than 365
    /// days, or if the `snapshot` path names no file (empty, or ending in `..`). A snapshot file
    /// that cannot be read is not a panic: see [`snapshot`](Self::snapshot).
    pub fn build(self) -> MemoryStore {
        assert!(
            self.max_entries > 0,
            "MemoryStore: max_entries must be at least 1"
        );
        assert!(
            self.max_bytes > 0,
            "MemoryStore: max_bytes must be at least 1"
        );
        if let Some(max) = self.max_entries_per_tenant {
            assert!(
                max > 0 && max <= self.max_entries,
                "MemoryStore: max_entries_per_tenant must be at least 1 and at most max_entries \
                 ({}), got {max}",
                self.max_entries
            );
        }
        assert!(
            self.initial_capacity <= self.max_entries,
            "MemoryStore: initial_capacity must be at most max_entries ({}), got {}",
            self.max_entries,
            self.initial_capacity
        );
        check_interval("cleanup_interval", self.cleanup_interval);
        check_interval("snapshot_interval", self.snapshot_interval);
        if let Some(path) = &self.snapshot {
            assert!(
                path.file_name().is_some(),
                "MemoryStore: the snapshot path must name a file, got {path:?}"
            );
        }
        MemoryStore::with_builder(self)
    }

    /// The settings `build` gives a store.
    pub(super) fn settings(&self) -> MemoryStoreSettings {
        MemoryStoreSettings {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            max_entries_per_tenant: self
                .max_entries_per_tenant
                .unwrap_or_else(|| default_per_tenant(self.max_entries)),
            cleanup_interval: self.cleanup_interval,
            snapshot_interval: self.snapshot_interval,
            initial_capacity: self.initial_capacity,
        }
    }
}

/// An eighth of `max_entries` (at least 1). The share bounds a tenant only while the store is
/// full, so an app whose keys all come from one tenant still has the whole store.
fn default_per_tenant(max_entries: usize) -> usize {
    (max_entries / DEFAULT_TENANT_SHARE).max(1)
}

fn check_interval(name: &str, interval: Duration) {
    crate::store::util::check_period(&format!("MemoryStore: {name}"), interval);
}

/// What a [`MemoryStore`] was built with, from [`MemoryStore::settings`].
///
/// ```
/// use tower_idempotency::MemoryStore;
///
/// let settings = MemoryStore::new().settings();
/// assert_eq!(settings.max_entries(), 1_000_000);
/// assert_eq!(settings.max_bytes(), 1 << 30);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStoreSettings {
    max_entries: usize,
    max_bytes: usize,
    max_entries_per_tenant: usize,
    cleanup_interval: Duration,
    snapshot_interval: Duration,
    initial_capacity: usize,
}

impl MemoryStoreSettings {
    /// The most records the store holds.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// About how many bytes of keys and stored responses the store holds.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// The most records one tenant holds (the default resolved).
    pub fn max_entries_per_tenant(&self) -> usize {
        self.max_entries_per_tenant
    }

    /// How often the background task removes expired records.
    pub fn cleanup_interval(&self) -> Duration {
        self.cleanup_interval
    }

    /// How often the snapshot is written, when the store has one
    /// ([`MemoryStore::snapshot_path`](super::MemoryStore::snapshot_path)).
    pub fn snapshot_interval(&self) -> Duration {
        self.snapshot_interval
    }

    /// The records the store had room for when it was built
    /// ([`initial_capacity`](MemoryStoreBuilder::initial_capacity)).
    pub fn initial_capacity(&self) -> usize {
        self.initial_capacity
    }
}
