//! [`RedisStore`]: a store shared by every server of a fleet, on Redis.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, ErrorKind, RedisError, Script, Value};

use super::{Begin, IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;

/// The default key prefix.
const DEFAULT_PREFIX: &str = "idempotency:";

/// The first byte of every record: the layout's version.
const VERSION: u8 = 1;
/// The state byte of an in-flight record.
const IN_FLIGHT: u8 = b'f';
/// The state byte of a completed record.
const COMPLETED: u8 = b'c';
/// Version, state, fingerprint (32 bytes) and lock token (16 bytes).
const HEAD_LEN: usize = 2 + 32 + 16;

/// The longest lease or TTL written, about 100 years; longer ones are cut to it.
const MAX_MILLIS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// `true`, and the record's head, when `KEYS[1]` is in flight and held by the token `t`.
const HELD: &str = r"
local function held(t)
  local head = redis.call('GETRANGE', KEYS[1], 0, 49)
  return string.len(head) == 50 and string.sub(head, 1, 2) == '\1f'
    and string.sub(head, 35, 50) == t, head
end
";

/// `begin`. ARGV: fingerprint, the in-flight record to write, lease in ms.
/// Returns 0 (acquired), 1 (in flight), 2 (mismatch), 3 (unreadable record), or the whole
/// completed record.
///
/// An existing key is a live record: Redis removes a record itself when its lease (in flight)
/// or its TTL (completed) runs out, so a dead holder's record is simply gone.
static BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local head = redis.call('GETRANGE', KEYS[1], 0, 49)
if head == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 0
end
if string.len(head) ~= 50 or string.byte(head, 1) ~= 1 then
  return 3
end
if string.sub(head, 3, 34) ~= ARGV[1] then
  return 2
end
local state = string.sub(head, 2, 2)
if state == 'f' then
  return 1
end
if state == 'c' then
  return redis.call('GET', KEYS[1])
end
return 3
",
    )
});

/// `renew`. ARGV: token, lease in ms. Returns 1, or 0 when the token does not hold the record.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELD}
if held(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"
    ))
});

/// `complete`. ARGV: token, encoded response, TTL in ms. Rewrites the record as completed
/// (keeping its fingerprint) with the TTL as its expiry.
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELD}
local ok, head = held(ARGV[1])
if ok then
  redis.call('SET', KEYS[1], '\\1c' .. string.sub(head, 3, 50) .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"
    ))
});

/// `release`. ARGV: token. Deletes the record if the token holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{HELD}
if held(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"
    ))
});

