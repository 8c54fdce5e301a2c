//! One shard of the [`MemoryStore`](super::MemoryStore): its records, the order in which its
//! completed records expire, and the list of its in-flight records.
//!
//! Every function here runs under the shard's lock, and none of them looks at another shard.

use foldhash::fast::SeedableRandomState;
use hashbrown::HashTable;

use super::Nanos;
use super::expiries::{Due, Expiries};
use super::snapshot::Saved;
use super::tenants::Tenants;
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::{Begin, Forget, LockToken, RecordInfo, RecordKey, RecordState};

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

/// Why a shard refused a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    /// In-flight records fill the shard.
    Store,
    /// The tenant's records fill its share of the shard, and all of them are in flight.
    Tenant,
}

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
    /// The high half of this shard's lock tokens; the low half is the record's id. Unique per
    /// shard of a store, so tokens never repeat within a store, and taken from no counter
    /// shared between threads.
    token_seed: u64,
    bytes: usize,
    max_len: usize,
    max_bytes: usize,
    /// How many records each tenant holds, and its completed ones by expiry.
    tenants: Tenants,
}

impl Shard {
    pub(super) fn new(
        max_len: usize,
        max_bytes: usize,
        max_per_tenant: usize,
        token_seed: u64,
        hasher: SeedableRandomState,
    ) -> Self {
        Self {
            table: HashTable::new(),
            expiries: Expiries::default(),
            in_flight: Vec::new(),
            dead_check_at: Nanos::MAX,
            next_id: 0,
            token_seed,
            bytes: 0,
            max_len,
            max_bytes,
            tenants: Tenants::new(max_per_tenant, hasher),
        }
    }

    /// How many records `tenant` holds in this shard.
    pub(super) fn tenant_len(&self, tenant: &crate::tenant::TenantId) -> usize {
        self.tenants.count(tenant)
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries in the expiry queue, stale ones included.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.expiries.len()
    }

    /// Entries in the tenants' queues, stale ones included.
    #[cfg(test)]
    pub(super) fn tenants_queued(&self) -> usize {
        self.tenants.queued()
    }

