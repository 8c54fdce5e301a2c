//! The records of each tenant within one shard: how many it holds, and its completed ones in
//! order of expiry, so that when the shard is full, a tenant at its share or over it makes room
//! from its own records, and a tenant within its share from the records of the one that holds
//! the most, when that one is over its share.
//!
//! Why per shard: every count changes under the shard's lock that the record's own change
//! already holds, so counts are exact without a second lock or an atomic, and no lock is ever
//! taken inside another. A tenant's records are spread evenly over the shards by the hash of
//! their keys, so each shard gives the tenant its share of
//! [`max_entries_per_tenant`](super::MemoryStoreBuilder::max_entries_per_tenant), as each shard
//! already holds the store to its share of `max_entries`. The cost on the path of a new key is
//! one lookup in a small map (`entry`), in the shard already locked; a replay costs nothing.

use foldhash::fast::SeedableRandomState;
use hashbrown::HashMap;

use super::expiries::{Due, Expiries};
use crate::tenant::TenantId;

/// A tenant's records in a shard.
#[derive(Debug, Default)]
pub(super) struct Tenant {
    /// Its records in the shard's table, in flight or completed, live or not yet pruned.
    pub(super) count: usize,
    /// Its completed records by expiry, nearest first. An entry whose record left by another
    /// path (pruned, evicted by the shard, forgotten, taken over) is stale: dropped once the
    /// shard's queue removes a later record of the tenant, or when stale entries outnumber the
    /// tenant's records.
    pub(super) completed: Expiries,
}

/// The tenants of a shard; a tenant with no record in it has no entry.
pub(super) struct Tenants {
    map: HashMap<TenantId, Tenant, SeedableRandomState>,
    /// This shard's share of the bound on one tenant's records.
    pub(super) max: usize,
    /// How many tenants hold more than `max`: when none does, or one, finding the heaviest
    /// takes no scan.
    over: usize,
    /// The tenant that held the most records when it last grew: a hint, checked before use
    /// (it may have shrunk since), that spares a scan of every tenant.
    heaviest: Option<TenantId>,
}

impl Tenants {
    pub(super) fn new(max: usize, hasher: SeedableRandomState) -> Self {
        Self {
            map: HashMap::with_hasher(hasher),
            max,
            over: 0,
            heaviest: None,
        }
    }

    /// The tenant that holds the most records, when it holds more than its share (among
    /// equals, the smallest id); `None` when every tenant is within its share. No scan unless
    /// two tenants or more are over their share, or the hint is stale.
    pub(super) fn over_share(&mut self) -> Option<TenantId> {
        if self.over == 0 {
            return None;
        }
        if self.over == 1
            && let Some(tenant) = self.heaviest
            && self.count(&tenant) > self.max
        {
            return Some(tenant);
        }
        let (tenant, count) = self
            .map
            .iter()
            .map(|(tenant, t)| (*tenant, t.count))
            .max_by(|a, b| {
                a.1.cmp(&b.1)
                    .then_with(|| b.0.as_bytes().cmp(a.0.as_bytes()))
            })?;
        self.heaviest = Some(tenant);
        (count > self.max).then_some(tenant)
    }

    /// Counts a new record of `tenant` (the caller made room for it).
    pub(super) fn add(&mut self, tenant: TenantId) {
        let count = {
            let entry = self.map.entry(tenant).or_default();
            entry.count += 1;
            entry.count
        };
        if count == self.max + 1 {
            self.over += 1;
        }
        if self.heaviest != Some(tenant)
            && self
                .heaviest
                .is_none_or(|heaviest| self.count(&heaviest) < count)
        {
            self.heaviest = Some(tenant);
        }
    }

    /// Uncounts a record of `tenant` that left the table; a tenant left with none goes.
    pub(super) fn remove(&mut self, tenant: &TenantId) {
        if let Some(entry) = self.map.get_mut(tenant) {
            if entry.count == self.max + 1 {
                self.over -= 1;
            }
            entry.count -= 1;
            if entry.count == 0 {
                self.map.remove(tenant);
            }
        }
    }

    pub(super) fn get_mut(&mut self, tenant: &TenantId) -> Option<&mut Tenant> {
        self.map.get_mut(tenant)
    }

    /// How many records `tenant` holds in this shard.
    pub(super) fn count(&self, tenant: &TenantId) -> usize {
        self.map.get(tenant).map_or(0, |t| t.count)
    }

    /// Every tenant with records, and how many.
    #[cfg(test)]
    pub(super) fn counts(&self) -> impl Iterator<Item = (TenantId, usize)> + '_ {
        self.map.iter().map(|(tenant, t)| (*tenant, t.count))
    }

    /// How many tenants the shard counts as over their share.
    #[cfg(test)]
    pub(super) fn over(&self) -> usize {
        self.over
    }

    /// The queued entries of every tenant, stale ones included.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.map.values().map(|t| t.completed.len()).sum()
    }
}

impl Tenant {
    /// Queues a completed record, looking at no other: the shard drops the front entries as it
    /// removes records in order of expiry ([`drop_through`](Self::drop_through)). Entries left
    /// stale by another path (forgotten, taken over) go all at once when they outnumber the
    /// tenant's records (`is_live_entry` says whether an entry's record is still in the
    /// table), so that the queue stays within twice the records it orders.
    pub(super) fn push(&mut self, due: Due, is_live_entry: impl Fn(&Due) -> bool) {
        self.completed.push(due);
        if self.completed.len() > 2 * self.count + 16 {
            let all = self.completed.take_all();
            self.completed
                .rebuild(all.into_iter().filter(is_live_entry));
        }
    }

    /// Drops the entries up to `due`, which the shard's own queue just gave up: the shard's
    /// queue holds every entry this one does and gives them up in the same order, so the
    /// records of those before it have left the table already.
    pub(super) fn drop_through(&mut self, due: Due) {
        while self.completed.peek().is_some_and(|front| front <= due) {
            self.completed.pop();
        }
    }
}
