//! [`SqlxStore`]: the PostgreSQL store on the application's own `sqlx::PgPool`.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::query::Query;
use sqlx::{Arguments, PgPool, Postgres, Row};

use super::sql::{
    self, BEGIN_ATTEMPTS, BeginRow, DEFAULT_TABLE, DELETE_BATCH, FENCED_ATTEMPTS,
    LOCK_NOT_AVAILABLE, Sql, Step, Table, corrupt, millis, token_bytes,
};
use super::util::{self, KeepRunning, SentBegin};
use super::{
    Begin, ClaimTarget, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, Settled,
    StoreError,
};
use crate::fingerprint::Fingerprint;
use crate::stored::StoredResponse;

/// An [`IdempotencyStore`] on PostgreSQL through the application's own [`sqlx::PgPool`]: the
/// same table, schema and semantics as `PostgresStore`, so that a fleet can run both against
/// one table, and the store a [`Claim`](crate::Claim) completes inside the handler's own sqlx
/// transaction.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, SqlxStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://app:secret@127.0.0.1/app").await?;
/// let store = SqlxStore::new(pool.clone());
/// store.migrate().await?; // creates the table if missing; safe on every start
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # Schema and semantics
///
/// Those of `PostgresStore` (feature `postgres`), statement for statement: the table (default
/// `idempotency_records`, found through each connection's `search_path`: a fleet whose roles or
/// search paths differ names its schema, see [`SqlxStoreBuilder::table`]) and its index, created
/// when missing by [`migrate`](Self::migrate) under a transaction-scoped advisory lock; time is
/// the database's; `begin` is one
/// `INSERT … ON CONFLICT` combined with a read of the row (and a second statement, the
/// takeover, for a row that is no longer live); `renew`, `complete` and `release` are fenced
/// by the lock token. An in-flight row that a transaction holds locked (a
/// handler between [`Claim::respond_in`](crate::Claim::respond_in) and its COMMIT) is never
/// waited for nor taken over: `begin` answers in flight (`409`) and the renewal lets it be.
///
/// # Connections
///
/// Every call takes a connection from the pool for one statement (`migrate` for a transaction): a
/// new key takes two (`begin`, then `complete`), a replay one, a key reused after its record
/// expired one more (the takeover). Statements are prepared once per connection (sqlx's statement
/// cache) and reused. While PostgreSQL is down, calls fail (the layer answers `503` once its store
/// timeout passes, or at once when the pool fails first), and once it is back the pool reconnects
/// by itself. A connection of no further use (read-only, SQLSTATE 25006; ended by the server, class
/// 57P, or the network, class 08) is closed instead of going back to the pool; so is one whose
/// call was dropped before its statement answered (past the layer's store timeout, a request
/// gone), at once, its pool slot free for a new connection (see below). A statement
/// PostgreSQL failed with a serialization failure or a deadlock (40001, 40P01) changed nothing, and
/// runs again, after a random pause (up to 1 ms, the bound doubling with each failure to 32 ms, so
/// that the statements that conflicted do not meet again at once): `begin` up to 10 times, `renew`,
/// `complete` and `release` up to 3. A handler holding a transaction holds one connection of the
/// same pool: size it for both.
///
/// A sqlx pool (0.8) pings each connection as it comes back to the pool, in a task of its own:
/// one more round trip after each of the store's statements, which the application cannot turn
/// off. By default it also pings every connection it hands out
/// ([`PoolOptions::test_before_acquire`](sqlx::pool::PoolOptions::test_before_acquire)): one
/// more before each statement, on the request's path. A pool built with
/// `test_before_acquire(false)` skips that one; a connection that broke or stopped answering
/// while idle then fails one call (`503`) and is replaced.
///
/// The ping on the way back has no timeout. On a connection whose answers stopped coming
/// without it closing (its network path lost, the old endpoint of a failover), it never answers,
/// and the connection held its pool slot until the operating system gave up on it (TCP's
/// retransmissions: some 15 minutes on Linux by default; for good behind a middlebox that keeps
/// the socket open): a few calls cut by the store timeout took the whole pool, every later call
/// failed (`503`), and a live handler's renewals failed until another server took its key over.
/// So a connection whose call was dropped before its statement answered skips the ping: the
/// store closes it, and the pool opens a new one. One whose statement answered goes back through
/// the ping: a connection that stops answering in that one round trip still holds its slot as
/// long. (Bounding that ping would take one more round trip per call, or sqlx's hidden API.)
///
/// ```no_run
/// # async fn run() -> Result<(), sqlx::Error> {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .max_connections(32)
///     .test_before_acquire(false)
///     .connect("postgres://app@127.0.0.1/app")
///     .await?;
/// let store = tower_idempotency::SqlxStore::new(pool);
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
///
/// Cloning is cheap and shares the pool and the configuration.
#[derive(Clone)]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub struct SqlxStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: Table,
    sql: Sql,
    target: ClaimTarget,
    cleanup_interval: Option<Duration>,
    cleanup: KeepRunning,
}

