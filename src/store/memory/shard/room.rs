//! Making room for a new record, fairly among tenants when the shard is full, and pruning what
//! expired or whose holder died.

use super::super::Nanos;
use super::super::expiries::Due;
use super::{Held, Record, Removed, Room, Shard, State};

impl Shard {
    pub(super) fn has_room(&self) -> bool {
        self.table.len() < self.max_len && self.bytes < self.max_bytes
    }

    /// Makes room for one more record. First go the records that are dead already: in-flight
    /// ones whose holder died, then expired completed ones (the front of the expiry queue);
    /// then live completed records, nearest expiry first, which count as evicted. In-flight
    /// records are never touched: `None` when they alone fill the shard.
    pub(super) fn make_room(&mut self, now: Nanos, removed: &mut Removed) -> Option<Room> {
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

    /// Makes room for one more record of `tenant` in a full shard, fairly. First go the records
    /// that are dead already, whoever's they are: in-flight ones whose holder died, then
    /// expired completed ones, nearest expiry first, while the shard is full. Then, while it is
    /// still full: when `tenant` holds its share or more (of the records or of the bytes), its
    /// own live completed records, nearest expiry first (counted as evicted): its completed
    /// records go before anyone else's. When it is within its share, completed records of the
    /// tenant that holds the most of its share, while that one is over it. Otherwise nothing
    /// here (a tenant at its share whose records are all in flight included: only a store full
    /// of in-flight records refuses a new key): the shard then drops the nearest expiry of all
    /// ([`make_room`](Self::make_room)). A tenant can thus hold more than its share only by
    /// requests in flight, which admission bounds. A share of records takes one record to make
    /// room; a share of bytes may take several (a large response completed after its room was
    /// made).
    pub(super) fn make_fair_room(
        &mut self,
        tenant: &crate::tenant::TenantId,
        now: Nanos,
        removed: &mut Removed,
    ) {
        if now >= self.dead_check_at {
            removed.pruned += self.prune_in_flight(now);
        }
        // An expired record goes before any live one is evicted, and before a tenant is
        // refused.
        while !self.has_room() {
            match self.expiries.peek() {
                Some(due) if due.at <= now => {}
                _ => break,
            }
            if let Some(due) = self.expiries.pop() {
                removed.pruned += u64::from(self.remove_due(due).is_some());
            }
        }
        if self.has_room() {
            return;
        }
        // One record at a time, while the shard is full: a share of bytes may take several.
        while !self.has_room() {
            let from = if self.tenants.at_share(tenant) {
                *tenant
            } else if let Some(heaviest) = self.tenants.over_share() {
                heaviest
            } else {
                break;
            };
            if !self.drop_nearest_of(&from, now, removed) {
                break;
            }
        }
        // The record dropped here left a stale entry in the shard's queue.
        self.compact_expiries();
    }

    /// Drops `tenant`'s completed record nearest expiry (stale entries skipped); `false` when it
    /// has none.
    fn drop_nearest_of(
        &mut self,
        tenant: &crate::tenant::TenantId,
        now: Nanos,
        removed: &mut Removed,
    ) -> bool {
        loop {
            let due = self.tenants.get_mut(tenant).and_then(|t| t.completed.pop());
            let Some(due) = due else {
                return false;
            };
            if let Some(record) = self.remove_due(due) {
                if record.is_live(now) {
                    removed.evicted += 1;
                } else {
                    removed.pruned += 1;
                }
                return true;
            }
        }
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
        let tenant = slot.record.tenant;
        if let Some(queue) = self.tenants.at_mut(tenant) {
            queue.drop_through(due);
        }
        self.tenants.remove(tenant, slot.record.size);
        Some(slot.record)
    }

    /// Removes every expired record and every in-flight record whose holder died, at most
    /// `budget` expired ones; returns how many were removed and whether expired ones are left.
    pub(in crate::store::memory) fn prune(&mut self, now: Nanos, budget: usize) -> (u64, bool) {
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
    pub(super) fn compact_expiries(&mut self) {
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
