//! The store contract: one atomic `begin`, then `complete` or `release`, fenced by a lock token.
//!
//! Every backend implements [`IdempotencyStore`]. The layer calls it like this for each request
//! that carries a valid key:
//!
//! 1. [`begin`](IdempotencyStore::begin) decides, in one atomic step, what happens to the request
//!    (see [`Begin`]). When it answers [`Begin::Acquired`], the caller holds the record's lease.
//! 2. While the handler runs, [`renew`](IdempotencyStore::renew) extends the lease.
//! 3. Then either [`complete`](IdempotencyStore::complete) stores the response, or
//!    [`release`](IdempotencyStore::release) removes the record so that a retry runs again.
//!
//! `renew`, `complete` and `release` take the [`LockToken`] that `begin` returned; a store must
//! refuse them with [`StoreErrorKind::LeaseLost`] when the record is no longer held by that token
//! (its lease ran out and another request took it over). This fencing is what stops a slow or
//! paused holder from overwriting its successor.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;

pub(crate) mod cache;
mod error;
#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(any(feature = "postgres", feature = "sqlx"))]
pub(crate) mod sql;
#[cfg(feature = "sqlx")]
pub(crate) mod sqlx;
mod util;

pub use error::{StoreError, StoreErrorKind};

#[cfg(all(test, any(feature = "redis", feature = "postgres", feature = "sqlx")))]
pub(crate) use util::MAX_MILLIS;
#[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
pub(crate) use util::whole_millis;

use crate::fingerprint::Fingerprint;
use crate::key::KeyText;
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

