//! The records of each tenant within one shard: how many it holds, the bytes they count for,
//! and its completed ones in order of expiry, so that when the shard is full, a tenant at its
//! share or over it makes room from its own records, and a tenant within its share from the
//! records of the one that holds the most, when that one is over its share. A share is of the
//! records and of the bytes alike: a tenant holds its share when it holds its part of either.
//!
//! Why per shard: every count changes under the shard's lock that the record's own change
//! already holds, so counts are exact without a second lock or an atomic, and no lock is ever
//! taken inside another. A tenant's records are spread evenly over the shards by the hash of
//! their keys, so each shard gives the tenant its share of
//! [`max_entries_per_tenant`](super::MemoryStoreBuilder::max_entries_per_tenant), as each shard
//! already holds the store to its share of `max_entries`. The cost on the path of a new key is
//! one lookup in a small map, in the shard already locked, when it begins: the record keeps its
//! tenant's place, where its later changes find the counts; a replay costs nothing.

use foldhash::fast::SeedableRandomState;
use hashbrown::HashMap;
use hashbrown::hash_map::Entry;

use super::expiries::{Due, Expiries};
use crate::tenant::TenantId;

/// Where a tenant's counts are in its shard's [`Tenants`] while it holds records there. Each of
/// its records keeps it, so that the record's changes find the counts without looking the
/// tenant up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Place(u32);

/// A tenant's records in a shard.
#[derive(Debug)]
pub(super) struct Tenant {
    id: TenantId,
    /// Its records in the shard's table, in flight or completed, live or not yet pruned.
    pub(super) count: usize,
    /// The bytes those records count for in the shard's budget.
    pub(super) bytes: usize,
    /// Its completed records by expiry, nearest first. An entry whose record left by another
    /// path (pruned, evicted by the shard, forgotten, taken over) is stale: dropped once the
    /// shard's queue removes a later record of the tenant, or when stale entries outnumber the
    /// tenant's records.
    pub(super) completed: Expiries,
}

/// The tenants of a shard; a tenant with no record in it has no entry.
pub(super) struct Tenants {
    /// The place of each tenant with records.
    places: HashMap<TenantId, Place, SeedableRandomState>,
    /// The tenants with records, at their places; a place left free is `None` until a new
    /// tenant takes it from `free`.
    slots: Vec<Option<Tenant>>,
    free: Vec<Place>,
    /// This shard's share of the bound on one tenant's records.
    pub(super) max: usize,
    /// A tenant's share of this shard's bytes: the same part of them as `max` is of its
    /// records, at least one byte.
    pub(super) max_bytes: usize,
    /// How many tenants hold more than their share (of records or of bytes): when none does,
    /// no tenant is looked at.
    over: usize,
    /// The heaviest tenant when they were last looked through: it pays while it stays over its
    /// share (checked at each use), and only then are they looked through again.
    heaviest: Option<TenantId>,
    /// How many times the tenants were looked through.
    #[cfg(test)]
    pub(super) scans: usize,
}

