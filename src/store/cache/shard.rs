//! The cache's state: sharded tables of completed records, each shard bounded and dropping its
//! oldest entries first, and the fingerprints of the keys this process holds.
//!
//! A key is hashed once per call ([`Inner::hash`]); the hash picks its shard and its place in
//! the shard's table, and the order of entries keeps hashes, not keys.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use foldhash::fast::SeedableRandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use tokio::time::Instant;

use crate::fingerprint::Fingerprint;
use crate::store::util::{map_hasher, record_hash};
use crate::store::{Begin, LockToken, RecordKey};
use crate::stored::StoredResponse;

/// The estimated bytes of an entry besides its key and response.
const ENTRY_OVERHEAD: usize = 160;
/// The number of shards; each holds a sixteenth of the bounds.
pub(super) const SHARDS: usize = 16;
/// The shard of a hash is taken from these bits: ones the tables do not use for a slot (the
/// low bits) nor for its control byte (the top seven).
const SHARD_SHIFT: u32 = 40;

pub(super) struct Inner {
    pub(super) max_age: Duration,
    /// Per shard.
    pub(super) max_entries: usize,
    /// Per shard.
    pub(super) max_bytes: usize,
    hasher: SeedableRandomState,
    shards: Box<[Mutex<Shard>]>,
}

/// A key's hash in the cache's tables, computed once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hash(u64);

#[derive(Default)]
struct Shard {
    records: HashTable<Record>,
    /// Records in the order they were cached, by hash and the generation that was cached: the
    /// front is dropped first. A record replaced or removed since leaves a stale entry, skipped.
    order: VecDeque<(u64, u64)>,
    /// The fingerprint of each key this process holds, by its lock token.
    held: HashTable<Held>,
    bytes: usize,
    generation: u64,
    /// Bumped by every `forget`: a record read from the store before one is not cached after
    /// it (see [`Stamp`]).
    forgets: u64,
}

/// A cached record: its key, its hash, what is cached, and the shard's generation it was
/// cached in (which tells its entry in the order from a stale one).
struct Record {
    hash: u64,
    key: RecordKey,
    cached: Cached,
    generation: u64,
}

/// A key this process holds: the fingerprint it began with, and since when.
struct Held {
    token: LockToken,
    fingerprint: Fingerprint,
    since: Instant,
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
}

