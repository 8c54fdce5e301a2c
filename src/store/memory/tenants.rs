//! The records of each tenant within one shard: how many it holds, and its completed ones in
//! order of expiry, so that when the shard is full, a tenant over its share makes room from its
//! own records, and a tenant within its share from the records of one that is over it.
//!
//! Why per shard: every count changes under the shard's lock that the record's own change
//! already holds, so counts are exact without a second lock or an atomic, and no lock is ever
//! taken inside another. A tenant's records are spread evenly over the shards by the hash of
//! their keys, so each shard holds the tenant to its share of
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
    /// path (pruned, evicted by the shard, forgotten, taken over) is stale: dropped when it
    /// reaches the front, or when stale entries outnumber the tenant's records.
    pub(super) completed: Expiries,
}

/// The tenants of a shard; a tenant with no record in it has no entry.
pub(super) struct Tenants {
    map: HashMap<TenantId, Tenant, SeedableRandomState>,
    /// This shard's share of the bound on one tenant's records.
    pub(super) max: usize,
    /// The tenant that held the most records when it last grew: a hint, checked before use
    /// (it may have shrunk since), that spares a scan of every tenant.
    heaviest: Option<TenantId>,
}

impl Tenants {
    pub(super) fn new(max: usize, hasher: SeedableRandomState) -> Self {
        Self {
            map: HashMap::with_hasher(hasher),
            max,
            heaviest: None,
        }
    }

    /// A tenant that holds more than its share, the one that holds the most if the hint is
    /// stale; `None` when every tenant is within its share.
    pub(super) fn over_share(&mut self) -> Option<TenantId> {
        if let Some(tenant) = self.heaviest
            && self.count(&tenant) > self.max
        {
            return Some(tenant);
        }
        let (tenant, count) = self
            .map
            .iter()
            .map(|(tenant, t)| (*tenant, t.count))
            .max_by_key(|&(_, count)| count)?;
        self.heaviest = Some(tenant);
        (count > self.max).then_some(tenant)
    }

    /// Counts a new record of `tenant` if the tenant is under its bound; `false` (and nothing
    /// counted) when it is at it.
    pub(super) fn try_add(&mut self, tenant: TenantId) -> bool {
        let entry = self.map.entry(tenant).or_default();
        if entry.count >= self.max {
            return false;
        }
        entry.count += 1;
        true
    }

    /// Counts a new record of `tenant`, whatever its bound (the caller made room).
    pub(super) fn add(&mut self, tenant: TenantId) {
        let count = {
            let entry = self.map.entry(tenant).or_default();
            entry.count += 1;
            entry.count
        };
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

    /// The queued entries of every tenant, stale ones included.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.map.values().map(|t| t.completed.len()).sum()
    }
}

impl Tenant {
    /// Queues a completed record; drops the stale entries at the front (`is_live_entry` says
    /// whether an entry's record is still in the table), and all of them once they outnumber
    /// the tenant's records, so that the queue stays within twice the records it orders.
    pub(super) fn push(&mut self, due: Due, is_live_entry: impl Fn(&Due) -> bool) {
        while let Some(front) = self.completed.peek() {
            if is_live_entry(&front) {
                break;
            }
            self.completed.pop();
        }
        self.completed.push(due);
        if self.completed.len() > 2 * self.count + 16 {
            let all = self.completed.take_all();
            self.completed
                .rebuild(all.into_iter().filter(is_live_entry));
        }
    }
}
