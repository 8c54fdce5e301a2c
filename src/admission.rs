//! Admission: a bound on the keyed requests a layer works on at once, overall and per tenant.
//!
//! The bound is checked once, when the request's body is read and before the store's `begin`
//! (a client still sending its body holds no place): past it, a new keyed request is answered
//! `503` with `Retry-After` and nothing is started. A request that was admitted keeps
//! its permit until its flow ends, whether its client stays or goes away (a detached run holds
//! the permit of its request). So keyed work is bounded without ever cutting off a run that
//! holds its key: whatever other callers do, a handler that started runs to its end.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::tenant::TenantId;

/// The default bound on keyed requests at work at once, across tenants.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// The default bound on one tenant's keyed requests at work at once.
pub(crate) const DEFAULT_MAX_IN_FLIGHT_PER_TENANT: usize = 1_000;

/// Tenants are counted in this many counters, chosen by the tenant's id (a uniform hash). Two
/// tenants that share a counter share its bound; with the default bounds no caller can use that
/// to hold another's share: it would take more keyed requests at work than the total bound
/// allows, spread over thousands of tenants to land enough of them on one counter.
const TENANT_COUNTERS: usize = 4096;

/// The counts of one layer, shared by its clones and every service it builds: two atomic
/// operations per keyed request, no lock.
pub(crate) struct Admission {
    total: AtomicUsize,
    tenants: Box<[AtomicU32]>,
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
        let counter = (limits.per_tenant < limits.total).then(|| counter_of(tenant));
        if let Some(counter) = counter {
            let max = u32::try_from(limits.per_tenant).unwrap_or(u32::MAX);
            let counted =
                self.tenants[counter].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                });
            if counted.is_err() {
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::Tenant);
            }
        }
        Ok(Permit {
            admission: self.clone(),
            counter,
        })
    }

    /// How many keyed requests are at work now.
    pub(crate) fn in_flight(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    fn leave(&self, counter: Option<usize>) {
        if let Some(counter) = counter {
            self.tenants[counter].fetch_sub(1, Ordering::AcqRel);
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The counter of `tenant`: its id is a uniform hash already.
fn counter_of(tenant: &TenantId) -> usize {
    let bytes = tenant.as_bytes();
    usize::from(u16::from_le_bytes([bytes[0], bytes[1]])) % TENANT_COUNTERS
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            total: AtomicUsize::new(0),
            tenants: (0..TENANT_COUNTERS).map(|_| AtomicU32::new(0)).collect(),
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
    counter: Option<usize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.leave(self.counter);
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
        assert!(
            admission
                .tenants
                .iter()
                .all(|c| c.load(Ordering::SeqCst) == 0)
        );
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
                    }
                });
            }
        });
        assert_eq!(admission.in_flight(), 0);
        assert!(
            admission
                .tenants
                .iter()
                .all(|c| c.load(Ordering::SeqCst) == 0)
        );
    }
}
