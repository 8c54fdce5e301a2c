//! [`IdempotencyStore`] for [`RedisStore`]: each call one script, then the replica wait.

use std::time::Duration;

use ::redis::Value;

use super::record::{self, Lua};
use super::{RedisStore, redis_error};
use crate::fingerprint::Fingerprint;
use crate::store::util::SentBegin;
use crate::store::{
    Begin, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, StoreError, StoreErrorKind,
};
use crate::stored::StoredResponse;

impl RedisStore {
    async fn invoke(&self, script: &Lua, key: &[u8], args: &[&[u8]]) -> Result<Value, StoreError> {
        self.invoke_again(script, key, args, args).await
    }

    /// Runs `script`; on one node, once more with `again` when the connection that carried it
    /// was found dropped (the server restarted, or closed the connection when it was idle or
    /// told to): the call may or may not have run, and the manager reconnects for the second.
    /// These scripts can run twice: `begin` finds its own token's record acquired, `renew` and
    /// `lookup` do what they did, and `complete` and `release`, told by `again`, take what their
    /// first run did as done (`forget` is never run again).
    async fn invoke_again(
        &self,
        script: &Lua,
        key: &[u8],
        args: &[&[u8]],
        again: &[&[u8]],
    ) -> Result<Value, StoreError> {
        match self.conn.run(script, key, args).await {
            Err(err)
                if self.conn.is_node()
                    && (err.is_connection_dropped() || err.is_unrecoverable_error()) =>
            {
                self.conn.run(script, key, again).await.map_err(redis_error)
            }
            result => result.map_err(redis_error),
        }
    }

    /// Runs one of the scripts that answer 1 (done) or 0 (not held by the token); `again` as
    /// for [`invoke_again`](Self::invoke_again).
    async fn fenced(
        &self,
        script: &Lua,
        key: &[u8],
        args: &[&[u8]],
        again: &[&[u8]],
    ) -> Result<(), StoreError> {
        match self.invoke_again(script, key, args, again).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::lease_lost()),
            other => Err(unexpected(&other)),
        }
    }

    /// With a replica wait set, the generation of the store's connection before a write, for
    /// [`replicated`](Self::replicated).
    fn write_generation(&self) -> u64 {
        self.replica_wait.map_or(0, |_| self.conn.generation())
    }

    /// With a replica wait set, waits until enough replicas have the writes made so far on the
    /// connection that carried the write to `key`, the store's connection of `generation`
    /// (read before the write). `WAIT` counts the writes of the connection it is sent on, and
    /// one that carried none answers at once: when the store's connection was replaced
    /// meanwhile (see [`Conn::generation`]), the wait cannot vouch for the write, and fails.
    async fn replicated(&self, key: &[u8], generation: u64) -> Result<(), StoreError> {
        let Some(wait) = self.replica_wait else {
            return Ok(());
        };
        let acknowledged = self
            .conn
            .wait(key, wait.replicas, wait.timeout)
            .await
            .map_err(redis_error)?;
        if self.conn.generation() != generation {
            return Err(StoreError::msg(
                StoreErrorKind::Unavailable,
                "the connection was replaced between the write and the replica wait",
            ));
        }
        if acknowledged >= i64::from(wait.replicas) {
            return Ok(());
        }
        Err(StoreError::msg(
            StoreErrorKind::Unavailable,
            format!(
                "the write reached {acknowledged} of the {} replicas required within {:?}",
                wait.replicas, wait.timeout
            ),
        ))
    }
}

impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let token = LockToken::random();
        let redis_key = self.redis_key(key);
        let record = record::in_flight(fingerprint, token);
        let lease_ms = record::millis(lease);
        let args: [&[u8]; 3] = [fingerprint.as_bytes(), &record, lease_ms.as_bytes()];
        let mut sent = SentBegin::new(self, key, token, lease);
        let generation = self.write_generation();
        let answer = self.invoke(&record::BEGIN, &redis_key, &args).await?;
        if answer != Value::Int(0) {
            sent.answered();
        }
        match answer {
            // Acquired: held by `sent` until the replicas have it too, so that a request gone
            // meanwhile leaves no record behind.
            Value::Int(0) => match self.replicated(&redis_key, generation).await {
                Ok(()) => {
                    sent.answered();
                    Ok(Begin::Acquired(token))
                }
                Err(err) => {
                    // The handler will not run: free the key for the retry. Should this fail
                    // too, `sent` tries again in the background.
                    let token = token.as_u128().to_be_bytes();
                    let again: [&[u8]; 2] = [&token, b"1"];
                    let _ = self
                        .fenced(&record::RELEASE, &redis_key, &[&token], &again)
                        .await;
                    Err(err)
                }
            },
            Value::Int(1) => Ok(Begin::InFlight),
            Value::Int(2) => Ok(Begin::Mismatch),
            Value::Int(3) => Err(StoreError::msg(
                StoreErrorKind::Corrupt,
                "the Redis key does not hold an idempotency record",
            )),
            Value::BulkString(bytes) => record::decode_completed(&bytes).map(Begin::Completed),
            other => Err(unexpected(&other)),
        }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let token = token.as_u128().to_be_bytes();
        let lease = record::millis(lease);
        let args: [&[u8]; 2] = [&token, lease.as_bytes()];
        self.fenced(&record::RENEW, &self.redis_key(key), &args, &args)
            .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let redis_key = self.redis_key(key);
        let token = token.as_u128().to_be_bytes();
        let encoded = response.encode();
        let ttl = record::millis(ttl);
        let args: [&[u8]; 3] = [&token, &encoded, ttl.as_bytes()];
        let again: [&[u8]; 4] = [&token, &encoded, ttl.as_bytes(), b"1"];
        let generation = self.write_generation();
        let completed = self
            .fenced(&record::COMPLETE, &redis_key, &args, &again)
            .await;
        if let Err(err) = completed {
            if err.kind() == StoreErrorKind::CapacityExceeded {
                // Redis is full (`noeviction`): the handler ran, and a record left to lapse
                // with its lease would let a retry run it again. `PEXPIRE` needs no memory: the
                // record stays in flight for the TTL (its retries get `409`, never a second
                // run) unless a later try completes it.
                let hold: [&[u8]; 2] = [&token, ttl.as_bytes()];
                let _ = self.fenced(&record::RENEW, &redis_key, &hold, &hold).await;
            }
            return Err(err);
        }
        self.replicated(&redis_key, generation).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token.as_u128().to_be_bytes();
        let again: [&[u8]; 2] = [&token, b"1"];
        self.fenced(&record::RELEASE, &self.redis_key(key), &[&token], &again)
            .await
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        match self
            .invoke(&record::LOOKUP, &self.redis_key(key), &[])
            .await?
        {
            Value::Nil => Ok(None),
            Value::Array(reply) => match reply.as_slice() {
                [Value::BulkString(bytes), Value::Int(expires_at)] => {
                    record::decode_info(bytes, *expires_at).map(Some)
                }
                _ => Err(unexpected(&Value::Array(reply))),
            },
            other => Err(unexpected(&other)),
        }
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let redis_key = self.redis_key(key);
        let force: &[u8] = if force { b"1" } else { b"0" };
        // Never run again after a dropped connection: a forced forget whose first run did
        // happen could delete a record another request began in between.
        let generation = self.write_generation();
        let answer = self.conn.run(&record::FORGET, &redis_key, &[force]).await;
        match answer.map_err(redis_error)? {
            Value::Int(0) => Ok(Forget::NotFound),
            Value::Int(1) => {
                self.replicated(&redis_key, generation).await?;
                Ok(Forget::Forgotten)
            }
            Value::Int(2) => Ok(Forget::InFlight),
            other => Err(unexpected(&other)),
        }
    }
}

fn unexpected(value: &Value) -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        format!("unexpected reply from an idempotency script: {value:?}"),
    )
}