/// Builds a [`SqlxStore`] with options; [`build`](Self::build) checks them.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::SqlxStore;
///
/// # async fn run(pool: sqlx::PgPool) -> Result<(), tower_idempotency::StoreError> {
/// let store = SqlxStore::builder(pool)
///     .table("billing.idempotency")
///     .cleanup_interval(Duration::from_secs(300))
///     .build()?;
/// store.migrate().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlx")))]
pub struct SqlxStoreBuilder {
    pool: PgPool,
    table: String,
    cleanup_interval: Option<Duration>,
}

impl SqlxStoreBuilder {
    /// The table that holds the records: `name` or `schema.name`, each part
    /// `[A-Za-z_][A-Za-z0-9_]{0,62}` (quoted in SQL, so its case is kept). Default:
    /// `idempotency_records`. The schema must exist. Every server of a fleet must use the same.
    ///
    /// A name without a schema (the default) is found through each connection's `search_path`: a
    /// fleet whose servers connect as different roles (the default `search_path` is
    /// `"$user", public`), set different search paths (a pool's `after_connect`, say) or mix
    /// with `PostgresStore`s that do, must give the schema, or its servers may each use a table
    /// of their own and run a key once each.
    ///
    /// ```
    /// # fn run(pool: sqlx::PgPool) {
    /// let builder = tower_idempotency::SqlxStore::builder(pool).table("billing.idempotency");
    /// # let _ = builder;
    /// # }
    /// ```
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Deletes expired rows every `interval` in a background task, which starts on the store's
    /// first use (on that call's Tokio runtime), holds only a weak reference to the store and
    /// ends when the store is dropped. Off by default; every instance of a fleet may run it.
    ///
    /// ```
    /// # fn run(pool: sqlx::PgPool) {
    /// use std::time::Duration;
    /// let builder = tower_idempotency::SqlxStore::builder(pool)
    ///     .cleanup_interval(Duration::from_secs(300));
    /// # let _ = builder;
    /// # }
    /// ```
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = Some(interval);
        self
    }

    /// The store.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Other`](super::StoreErrorKind::Other) when the table name is not
    /// `name` or `schema.name` as [`table`](Self::table) says (a name is never spliced into SQL
    /// unchecked), or the cleanup interval is zero or longer than a year.
    pub fn build(self) -> Result<SqlxStore, StoreError> {
        let table = Table::parse(&self.table)?;
        if let Some(interval) = self.cleanup_interval {
            util::check_period_or_err("SqlxStore", interval)?;
        }
        let sql = Sql::new(&table);
        Ok(SqlxStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                target: ClaimTarget::new(&table, &sql),
                sql,
                table,
                cleanup_interval: self.cleanup_interval,
                cleanup: KeepRunning::default(),
            }),
        })
    }
}

impl SqlxStore {
    /// A store on `pool` with the default table, `idempotency_records`, and no background
    /// cleanup. Does not create the table: call [`migrate`](Self::migrate).
    pub fn new(pool: PgPool) -> Self {
        Self::builder(pool)
            .build()
            .expect("the default options are valid")
    }

    /// A builder for a store on `pool`, with options.
    pub fn builder(pool: PgPool) -> SqlxStoreBuilder {
        SqlxStoreBuilder {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            cleanup_interval: None,
        }
    }

