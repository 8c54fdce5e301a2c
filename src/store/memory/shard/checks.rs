//! What tests read of a shard, and the check of its counts against its records.

use super::{Shard, State};

impl Shard {
    /// Entries in the expiry queue, stale ones included.
    #[cfg(test)]
    pub(in crate::store::memory) fn queued(&self) -> usize {
        self.expiries.len()
    }

    /// A tenant's share of this shard's bytes.
    #[cfg(test)]
    pub(in crate::store::memory) fn tenant_share_bytes(&self) -> usize {
        self.tenants.max_bytes
    }

    /// How many times the shard looked through its tenants for the heaviest.
    #[cfg(test)]
    pub(in crate::store::memory) fn tenant_scans(&self) -> usize {
        self.tenants.scans
    }

    /// Entries in the tenants' queues, stale ones included.
    #[cfg(test)]
    pub(in crate::store::memory) fn tenants_queued(&self) -> usize {
        self.tenants.queued()
    }

    /// Checks the shard's counts against its records: each tenant's count, the bytes, the
    /// in-flight list.
    #[cfg(test)]
    pub(in crate::store::memory) fn check_counts(&self) {
        use std::collections::HashMap;
        let mut tenants: HashMap<crate::tenant::TenantId, usize> = HashMap::new();
        let mut bytes = 0;
        let mut in_flight = 0;
        self.tenants.check_places();
        for slot in &self.table {
            assert_eq!(
                self.tenants.id_at(slot.record.tenant),
                Some(*slot.record.key.tenant()),
                "a record's tenant at its place"
            );
            *tenants.entry(*slot.record.key.tenant()).or_default() += 1;
            bytes += slot.record.size;
            in_flight += usize::from(matches!(slot.record.state, State::InFlight { .. }));
        }
        let counted: HashMap<_, _> = self.tenants.counts().collect();
        assert_eq!(counted, tenants, "each tenant's count is its records");
        assert_eq!(self.bytes, bytes, "bytes");
        let mut tenant_bytes: HashMap<crate::tenant::TenantId, usize> = HashMap::new();
        for slot in &self.table {
            *tenant_bytes.entry(*slot.record.key.tenant()).or_default() += slot.record.size;
        }
        let counted_bytes: HashMap<_, _> = self.tenants.bytes().collect();
        assert_eq!(
            counted_bytes, tenant_bytes,
            "each tenant's bytes are its records'"
        );
        assert_eq!(self.in_flight.len(), in_flight, "the in-flight list");
        assert!(self.table.len() <= self.max_len, "the shard's bound");
        let over = counted
            .iter()
            .filter(|(t, n)| **n > self.tenants.max || tenant_bytes[*t] > self.tenants.max_bytes)
            .count();
        assert_eq!(self.tenants.over(), over, "the tenants over their share");
    }
}