/// A store for idempotency records, shared by every request (and, for a shared store, by every
/// server of a fleet).
///
/// Each method must be atomic per [`RecordKey`]: two `begin` calls for the same key, racing on
/// two threads or two servers, must never both get [`Begin::Acquired`] for a live record.
///
/// # Implementing your own store
///
/// A store keeps, per record key, either an *in-flight* record (fingerprint, lock token, lease
/// deadline) or a *completed* one (fingerprint, stored response, expiry). This toy store keeps
/// them in a `Mutex<HashMap>`; it never holds the lock across an `.await`.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::time::{Duration, Instant};
/// use tower_idempotency::{
///     Begin, Fingerprint, IdempotencyStore, LockToken, RecordKey, StoreError, StoredResponse,
/// };
///
/// enum State {
///     InFlight { token: LockToken, lease_until: Instant },
///     Completed { response: StoredResponse, expires_at: Instant },
/// }
///
/// struct Record {
///     fingerprint: Fingerprint,
///     state: State,
/// }
///
/// impl Record {
///     fn is_live(&self, now: Instant) -> bool {
///         match &self.state {
///             State::InFlight { lease_until, .. } => *lease_until > now,
///             State::Completed { expires_at, .. } => *expires_at > now,
///         }
///     }
///
///     fn held_by(&self, token: LockToken) -> bool {
///         matches!(self.state, State::InFlight { token: held, .. } if held == token)
///     }
/// }
///
/// #[derive(Default)]
/// struct MyStore(Mutex<HashMap<RecordKey, Record>>);
///
/// impl IdempotencyStore for MyStore {
///     async fn begin(
///         &self,
///         key: &RecordKey,
///         fingerprint: &Fingerprint,
///         lease: Duration,
///     ) -> Result<Begin, StoreError> {
///         let now = Instant::now();
///         // One lock around the decision and the write: atomic per key.
///         let mut map = self.0.lock().unwrap();
///         if let Some(record) = map.get(key).filter(|r| r.is_live(now)) {
///             if record.fingerprint != *fingerprint {
///                 return Ok(Begin::Mismatch);
///             }
///             return Ok(match &record.state {
///                 State::InFlight { .. } => Begin::InFlight,
///                 State::Completed { response, .. } => Begin::Completed(response.clone()),
///             });
///         }
///         // Absent, expired, or in flight with a holder that died: take it.
///         let token = LockToken::random();
///         let state = State::InFlight { token, lease_until: now + lease };
///         map.insert(key.clone(), Record { fingerprint: *fingerprint, state });
///         Ok(Begin::Acquired(token))
///     }
///
///     async fn renew(&self, key: &RecordKey, token: LockToken, lease: Duration) -> Result<(), StoreError> {
///         match self.0.lock().unwrap().get_mut(key) {
///             Some(record) if record.held_by(token) => {
///                 record.state = State::InFlight { token, lease_until: Instant::now() + lease };
///                 Ok(())
///             }
///             _ => Err(StoreError::lease_lost()),
///         }
///     }
///
///     async fn complete(
///         &self,
///         key: &RecordKey,
///         token: LockToken,
///         response: StoredResponse,
///         ttl: Duration,
///     ) -> Result<(), StoreError> {
///         match self.0.lock().unwrap().get_mut(key) {
///             Some(record) if record.held_by(token) => {
///                 record.state = State::Completed { response, expires_at: Instant::now() + ttl };
///                 Ok(())
///             }
///             _ => Err(StoreError::lease_lost()),
///         }
///     }
///
///     async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
///         let mut map = self.0.lock().unwrap();
///         match map.get(key) {
///             Some(record) if record.held_by(token) => {
///                 map.remove(key);
///                 Ok(())
///             }
///             _ => Err(StoreError::lease_lost()),
///         }
///     }
/// }
///
/// let layer = tower_idempotency::IdempotencyLayer::new(MyStore::default());
/// # let _ = layer;
/// ```
///
/// A real store also prunes expired records and bounds its size; see `MemoryStore`. The layer
/// hands a store leases from 3 ms to 100 years and TTLs from zero to 100 years, so that adding
/// one to a clock never overflows.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Atomically looks up the record for `key` and decides what the request does.
    ///
    /// A record is *live* while it is in flight with an unexpired lease, or completed and not
    /// yet expired. Then:
    ///
    /// - no live record (none, an expired completed one, or an in-flight one whose lease ran out
    ///   because its holder died): write an in-flight record holding `fingerprint`, a fresh
    ///   [`LockToken`] and a lease of `lease`, and answer [`Begin::Acquired`] with that token;
    /// - a live record whose fingerprint differs from `fingerprint`: [`Begin::Mismatch`],
    ///   whatever its state;
    /// - in flight with the same fingerprint: [`Begin::InFlight`];
    /// - completed with the same fingerprint: [`Begin::Completed`] with the stored response.
    ///
    /// The layer drops a `begin` that runs past its store timeout, or whose client went away.
    /// A store across a network may still write the record after that (the server was slow, or
    /// its reply was lost): that record is in flight under a token no request holds, and its
    /// key answers `409` until its lease ends. The crate's shared stores release such a record
    /// in the background, fenced by its token; a store of your own should do the same where it
    /// can (a future that, dropped before its answer, releases the token it sent).
    fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send;

    /// Extends the lease of an in-flight record held by `token` to `lease` from now.
    ///
    /// Fails with [`StoreErrorKind::LeaseLost`] when the record is gone or held by another token.
    fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Turns the in-flight record held by `token` into a completed one holding `response`, which
    /// expires `ttl` from now.
    ///
    /// Fails with [`StoreErrorKind::LeaseLost`] when the record is gone or held by another token;
    /// the record is then left as it is.
    fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the in-flight record held by `token`, so that the next request with its key runs.
    ///
    /// Fails with [`StoreErrorKind::LeaseLost`] when the record is gone or held by another token;
    /// the record is then left as it is.
    fn release(
        &self,
        key: &RecordKey,
        token: LockToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads the record of `key` as it is now, for operators: `None` when there is no live
    /// record. Never changes the record.
    ///
    /// The layer never calls it; support tools do (see `Operator`). The default answers
    /// [`StoreErrorKind::Unsupported`], so that stores written before it keep compiling.
    fn lookup(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<RecordInfo>, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(StoreError::unsupported("lookup")))
    }

    /// Removes the record of `key`, so that the next request with the key runs the handler.
    ///
    /// A completed record is removed. An in-flight record whose lease is live is left alone and
    /// answered with [`Forget::InFlight`], unless `force` is set: then it is removed too, its
    /// holder's `complete` fails with [`StoreErrorKind::LeaseLost`], and a retry may run the
    /// handler while the first run is still going. Force only a key whose holder is known dead.
    /// A record a transaction holds (a handler's [`Claim`](crate::Claim), between `respond_in`
    /// and its COMMIT) is answered with [`Forget::InFlight`] after a quarter of a second at most,
    /// forced or not: its holder is alive, and the record is about to commit.
    ///
    /// The default answers [`StoreErrorKind::Unsupported`].
    fn forget(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> impl Future<Output = Result<Forget, StoreError>> + Send {
        let _ = (key, force);
        std::future::ready(Err(StoreError::unsupported("forget")))
    }

    /// Settles a record that its holder completed inside its own database transaction
    /// (`Claim::respond_in`), once the handler has returned: the layer calls it instead of
    /// [`complete`](Self::complete).
    ///
    /// - Still in flight under `token` (the transaction rolled back, or never committed):
    ///   removes it, so that a retry runs, and answers [`Settled::Released`]; an effect that
    ///   did not happen is never replayed. A transaction still holding the row is waited for.
    /// - Completed under `token` (the transaction committed): [`Settled::Completed`].
    /// - Gone, or held by another token: [`Settled::Lost`].
    ///
    /// The default answers [`StoreErrorKind::Unsupported`]: only a store whose records live in
    /// the application's database can be completed in its transactions.
    fn settle(
        &self,
        key: &RecordKey,
        token: LockToken,
    ) -> impl Future<Output = Result<Settled, StoreError>> + Send {
        let _ = (key, token);
        std::future::ready(Err(StoreError::unsupported("settle")))
    }

    /// Where a `Claim` completes this store's records inside the application's own
    /// transaction, or `None` when the store cannot (the default): `Claim::respond_in` then
    /// fails with `ClaimErrorKind::Unsupported`, never completing outside the transaction.
    ///
    /// Only the crate's PostgreSQL stores answer one; a wrapper store forwards its inner
    /// store's.
    #[cfg(any(feature = "postgres", feature = "sqlx"))]
    #[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
    fn claim_target(&self) -> Option<ClaimTarget> {
        None
    }
}