/// An [`IdempotencyStore`] on Redis, shared by every server of a fleet.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # How records are kept
///
/// Each record is one Redis string at `<prefix>{<tenant hex>:<key>}`, for example
/// `idempotency:{4f3c…9a:8e03978e-40d5-43e8}`. The prefix (default `idempotency:`) and the
/// record key are the same on every server, so a fleet shares one truth. The braces are a hash
/// tag and each script touches that one key, so the layout is ready for Redis Cluster (one
/// slot per record); the store itself talks to one Redis endpoint.
///
/// The value is a version byte (`1`), a state byte (`f` in flight, `c` completed), the
/// request's fingerprint (32 bytes), the holder's lock token (16 bytes, big-endian) and, once
/// completed, the response as [`StoredResponse::encode`] writes it. Binary bodies round-trip
/// exactly.
///
/// Time is the server's: an in-flight record's lease is the key's expiry (`PX`), so Redis
/// removes a dead holder's record by itself and the next request takes the key over; a
/// completed record's expiry is the TTL, counted from completion. No clock of the application
/// servers is involved.
///
/// `begin`, `renew`, `complete` and `release` are each one Lua script, which Redis runs
/// atomically: `begin` decides (acquired, in flight, completed, mismatch) and writes in one
/// step, and the other three check the lock token inside the script, answering
/// [`StoreErrorKind::LeaseLost`] when it no longer holds the record. The scripts are sent by
/// their SHA-1 (`EVALSHA`) and loaded once when the server does not know them (after a restart,
/// say).
///
/// # Connections
///
/// The store talks through the `redis` crate's Tokio [`ConnectionManager`]: one multiplexed
/// connection shared by every request (cloning the store is cheap and shares it). It is the
/// right tool here for two reasons: Redis runs commands one at a time anyway, so one pipelined
/// connection carries every concurrent request without a pool to size; and it reconnects by
/// itself when the connection drops, so a Redis restart needs no action from the application
/// (a bare multiplexed connection would stay broken). While Redis is down, store calls fail with
/// [`StoreErrorKind::Unavailable`] (the layer answers `503` with `Retry-After`, and its store
/// timeout bounds how long a request waits); once Redis is back, the next calls succeed again,
/// without rebuilding the store. [`connect`](Self::connect) retries a lost connection with an
/// exponential backoff of at most one second, and keeps the `redis` crate's timeouts (1 s to
/// connect, 500 ms per response); for other settings (timeouts, TLS, RESP3), build your own
/// manager and use [`new`](Self::new).
///
/// # Operating Redis
///
/// Give idempotency records a Redis whose eviction policy never evicts them
/// (`maxmemory-policy noeviction`, or no `maxmemory`): every record carries an expiry, so a
/// `volatile-*` policy could evict a live record under memory pressure and let a retry run the
/// handler twice. With persistence off, a Redis restart forgets every record.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host[:port][/db]`, or
    /// `rediss://` with the `redis` crate's TLS features) and loads the store's scripts.
    ///
    /// Fails with [`StoreErrorKind::Other`] when the URL is invalid, and with
    /// [`StoreErrorKind::Unavailable`] when the server cannot be reached.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client =
            Client::open(url).map_err(|err| StoreError::new(StoreErrorKind::Other, err))?;
        let config = ConnectionManagerConfig::new().set_max_delay(Duration::from_secs(1));
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(redis_error)?;
        for script in [&*BEGIN, &*RENEW, &*COMPLETE, &*RELEASE] {
            script
                .prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(redis_error)?;
        }
        Ok(Self::new(conn))
    }

    /// A store over an existing connection manager, with the default prefix.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379")?;
    /// let manager = redis::aio::ConnectionManager::new(client).await?;
    /// let store = tower_idempotency::RedisStore::new(manager);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: Arc::from(DEFAULT_PREFIX),
        }
    }

    /// The prefix of every record's Redis key. Default: `idempotency:`. Every server of a
    /// fleet must use the same one.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .prefix("payments-api:idem:");
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// The Redis key of `key`'s record: `<prefix>{<tenant hex>:<key>}`.
    pub fn redis_key(&self, key: &RecordKey) -> String {
        format!("{}{{{key}}}", self.prefix)
    }

    async fn invoke(
        &self,
        script: &Script,
        key: &RecordKey,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation.key(self.redis_key(key));
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)
    }

    /// Runs one of the scripts that answer 1 (done) or 0 (not held by the token).
    async fn fenced(
        &self,
        script: &Script,
        key: &RecordKey,
        args: &[&[u8]],
    ) -> Result<(), StoreError> {
        match self.invoke(script, key, args).await? {
            Value::Int(1) => Ok(()),
            Value::Int(0) => Err(StoreError::lease_lost()),
            other => Err(unexpected(&other)),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
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
        let mut record = Vec::with_capacity(HEAD_LEN);
        record.extend_from_slice(&[VERSION, IN_FLIGHT]);
        record.extend_from_slice(fingerprint.as_bytes());
        record.extend_from_slice(&token.as_u128().to_be_bytes());
        let lease = millis(lease);
        let args: [&[u8]; 3] = [fingerprint.as_bytes(), &record, lease.as_bytes()];
        match self.invoke(&BEGIN, key, &args).await? {
            Value::Int(0) => Ok(Begin::Acquired(token)),
            Value::Int(1) => Ok(Begin::InFlight),
            Value::Int(2) => Ok(Begin::Mismatch),
            Value::Int(3) => Err(StoreError::msg(
                StoreErrorKind::Corrupt,
                "the Redis key does not hold an idempotency record",
            )),
            Value::BulkString(bytes) => decode_completed(&bytes).map(Begin::Completed),
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
        let lease = millis(lease);
        self.fenced(&RENEW, key, &[&token, lease.as_bytes()]).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = token.as_u128().to_be_bytes();
        let encoded = response.encode();
        let ttl = millis(ttl);
        self.fenced(&COMPLETE, key, &[&token, &encoded, ttl.as_bytes()])
            .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token.as_u128().to_be_bytes();
        self.fenced(&RELEASE, key, &[&token]).await
    }
}

/// A duration as whole milliseconds (rounded up, at least 1, at most [`MAX_MILLIS`]), in
/// decimal, as `PX` and `PEXPIRE` take it.
fn millis(duration: Duration) -> String {
    let ms = duration.as_nanos().div_ceil(1_000_000);
    ms.clamp(1, u128::from(MAX_MILLIS)).to_string()
}

/// Reads a completed record back: its head, then the encoded response.
fn decode_completed(bytes: &[u8]) -> Result<StoredResponse, StoreError> {
    match bytes.split_at_checked(HEAD_LEN) {
        Some((head, response)) if head[..2] == [VERSION, COMPLETED] => {
            StoredResponse::decode(response)
                .map_err(|err| StoreError::new(StoreErrorKind::Corrupt, err))
        }
        _ => Err(StoreError::msg(
            StoreErrorKind::Corrupt,
            "the Redis key does not hold a completed idempotency record",
        )),
    }
}

fn unexpected(value: &Value) -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        format!("unexpected reply from an idempotency script: {value:?}"),
    )
}