    /// Checks the shard's counts against its records: each tenant's count, the bytes, the
    /// in-flight list.
    #[cfg(test)]
    pub(super) fn check_counts(&self) {
        use std::collections::HashMap;
        let mut tenants: HashMap<crate::tenant::TenantId, usize> = HashMap::new();
        let mut bytes = 0;
        let mut in_flight = 0;
        for slot in &self.table {
            *tenants.entry(*slot.record.key.tenant()).or_default() += 1;
            bytes += slot.record.size;
            in_flight += usize::from(matches!(slot.record.state, State::InFlight { .. }));
        }
        let counted: HashMap<_, _> = self.tenants.counts().collect();
        assert_eq!(counted, tenants, "each tenant's count is its records");
        assert_eq!(self.bytes, bytes, "bytes");
        assert_eq!(self.in_flight.len(), in_flight, "the in-flight list");
        assert!(self.table.len() <= self.max_len, "the shard's bound");
        assert!(
            counted.values().all(|&n| n <= self.tenants.max),
            "each tenant's bound"
        );
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
        let token = LockToken::from_u128(u128::from(self.token_seed) << 64 | u128::from(id));
        let size = RECORD_OVERHEAD + key.key().len();
        if let Some(record) = self.find_mut(hash, key) {
            if record.is_live(now) {
                return Ok(record.decide(fingerprint));
            }
            // Expired, or in flight with its holder gone: the key is free again. The record's
            // allocation is reused; its old place in the expiry queue becomes stale.
            let old_size = record.size;
            let old_slot = match record.state {
                State::InFlight { slot, .. } => Some(slot),
                State::Completed(_) => None,
            };
            *record = Record {
                key: key.clone(),
                fingerprint: *fingerprint,
                id,
                deadline: lease_until,
                size,
                state: State::InFlight { token, slot: 0 },
            };
            self.next_id += 1;
            self.bytes = self.bytes - old_size + size;
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
        // A tenant at its bound makes room from its own records, before the shard does.
        let tenant = *key.tenant();
        if !self.tenants.try_add(tenant) {
            self.make_tenant_room(&tenant, now, removed)?;
            self.tenants.add(tenant);
        }
        let Some(Room(spare)) = self.make_room(now, removed) else {
            self.tenants.remove(&tenant);
            return Err(Full::Store);
        };
        let fresh = Record {
            key: key.clone(),
            fingerprint: *fingerprint,
            id,
            deadline: lease_until,
            size,
            state: State::InFlight {
                token,
                slot: self.in_flight.len(),
            },
        };
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

    fn has_room(&self) -> bool {
        self.table.len() < self.max_len && self.bytes < self.max_bytes
    }

    /// Makes room for one more record. First go the records that are dead already: in-flight
    /// ones whose holder died, then expired completed ones (the front of the expiry queue);
    /// then live completed records, nearest expiry first, which count as evicted. In-flight
    /// records are never touched: `None` when they alone fill the shard.
    fn make_room(&mut self, now: Nanos, removed: &mut Removed) -> Option<Room> {
        if !self.has_room() && now >= self.dead_check_at {
            removed.pruned += self.prune_in_flight(now);
        }
        let mut spare = None;
        while !self.has_room() {
            let due = self.expiries.pop()?;
            if let Some(record) = self.remove_due(due) {
                if record.is_live(now) {
                    removed.evicted += 1;
                } else {
                    removed.pruned += 1;
                }
                spare = Some(record);
            }
        }
        Some(Room(spare))
    }

    /// Makes room for one more record of `tenant`, which holds its share of the shard: first go
    /// the records that are dead already (in-flight ones whose holder died, the tenant's expired
    /// ones), then the tenant's live completed records, nearest expiry first, which count as
    /// evicted. Other tenants' live records are never touched, nor in-flight ones:
    /// [`Full::Tenant`] when the tenant's in-flight records alone fill its share.
    fn make_tenant_room(
        &mut self,
        tenant: &crate::tenant::TenantId,
        now: Nanos,
        removed: &mut Removed,
    ) -> Result<(), Full> {
        if now >= self.dead_check_at {
            removed.pruned += self.prune_in_flight(now);
        }
        while self.tenants.count(tenant) >= self.tenants.max {
            let due = self.tenants.get_mut(tenant).and_then(|t| t.completed.pop());
            let Some(due) = due else {
                return Err(Full::Tenant);
            };
            if let Some(record) = self.remove_due(due) {
                if record.is_live(now) {
                    removed.evicted += 1;
                } else {
                    removed.pruned += 1;
                }
            }
        }
        // The records dropped here left stale entries in the shard's queue.
        self.compact_expiries();
        Ok(())
    }

    /// Removes the completed record `due` points to, if the entry is not stale.
    fn remove_due(&mut self, due: Due) -> Option<Box<Record>> {
        let entry = self
            .table
            .find_entry(due.hash, |slot| slot.record.id == due.id)
            .ok()?;
        if !matches!(entry.get().record.state, State::Completed(_)) {
            return None;
        }
        let (slot, _) = entry.remove();
        self.bytes -= slot.record.size;
        self.tenants.remove(slot.record.key.tenant());
        Some(slot.record)
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
        let (old, id) = (record.size, record.id);
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
        self.queue_completed(key.tenant(), due);
        true
    }

    /// Puts a completed record in the shard's expiry queue and its tenant's.
    fn queue_completed(&mut self, tenant: &crate::tenant::TenantId, due: Due) {
        self.expiries.push(due);
        let table = &self.table;
        if let Some(tenant) = self.tenants.get_mut(tenant) {
            tenant.push(due, |due| {
                table
                    .find(due.hash, |slot| slot.record.id == due.id)
                    .is_some()
            });
        }
    }

    /// The live completed records, for a snapshot; `wall` turns a deadline into wall-clock
    /// time.
    pub(super) fn saved(
        &self,
        now: Nanos,
        out: &mut Vec<Saved>,
        wall: impl Fn(Nanos) -> std::time::SystemTime,
    ) {
        for Slot { record, .. } in &self.table {
            if let State::Completed(response) = &record.state
                && record.is_live(now)
            {
                out.push(Saved {
                    key: record.key.clone(),
                    fingerprint: record.fingerprint,
                    response: response.clone(),
                    expires_at: wall(record.deadline),
                });
            }
        }
    }

    /// Puts a completed record read from a snapshot in the shard, if its key is absent and
    /// there is room for it without dropping another record; `false` otherwise.
    pub(super) fn restore(&mut self, hash: u64, saved: Saved, expires_at: Nanos) -> bool {
        if self.find(hash, &saved.key).is_some() {
            return false;
        }
        let tenant = *saved.key.tenant();
        if !self.tenants.try_add(tenant) {
            return false;
        }
        if !self.has_room() {
            self.tenants.remove(&tenant);
            return false;
        }
        let id = self.next_id;
        self.next_id += 1;
        let size = completed_size(&saved.key, &saved.response);
        self.bytes += size;
        let record = Box::new(Record {
            key: saved.key,
            fingerprint: saved.fingerprint,
            id,
            deadline: expires_at,
            size,
            state: State::Completed(saved.response),
        });
        self.table
            .insert_unique(hash, Slot { hash, record }, |slot| slot.hash);
        let due = Due {
            at: expires_at,
            id,
            hash,
        };
        self.queue_completed(&tenant, due);
        true
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
        self.tenants.remove(record.key.tenant());
        if let State::InFlight { slot, .. } = record.state {
            self.unlist(slot);
        }
    }

    pub(super) fn lookup(&self, hash: u64, key: &RecordKey, now: Nanos) -> Option<Info> {
        let record = self.find(hash, key).filter(|r| r.is_live(now))?;
        let state = match &record.state {
            State::InFlight { .. } => InfoState::InFlight,
            State::Completed(response) => InfoState::Completed {
                status: response.status(),
                replayable: !response.is_omitted(),
            },
        };
        Some(Info {
            fingerprint: record.fingerprint,
            deadline: record.deadline,
            state,
        })
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
        self.forget_removed(&slot.record);
        self.compact_expiries();
        answer
    }

    /// Removes every expired record and every in-flight record whose holder died, at most
    /// `budget` expired ones; returns how many were removed and whether expired ones are left.
    pub(super) fn prune(&mut self, now: Nanos, budget: usize) -> (u64, bool) {
        let mut removed = 0;
        for _ in 0..budget {
            match self.expiries.peek() {
                Some(due) if due.at <= now => {}
                _ => return (removed + self.prune_in_flight(now), false),
            }
            let Some(due) = self.expiries.pop() else {
                break;
            };
            removed += u64::from(self.remove_due(due).is_some());
        }
        (removed + self.prune_in_flight(now), true)
    }

    /// Removes the in-flight records whose lease ran out: their holder died.
    fn prune_in_flight(&mut self, now: Nanos) -> u64 {
        if now < self.dead_check_at {
            return 0;
        }
        let mut removed = 0;
        let mut next_check = Nanos::MAX;
        let mut i = 0;
        while let Some(&Held { hash, id }) = self.in_flight.get(i) {
            let Ok(entry) = self.table.find_entry(hash, |slot| slot.record.id == id) else {
                // Every listed record is in the table; were one not, its entry would go.
                self.in_flight.swap_remove(i);
                continue;
            };
            let deadline = entry.get().record.deadline;
            if deadline > now {
                next_check = next_check.min(deadline);
                i += 1;
                continue;
            }
            let (slot, _) = entry.remove();
            // Moves the last entry to `i`, which is looked at next.
            self.forget_removed(&slot.record);
            removed += 1;
        }
        self.dead_check_at = next_check;
        removed
    }

    /// Rebuilds the expiry queue when stale entries (of forgotten records) outnumber the live
    /// ones, so that it never grows past twice the records it orders.
    fn compact_expiries(&mut self) {
        let completed = self.table.len() - self.in_flight.len();
        if self.expiries.len() <= 2 * completed + 64 {
            return;
        }
        let live = self
            .table
            .iter()
            .filter(|slot| matches!(slot.record.state, State::Completed(_)))
            .map(|slot| Due {
                at: slot.record.deadline,
                id: slot.record.id,
                hash: slot.hash,
            });
        self.expiries.rebuild(live);
    }
}

/// A record as `lookup` reads it, with its deadline still on the store's clock.
pub(super) struct Info {
    pub(super) fingerprint: Fingerprint,
    pub(super) deadline: Nanos,
    pub(super) state: InfoState,
}

pub(super) enum InfoState {
    InFlight,
    Completed {
        status: http::StatusCode,
        replayable: bool,
    },
}

impl Info {
    /// The public form, with `deadline` turned into wall-clock time by `at`.
    pub(super) fn into_record_info(
        self,
        at: impl Fn(Nanos) -> std::time::SystemTime,
    ) -> RecordInfo {
        let deadline = at(self.deadline);
        let state = match self.state {
            InfoState::InFlight => RecordState::InFlight {
                lease_until: deadline,
            },
            InfoState::Completed { status, replayable } => RecordState::Completed {
                status,
                replayable,
                expires_at: deadline,
            },
        };
        RecordInfo::new(self.fingerprint, state)
    }
}

/// The bytes a completed record counts for: its key, its stored headers and body, and the
/// fixed overheads.
pub(super) fn completed_size(key: &RecordKey, response: &StoredResponse) -> usize {
    let headers: usize = response
        .header_list()
        .iter()
        .map(|(name, value)| HEADER_OVERHEAD + name.as_str().len() + value.len())
        .sum();
    RECORD_OVERHEAD + key.key().len() + headers + response.body().len()
}