/// What [`IdempotencyStore::settle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// The holder's transaction committed: the record is completed and replays.
    Completed,
    /// The holder's transaction did not commit: the record was removed, a retry runs.
    Released,
    /// The record is gone or held by another token (forgotten, or taken over).
    Lost,
}

/// The table a `Claim` completes its record in, inside the application's own transaction: the
/// statement of the store's `complete`, for its table. Only the crate's PostgreSQL stores make
/// one ([`IdempotencyStore::claim_target`]).
#[cfg(any(feature = "postgres", feature = "sqlx"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlx"))))]
#[derive(Clone)]
pub struct ClaimTarget {
    pub(crate) table: Arc<str>,
    pub(crate) complete: Arc<str>,
}

#[cfg(any(feature = "postgres", feature = "sqlx"))]
impl ClaimTarget {
    pub(crate) fn new(table: &sql::Table, sql: &sql::Sql) -> Self {
        Self {
            table: table.quoted.as_str().into(),
            complete: sql.complete.as_str().into(),
        }
    }

    /// The table, quoted as in SQL (`"idempotency_records"`, `"schema"."name"`).
    pub fn table(&self) -> &str {
        &self.table
    }
}

#[cfg(any(feature = "postgres", feature = "sqlx"))]
impl fmt::Debug for ClaimTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimTarget")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<T: IdempotencyStore> IdempotencyStore for std::sync::Arc<T> {
    fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Begin, StoreError>> + Send {
        (**self).begin(key, fingerprint, lease)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).renew(key, token, lease)
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(key, token, response, ttl)
    }

    fn release(
        &self,
        key: &RecordKey,
        token: LockToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(key, token)
    }

    fn lookup(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<RecordInfo>, StoreError>> + Send {
        (**self).lookup(key)
    }

    fn forget(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> impl Future<Output = Result<Forget, StoreError>> + Send {
        (**self).forget(key, force)
    }

    fn settle(
        &self,
        key: &RecordKey,
        token: LockToken,
    ) -> impl Future<Output = Result<Settled, StoreError>> + Send {
        (**self).settle(key, token)
    }

    #[cfg(any(feature = "postgres", feature = "sqlx"))]
    fn claim_target(&self) -> Option<ClaimTarget> {
        (**self).claim_target()
    }
}

/// A record as [`IdempotencyStore::lookup`] reads it, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordInfo {
    /// The fingerprint of the request the key is bound to.
    pub fingerprint: Fingerprint,
    /// In flight or completed.
    pub state: RecordState,
}

impl RecordInfo {
    /// A record read back from a store.
    pub fn new(fingerprint: Fingerprint, state: RecordState) -> Self {
        Self { fingerprint, state }
    }
}

/// The state of a record, as [`IdempotencyStore::lookup`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordState {
    /// A request holds the key; its lease runs out at `lease_until` unless renewed.
    InFlight {
        /// When the lease runs out.
        lease_until: SystemTime,
    },
    /// The request completed with `status`; the record expires at `expires_at`.
    Completed {
        /// The stored status.
        status: StatusCode,
        /// `false` when the response was too large to store: a retry gets
        /// `409 idempotency_response_not_stored`.
        replayable: bool,
        /// When the record expires.
        expires_at: SystemTime,
    },
}