/// Connection, I/O and server errors make the store unavailable; a reply the client could not
/// read, or a key holding another Redis type, is corrupt.
fn redis_error(err: RedisError) -> StoreError {
    let kind = match err.kind() {
        ErrorKind::Parse | ErrorKind::UnexpectedReturnType => StoreErrorKind::Corrupt,
        _ if err.code() == Some("WRONGTYPE") => StoreErrorKind::Corrupt,
        _ => StoreErrorKind::Unavailable,
    };
    StoreError::new(kind, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::TenantId;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    #[test]
    fn millis_round_up_and_clamp() {
        assert_eq!(millis(Duration::ZERO), "1");
        assert_eq!(millis(Duration::from_micros(1500)), "2");
        assert_eq!(millis(Duration::from_millis(300)), "300");
        assert_eq!(millis(Duration::MAX), MAX_MILLIS.to_string());
    }

    #[test]
    fn completed_records_decode_and_garbage_is_corrupt() {
        let response = StoredResponse::new(
            StatusCode::CREATED,
            HeaderMap::new(),
            Bytes::from_static(b"\0\xff"),
        );
        let mut record = vec![VERSION, COMPLETED];
        record.extend_from_slice(&[7; 48]);
        record.extend_from_slice(&response.encode());
        assert_eq!(decode_completed(&record).unwrap(), response);

        record[1] = IN_FLIGHT;
        assert_eq!(
            decode_completed(&record).unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            decode_completed(b"short").unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        let mut truncated = vec![VERSION, COMPLETED];
        truncated.extend_from_slice(&[7; 48]);
        truncated.push(1);
        assert_eq!(
            decode_completed(&truncated).unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
    }

    #[test]
    fn redis_keys_are_stable_and_hash_tagged() {
        let key = RecordKey::new(TenantId::shared(), "a{b}:c");
        let expected = format!("idempotency:{{{}:a{{b}}:c}}", "0".repeat(64));
        // The key does not depend on the connection, only on the prefix and the record key.
        assert_eq!(format!("{DEFAULT_PREFIX}{{{key}}}"), expected);
    }
}
