//! One shard of the [`MemoryStore`](super::MemoryStore): its records, the order in which its
//! completed records expire, and the list of its in-flight records.
//!
//! Every function here runs under the shard's lock, and none of them looks at another shard.

use foldhash::fast::SeedableRandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use super::Nanos;
use super::expiries::{Due, Expiries};
use super::tenants::{Place, Tenants};
use crate::fingerprint::Fingerprint;
use crate::store::{Begin, Forget, LockToken, RecordKey};
use crate::stored::StoredResponse;

#[cfg(test)]
mod checks;
mod info;
mod room;
mod snapshot;

/// The estimated bytes a record takes besides its key and response: its table slot, its boxed
/// record, its place in the expiry queue, and the stored response's own allocations.
pub(super) const RECORD_OVERHEAD: usize = 256;
/// The estimated bytes a stored header takes besides its name and value.
const HEADER_OVERHEAD: usize = 32;

/// A table slot: the record's hash beside a pointer to it, so that growing the table moves
/// 16 bytes per record and hashes nothing again.
struct Slot {
    hash: u64,
    record: Box<Record>,
}

struct Record {
    key: RecordKey,
    fingerprint: Fingerprint,
    /// Unique within the shard: what the expiry queue and the in-flight list point to.
    id: u64,
    /// In flight: when the lease runs out; completed: when the record expires.
    deadline: Nanos,
    /// The bytes this record counts for in the shard's budget.
    size: usize,
    /// Its tenant's place in the shard's [`Tenants`].
    tenant: Place,
    state: State,
}

enum State {
    /// `slot` is the record's index in [`Shard::in_flight`].
    InFlight {
        token: LockToken,
        slot: usize,
    },
    Completed(StoredResponse),
}

impl Record {
    fn is_live(&self, now: Nanos) -> bool {
        self.deadline > now
    }

    /// What `begin` answers for a live record.
    fn decide(&self, fingerprint: &Fingerprint) -> Begin {
        if self.fingerprint != *fingerprint {
            return Begin::Mismatch;
        }
        match &self.state {
            State::InFlight { .. } => Begin::InFlight,
            State::Completed(response) => Begin::Completed(response.clone()),
        }
    }

    fn held_by(&self, token: LockToken) -> bool {
        matches!(self.state, State::InFlight { token: held, .. } if held == token)
    }
}

/// An in-flight record, as its shard lists it for the pruning of holders that died.
#[derive(Clone, Copy)]
struct Held {
    hash: u64,
    id: u64,
}

/// What a shard removed to make room or while pruning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Removed {
    /// Live completed records dropped before their expiry.
    pub(super) evicted: u64,
    /// Expired records, and in-flight records whose holder died.
    pub(super) pruned: u64,
}

/// Room for a new record, and the allocation of a record removed to make it, if any.
struct Room(Option<Box<Record>>);

/// A shard refused a new key: in-flight records fill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Full;

pub(super) struct Shard {
    table: HashTable<Slot>,
    /// Completed records by expiry, nearest first.
    expiries: Expiries,
    /// In-flight records, in no order: there are as many as requests running.
    in_flight: Vec<Held>,
    /// No in-flight record's lease runs out before this: until then, none is dead, and the
    /// list need not be looked at.
    dead_check_at: Nanos,
    next_id: u64,
    /// The store's key of its lock tokens: a token's high half is it xored with the record's
    /// hash, its low half the record's id. Records of one hash share a shard, where ids are
    /// unique, so tokens never repeat within a store, and they are taken from no counter shared
    /// between threads.
    token_key: u64,
    bytes: usize,
    max_len: usize,
    max_bytes: usize,
    /// How many records each tenant holds, and its completed ones by expiry.
    tenants: Tenants,
    /// Counts the changes to the completed records that a snapshot holds (completed, forgotten,
    /// restored), so that a periodic snapshot of an unchanged store is skipped.
    changes: u64,
}

/// A shard's part of the store's bounds, and the records it has room for from the start.
pub(super) struct Limits {
    pub(super) len: usize,
    pub(super) bytes: usize,
    pub(super) per_tenant: usize,
    pub(super) capacity: usize,
}

impl Shard {
    pub(super) fn new(limits: Limits, token_key: u64, hasher: SeedableRandomState) -> Self {
        Self {
            table: HashTable::with_capacity(limits.capacity),
            expiries: Expiries::with_capacity(limits.capacity),
            in_flight: Vec::new(),
            dead_check_at: Nanos::MAX,
            next_id: 0,
            token_key,
            bytes: 0,
            max_len: limits.len,
            max_bytes: limits.bytes,
            tenants: Tenants::new(limits.per_tenant, limits.len, limits.bytes, hasher),
            changes: 0,
        }
    }

