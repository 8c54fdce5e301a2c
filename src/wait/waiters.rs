//! The waiters of one layer: who waits for which key, bounded in all and per key, and how a
//! holder's guard wakes them. Nothing here asks the store: that is [`super::for_first`]'s.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::RecordKey;

/// The default bound on the requests of one layer waiting at once, across keys.
pub(crate) const DEFAULT_MAX_WAITERS: usize = 1_000;
/// The most requests that wait for one key at once; past it, a duplicate gets `409` at once.
pub(super) const MAX_WAITERS_PER_KEY: usize = 64;

/// Keys are kept in this many maps, each behind its own lock, chosen by the key's hash.
const SHARDS: usize = 16;

/// The waiters of one layer, shared by its clones and every service it builds.
pub(crate) struct Waiters {
    /// Requests waiting now, across keys: the holder side skips the map while it is zero.
    total: AtomicUsize,
    shards: [Mutex<HashMap<RecordKey, Slot>>; SHARDS],
    hasher: RandomState,
}

/// The waiters of one key.
struct Slot {
    key: Arc<Key>,
    waiters: usize,
}

/// What the waiters of one key share.
pub(super) struct Key {
    /// Notified when the key's holder in this layer completes or releases it, and by a waiter
    /// whose poll found the key settled.
    pub(super) settled: Notify,
    /// When the key's waiters started sharing it.
    since: Instant,
    /// When the key was last polled, in milliseconds since `since`, plus one (0: never).
    polled: AtomicU64,
}

impl Key {
    /// Whether the caller should poll the store now, `interval` being its own time between
    /// polls: not when another waiter of this key polled less than `interval` ago.
    pub(super) fn claim_poll(&self, interval: Duration) -> bool {
        let now = millis(self.since.elapsed()) + 1;
        let interval = millis(interval);
        let mut last = self.polled.load(Ordering::Acquire);
        loop {
            if last != 0 && now < last.saturating_add(interval) {
                return false;
            }
            match self
                .polled
                .compare_exchange_weak(last, now, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(current) => last = current,
            }
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Default for Waiters {
    fn default() -> Self {
        Self {
            total: AtomicUsize::new(0),
            shards: std::array::from_fn(|_| Mutex::default()),
            hasher: RandomState::new(),
        }
    }
}

impl Waiters {
    /// Registers a waiter of `key`, or `None` past the bounds (`max` in all,
    /// [`MAX_WAITERS_PER_KEY`] for one key).
    pub(super) fn join(self: &Arc<Self>, key: &RecordKey, max: usize) -> Option<Waiting> {
        self.total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        let mut shard = self.shard(key);
        let slot = shard.entry(key.clone()).or_insert_with(|| Slot {
            key: Arc::new(Key {
                settled: Notify::new(),
                since: Instant::now(),
                polled: AtomicU64::new(0),
            }),
            waiters: 0,
        });
        if slot.waiters >= MAX_WAITERS_PER_KEY {
            drop(shard);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        slot.waiters += 1;
        let shared = slot.key.clone();
        drop(shard);
        Some(Waiting {
            waiters: self.clone(),
            record: key.clone(),
            key: shared,
        })
    }

    /// Wakes the waiters of `key` in this layer: its holder completed or released it.
    pub(crate) fn wake(&self, key: &RecordKey) {
        if self.total.load(Ordering::Acquire) == 0 {
            return;
        }
        let waiting = self.shard(key).get(key).map(|slot| slot.key.clone());
        if let Some(waiting) = waiting {
            waiting.settled.notify_waiters();
        }
    }

    /// Requests waiting now.
    pub(crate) fn requests(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Keys with requests waiting now.
    pub(crate) fn keys(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, HashMap<RecordKey, Slot>> {
        let mut hasher = self.hasher.build_hasher();
        std::hash::Hash::hash(key, &mut hasher);
        lock(&self.shards[hasher.finish() as usize % SHARDS])
    }

    fn leave(&self, key: &RecordKey) {
        let mut shard = self.shard(key);
        if let Some(slot) = shard.get_mut(key) {
            slot.waiters -= 1;
            if slot.waiters == 0 {
                shard.remove(key);
            }
        }
        drop(shard);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A panic never happens under these locks; if one did, the maps are still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One waiting request, registered until it is dropped: its answer came, or its client hung
/// up and hyper dropped its future.
pub(super) struct Waiting {
    waiters: Arc<Waiters>,
    record: RecordKey,
    pub(super) key: Arc<Key>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waiters.leave(&self.record);
    }
}
