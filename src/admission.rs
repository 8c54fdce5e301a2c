//! Admission: a bound on the keyed requests a layer works on at once, overall and per tenant.
//!
//! The bound is checked once, when the request's body is read and before the store's `begin`
//! (a client still sending its body holds no place): past it, a new keyed request is answered
//! `503` with `Retry-After` and nothing is started. A request that was admitted keeps
//! its permit until its flow ends, whether its client stays or goes away (a detached run holds
//! the permit of its request). So keyed work is bounded without ever cutting off a run that
//! holds its key: whatever other callers do, a handler that started runs to its end.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::tenant::TenantId;

/// The default bound on keyed requests at work at once, across tenants.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// The default bound on one tenant's keyed requests at work at once.
pub(crate) const DEFAULT_MAX_IN_FLIGHT_PER_TENANT: usize = 1_000;

/// Tenants' counts are kept in this many maps, chosen by the tenant's id, each behind a lock of
/// its own held for one map operation.
const TENANT_SHARDS: usize = 64;

/// A shard keeps the entries of tenants with nothing at work (a tenant that comes back is
/// counted without an insert) until it holds this many, or twice as many as it kept at its last
/// sweep: then the next new tenant's arrival first sweeps them out.
const SHARD_ENTRIES: usize = 256;

/// The counts of one layer, shared by its clones and every service it builds: an atomic
/// operation on the total, and one short lock on the tenant's shard, per keyed request. Each
/// tenant is counted exactly, apart from every other (a tenant at its bound never holds back
/// another). The maps hold the tenants at work, and at most about as many again that were (see
/// [`SHARD_ENTRIES`]).
pub(crate) struct Admission {
    total: AtomicUsize,
    tenants: Box<[Mutex<Shard>]>,
}

/// One shard's counts: each tenant with keyed requests at work (or lately), and how many.
#[derive(Default)]
struct Shard {
    counts: HashMap<TenantId, u32, BuildHasherDefault<IdHasher>>,
    /// Past this many entries, a new tenant sweeps out the entries at zero first.
    sweep_at: usize,
}

impl Shard {
    /// Counts one more request of `tenant`, unless it has `max` at work.
    fn enter(&mut self, tenant: &TenantId, max: u32) -> bool {
        if let Some(n) = self.counts.get_mut(tenant) {
            if *n >= max {
                return false;
            }
            *n += 1;
            return true;
        }
        if self.counts.len() >= self.sweep_at.max(SHARD_ENTRIES) {
            self.counts.retain(|_, n| *n > 0);
            self.sweep_at = 2 * self.counts.len();
        }
        self.counts.insert(*tenant, 1);
        true
    }

    fn leave(&mut self, tenant: &TenantId) {
        if let Some(n) = self.counts.get_mut(tenant) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A hasher for tenant ids, which are uniform hashes already (a MAC of the tenant, or the
/// shared scope's zeros) and hash as one word, their four folded: it keeps that word.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut last = [0; 8];
        let n = bytes.len().min(8);
        last[..n].copy_from_slice(&bytes[bytes.len() - n..]);
        self.0 ^= u64::from_le_bytes(last);
    }
}

/// The bounds a request is admitted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) total: usize,
    pub(crate) per_tenant: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: DEFAULT_MAX_IN_FLIGHT,
            per_tenant: DEFAULT_MAX_IN_FLIGHT_PER_TENANT,
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The layer works on its most keyed requests at once.
    Total,
    /// The request's tenant has its most keyed requests at work.
    Tenant,
}