    /// The pool the store queries through.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Creates the table and its index if they are missing (the schema of `PostgresStore`); a
    /// role without the `CREATE` privilege can run it on a table that exists.
    ///
    /// Safe to run on every start, from every instance of a fleet at once (and beside
    /// `PostgresStore::migrate`): it runs under the same transaction-scoped advisory lock, one
    /// for every migration of this crate (however the table is spelled), so concurrent runs
    /// wait for each other instead of racing on the catalog.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.inner.conn().await?;
        let migrated = match sqlx::Connection::begin(conn.ask()).await {
            Ok(tx) => self.inner.sql.migrate(tx).await,
            Err(err) => Err(sqlx_error(err)),
        };
        // As `Held::answered`, for the error of any of its statements.
        conn.done(migrated.as_ref().is_err_and(|err| {
            std::error::Error::source(err)
                .and_then(|source| source.downcast_ref())
                .is_some_and(discards_connection)
        }));
        migrated
    }

    /// Deletes every expired row, in batches of 1000, and returns how many were deleted.
    ///
    /// Rows another session is deleting are skipped, so every instance of a fleet may run it at
    /// once. An in-flight row whose lease ran out is expired too: deleting it is the same as a
    /// takeover, and its holder's later `complete` fails with
    /// [`LeaseLost`](super::StoreErrorKind::LeaseLost).
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        self.inner.delete_expired().await
    }

    fn ensure_cleanup(&self) {
        let inner = &self.inner;
        let Some(period) = inner.cleanup_interval else {
            return;
        };
        inner
            .cleanup
            .start(|| clean_periodically(Arc::downgrade(inner), period));
    }

    /// `sql` with the record's tenant and key bound as `$1` and `$2`, the arguments' buffer
    /// sized up front for them, for the small parameters that may follow (a fingerprint, a
    /// token, a duration) and for `more` bytes besides (a response): bound into an empty
    /// buffer, they would grow it a reallocation at a time.
    fn keyed<'q>(
        &self,
        sql: &'q str,
        key: &'q RecordKey,
        more: usize,
    ) -> Query<'q, Postgres, PgArguments> {
        let mut arguments = PgArguments::default();
        // At most five parameters, each its 4-byte length and its bytes: the tenant (32), the
        // key, then a fingerprint (32), a token (16) and a duration (8), or `more`.
        let key_len = key.text().as_bytes().len();
        arguments.reserve(5, 5 * 4 + 32 + key_len + 32 + 16 + 8 + more);
        sqlx::query_with(sql, arguments)
            .bind(&key.tenant().as_bytes()[..])
            .bind(key.key())
    }

    /// Runs a `renew`, `complete` or `release` statement, as `query` makes it: the rows it
    /// changed. A statement PostgreSQL failed as one to run again ([`sql::runs_again`]) runs
    /// again after a pause ([`sql::pause_before_again`]), up to [`FENCED_ATTEMPTS`] times in
    /// all: it changed nothing, and its token still fences it.
    async fn fenced<'q>(
        &self,
        query: impl Fn() -> Query<'q, Postgres, PgArguments>,
    ) -> Result<u64, sqlx::Error> {
        self.ensure_cleanup();
        let mut failures = 0;
        loop {
            let mut conn = Held::new(self.inner.pool.acquire().await?);
            let done = query().execute(conn.ask()).await;
            match conn.answered(done) {
                Ok(done) => return Ok(done.rows_affected()),
                Err(err) if failures + 1 < FENCED_ATTEMPTS && runs_again(&err) => {
                    // Back to the pool while it waits.
                    drop(conn);
                    failures += 1;
                    sql::pause_before_again(failures).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// [`fenced`](Self::fenced), one row changed, or the lease is lost.
    async fn fenced_one<'q>(
        &self,
        query: impl Fn() -> Query<'q, Postgres, PgArguments>,
    ) -> Result<(), StoreError> {
        match self.fenced(query).await.map_err(sqlx_error)? {
            0 => Err(StoreError::lease_lost()),
            _ => Ok(()),
        }
    }
}

impl Inner {
    /// A connection of the pool, held for a call's statements: see [`Held`].
    async fn conn(&self) -> Result<Held, StoreError> {
        self.pool.acquire().await.map(Held::new).map_err(sqlx_error)
    }

    async fn delete_expired(&self) -> Result<u64, StoreError> {
        sql::delete_in_batches(|| async {
            let mut conn = self.conn().await?;
            let done = sqlx::query(&self.sql.delete_expired)
                .bind(DELETE_BATCH)
                .execute(conn.ask())
                .await;
            Ok(conn.answered(done).map_err(sqlx_error)?.rows_affected())
        })
        .await
    }
}

/// The background cleanup: it holds only a weak reference, so it ends at its first tick after
/// the store is dropped. A failed run (the database is down, say) is retried at the next tick.
async fn clean_periodically(store: Weak<Inner>, period: Duration) {
    util::every(store, period, |inner: Arc<Inner>| async move {
        let _ = inner.delete_expired().await;
    })
    .await;
}

impl fmt::Debug for SqlxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxStore")
            .field("table", &self.inner.table.quoted)
            .field("cleanup_interval", &self.inner.cleanup_interval)
            .field("pool_size", &self.inner.pool.size())
            .field("pool_idle", &self.inner.pool.num_idle())
            .finish()
    }
}