/// What [`IdempotencyStore::forget`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Forget {
    /// The record was removed: the next request with the key runs the handler.
    Forgotten,
    /// There was no live record.
    NotFound,
    /// The record is in flight and was left alone (`force` was not set).
    InFlight,
}

/// What [`IdempotencyStore::begin`] decided.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Begin {
    /// The caller now holds the in-flight record: run the handler, then complete or release.
    Acquired(LockToken),
    /// Another request with the same key and fingerprint is running (`409`).
    InFlight,
    /// The request already completed: replay this response.
    Completed(StoredResponse),
    /// The key is bound to a different request (`422`).
    Mismatch,
}

/// The identity of a record: the tenant's scope and the client's idempotency key.
///
/// Records of different tenants never meet, even when their keys are equal. The same tenant and
/// key give the same `RecordKey` on every server, so a fleet shares one truth.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordKey {
    tenant: TenantId,
    key: KeyText,
}

/// Hashes the key and 8 bytes of the tenant, which is a SHA-256 digest already: half the bytes
/// of hashing both whole, for the same spread.
impl std::hash::Hash for RecordKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (head, _) = self.tenant.as_bytes().split_at(8);
        state.write(head);
        state.write(self.key.as_bytes());
    }
}

impl RecordKey {
    /// Builds a record key from a tenant scope and an idempotency key (already validated).
    pub fn new(tenant: TenantId, key: impl Into<Arc<str>>) -> Self {
        Self::from_text(tenant, KeyText::from_shared(key.into()))
    }

    pub(crate) fn from_text(tenant: TenantId, key: KeyText) -> Self {
        Self { tenant, key }
    }

    /// The tenant scope.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The idempotency key, unquoted, as the client sent it.
    pub fn key(&self) -> &str {
        self.key.as_str()
    }

    /// The idempotency key's text (cloning it copies at most 46 bytes, or shares a longer key).
    pub(crate) fn text(&self) -> &KeyText {
        &self.key
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("tenant", &self.tenant)
            .field("key", &self.key)
            .finish()
    }
}

/// A display of the record key that is stable across processes and versions,
/// `<tenant hex>:<key>`, for stores that address records by a string.
impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.tenant, self.key)
    }
}

/// Proof of holding an in-flight record, handed out by [`IdempotencyStore::begin`].
///
/// Tokens are 128 bits: a per-process random part and a counter, so tokens of different servers
/// of a fleet do not collide.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LockToken([u64; 2]); // not a `u128`, whose 16-byte alignment would pad every record

impl LockToken {
    /// A new token, unique within this process and, with overwhelming probability, across a
    /// fleet.
    pub fn random() -> Self {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};

        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            hasher.write_u32(std::process::id());
            hasher.finish()
        });
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self([seed, count])
    }

    /// Rebuilds a token from its 128-bit value, as read back from a store.
    pub const fn from_u128(value: u128) -> Self {
        Self([(value >> 64) as u64, value as u64])
    }

    /// The token's 128-bit value, as written to a store.
    pub const fn as_u128(self) -> u128 {
        ((self.0[0] as u128) << 64) | self.0[1] as u128
    }
}

impl fmt::Debug for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockToken({:032x})", self.as_u128())
    }
}

impl fmt::Display for LockToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.as_u128())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_tokens_are_unique_and_round_trip() {
        let a = LockToken::random();
        let b = LockToken::random();
        assert_ne!(a, b);
        assert_eq!(LockToken::from_u128(a.as_u128()), a);
        assert_eq!(a.to_string().len(), 32);
    }

    #[cfg(any(feature = "redis", feature = "postgres", feature = "sqlx"))]
    #[test]
    fn whole_millis_round_up_and_clamp() {
        assert_eq!(whole_millis(Duration::ZERO), 1);
        assert_eq!(whole_millis(Duration::from_micros(1500)), 2);
        assert_eq!(whole_millis(Duration::from_millis(300)), 300);
        assert_eq!(whole_millis(Duration::MAX), MAX_MILLIS);
    }

    #[test]
    fn record_key_display_is_stable() {
        let key = RecordKey::new(TenantId::shared(), "abc");
        assert_eq!(key.to_string(), format!("{}:abc", TenantId::shared()));
    }
}
