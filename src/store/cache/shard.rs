//! The cache's state: sharded maps of completed records, each shard bounded and dropping its
//! oldest entries first, and the fingerprints of the keys this process holds.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry as MapEntry, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::store::{Begin, LockToken, RecordKey};
use crate::stored::StoredResponse;

/// The estimated bytes of an entry besides its key and response.
const ENTRY_OVERHEAD: usize = 160;
/// The number of shards; each holds a sixteenth of the bounds.
pub(super) const SHARDS: usize = 16;

pub(super) struct Inner {
    pub(super) max_age: Duration,
    /// Per shard.
    pub(super) max_entries: usize,
    /// Per shard.
    pub(super) max_bytes: usize,
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
    /// Bumped by every `forget`: a record read from the store before one is not cached after
    /// it (see [`Stamp`]).
    forgets: u64,
}

/// What a shard had seen of `forget` before a store call: an answer that comes back after a
/// `forget` of the same shard may describe a record the store no longer holds, and is not
/// cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp(u64);

/// How a record read back from the store is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// This process completed it: the newest there is, in place of any entry.
    Replace,
    /// Learned from a replay, perhaps an old one: never in place of an entry already there.
    IfAbsent,
}

pub(super) struct Cached {
    pub(super) fingerprint: Fingerprint,
    pub(super) response: StoredResponse,
    pub(super) expires_at: Instant,
    pub(super) size: usize,
    pub(super) generation: u64,
}

impl Inner {
    /// Bounds for the whole cache, shared evenly by the shards.
    pub(super) fn new(max_entries: usize, max_bytes: usize, max_age: Duration) -> Self {
        Self {
            max_age,
            max_entries: max_entries / SHARDS,
            max_bytes: max_bytes / SHARDS,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    pub(super) fn entry_count(&self) -> usize {
        self.shards().map(|s| s.records.len()).sum()
    }

    pub(super) fn weighted_size(&self) -> usize {
        self.shards().map(|s| s.bytes).sum()
    }

    /// Drops the cached record of `key`, if any, and keeps records read from the store before
    /// now out of the cache.
    pub(super) fn forget(&self, key: &RecordKey) {
        let mut shard = self.shard(key);
        shard.forgets += 1;
        shard.remove(key);
    }

    fn shard(&self, key: &RecordKey) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn shards(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock)
    }

    /// The answer of a cached, live record of `key`; or, when there is none, the stamp to
    /// cache what the store answers under.
    pub(super) fn answer(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
    ) -> Result<Begin, Stamp> {
        let mut shard = self.shard(key);
        let stamp = Stamp(shard.forgets);
        let Some(cached) = shard.records.get(key) else {
            return Err(stamp);
        };
        if cached.expires_at <= Instant::now() {
            shard.remove(key);
            return Err(stamp);
        }
        Ok(if cached.fingerprint == *fingerprint {
            Begin::Completed(cached.response.clone())
        } else {
            Begin::Mismatch
        })
    }

    /// Caches a record the store answered after `stamp` was taken, unless a `forget` of its
    /// shard came in between.
    pub(super) fn insert(&self, key: &RecordKey, cached: Cached, stamp: Stamp, write: Write) {
        if cached.size > self.max_bytes {
            return;
        }
        let mut shard = self.shard(key);
        if Stamp(shard.forgets) != stamp
            || (write == Write::IfAbsent && shard.records.contains_key(key))
        {
            return;
        }
        shard.insert(key.clone(), cached, self.max_entries, self.max_bytes);
    }

    pub(super) fn hold(&self, key: &RecordKey, token: LockToken, fingerprint: Fingerprint) {
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

    /// Forgets the fingerprint `token`'s holder began with, and answers it with the stamp to
    /// cache its completion under.
    pub(super) fn unhold(&self, key: &RecordKey, token: LockToken) -> (Option<Fingerprint>, Stamp) {
        let mut shard = self.shard(key);
        let fingerprint = shard.held.remove(&token).map(|(fp, _)| fp);
        (fingerprint, Stamp(shard.forgets))
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
    crate::store::util::lock(shard)
}

/// The estimated bytes of a cached record.
pub(super) fn weight(key: &RecordKey, response: &StoredResponse) -> usize {
    ENTRY_OVERHEAD + key.key().len() + response.payload_size(32)
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