impl IdempotencyStore for SqlxStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_cleanup();
        let token = LockToken::random();
        let token_bytes = token_bytes(token);
        let fingerprint = &fingerprint.as_bytes()[..];
        let sql = &self.inner.sql;
        let mut conn = self.inner.conn().await?;
        // `begin`, or `take_over`, which takes the same parameters.
        let statement = |take_over: bool| {
            let statement = if take_over {
                &sql.take_over
            } else {
                &sql.begin
            };
            self.keyed(statement, key, 0)
                .bind(fingerprint)
                .bind(&token_bytes[..])
                .bind(millis(lease))
        };
        let mut sent = SentBegin::new(self, key, token, lease);
        // A statement that a concurrent writer overtook, or that PostgreSQL failed as one to
        // run again (`sql::runs_again`: it changed nothing; after a pause), runs again.
        let mut failures = 0;
        for _ in 0..BEGIN_ATTEMPTS {
            let row = statement(false).fetch_optional(conn.ask()).await;
            let row = match conn.answered(row) {
                Ok(row) => row,
                Err(err) if runs_again(&err) => {
                    failures += 1;
                    sql::pause_before_again(failures).await;
                    continue;
                }
                Err(err) => return Err(begin_error(err, &mut sent)),
            };
            let row = match sql::decide(begin_row(row.as_ref())?, token)? {
                Step::Done(begin) => {
                    sent.answered();
                    return Ok(begin);
                }
                Step::Again => continue,
                Step::TakeOver => {
                    let row = match statement(true).fetch_optional(conn.ask()).await {
                        // A transaction holds the in-flight row: read it without waiting.
                        Err(err) if is_locked(&err) => {
                            let peek = self.keyed(&sql.peek, key, 0).bind(fingerprint);
                            peek.fetch_optional(conn.ask()).await
                        }
                        row => row,
                    };
                    match conn.answered(row) {
                        Ok(row) => row,
                        Err(err) if runs_again(&err) => {
                            failures += 1;
                            sql::pause_before_again(failures).await;
                            continue;
                        }
                        Err(err) => return Err(begin_error(err, &mut sent)),
                    }
                }
            };
            if let Step::Done(begin) = sql::decide(begin_row(row.as_ref())?, token)? {
                sent.answered();
                return Ok(begin);
            }
        }
        sent.answered();
        Err(sql::kept_changing())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let query = || {
            self.keyed(&self.inner.sql.renew, key, 0)
                .bind(&token[..])
                .bind(millis(lease))
        };
        match self.fenced(query).await {
            Ok(0) => Err(StoreError::lease_lost()),
            Ok(_) => Ok(()),
            // The handler's own transaction holds the row (`Claim::respond_in`): nothing can
            // take it over while it does, and the renewal does not wait for it.
            Err(err) if is_locked(&err) => Ok(()),
            Err(err) => Err(sqlx_error(err)),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let encoded = response.encode();
        self.fenced_one(|| {
            self.keyed(&self.inner.sql.complete, key, encoded.len())
                .bind(&token[..])
                .bind(&encoded[..])
                .bind(millis(ttl))
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token_bytes(token);
        self.fenced_one(|| self.keyed(&self.inner.sql.release, key, 0).bind(&token[..]))
            .await
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let mut conn = self.inner.conn().await?;
        let row = self
            .keyed(&self.inner.sql.lookup, key, 0)
            .fetch_optional(conn.ask())
            .await;
        let row = conn.answered(row).map_err(sqlx_error)?;
        row.as_ref().map(record_info).transpose()
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let mut conn = self.inner.conn().await?;
        let mut waits = sql::forget_lock_waits();
        let row = loop {
            let row = self
                .keyed(&self.inner.sql.forget, key, 0)
                .bind(force)
                .fetch_one(conn.ask())
                .await;
            match conn.answered(row) {
                Ok(row) => break row,
                // A statement holds the row for a moment; a transaction that keeps holding
                // it is alive (see `Sql::forget`).
                Err(err) if is_locked(&err) => match waits.next() {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => return Ok(Forget::InFlight),
                },
                Err(err) => return Err(sqlx_error(err)),
            }
        };
        Ok(sql::forget(row.try_get(0).map_err(corrupt)?))
    }

    async fn settle(&self, key: &RecordKey, token: LockToken) -> Result<Settled, StoreError> {
        let token = token_bytes(token);
        let mut conn = self.inner.conn().await?;
        for statement in [&self.inner.sql.settle, &self.inner.sql.settled] {
            let row = self
                .keyed(statement, key, 0)
                .bind(&token[..])
                .fetch_one(conn.ask())
                .await;
            let row = conn.answered(row).map_err(sqlx_error)?;
            if let Some(settled) = sql::settled(row.try_get(0).map_err(corrupt)?) {
                return Ok(settled);
            }
        }
        Ok(Settled::Lost)
    }

    fn claim_target(&self) -> Option<ClaimTarget> {
        Some(self.inner.target.clone())
    }
}

impl sql::MigrationTx for sqlx::Transaction<'_, Postgres> {
    async fn execute(&mut self, sql: &str, param: Option<i64>) -> Result<(), StoreError> {
        let query = match param {
            Some(param) => sqlx::query(sql).bind(param),
            None => sqlx::query(sql),
        };
        let conn: &mut sqlx::PgConnection = self;
        query.execute(conn).await.map(drop).map_err(sqlx_error)
    }

    async fn query_bool(&mut self, sql: &str) -> Result<bool, StoreError> {
        let conn: &mut sqlx::PgConnection = self;
        let exists = sqlx::query_scalar(sql).fetch_one(conn).await;
        exists.map_err(sqlx_error)
    }

    async fn commit(self) -> Result<(), StoreError> {
        sqlx::Transaction::commit(self).await.map_err(sqlx_error)
    }
}