impl Tenants {
    /// The tenants of a shard of `shard_len` records and `shard_bytes` bytes, `max` records of
    /// which are a tenant's share.
    pub(super) fn new(
        max: usize,
        shard_len: usize,
        shard_bytes: usize,
        hasher: SeedableRandomState,
    ) -> Self {
        let max_bytes = shard_bytes as u128 * max as u128 / shard_len.max(1) as u128;
        Self {
            places: HashMap::with_hasher(hasher),
            slots: Vec::new(),
            free: Vec::new(),
            max,
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX).max(1),
            over: 0,
            heaviest: None,
            #[cfg(test)]
            scans: 0,
        }
    }

    /// How much of its share a tenant holds, to compare tenants by: the larger of its part of
    /// the records and its part of the bytes, over the common denominator `max × max_bytes`.
    fn weight(&self, tenant: &Tenant) -> u128 {
        let records = tenant.count as u128 * self.max_bytes as u128;
        let bytes = tenant.bytes as u128 * self.max as u128;
        records.max(bytes)
    }

    /// Whether `tenant` holds its share or more, of the records or of the bytes: then it makes
    /// room from its own records.
    pub(super) fn at_share(&self, tenant: &TenantId) -> bool {
        self.get(tenant)
            .is_some_and(|t| t.count >= self.max || t.bytes >= self.max_bytes)
    }

    /// The tenants with records.
    fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.slots.iter().flatten()
    }

    fn get(&self, tenant: &TenantId) -> Option<&Tenant> {
        let &Place(i) = self.places.get(tenant)?;
        self.slots.get(i as usize)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, tenant: &TenantId) -> Option<&mut Tenant> {
        let &Place(i) = self.places.get(tenant)?;
        self.slots.get_mut(i as usize)?.as_mut()
    }

    /// The tenant at `place`.
    pub(super) fn at_mut(&mut self, Place(i): Place) -> Option<&mut Tenant> {
        self.slots.get_mut(i as usize)?.as_mut()
    }

    /// A tenant over its share, to make room from: the heaviest ([`weight`](Self::weight); among
    /// equals, the smallest id) when the tenants were last looked through, while it stays over
    /// its share; `None` when every tenant is within its share. The tenants are looked through
    /// again only when that one is within its share: a full shard that drops many records for
    /// one new key (a large response completed after its room was made) looks once.
    pub(super) fn over_share(&mut self) -> Option<TenantId> {
        if self.over == 0 {
            return None;
        }
        if let Some(tenant) = self.heaviest
            && self
                .get(&tenant)
                .is_some_and(|t| t.over(self.max, self.max_bytes))
        {
            return Some(tenant);
        }
        #[cfg(test)]
        {
            self.scans += 1;
        }
        let heaviest = self.iter().max_by(|a, b| {
            (self.weight(a).cmp(&self.weight(b))).then_with(|| b.id.as_bytes().cmp(a.id.as_bytes()))
        })?;
        let over = heaviest.over(self.max, self.max_bytes);
        let tenant = heaviest.id;
        self.heaviest = Some(tenant);
        over.then_some(tenant)
    }

    /// Counts a tenant that went from over its share (`was`) or not, to `now`.
    fn account(&mut self, was: bool, now: bool) {
        match (was, now) {
            (false, true) => self.over += 1,
            (true, false) => self.over -= 1,
            _ => {}
        }
    }

    /// A record of `size` bytes added for `tenant`; returns the tenant's place, which stays
    /// while the tenant holds records.
    ///
    /// # Panics
    ///
    /// When a shard holds records of 2³² tenants at once.
    pub(super) fn add(&mut self, tenant: TenantId, size: usize) -> Place {
        let place = match self.places.entry(tenant) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                let fresh = Tenant {
                    id: tenant,
                    count: 0,
                    bytes: 0,
                    completed: Expiries::default(),
                };
                let place = match self.free.pop() {
                    Some(Place(i)) => {
                        self.slots[i as usize] = Some(fresh);
                        Place(i)
                    }
                    None => {
                        let i = u32::try_from(self.slots.len()).expect("2^32 tenants in a shard");
                        self.slots.push(Some(fresh));
                        Place(i)
                    }
                };
                *entry.insert(place)
            }
        };
        self.change(place, |t| {
            t.count += 1;
            t.bytes += size;
        });
        place
    }

    /// Changes the counts of the tenant at `place`, which has records, by `change`; a tenant
    /// left with none leaves its place.
    fn change(&mut self, place: Place, change: impl FnOnce(&mut Tenant)) {
        let (max, max_bytes) = (self.max, self.max_bytes);
        let Some(t) = self.at_mut(place) else {
            return;
        };
        let was = t.over(max, max_bytes);
        change(t);
        let now = t.over(max, max_bytes);
        let empty = (t.count == 0).then_some(t.id);
        self.account(was, now);
        if let Some(tenant) = empty {
            self.places.remove(&tenant);
            self.slots[place.0 as usize] = None;
            self.free.push(place);
        }
    }

    /// A record of `size` bytes of the tenant's at `place` removed.
    pub(super) fn remove(&mut self, place: Place, size: usize) {
        self.change(place, |t| {
            t.count -= 1;
            t.bytes -= size;
        });
    }

    /// A record of the tenant's at `place` that counted `old` bytes counts `new` now.
    pub(super) fn resize(&mut self, place: Place, old: usize, new: usize) {
        self.change(place, |t| t.bytes = t.bytes - old + new);
    }

    /// A record of the tenant's at `place` completed: it counted `old` bytes in flight, `new`
    /// now, and `due` is its entry in the tenant's queue (see [`Tenant::push`]).
    pub(super) fn completed(
        &mut self,
        place: Place,
        due: Due,
        (old, new): (usize, usize),
        is_live_entry: impl Fn(&Due) -> bool,
    ) {
        self.change(place, |t| {
            t.bytes = t.bytes - old + new;
            t.push(due, is_live_entry);
        });
    }

    pub(super) fn count(&self, tenant: &TenantId) -> usize {
        self.get(tenant).map_or(0, |t| t.count)
    }

    /// Every tenant with records, and how many.
    #[cfg(test)]
    pub(super) fn counts(&self) -> impl Iterator<Item = (TenantId, usize)> + '_ {
        self.iter().map(|t| (t.id, t.count))
    }

    /// Every tenant with records, and the bytes they count for.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> impl Iterator<Item = (TenantId, usize)> + '_ {
        self.iter().map(|t| (t.id, t.bytes))
    }

    /// The tenant at `place`, if one is there.
    #[cfg(test)]
    pub(super) fn id_at(&self, Place(i): Place) -> Option<TenantId> {
        Some(self.slots.get(i as usize)?.as_ref()?.id)
    }

    /// Whether every place is either a tenant's, listed at it, or free.
    #[cfg(test)]
    pub(super) fn check_places(&self) {
        assert_eq!(
            self.places.len() + self.free.len(),
            self.slots.len(),
            "every place is a tenant's or free"
        );
        for (tenant, &place) in &self.places {
            assert_eq!(self.id_at(place), Some(*tenant), "a tenant's place");
        }
        for &place in &self.free {
            assert_eq!(self.id_at(place), None, "a free place");
        }
    }

    /// How many tenants the shard counts as over their share.
    #[cfg(test)]
    pub(super) fn over(&self) -> usize {
        self.over
    }

    /// The queued entries of every tenant, stale ones included.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.iter().map(|t| t.completed.len()).sum()
    }
}

impl Tenant {
    /// Whether the tenant holds more than its share: of `max` records or of `max_bytes`.
    fn over(&self, max: usize, max_bytes: usize) -> bool {
        self.count > max || self.bytes > max_bytes
    }

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