impl Admission {
    /// A permit for one keyed request of `tenant` under `limits`, or why there is none.
    pub(crate) fn admit(
        self: &Arc<Self>,
        tenant: &TenantId,
        limits: Limits,
    ) -> Result<Permit, Refused> {
        let counted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limits.total).then_some(n + 1)
            });
        if counted.is_err() {
            return Err(Refused::Total);
        }
        // A per-tenant bound at least the total one can never be the one reached.
        let counted = (limits.per_tenant < limits.total).then_some(*tenant);
        if let Some(tenant) = &counted {
            let max = u32::try_from(limits.per_tenant).unwrap_or(u32::MAX);
            let entered = self.shard(tenant).enter(tenant, max);
            if !entered {
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Tenant);
            }
        }
        Ok(Permit {
            admission: self.clone(),
            tenant: counted,
        })
    }

    /// The counts of `tenant`'s shard, locked. Nothing panics under the lock; a poisoned one
    /// is taken as it is.
    fn shard(&self, tenant: &TenantId) -> MutexGuard<'_, Shard> {
        let bytes = tenant.as_bytes();
        let shard = usize::from(bytes[0]) % TENANT_SHARDS;
        self.tenants[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no tenant has keyed requests at work.
    #[cfg(test)]
    fn counts_none(&self) -> bool {
        let shards = self.tenants.iter().map(|shard| shard.lock().unwrap());
        shards
            .into_iter()
            .all(|shard| shard.counts.values().all(|&n| n == 0))
    }

    /// How many keyed requests of `tenant` are at work now.
    #[cfg(test)]
    fn of(&self, tenant: &TenantId) -> u32 {
        self.shard(tenant).counts.get(tenant).copied().unwrap_or(0)
    }

    /// How many keyed requests are at work now.
    pub(crate) fn in_flight(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    fn leave(&self, tenant: Option<&TenantId>) {
        if let Some(tenant) = tenant {
            self.shard(tenant).leave(tenant);
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            total: AtomicUsize::new(0),
            tenants: (0..TENANT_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// One admitted keyed request, counted until its flow ends (or its detached run does).
pub(crate) struct Permit {
    admission: Arc<Admission>,
    /// The tenant it counts for, when tenants are counted.
    tenant: Option<TenantId>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.leave(self.tenant.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_total_and_per_tenant() {
        let admission = Arc::<Admission>::default();
        let limits = Limits {
            total: 3,
            per_tenant: 2,
        };
        let (a, b) = (TenantId::from_bytes([1; 32]), TenantId::from_bytes([2; 32]));
        let a1 = admission.admit(&a, limits).unwrap();
        let a2 = admission.admit(&a, limits).unwrap();
        assert_eq!(admission.admit(&a, limits).err(), Some(Refused::Tenant));
        let b1 = admission.admit(&b, limits).unwrap();
        assert_eq!(admission.admit(&b, limits).err(), Some(Refused::Total));
        assert_eq!(admission.in_flight(), 3);
        drop(a1);
        let a3 = admission.admit(&a, limits).unwrap();
        assert_eq!(admission.admit(&b, limits).err(), Some(Refused::Total));
        drop((a2, a3, b1));
        assert_eq!(admission.in_flight(), 0);
        assert!(admission.counts_none());
    }

    #[test]
    fn tenants_of_one_shard_are_counted_apart() {
        let admission = Arc::<Admission>::default();
        let limits = Limits {
            total: 100,
            per_tenant: 2,
        };
        // The same first bytes: one shard (and, before, one counter).
        let mut bytes = [7; 32];
        let a = TenantId::from_bytes(bytes);
        bytes[31] = 8;
        let b = TenantId::from_bytes(bytes);
        let held: Vec<_> = (0..2)
            .map(|_| admission.admit(&a, limits).unwrap())
            .collect();
        assert_eq!(admission.admit(&a, limits).err(), Some(Refused::Tenant));
        let b1 = admission.admit(&b, limits).unwrap();
        let b2 = admission.admit(&b, limits).unwrap();
        assert_eq!(admission.admit(&b, limits).err(), Some(Refused::Tenant));
        assert_eq!((admission.of(&a), admission.of(&b)), (2, 2));
        drop((held, b1));
        assert_eq!((admission.of(&a), admission.of(&b)), (0, 1));
        drop(b2);
        assert!(admission.counts_none());
        assert_eq!(admission.in_flight(), 0);
    }

    #[test]
    fn tenants_gone_are_swept_out() {
        let admission = Arc::<Admission>::default();
        let limits = Limits {
            total: 100_000,
            per_tenant: 4,
        };
        // One tenant stays at work throughout; 100,000 others come and go.
        let mut stays = [0; 32];
        stays[1] = 1;
        let stays = TenantId::from_bytes(stays);
        let held = admission.admit(&stays, limits).unwrap();
        for i in 0..100_000u32 {
            let mut bytes = [0; 32];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            bytes[31] = 1;
            drop(
                admission
                    .admit(&TenantId::from_bytes(bytes), limits)
                    .unwrap(),
            );
        }
        for shard in admission.tenants.iter() {
            assert!(shard.lock().unwrap().counts.len() <= SHARD_ENTRIES);
        }
        assert_eq!(
            admission.of(&stays),
            1,
            "a tenant at work is never swept out"
        );
        drop(held);
        assert!(admission.counts_none());
        assert_eq!(admission.in_flight(), 0);
    }

    #[test]
    fn counts_stay_exact_under_threads() {
        let admission = Arc::<Admission>::default();
        let limits = Limits {
            total: 64,
            per_tenant: 8,
        };
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let admission = &admission;
                scope.spawn(move || {
                    let tenant = TenantId::from_bytes([t % 3; 32]);
                    for _ in 0..2_000 {
                        let permits: Vec<_> = (0..4)
                            .filter_map(|_| admission.admit(&tenant, limits).ok())
                            .collect();
                        assert!(permits.len() <= 8);
                        assert!(admission.of(&tenant) <= 8);
                    }
                });
            }
        });
        assert_eq!(admission.in_flight(), 0);
        assert!(admission.counts_none());
    }
}