/// Reads a row of `lookup`.
fn record_info(row: &PgRow) -> Result<RecordInfo, StoreError> {
    sql::record_info(
        row.try_get(0).map_err(corrupt)?,
        row.try_get(1).map_err(corrupt)?,
        row.try_get(2).map_err(corrupt)?,
        row.try_get(3).map_err(corrupt)?,
    )
}

/// The outcome and response of a row of `begin` or `peek`.
fn begin_row(row: Option<&PgRow>) -> Result<BeginRow<'_>, StoreError> {
    row.map(|row| {
        let outcome = row.try_get(0).map_err(corrupt)?;
        Ok((outcome, row.try_get(1).map_err(corrupt)?))
    })
    .transpose()
}

/// The error of one of `begin`'s statements. A statement the server failed was rolled back:
/// `sent` has nothing to clean up. Not so when the server ended the connection (class 57P, 08):
/// that may come after the statement committed, its answer lost.
fn begin_error(err: sqlx::Error, sent: &mut SentBegin<'_, SqlxStore>) -> StoreError {
    if sqlstate(&err).is_some_and(|code| !sql::ends_connection(&code)) {
        sent.answered();
    }
    sqlx_error(err)
}

/// The SQLSTATE of the statement that failed with `err`, when the server answered one.
fn sqlstate(err: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    err.as_database_error().and_then(|db| db.code())
}

/// Whether a statement failed on a row lock it would not wait for (`NOWAIT`).
fn is_locked(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some(LOCK_NOT_AVAILABLE)
}

/// Whether PostgreSQL failed a statement as one to run again ([`sql::runs_again`]).
fn runs_again(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|code| sql::runs_again(&code))
}

/// Whether a failure left its connection of no further use ([`sql::discards_connection`]: a
/// read-only connection, one the server is ending).
fn discards_connection(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|code| sql::discards_connection(&code))
}