impl Inner {
    /// Bounds for the whole cache, shared evenly by the shards.
    pub(super) fn new(max_entries: usize, max_bytes: usize, max_age: Duration) -> Self {
        Self {
            max_age,
            max_entries: max_entries / SHARDS,
            max_bytes: max_bytes / SHARDS,
            hasher: map_hasher(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    pub(super) fn entry_count(&self) -> usize {
        self.shards().map(|s| s.records.len()).sum()
    }

    pub(super) fn weighted_size(&self) -> usize {
        self.shards().map(|s| s.bytes).sum()
    }

    /// The hash of `key`, for every call about it.
    pub(super) fn hash(&self, key: &RecordKey) -> Hash {
        Hash(record_hash(&self.hasher, key))
    }

    /// Drops the cached record of `key`, if any, and keeps records read from the store before
    /// now out of the cache.
    pub(super) fn forget(&self, hash: Hash, key: &RecordKey) {
        let mut shard = self.shard(hash);
        shard.forgets += 1;
        shard.remove(hash, key);
    }

    fn shard(&self, Hash(hash): Hash) -> MutexGuard<'_, Shard> {
        lock(&self.shards[(hash >> SHARD_SHIFT) as usize % SHARDS])
    }

    fn shards(&self) -> impl Iterator<Item = MutexGuard<'_, Shard>> {
        self.shards.iter().map(lock)
    }

    /// The answer of a cached, live record of `key`; or, when there is none, the stamp to
    /// cache what the store answers under.
    pub(super) fn answer(
        &self,
        hash: Hash,
        key: &RecordKey,
        fingerprint: &Fingerprint,
    ) -> Result<Begin, Stamp> {
        let mut shard = self.shard(hash);
        let stamp = Stamp(shard.forgets);
        let Some(record) = shard.records.find(hash.0, |r| r.key == *key) else {
            return Err(stamp);
        };
        let cached = &record.cached;
        if cached.expires_at <= Instant::now() {
            shard.remove(hash, key);
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
    pub(super) fn insert(
        &self,
        hash: Hash,
        key: &RecordKey,
        cached: Cached,
        stamp: Stamp,
        write: Write,
    ) {
        if cached.size > self.max_bytes {
            return;
        }
        let mut shard = self.shard(hash);
        if Stamp(shard.forgets) != stamp {
            return;
        }
        shard.insert(hash, key, cached, write, self.max_entries, self.max_bytes);
    }

    pub(super) fn hold(&self, hash: Hash, token: LockToken, fingerprint: Fingerprint) {
        let now = Instant::now();
        let max_age = self.max_age;
        let limit = self.max_entries;
        let token_hash = self.token_hash(token);
        let mut shard = self.shard(hash);
        if shard.held.len() >= limit {
            // Holders that never completed nor released (their task was cut short): forget the
            // long-gone ones; if it is still full, this record will not be cached on complete.
            shard
                .held
                .retain(|held| now.duration_since(held.since) < max_age * 10);
            if shard.held.len() >= limit {
                return;
            }
        }
        let held = Held {
            token,
            fingerprint,
            since: now,
        };
        let hasher = |held: &Held| self.token_hash(held.token);
        match shard.held.entry(token_hash, |h| h.token == token, hasher) {
            Entry::Occupied(mut entry) => *entry.get_mut() = held,
            Entry::Vacant(entry) => {
                entry.insert(held);
            }
        }
    }

    /// Forgets the fingerprint `token`'s holder began with, and answers it with the stamp to
    /// cache its completion under.
    pub(super) fn unhold(&self, hash: Hash, token: LockToken) -> (Option<Fingerprint>, Stamp) {
        let token_hash = self.token_hash(token);
        let mut shard = self.shard(hash);
        let fingerprint = match shard.held.find_entry(token_hash, |h| h.token == token) {
            Ok(entry) => Some(entry.remove().0.fingerprint),
            Err(_) => None,
        };
        (fingerprint, Stamp(shard.forgets))
    }

    /// Where `token` goes in a shard's table of holders. Tokens are the store's, never a
    /// client's; still hashed with the cache's key.
    fn token_hash(&self, token: LockToken) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(token)
    }
}

impl Shard {
    fn remove(&mut self, Hash(hash): Hash, key: &RecordKey) {
        if let Ok(entry) = self.records.find_entry(hash, |r| r.key == *key) {
            self.bytes -= entry.remove().0.cached.size;
        }
    }

    /// Caches `cached` for `key` as `write` says, then drops the oldest entries while the
    /// shard is over its bounds.
    fn insert(
        &mut self,
        Hash(hash): Hash,
        key: &RecordKey,
        cached: Cached,
        write: Write,
        max_entries: usize,
        max_bytes: usize,
    ) {
        let entry = self.records.entry(hash, |r| r.key == *key, |r| r.hash);
        if write == Write::IfAbsent && matches!(entry, Entry::Occupied(_)) {
            return;
        }
        self.generation += 1;
        let generation = self.generation;
        self.bytes += cached.size;
        self.order.push_back((hash, generation));
        match entry {
            Entry::Occupied(mut entry) => {
                let record = entry.get_mut();
                self.bytes -= record.cached.size;
                record.cached = cached;
                record.generation = generation;
            }
            Entry::Vacant(entry) => {
                entry.insert(Record {
                    hash,
                    key: key.clone(),
                    cached,
                    generation,
                });
            }
        }
        while self.records.len() > max_entries || self.bytes > max_bytes {
            let Some((hash, generation)) = self.order.pop_front() else {
                break;
            };
            let current = |r: &Record| r.generation == generation;
            if let Ok(entry) = self.records.find_entry(hash, current) {
                self.bytes -= entry.remove().0.cached.size;
            }
        }
        // Stale order entries (records replaced or removed since) are dropped once they
        // outnumber the live ones.
        if self.order.len() > 2 * self.records.len() + SHARDS {
            let records = &self.records;
            self.order.retain(|&(hash, generation)| {
                records.find(hash, |r| r.generation == generation).is_some()
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
    ENTRY_OVERHEAD + key.text().as_bytes().len() + response.payload_size(32)
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
        }
    }

    fn key(n: usize) -> RecordKey {
        RecordKey::new(TenantId::shared(), n.to_string())
    }

    /// A shard's calls with the hashes of a cache's tables.
    struct Keys(Inner);

    impl Keys {
        fn new() -> Self {
            Self(Inner::new(SHARDS, 64 << 10, Duration::from_secs(60)))
        }

        fn insert(&self, shard: &mut Shard, n: usize, cached: Cached) {
            let key = key(n);
            shard.insert(self.0.hash(&key), &key, cached, Write::Replace, 8, 1_000);
        }

        fn contains(&self, shard: &Shard, n: usize) -> bool {
            let key = key(n);
            let hash = self.0.hash(&key).0;
            shard.records.find(hash, |r| r.key == key).is_some()
        }

        fn remove(&self, shard: &mut Shard, n: usize) {
            let key = key(n);
            shard.remove(self.0.hash(&key), &key);
        }
    }

    fn bytes(shard: &Shard) -> usize {
        shard.records.iter().map(|r| r.cached.size).sum()
    }

    #[test]
    fn shards_keep_their_bounds_and_count_bytes_exactly() {
        let keys = Keys::new();
        let mut shard = Shard::default();
        for n in 0..100 {
            keys.insert(&mut shard, n, cached(10));
            assert!(shard.records.len() <= 8);
            assert_eq!(shard.bytes, bytes(&shard));
        }
        // The oldest made room: the last eight remain.
        assert!((92..100).all(|n| keys.contains(&shard, n)));

        // Replacing a key counts its bytes once; the stale order entry is skipped, then
        // compacted away.
        for _ in 0..100 {
            keys.insert(&mut shard, 99, cached(20));
        }
        assert_eq!(shard.records.len(), 8);
        assert_eq!(shard.bytes, 7 * 10 + 20);
        assert!(shard.order.len() <= 2 * 8 + SHARDS);

        // By bytes.
        keys.insert(&mut shard, 1000, cached(950));
        assert!(shard.bytes <= 1_000);
        assert!(keys.contains(&shard, 1000));
        keys.remove(&mut shard, 1000);
        assert_eq!(shard.bytes, bytes(&shard));
    }

    /// Records whose hashes meet (here, all of them) are still told apart by their keys, and
    /// made room for by their generations.
    #[test]
    fn records_of_one_hash_are_kept_apart() {
        let mut shard = Shard::default();
        let hash = Hash(7);
        for n in 0..20 {
            shard.insert(hash, &key(n), cached(10), Write::Replace, 8, 1_000);
        }
        assert_eq!(shard.records.len(), 8);
        let kept: Vec<usize> = (0..20)
            .filter(|&n| shard.records.find(7, |r| r.key == key(n)).is_some())
            .collect();
        assert_eq!(kept, (12..20).collect::<Vec<_>>());
        shard.remove(hash, &key(15));
        assert_eq!(shard.records.len(), 7);
        assert_eq!(shard.bytes, 70);
        assert!(shard.records.find(7, |r| r.key == key(16)).is_some());
    }

    /// A holder's fingerprint is found by its token, once, whatever the shard holds besides.
    #[test]
    fn holders_are_found_by_their_tokens() {
        let inner = Inner::new(SHARDS * 64, 64 << 10, Duration::from_secs(60));
        let key = key(1);
        let hash = inner.hash(&key);
        let tokens: Vec<LockToken> = (0..50).map(|_| LockToken::random()).collect();
        for (i, token) in tokens.iter().enumerate() {
            inner.hold(hash, *token, Fingerprint::from_bytes([i as u8; 32]));
        }
        for (i, token) in tokens.iter().enumerate().rev() {
            let (fingerprint, _) = inner.unhold(hash, *token);
            assert_eq!(fingerprint, Some(Fingerprint::from_bytes([i as u8; 32])));
            assert_eq!(inner.unhold(hash, *token).0, None);
        }
    }

    /// Against a plain model of the same rules (the oldest live entry makes room first; a
    /// replaced entry takes the back of the order; an entry written only if absent leaves one
    /// in place alone), under random inserts, replacements and removals, with few hash bits so
    /// that records share slots: the same records, the same bytes.
    #[test]
    fn shards_keep_what_the_model_keeps() {
        use proptest::prelude::*;
        use std::collections::HashMap;

        let op = (0..3u8, 0..24usize, 1..400usize);
        proptest!(|(ops in proptest::collection::vec(op, 1..300), bits in 0..4u32)| {
            let keys = Keys::new();
            // Few distinct hashes: records meet in the table and in the order.
            let hash = |n: usize| Hash(keys.0.hash(&key(n)).0 & ((1 << bits) - 1));
            let mut shard = Shard::default();
            let mut model: HashMap<usize, (usize, u64)> = HashMap::new();
            let mut order: Vec<(usize, u64)> = Vec::new();
            let mut generation = 0;
            for (kind, n, size) in ops {
                let write = if kind == 0 { Write::Replace } else { Write::IfAbsent };
                if kind == 2 {
                    shard.remove(hash(n), &key(n));
                    model.remove(&n);
                } else if write == Write::IfAbsent && model.contains_key(&n) {
                    shard.insert(hash(n), &key(n), cached(size), write, 8, 1_000);
                } else {
                    shard.insert(hash(n), &key(n), cached(size), write, 8, 1_000);
                    generation += 1;
                    model.insert(n, (size, generation));
                    order.push((n, generation));
                    let over = |m: &HashMap<usize, (usize, u64)>| {
                        m.len() > 8 || m.values().map(|v| v.0).sum::<usize>() > 1_000
                    };
                    while over(&model) && !order.is_empty() {
                        let (n, generation) = order.remove(0);
                        if model.get(&n).is_some_and(|v| v.1 == generation) {
                            model.remove(&n);
                        }
                    }
                }
                let kept: HashMap<usize, usize> = (0..24)
                    .filter_map(|n| {
                        let key = key(n);
                        shard
                            .records
                            .find(hash(n).0, |r| r.key == key)
                            .map(|r| (n, r.cached.size))
                    })
                    .collect();
                let expected: HashMap<usize, usize> =
                    model.iter().map(|(&n, &(size, _))| (n, size)).collect();
                prop_assert_eq!(&kept, &expected);
                prop_assert_eq!(shard.records.len(), model.len());
                prop_assert_eq!(shard.bytes, bytes(&shard));
            }
        });
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
