//! A shard's side of a snapshot: its completed records out, records read back in.

use super::super::Nanos;
use super::super::expiries::Due;
use super::super::snapshot::Saved;
use super::{Record, Removed, Shard, Slot, State, completed_size};

impl Shard {
    /// The live completed records, for a snapshot; `wall` turns a deadline into wall-clock
    /// time.
    pub(in crate::store::memory) fn saved(
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
    /// there is room for it; `false` otherwise. As for a new key in a shard with room, no
    /// tenant's share bounds it: a store that one tenant filled comes back whole. A full shard
    /// makes room as for a new key, but only from a tenant over its share, for a tenant within
    /// its own: records come back nearest expiry last, so a tenant at its share keeps those it
    /// has, and one tenant's records cannot crowd out another's on a restart (the shards of a
    /// new store divide the keys anew) or into smaller bounds. The records dropped for it are
    /// counted in `displaced`.
    pub(in crate::store::memory) fn restore(
        &mut self,
        hash: u64,
        saved: Saved,
        (expires_at, now): (Nanos, Nanos),
        displaced: &mut Removed,
    ) -> bool {
        if self.find(hash, &saved.key).is_some() {
            return false;
        }
        if !self.has_room() {
            if self.tenants.at_share(saved.key.tenant()) {
                return false;
            }
            self.make_fair_room(saved.key.tenant(), now, displaced);
            if !self.has_room() {
                return false;
            }
        }
        let tenant = *saved.key.tenant();
        let size = completed_size(&saved.key, &saved.response);
        let place = self.tenants.add(tenant, size);
        let id = self.next_id;
        self.next_id += 1;
        self.bytes += size;
        let record = Box::new(Record {
            key: saved.key,
            fingerprint: saved.fingerprint,
            id,
            deadline: expires_at,
            size,
            tenant: place,
            state: State::Completed(saved.response),
        });
        self.table
            .insert_unique(hash, Slot { hash, record }, |slot| slot.hash);
        let due = Due {
            at: expires_at,
            id,
            hash,
        };
        self.queue_completed(place, due, size, size);
        self.changes = self.changes.wrapping_add(1);
        true
    }
}