/// A connection of the pool, held by one call for its statements: ask each on
/// [`ask`](Self::ask), and pass what it answered through [`answered`](Self::answered).
///
/// Dropped while a statement is under way (the call was dropped before it answered: the layer's
/// store timeout, a request gone), the connection is detached from the pool and closed at once,
/// and its pool slot is free for a new one. Given back, the pool would ping it first, with no
/// timeout (sqlx 0.8): on a connection whose answers stopped coming (its network path lost) the
/// ping never answers, and the slot was held until TCP gave up on it. Otherwise it goes back to
/// the pool, which pings it in a task of its own, as any connection of the application's: the
/// ping also flushes what the statement left (a dropped transaction's rollback), and runs the
/// pool's `after_release`. Its gap, a connection that stops answering during that ping, is the
/// window of one round trip; closing it would take a ping of our own under a timeout before
/// sqlx's (one more round trip per call), or sqlx's hidden `return_to_pool` under a timeout
/// (not sqlx's API: any release may change it).
struct Held {
    conn: Option<PoolConnection<Postgres>>,
    /// A statement was asked and has not answered.
    asked: bool,
}

impl Held {
    fn new(conn: PoolConnection<Postgres>) -> Self {
        Self {
            conn: Some(conn),
            asked: false,
        }
    }

    /// The connection, for a statement: until its answer passes through
    /// [`answered`](Self::answered), dropping `self` closes the connection.
    fn ask(&mut self) -> &mut PgConnection {
        self.asked = true;
        self.conn.as_mut().expect("a held connection is taken once")
    }

    /// Passes on what the statement asked answered; a connection its failure left of no further
    /// use ([`discards_connection`]) is closed when it is dropped instead of going back to the
    /// pool, which opens a new one when it needs it.
    fn answered<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        self.done(result.as_ref().is_err_and(discards_connection));
        result
    }

    /// The statements asked answered; `discard`: their failure left the connection of no
    /// further use.
    fn done(&mut self, discard: bool) {
        self.asked = false;
        if discard && let Some(conn) = &mut self.conn {
            conn.close_on_drop();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.asked
            && let Some(conn) = self.conn.take()
        {
            // Out of the pool (its slot free at once), and closed as it drops: no ping, no
            // goodbye on a connection that may not answer (`close_on_drop` would wait up to 5 s
            // for one, holding the slot).
            drop(conn.detach());
        }
    }
}

/// A failed query: the server or the pool failed (`Unavailable`), or a value could not be
/// decoded (`Corrupt`).
pub(crate) fn sqlx_error(err: sqlx::Error) -> StoreError {
    match err {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => corrupt(err),
        _ => {
            // What the server answered, as `PostgresStore` says it: its message and SQLSTATE.
            let message = err.as_database_error().map(|db| match db.code() {
                Some(code) => sql::server_message(db.message(), &code),
                None => db.message().to_owned(),
            });
            let error = StoreError::unavailable(err);
            match message {
                Some(message) => error.with_message(message),
                None => error,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreErrorKind;

    /// A pool that has not connected (nothing connects until the first query).
    fn pool() -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/db")
            .unwrap()
    }

    #[tokio::test]
    async fn options_are_validated_in_build() {
        let store = SqlxStore::builder(pool())
            .table("billing.idem")
            .cleanup_interval(Duration::from_secs(60))
            .build()
            .unwrap();
        assert_eq!(store.inner.table.quoted, "\"billing\".\"idem\"");
        assert!(store.inner.sql.begin.contains("\"billing\".\"idem\""));
        assert!(store.inner.sql.take_over.contains("\"billing\".\"idem\""));
        assert_eq!(store.inner.cleanup_interval, Some(Duration::from_secs(60)));
        assert_eq!(
            store.claim_target().unwrap().table(),
            "\"billing\".\"idem\""
        );
        let debug = format!("{store:?}");
        assert!(
            debug.contains("billing") && debug.contains("60s"),
            "{debug}"
        );

        let err = SqlxStore::builder(pool())
            .table("no-dashes")
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
        let err = SqlxStore::builder(pool())
            .cleanup_interval(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
        assert!(err.to_string().contains("must not be zero"), "{err}");
        let err = SqlxStore::builder(pool())
            .cleanup_interval(Duration::MAX)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
    }

    fn is_send<T: Send>(_: &T) {}

    #[tokio::test]
    async fn migrate_can_be_spawned() {
        let store = SqlxStore::new(pool());
        is_send(&store.migrate());
    }

    #[tokio::test]
    async fn the_default_table_is_the_postgres_stores() {
        let store = SqlxStore::new(pool());
        assert_eq!(store.inner.table.quoted, "\"idempotency_records\"");
    }
}