    /// How many records `tenant` holds in this shard.
    pub(super) fn tenant_len(&self, tenant: &crate::tenant::TenantId) -> usize {
        self.tenants.count(tenant)
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// The records the table holds before it grows.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.table.capacity()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The count of changes to the completed records a snapshot holds.
    pub(super) fn changes(&self) -> u64 {
        self.changes
    }

    fn find(&self, hash: u64, key: &RecordKey) -> Option<&Record> {
        let slot = self
            .table
            .find(hash, |slot| slot.hash == hash && slot.record.key == *key)?;
        Some(&slot.record)
    }

    fn find_mut(&mut self, hash: u64, key: &RecordKey) -> Option<&mut Record> {
        let slot = self
            .table
            .find_mut(hash, |slot| slot.hash == hash && slot.record.key == *key)?;
        Some(&mut slot.record)
    }

    /// The answer for a live record, if there is one: what replays, 409 and 422 need, under a
    /// shared lock.
    pub(super) fn decide(
        &self,
        hash: u64,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        now: Nanos,
    ) -> Option<Begin> {
        let record = self.find(hash, key)?;
        record.is_live(now).then(|| record.decide(fingerprint))
    }

    /// `begin` under the write lock: answers a live record, takes over a dead one, or inserts a
    /// new in-flight record, making room first when the shard is full.
    pub(super) fn begin(
        &mut self,
        hash: u64,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease_until: Nanos,
        now: Nanos,
        removed: &mut Removed,
    ) -> Result<Begin, Full> {
        let id = self.next_id;
        let token = LockToken::from_u128(u128::from(self.token_key ^ hash) << 64 | u128::from(id));
        let size = RECORD_OVERHEAD + key.text().as_bytes().len();
        // The new in-flight record, at entry `slot` of the in-flight list.
        let in_flight = |tenant, slot| Record {
            key: key.clone(),
            fingerprint: *fingerprint,
            id,
            deadline: lease_until,
            size,
            tenant,
            state: State::InFlight { token, slot },
        };
        // A new key in a shard with room, the common case: one probe finds the key absent and
        // its slot.
        if self.has_room() {
            let eq = |slot: &Slot| slot.hash == hash && slot.record.key == *key;
            if let Entry::Vacant(vacant) = self.table.entry(hash, eq, |slot| slot.hash) {
                let tenant = self.tenants.add(*key.tenant(), size);
                // Written in place in its allocation (`Box::new` builds it on the stack, then
                // copies it there).
                let slot = self.in_flight.len();
                let record = Box::write(Box::new_uninit(), in_flight(tenant, slot));
                vacant.insert(Slot { hash, record });
                self.next_id += 1;
                self.bytes += size;
                self.list(hash, id, lease_until);
                return Ok(Begin::Acquired(token));
            }
        }
        if let Some(record) = self.find_mut(hash, key) {
            if record.is_live(now) {
                return Ok(record.decide(fingerprint));
            }
            // Expired, or in flight with its holder gone: the key is free again. The record's
            // allocation is reused; its old place in the expiry queue becomes stale.
            let (old_size, tenant) = (record.size, record.tenant);
            let old_slot = match record.state {
                State::InFlight { slot, .. } => Some(slot),
                State::Completed(_) => None,
            };
            *record = in_flight(tenant, 0);
            self.next_id += 1;
            self.bytes = self.bytes - old_size + size;
            self.tenants.resize(tenant, old_size, size);
            if let Some(slot) = old_slot {
                self.unlist(slot);
            }
            let slot = self.in_flight.len();
            self.list(hash, id, lease_until);
            if let Some(record) = self.find_mut(hash, key) {
                record.state = State::InFlight { token, slot };
            }
            removed.pruned += 1;
            return Ok(Begin::Acquired(token));
        }
        // A full shard makes room fairly: from the tenant's own records when it holds its share
        // or more, else from a tenant over its share; only then from every tenant's nearest
        // expiries. A shard that is not full bounds no tenant.
        let tenant = *key.tenant();
        if !self.has_room() {
            self.make_fair_room(&tenant, now, removed);
        }
        let place = self.tenants.add(tenant, size);
        let Some(Room(spare)) = self.make_room(now, removed) else {
            self.tenants.remove(place, size);
            return Err(Full);
        };
        let fresh = in_flight(place, self.in_flight.len());
        // A record dropped to make room lends its allocation to the new one.
        let record = match spare {
            Some(mut record) => {
                *record = fresh;
                record
            }
            None => Box::new(fresh),
        };
        self.next_id += 1;
        self.bytes += size;
        self.list(hash, id, lease_until);
        self.table
            .insert_unique(hash, Slot { hash, record }, |slot| slot.hash);
        Ok(Begin::Acquired(token))
    }

    /// Puts a new in-flight record in the list.
    fn list(&mut self, hash: u64, id: u64, lease_until: Nanos) {
        self.in_flight.push(Held { hash, id });
        self.dead_check_at = self.dead_check_at.min(lease_until);
    }

    /// Takes entry `slot` out of the in-flight list, and tells the record moved into its place.
    fn unlist(&mut self, slot: usize) {
        self.in_flight.swap_remove(slot);
        if let Some(&Held { hash, id }) = self.in_flight.get(slot) {
            let moved = self.table.find_mut(hash, |s| s.record.id == id);
            if let Some(Slot { record, .. }) = moved
                && let State::InFlight { slot: held, .. } = &mut record.state
            {
                *held = slot;
            }
        }
    }

    pub(super) fn renew(
        &mut self,
        hash: u64,
        key: &RecordKey,
        token: LockToken,
        lease_until: Nanos,
    ) -> bool {
        match self.find_mut(hash, key) {
            Some(record) if record.held_by(token) => {
                record.deadline = lease_until;
                true
            }
            _ => false,
        }
    }

    pub(super) fn complete(
        &mut self,
        hash: u64,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        expires_at: Nanos,
    ) -> bool {
        let size = completed_size(key, &response);
        let Some(record) = self.find_mut(hash, key) else {
            return false;
        };
        let State::InFlight { token: held, slot } = record.state else {
            return false;
        };
        if held != token {
            return false;
        }
        let (old, id, tenant) = (record.size, record.id, record.tenant);
        record.size = size;
        record.deadline = expires_at;
        record.state = State::Completed(response);
        self.bytes = self.bytes - old + size;
        self.unlist(slot);
        let due = Due {
            at: expires_at,
            id,
            hash,
        };
        self.queue_completed(tenant, due, old, size);
        // A record taken over after it expired left its entry behind, stale: a key used again
        // and again would grow the queue by one entry per completion until the next prune.
        self.compact_expiries();
        self.changes = self.changes.wrapping_add(1);
        true
    }

    /// Puts a completed record in the shard's expiry queue and its tenant's, with its size
    /// (`old` bytes in flight, `new` completed) in the tenant's bytes.
    fn queue_completed(&mut self, tenant: Place, due: Due, old: usize, new: usize) {
        self.expiries.push(due);
        let table = &self.table;
        let is_live_entry = |due: &Due| {
            table
                .find(due.hash, |slot| slot.record.id == due.id)
                .is_some()
        };
        self.tenants
            .completed(tenant, due, (old, new), is_live_entry);
    }

    pub(super) fn release(&mut self, hash: u64, key: &RecordKey, token: LockToken) -> bool {
        let found = self.table.find_entry(hash, |slot| {
            slot.hash == hash && slot.record.key == *key && slot.record.held_by(token)
        });
        let Ok(entry) = found else {
            return false;
        };
        let (slot, _) = entry.remove();
        self.forget_removed(&slot.record);
        true
    }

    /// Accounts for a record taken out of the table.
    fn forget_removed(&mut self, record: &Record) {
        self.bytes -= record.size;
        self.tenants.remove(record.tenant, record.size);
        if let State::InFlight { slot, .. } = record.state {
            self.unlist(slot);
        }
    }

    pub(super) fn forget(&mut self, hash: u64, key: &RecordKey, force: bool, now: Nanos) -> Forget {
        let found = self
            .table
            .find_entry(hash, |slot| slot.hash == hash && slot.record.key == *key);
        let Ok(entry) = found else {
            return Forget::NotFound;
        };
        let record = &entry.get().record;
        let answer = if !record.is_live(now) {
            Forget::NotFound
        } else if matches!(record.state, State::InFlight { .. }) && !force {
            return Forget::InFlight;
        } else {
            Forget::Forgotten
        };
        // A dead record is removed too: it is invisible already.
        let (slot, _) = entry.remove();
        self.changes = self.changes.wrapping_add(1);
        self.forget_removed(&slot.record);
        self.compact_expiries();
        answer
    }
}

/// The bytes a completed record counts for: its key, its stored headers and body, and the
/// fixed overheads.
pub(super) fn completed_size(key: &RecordKey, response: &StoredResponse) -> usize {
    RECORD_OVERHEAD + key.text().as_bytes().len() + response.payload_size(HEADER_OVERHEAD)
}
