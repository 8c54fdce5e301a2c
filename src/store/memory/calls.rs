//! [`MemoryStore`]'s calls of the [`IdempotencyStore`] contract: each finds its record's shard
//! and takes its lock once.

use std::time::Duration;

use super::shard::{Full, Removed};
use super::{MemoryStore, nanos, read, write};
use crate::fingerprint::Fingerprint;
use crate::store::{
    Begin, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, StoreError, StoreErrorKind,
};
use crate::stored::StoredResponse;

/// The error of a new key that finds its shard full of in-flight records.
fn full(_: Full) -> StoreError {
    StoreError::msg(
        StoreErrorKind::CapacityExceeded,
        "the store is full of requests in flight: no completed record can be dropped to make room",
    )
}

impl IdempotencyStore for MemoryStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_tasks();
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let shard = inner.shard(hash);
        let now = inner.now();
        // Replays, 409 and 422 only read: a shared lock, and no copy of the key.
        if let Some(answer) = read(shard).decide(hash, key, fingerprint, now) {
            return Ok(answer);
        }
        let mut removed = Removed::default();
        let lease_until = now.saturating_add(nanos(lease));
        // The write lock: the decision and the write are one step.
        let begun = write(shard).begin(hash, key, fingerprint, lease_until, now, &mut removed);
        if removed.evicted > 0 {
            inner.evicted(removed.evicted, now);
        }
        begun.map_err(full)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        // The token says where its record is; the record's key is still checked there.
        let hash = inner.token_hash(token);
        let lease_until = inner.now().saturating_add(nanos(lease));
        if write(inner.shard(hash)).renew(hash, key, token, lease_until) {
            Ok(())
        } else {
            Err(StoreError::lease_lost())
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let hash = inner.token_hash(token);
        let expires_at = inner.now().saturating_add(nanos(ttl));
        if write(inner.shard(hash)).complete(hash, key, token, response, expires_at) {
            Ok(())
        } else {
            Err(StoreError::lease_lost())
        }
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let inner = &*self.inner;
        let hash = inner.token_hash(token);
        if write(inner.shard(hash)).release(hash, key, token) {
            Ok(())
        } else {
            Err(StoreError::lease_lost())
        }
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let now = inner.now();
        let Some(info) = read(inner.shard(hash)).lookup(hash, key, now) else {
            return Ok(None);
        };
        let wall_epoch = inner.wall_epoch();
        Ok(Some(info.into_record_info(|deadline| {
            wall_epoch + Duration::from_nanos(deadline)
        })))
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let inner = &*self.inner;
        let hash = inner.hash(key);
        let now = inner.now();
        Ok(write(inner.shard(hash)).forget(hash, key, force, now))
    }
}
