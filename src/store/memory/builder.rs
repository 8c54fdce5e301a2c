//! [`MemoryStoreBuilder`]: a [`MemoryStore`]'s settings, checked once, in `build`.

use std::time::Duration;

use super::MemoryStore;

/// The default bound on records, live or expired but not yet pruned.
pub(crate) const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// The default bound on the bytes held by records (keys, stored headers and bodies, and a fixed
/// estimate of each record's own overhead).
pub(crate) const DEFAULT_MAX_BYTES: usize = 1 << 30;
/// The default period of the background pruning of expired records.
pub(crate) const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// The longest period a background task accepts. Tokio's timer cannot schedule a tick at
/// `u64::MAX` milliseconds (adding such a period to an instant overflows and panics), so a
/// longer one is refused in `build` rather than left to end the task.
pub(crate) const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

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
    pub(super) cleanup_interval: Duration,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            cleanup_interval: DEFAULT_CLEANUP_INTERVAL,
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

    /// The store.
    ///
    /// # Panics
    ///
    /// If `max_entries` or `max_bytes` is 0, or if `cleanup_interval` is zero or longer than
    /// 365 days.
    pub fn build(self) -> MemoryStore {
        assert!(
            self.max_entries > 0,
            "MemoryStore: max_entries must be at least 1"
        );
        assert!(
            self.max_bytes > 0,
            "MemoryStore: max_bytes must be at least 1"
        );
        check_interval("cleanup_interval", self.cleanup_interval);
        MemoryStore::with_builder(self)
    }

    /// The settings `build` gives a store.
    pub(super) fn settings(&self) -> MemoryStoreSettings {
        MemoryStoreSettings {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            cleanup_interval: self.cleanup_interval,
        }
    }
}

fn check_interval(name: &str, interval: Duration) {
    assert!(
        !interval.is_zero(),
        "MemoryStore: {name} must be longer than zero"
    );
    assert!(
        interval <= MAX_INTERVAL,
        "MemoryStore: {name} must be at most 365 days, got {interval:?}"
    );
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
    cleanup_interval: Duration,
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

    /// How often the background task removes expired records.
    pub fn cleanup_interval(&self) -> Duration {
        self.cleanup_interval
    }
}
