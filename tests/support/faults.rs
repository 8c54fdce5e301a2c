//! A store wrapper that fails, delays, hangs or loses the reply of any call, on command.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, LockToken, MemoryStore, RecordKey, StoreError,
    StoreErrorKind, StoredResponse, TenantId,
};

/// A store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Begin,
    Renew,
    Complete,
    Release,
}

/// What happens to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call never reaches the store and fails.
    Fail,
    /// The call reaches the store after a delay.
    Delay(Duration),
    /// The call never returns (a network partition): the layer's timeout must fire.
    Hang,
    /// The call reaches the store and takes effect, but its reply is lost: it fails.
    LoseReply,
    /// The store answers with a record it cannot decode (another version's format): the call
    /// fails as `Corrupt`.
    Corrupt,
}

#[derive(Default)]
struct Plan {
    faults: HashMap<Op, (Fault, Option<usize>)>,
    calls: HashMap<Op, usize>,
}

/// Wraps a store (a `MemoryStore` by default) and injects faults.
///
/// Each wrapper puts its records in a namespace of its own (a tenant derived from a fresh lock
/// token), so tests sharing one Redis or PostgreSQL server never meet.
#[derive(Clone)]
pub struct FaultyStore<S = MemoryStore> {
    pub inner: S,
    plan: Arc<Mutex<Plan>>,
    namespace: LockToken,
}

impl Default for FaultyStore {
    fn default() -> Self {
        Self::new(MemoryStore::new())
    }
}

impl<S> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            plan: Arc::default(),
            namespace: LockToken::random(),
        }
    }

    fn scoped(&self, key: &RecordKey) -> RecordKey {
        let mut scope = self.namespace.as_u128().to_be_bytes().to_vec();
        scope.extend_from_slice(key.tenant().as_bytes());
        RecordKey::new(TenantId::hashed(scope), key.key())
    }

    /// Every later `op` call suffers `fault`.
    pub fn always(&self, op: Op, fault: Fault) {
        self.plan.lock().unwrap().faults.insert(op, (fault, None));
    }

    /// The next `times` `op` calls suffer `fault`.
    pub fn times(&self, op: Op, fault: Fault, times: usize) {
        self.plan
            .lock()
            .unwrap()
            .faults
            .insert(op, (fault, Some(times)));
    }

    /// Every call of every kind fails (a store that is down), or none does.
    pub fn fail(&self, down: bool) {
        let mut plan = self.plan.lock().unwrap();
        for op in [Op::Begin, Op::Renew, Op::Complete, Op::Release] {
            if down {
                plan.faults.insert(op, (Fault::Fail, None));
            } else {
                plan.faults.remove(&op);
            }
        }
    }

    /// No more faults.
    pub fn heal(&self) {
        self.plan.lock().unwrap().faults.clear();
    }

    /// How many `op` calls were made, faulty or not.
    pub fn calls(&self, op: Op) -> usize {
        self.plan
            .lock()
            .unwrap()
            .calls
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_calls(&self) -> usize {
        self.plan.lock().unwrap().calls.values().sum()
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        let mut plan = self.plan.lock().unwrap();
        *plan.calls.entry(op).or_default() += 1;
        let (fault, remaining) = plan.faults.get_mut(&op)?;
        let fault = *fault;
        match remaining {
            Some(0) => None,
            Some(n) => {
                *n -= 1;
                Some(fault)
            }
            None => Some(fault),
        }
    }

    async fn apply<T>(
        &self,
        op: Op,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let down = || {
            let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "injected fault");
            StoreError::unavailable(io)
        };
        match self.next_fault(op) {
            None => call.await,
            Some(Fault::Fail) => Err(down()),
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                call.await
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::LoseReply) => {
                let _ = call.await;
                Err(down())
            }
            Some(Fault::Corrupt) => Err(StoreError::msg(
                StoreErrorKind::Corrupt,
                "injected fault: a record of an unknown format",
            )),
        }
    }
}

impl<S: IdempotencyStore> IdempotencyStore for FaultyStore<S> {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let key = &self.scoped(key);
        self.apply(Op::Begin, self.inner.begin(key, fingerprint, lease))
            .await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let key = &self.scoped(key);
        self.apply(Op::Renew, self.inner.renew(key, token, lease))
            .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = &self.scoped(key);
        self.apply(Op::Complete, self.inner.complete(key, token, response, ttl))
            .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let key = &self.scoped(key);
        self.apply(Op::Release, self.inner.release(key, token))
            .await
    }
}
