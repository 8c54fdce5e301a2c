//! [`PostgresStore`]: a durable store shared by every server of a fleet, on PostgreSQL.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use deadpool_postgres::{
    Client, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::sql::{
    self, BEGIN_ATTEMPTS, BeginRow, DEFAULT_TABLE, DELETE_BATCH, FENCED_ATTEMPTS, Sql, Step, Table,
    corrupt, millis, token_bytes,
};
use super::util::{self, KeepRunning, SentBegin};
use super::{
    Begin, ClaimTarget, Forget, IdempotencyStore, LockToken, RecordInfo, RecordKey, Settled,
    StoreError, StoreErrorKind,
};
use crate::fingerprint::Fingerprint;
use crate::stored::StoredResponse;

mod pipeline;

use pipeline::{LOCK_TIMEOUT, Lent, Next, Pipelines, PoolShare};

/// The pool size of [`PostgresStore::connect`].
const DEFAULT_MAX_CONNECTIONS: usize = 16;

/// An [`IdempotencyStore`] on PostgreSQL, shared by every server of a fleet and durable across
/// restarts.
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, PostgresStore};
///
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// let store = PostgresStore::connect("postgres://app:secret@127.0.0.1/app").await?;
/// store.migrate().await?; // creates the table if missing; safe on every start
/// let layer = IdempotencyLayer::new(store);
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// # Schema
///
/// [`migrate`](Self::migrate) runs this (with the configured [`table`](Self::table), default
/// `idempotency_records`), each statement only when its table or index is missing (`to_regclass`),
/// under a transaction-scoped advisory lock, one for every migration of this crate, so that every
/// instance of a fleet can run it at once on start:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS "idempotency_records" (
///     tenant      bytea       NOT NULL,              -- SHA-256 of the tenant (32 bytes)
///     key         text        COLLATE "C" NOT NULL,  -- the client's key, visible ASCII
///     state       text        NOT NULL,              -- 'in_flight' or 'completed'
///     fingerprint bytea       NOT NULL,              -- SHA-256 of the request (32 bytes)
///     token       bytea       NOT NULL,              -- the holder's lock token (16 bytes)
///     response    bytea,                             -- StoredResponse::encode(), once completed
///     expires_at  timestamptz NOT NULL,              -- end of the lease, or of the TTL
///     PRIMARY KEY (tenant, key)
/// );
/// CREATE INDEX IF NOT EXISTS "idempotency_records_expires_idx"
///     ON "idempotency_records" (expires_at);
/// ```
///
/// Run it yourself if your migrations are managed elsewhere; the store only needs the table.
/// A role with no `CREATE` privilege on the schema can still call `migrate` on a table that
/// exists (it creates nothing then), so the same start-up code runs under a least-privilege role
/// (`SELECT`, `INSERT`, `UPDATE`, `DELETE` on the table).
///
/// The table has no `CHECK` on `state`: PostgreSQL builds a check's expression again in every
/// statement that writes a row, which cost about a tenth of the database's CPU per new key. The
/// store's statements are the column's only writers, and a state that is neither of theirs is
/// read as [`StoreErrorKind::Corrupt`]. A table made by an earlier release has
/// `CHECK (state IN ('in_flight', 'completed'))`; it works as it is (`migrate` never alters a
/// table), and an operator may drop it (`ALTER TABLE idempotency_records DROP CONSTRAINT
/// idempotency_records_state_check`).
///
/// The default table name is not schema-qualified: each connection finds it through its
/// `search_path`. A fleet whose servers connect as different roles (PostgreSQL's default
/// `search_path` is `"$user", public`) or set different search paths must name the table with
/// its schema ([`PostgresStoreBuilder::table`], `"public.idempotency_records"`), or its servers
/// may each keep their own table, and run a key once each.
///
/// # Semantics
///
/// Time is the database's (`clock_timestamp()`), never the application servers'. A row is live
/// while `expires_at` is in the future: the lease of an in-flight row, the TTL (from
/// completion) of a completed one. `begin` is one statement: a read of the row and, only when
/// no row was read, an `INSERT … ON CONFLICT (tenant, key) DO NOTHING`, so the decision
/// (acquired, in flight, completed, mismatch) is made atomically by the database; no
/// check-then-insert. A replay, a duplicate in flight and a reused key are answered from the
/// read alone: they write nothing and lock nothing, so concurrent retries of one key do not
/// queue behind each other. Only a key whose row is no longer live takes a second statement,
/// the takeover: the same read with an `INSERT … ON CONFLICT (tenant, key) DO UPDATE … WHERE
/// <the existing row is not live>`. `renew`, `complete` and `release` are one `UPDATE` or
/// `DELETE` each, `WHERE token = $token AND state = 'in_flight'`; when no row matches, they fail
/// with [`StoreErrorKind::LeaseLost`]. The operator calls are one statement each too:
/// [`lookup`](IdempotencyStore::lookup) a `SELECT` of the live row, and
/// [`forget`](IdempotencyStore::forget) a `DELETE` of the live row (completed, or in flight
/// when forced) combined with a read of the in-flight row that stopped it.
///
/// # Completing in the handler's transaction
///
/// A handler can complete its record inside its own transaction on the same database
/// ([`Claim::respond_in`](crate::Claim::respond_in) with a tokio-postgres or deadpool-postgres
/// transaction). Until its COMMIT the row is locked: `begin` answers a live in-flight row from its
/// read, and its takeover locks one whose lease ran out with `NOWAIT` before taking it over;
/// `renew` locks with `NOWAIT` too. So a duplicate answers in flight (`409`) at once instead of
/// waiting, and nothing takes the row over while the transaction holds it, even past its lease. The
/// layer then settles the record ([`settle`](IdempotencyStore::settle)): released when the
/// transaction did not commit. `migrate` creates the index only when it is missing, so an instance
/// starting meanwhile does not queue the table's traffic behind that transaction.
///
/// # Expired rows
///
/// Expired rows are ignored at once, and overwritten when their key is used again, but they
/// stay in the table until deleted. Call [`delete_expired`](Self::delete_expired) from your own
/// scheduler, or let the store do it with [`cleanup_interval`](Self::cleanup_interval).
///
/// # Connections
///
/// Queries go through a [`deadpool_postgres::Pool`]. A connection that broke (the server restarted,
/// say) is dropped by the pool and replaced on the next call, so while PostgreSQL is down store
/// calls fail with [`StoreErrorKind::Unavailable`] (the layer answers `503`), and once it is back
/// they succeed again without rebuilding the store. So is a connection of no further use: read-only
/// (SQLSTATE 25006: a standby, or a database set `default_transaction_read_only` when it was
/// opened), or ended by the server (class 57P) or the network (class 08). A statement PostgreSQL
/// failed with a serialization failure or a deadlock (40001, 40P01: a database whose default
/// isolation is `serializable` or `repeatable read`) changed nothing, and runs again, after a
/// random pause (up to 1 ms, the bound doubling with each failure to 32 ms, so that the statements
/// that conflicted do not meet again at once): `begin` up to 10 times, `renew`, `complete` and
/// `release` up to 3. An error's text carries the server's message and SQLSTATE.
/// [`connect`](Self::connect) connects without TLS; for TLS, build a pool with a TLS connector and
/// use [`from_pool`](Self::from_pool).
///
/// A new key takes two statements (`begin`, then `complete` once the handler answered), a replay
/// one; a key reused after its record expired takes one more, the takeover. These, and
/// `release` and `lookup`, run on connections of the pool that the store keeps and shares
/// between calls, pipelined: half of the pool's connections
/// ([`pipelined_connections`](PostgresStoreBuilder::pipelined_connections)). A shared
/// connection whose call was dropped before it answered (past the store's timeout, say) is
/// replaced: one whose answers stopped coming (its network path lost) would otherwise time out
/// every call that came to it in turn. The other calls (`renew` among them: a live handler's
/// lease does not depend on a connection other calls share), and handlers' transactions, hold a
/// connection of their own for their statements; one held by a call that was dropped before it
/// answered is closed, not given back to the pool, where the next calls would wait behind its
/// statement. Statements are prepared once per connection and reused. The pool of
/// [`connect`](Self::connect) opens up to 16 connections
/// ([`max_connections`](PostgresStoreBuilder::max_connections)): size it to the shared
/// connections plus the handlers' transactions a server has in progress at once, within what
/// the database allows.
///
/// Cloning is cheap and shares the pool and the configuration. A store's settings
/// ([`PostgresStore::builder`]: the table, the cleanup interval) are set before it exists and
/// never change.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Dropped before the pool: its shared connections count in the pool's share (by the pool's
    /// identity) until they are dropped.
    pipelines: Pipelines,
    pool: Pool,
    table_name: String,
    table: Table,
    sql: Sql,
    target: ClaimTarget,
    cleanup_interval: Option<Duration>,
    cleanup: KeepRunning,
}

impl PostgresStore {
    /// Connects to the PostgreSQL at `url` (`postgres://user:password@host:port/database`, or
    /// a `key=value` connection string) with a pool of up to 16 connections
    /// ([`max_connections`](PostgresStoreBuilder::max_connections)), without TLS, and
    /// checks that a connection can be made. Does not create the table: call
    /// [`migrate`](Self::migrate).
    ///
    /// Fails with [`StoreErrorKind::Other`] when the URL is invalid, and with
    /// [`StoreErrorKind::Unavailable`] when the server cannot be reached.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::PostgresStore::connect("postgres://app@127.0.0.1/app").await?;
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Settings for a store, checked once when the store is made ([`PostgresStoreBuilder`]).
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # async fn run() -> Result<(), tower_idempotency::StoreError> {
    /// let store = tower_idempotency::PostgresStore::builder()
    ///     .table("billing.idempotency")
    ///     .cleanup_interval(Duration::from_secs(300))
    ///     .connect("postgres://app@127.0.0.1/app")
    ///     .await?;
    /// store.migrate().await?;
    /// assert_eq!(store.table(), "billing.idempotency");
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            table: DEFAULT_TABLE.to_owned(),
            cleanup_interval: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            pipelined_connections: None,
        }
    }

    /// The pool [`connect`](Self::connect) makes for `url`, of up to `max_connections`.
    async fn pool_for(url: &str, max_connections: usize) -> Result<Pool, StoreError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|err| StoreError::new(StoreErrorKind::Other, err))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("tower-idempotency");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(Duration::from_secs(5));
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|err| StoreError::new(StoreErrorKind::Other, err))?;
        drop(pool.get().await.map_err(pool_error)?);
        Ok(pool)
    }

    /// A store over an existing pool, with the default table, `idempotency_records`. The store
    /// keeps half of the pool's connections, shared by its single statements
    /// ([`pipelined_connections`](PostgresStoreBuilder::pipelined_connections)): a pool the
    /// application uses too has the other half for itself. Stores built on one pool (a table
    /// each, say) keep half of it between them, not half each.
    ///
    /// ```no_run
    /// use deadpool_postgres::{Manager, Pool};
    ///
    /// # fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let config: tokio_postgres::Config = "postgres://app@127.0.0.1/app".parse()?;
    /// let pool = Pool::builder(Manager::new(config, tokio_postgres::NoTls)).build()?;
    /// let store = tower_idempotency::PostgresStore::from_pool(pool);
    /// # let _ = store;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_pool(pool: Pool) -> Self {
        Self::builder()
            .build(pool)
            .expect("the default settings are valid")
    }

    /// How many of the pool's connections the store's single statements share
    /// ([`pipelined_connections`](PostgresStoreBuilder::pipelined_connections), at most half
    /// of the pool's size).
    pub fn pipelined_connections(&self) -> usize {
        self.inner.pipelines.count()
    }

    /// The table that holds the records, as it was given (`name` or `schema.name`).
    pub fn table(&self) -> &str {
        &self.inner.table_name
    }

    /// The period of the background cleanup of expired rows; `None` when it is off.
    pub fn cleanup_interval(&self) -> Option<Duration> {
        self.inner.cleanup_interval
    }

    /// The pool the store queries through. The connections the store shares
    /// ([`pipelined_connections`](Self::pipelined_connections)) count as in use in its status
    /// from their first use on.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// Creates the table and its index if they are missing (see [Schema](Self#schema)); a role
    /// without the `CREATE` privilege can run it on a table that exists.
    ///
    /// Safe to run on every start, from every instance of a fleet at once: it runs under a
    /// transaction-scoped advisory lock, one for every migration of this crate (however the
    /// table is spelled), so concurrent runs wait for each other instead of racing on the
    /// catalog.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.inner.client().await?;
        let migrated = async {
            let tx = client.transaction().await.map_err(pg_error)?;
            self.inner.sql.migrate(tx).await
        }
        .await;
        give_back(client, migrated)
    }

    /// Deletes every expired row, in batches of 1000, and returns how many were deleted.
    ///
    /// Rows another session is deleting are skipped, so every instance of a fleet may run it at
    /// once. An in-flight row whose lease ran out is expired too: deleting it is the same as a
    /// takeover, and its holder's later `complete` fails with
    /// [`LeaseLost`](StoreErrorKind::LeaseLost).
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

    /// Runs a statement that answers with the rows it changed. With `shares`, on a shared
    /// connection, and again on a connection of its own (which waits for the lock) when a lock
    /// held it up there; without (`renew`), on a connection of its own.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        shares: bool,
    ) -> Result<u64, StoreError> {
        self.ensure_cleanup();
        let run = async |conn: Conn<'_>| {
            let executed = async {
                let statement = conn.prepare_cached(sql).await.map_err(pg_error)?;
                conn.execute(&statement, params).await.map_err(pg_error)
            }
            .await;
            Inner::hand_back(conn, executed)
        };
        let conn = if shares {
            self.inner.shared().await?
        } else {
            Conn::Own(self.inner.client().await?)
        };
        let shared = conn.is_shared();
        match run(conn).await {
            Err(err) if shared && locked(&err) => run(Conn::Own(self.inner.client().await?)).await,
            executed => executed,
        }
    }

    /// Runs a `renew`, `complete` or `release` statement: one row changed, or the lease is lost.
    /// A statement PostgreSQL failed as one to run again ([`sql::runs_again`]) runs again after
    /// a pause ([`sql::pause_before_again`]), up to [`FENCED_ATTEMPTS`] times in all: it changed
    /// nothing, and its token still fences it. `shares`: as [`execute`](Self::execute).
    async fn fenced(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        shares: bool,
    ) -> Result<(), StoreError> {
        let mut failures = 0;
        loop {
            match self.execute(sql, params, shares).await {
                Ok(0) => return Err(StoreError::lease_lost()),
                Ok(_) => return Ok(()),
                Err(err) if failures + 1 < FENCED_ATTEMPTS && runs_again(&err) => {
                    failures += 1;
                    sql::pause_before_again(failures).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `begin`'s `take_over`, with `begin`'s parameters, on `begin`'s connection; a row that a
    /// transaction holds is read with `peek` instead. On a shared connection the error of
    /// `NOWAIT` is also that of a lock waited for past the session's timeout: there the takeover
    /// fails with it, and `begin` runs again on a connection of its own, where only `NOWAIT`
    /// raises it.
    async fn take_over(
        &self,
        client: &Conn<'_>,
        params: &[&(dyn ToSql + Sync); 5],
    ) -> Result<Option<Row>, StoreError> {
        let sql = &self.inner.sql;
        let statement = client
            .prepare_cached(&sql.take_over)
            .await
            .map_err(pg_error)?;
        match client.query_opt(&statement, params).await {
            Ok(row) => Ok(row),
            // A transaction holds the in-flight row: read it without waiting.
            Err(err)
                if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) && !client.is_shared() =>
            {
                let peek = client.prepare_cached(&sql.peek).await.map_err(pg_error)?;
                client
                    .query_opt(&peek, &params[..3])
                    .await
                    .map_err(pg_error)
            }
            Err(err) => Err(pg_error(err)),
        }
    }

    /// `begin`'s statements on `client`: `begin`, then `take_over` for a row that is no longer
    /// live, until one decides. A statement that a concurrent writer overtook, or that
    /// PostgreSQL failed as one to run again ([`sql::runs_again`]: it changed nothing; after a
    /// pause, [`sql::pause_before_again`]), runs again, up to [`BEGIN_ATTEMPTS`] times. `sent` is
    /// told when the store answered.
    async fn begin_on(
        &self,
        client: &Conn<'_>,
        params: &[&(dyn ToSql + Sync); 5],
        token: LockToken,
        sent: &mut SentBegin<'_, Self>,
    ) -> Result<Begin, StoreError> {
        let statement = client
            .prepare_cached(&self.inner.sql.begin)
            .await
            .map_err(pg_error)?;
        let mut failures = 0;
        for _ in 0..BEGIN_ATTEMPTS {
            let row = match client.query_opt(&statement, params).await.map_err(pg_error) {
                Ok(row) => row,
                Err(err) if runs_again(&err) => {
                    failures += 1;
                    sql::pause_before_again(failures).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let row = match sql::decide(begin_row(row.as_ref())?, token)? {
                Step::Done(begin) => {
                    sent.answered();
                    return Ok(begin);
                }
                Step::Again => continue,
                Step::TakeOver => match self.take_over(client, params).await {
                    Ok(row) => row,
                    Err(err) if runs_again(&err) => {
                        failures += 1;
                        sql::pause_before_again(failures).await;
                        continue;
                    }
                    Err(err) => return Err(err),
                },
            };
            if let Step::Done(begin) = sql::decide(begin_row(row.as_ref())?, token)? {
                sent.answered();
                return Ok(begin);
            }
        }
        sent.answered();
        Err(sql::kept_changing())
    }
}

/// The settings of a [`PostgresStore`], from [`PostgresStore::builder`], checked once when the
/// store is made: by connecting ([`connect`](Self::connect)) or over a pool of yours
/// ([`build`](Self::build)).
#[derive(Debug, Clone)]
#[must_use]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub struct PostgresStoreBuilder {
    table: String,
    cleanup_interval: Option<Duration>,
    max_connections: usize,
    pipelined_connections: Option<usize>,
}

impl PostgresStoreBuilder {
    /// The table that holds the records: `name` or `schema.name`, each part
    /// `[A-Za-z_][A-Za-z0-9_]{0,62}` (quoted in SQL, so its case is kept). Default:
    /// `idempotency_records`. The schema must exist. Every server of a fleet must use the same.
    ///
    /// A name without a schema (the default) is found through each connection's `search_path`: a
    /// fleet whose servers connect as different roles (the default `search_path` is
    /// `"$user", public`) or set different search paths must give the schema, or its servers
    /// may each use a table of their own and run a key once each.
    ///
    /// ```
    /// let builder = tower_idempotency::PostgresStore::builder().table("billing.idempotency");
    /// # let _ = builder;
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
    /// use std::time::Duration;
    /// let builder = tower_idempotency::PostgresStore::builder()
    ///     .cleanup_interval(Duration::from_secs(300));
    /// # let _ = builder;
    /// ```
    pub fn cleanup_interval(mut self, interval: Duration) -> Self {
        self.cleanup_interval = Some(interval);
        self
    }

    /// The most connections the pool that [`connect`](Self::connect) makes may open. Default:
    /// 16. The store keeps half of them for the statements it shares
    /// ([`pipelined_connections`](Self::pipelined_connections)); each handler's transaction
    /// (`Claim::respond_in`) and each of the other calls (`settle`, `forget`, `delete_expired`,
    /// `migrate`) holds one of the rest while it runs. Past what the database's cores can run,
    /// more connections only queue there. A pool of yours ([`build`](Self::build)) keeps its own
    /// size.
    ///
    /// ```
    /// let builder = tower_idempotency::PostgresStore::builder().max_connections(32);
    /// # let _ = builder;
    /// ```
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// How many of the pool's connections the store's single statements share, pipelined.
    /// Default, and at most: half of the pool's size, rounded down (8 of the 16 of
    /// [`connect`](Self::connect); a pool of one connection shares none). Stores built on one
    /// pool share at most half of it between them: once they do, a store's call whose
    /// connection is not open yet takes a connection of its own instead.
    ///
    /// `begin`, `complete`, `release` and `lookup` are one statement each. They go out
    /// on the shared connections in turn, many calls' statements on each at once: each is sent
    /// without waiting for the answers of those before it (tokio-postgres pipelines the
    /// statements of a connection's concurrent callers), and the database reads and answers them
    /// in batches. Both sides then spend fewer reads, writes and wake-ups per statement than a
    /// connection per call takes.
    ///
    /// A statement runs once those sent before it on its connection have run, so none may wait
    /// there long for a lock: a shared connection's session waits 100 ms at most
    /// (`lock_timeout`), and a statement that a lock held up longer (a `complete` or `release` of
    /// a row that a handler's transaction still holds; see "Completing in the handler's
    /// transaction" on [`PostgresStore`]) runs again on a connection of its own, which waits.
    ///
    /// The count is a trade. A connection's statements run one after another on its backend,
    /// each a transaction that commits before the next starts: under `synchronous_commit` (the
    /// default), each waits there for its commit's WAL flush, and fewer connections flush fewer
    /// commits at once. On this crate's load test (BENCHMARKS.md), half of a pool of 16 ran new
    /// keys about as fast as a connection per call on a durable configuration and replays 1.48 ×
    /// as fast, and new keys 1.2 × and replays 1.24 × as fast with `synchronous_commit = off`; 4
    /// ran 1.43 × and 1.47 × as fast there, but new keys 0.78 × on the durable one. Fewer suit a
    /// database whose commits do not wait for a disk (or whose traffic is mostly replays, which
    /// write nothing), more one whose flushes are slow.
    ///
    /// Each shared connection is taken from the pool at its first use and kept, and closed when
    /// the store is dropped (its session's setting stays out of the pool); one that closed, that
    /// a failure left of no further use (see "Connections" on [`PostgresStore`]), or whose call
    /// was dropped before it answered (past the store's timeout, say: its answers may have
    /// stopped coming), is replaced at the next call. `renew` (a live handler's lease does not
    /// depend on a connection other calls share), `settle` (which waits for a handler's
    /// transaction), `forget`, `delete_expired`, `migrate` and handlers' transactions take a
    /// connection of their own. With 0, every call does.
    ///
    /// ```
    /// let builder = tower_idempotency::PostgresStore::builder().pipelined_connections(2);
    /// # let _ = builder;
    /// ```
    pub fn pipelined_connections(mut self, count: usize) -> Self {
        self.pipelined_connections = Some(count);
        self
    }

    /// Connects to the PostgreSQL at `url`, as [`PostgresStore::connect`], with these settings.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build); [`StoreErrorKind::Other`] when
    /// [`max_connections`](Self::max_connections) is zero; and as [`PostgresStore::connect`].
    pub async fn connect(self, url: &str) -> Result<PostgresStore, StoreError> {
        if self.max_connections == 0 {
            return Err(StoreError::msg(
                StoreErrorKind::Other,
                "PostgresStore: max_connections must not be zero",
            ));
        }
        let max_connections = self.max_connections;
        let checked = self.checked()?;
        let pool = PostgresStore::pool_for(url, max_connections).await?;
        Ok(checked.finish(pool))
    }

    /// A store over an existing pool, with these settings.
    ///
    /// # Errors
    ///
    /// [`StoreErrorKind::Other`] when the table name is not `name` or `schema.name` as
    /// [`table`](Self::table) says (a name is never spliced into SQL unchecked), or the cleanup
    /// interval is zero or longer than a year.
    pub fn build(self, pool: Pool) -> Result<PostgresStore, StoreError> {
        Ok(self.checked()?.finish(pool))
    }

    /// The settings, checked: the one place they are.
    fn checked(self) -> Result<Checked, StoreError> {
        let table = Table::parse(&self.table)?;
        if let Some(interval) = self.cleanup_interval {
            util::check_period_or_err("PostgresStore", interval)?;
        }
        Ok(Checked {
            table_name: self.table,
            table,
            cleanup_interval: self.cleanup_interval,
            pipelined_connections: self.pipelined_connections,
        })
    }
}

/// Settings that passed [`PostgresStoreBuilder::checked`].
struct Checked {
    table_name: String,
    table: Table,
    cleanup_interval: Option<Duration>,
    pipelined_connections: Option<usize>,
}

impl Checked {
    fn finish(self, pool: Pool) -> PostgresStore {
        let sql = Sql::new(&self.table);
        // Half of the pool at most, and at most half with the other stores built on the pool:
        // the rest is for the calls that hold a connection of their own, and for handlers'
        // transactions (`Claim::respond_in`). Half by default (see
        // `PostgresStoreBuilder::pipelined_connections`).
        let half = pool.status().max_size / 2;
        let pipelined = self
            .pipelined_connections
            .map_or(half, |count| count.min(half));
        let pipelines = Pipelines::new(pipelined, PoolShare::new(pool.manager(), half));
        PostgresStore {
            inner: Arc::new(Inner {
                pool,
                target: ClaimTarget::new(&self.table, &sql),
                sql,
                table_name: self.table_name,
                table: self.table,
                cleanup_interval: self.cleanup_interval,
                cleanup: KeepRunning::default(),
                pipelines,
            }),
        }
    }
}

impl Inner {
    /// A connection of the pool, to hand back with [`give_back`].
    async fn client(&self) -> Result<Pooled, StoreError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        Ok(Pooled(Some(client)))
    }

    /// A connection for a single statement (`begin`, `complete`, `release`, `lookup`):
    /// the next of the shared connections in turn, taken from the pool if it has none open; or
    /// one of the pool's own when the store shares none, or while another call takes the slot's.
    /// To hand back with [`hand_back`](Self::hand_back).
    async fn shared(&self) -> Result<Conn<'_>, StoreError> {
        match self.pipelines.next() {
            Next::Shared(lent) => Ok(Conn::Shared(lent)),
            Next::Own => Ok(Conn::Own(self.client().await?)),
            Next::Fill(filling) => {
                let client = self.client().await?;
                client.batch_execute(LOCK_TIMEOUT).await.map_err(pg_error)?;
                Ok(Conn::Shared(filling.fill(client.into_shared())))
            }
        }
    }

    /// Hands `conn` back and passes `result` on, as [`give_back`] does: a shared connection
    /// that `result`'s failure left of no further use is taken out of its slot (as one whose
    /// call is dropped before it is handed back), and closed once the statements under way on
    /// it have answered.
    fn hand_back<T>(conn: Conn<'_>, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match conn {
            Conn::Own(client) => give_back(client, result),
            Conn::Shared(lent) => {
                if !discards(&result) {
                    lent.keep();
                }
                result
            }
        }
    }

    async fn delete_expired(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let deleted = async {
            let statement = client
                .prepare_cached(&self.sql.delete_expired)
                .await
                .map_err(pg_error)?;
            let (client, statement) = (&client, &statement);
            sql::delete_in_batches(|| async move {
                let deleted = client.execute(statement, &[&DELETE_BATCH]).await;
                deleted.map_err(pg_error)
            })
            .await
        }
        .await;
        give_back(client, deleted)
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

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.table.quoted)
            .field("cleanup_interval", &self.inner.cleanup_interval)
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

impl IdempotencyStore for PostgresStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        self.ensure_cleanup();
        let token = LockToken::random();
        let token_bytes = token_bytes(token);
        let (tenant, fingerprint) = (&key.tenant().as_bytes()[..], &fingerprint.as_bytes()[..]);
        let lease_ms = millis(lease);
        let params: [&(dyn ToSql + Sync); 5] = [
            &tenant,
            &key.key(),
            &fingerprint,
            &&token_bytes[..],
            &lease_ms,
        ];
        let conn = self.inner.shared().await?;
        let shared = conn.is_shared();
        let mut sent = SentBegin::new(self, key, token, lease);
        let began = self.begin_on(&conn, &params, token, &mut sent).await;
        let mut began = Inner::hand_back(conn, began);
        if shared && began.as_ref().is_err_and(locked) {
            // A lock held a statement up on the shared connection past the session's lock timeout
            // (a concurrent insert of the same key, uncommitted; a row the takeover would update,
            // held by another transaction), and it changed nothing: `begin` runs again on a
            // connection of its own, which waits for the lock.
            began = match self.inner.client().await {
                Ok(client) => {
                    let conn = Conn::Own(client);
                    let again = self.begin_on(&conn, &params, token, &mut sent).await;
                    Inner::hand_back(conn, again)
                }
                Err(err) => {
                    sent.answered();
                    Err(err)
                }
            };
        }
        if let Err(err) = &began
            && sqlstate(err).is_some_and(|code| !sql::ends_connection(code.code()))
        {
            // The server failed the statement and rolled it back: nothing to clean up. (Not so
            // when it ended the connection: that may come after the statement committed.)
            sent.answered();
        }
        began
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let (tenant, token) = (&key.tenant().as_bytes()[..], &token[..]);
        let sql = &self.inner.sql.renew;
        // On a connection of its own: a renewal keeps a live handler's key from being taken
        // over, and does not queue behind other calls' statements, nor share their connection's
        // fate when its answers stop coming.
        match self
            .fenced(sql, &[&tenant, &key.key(), &token, &millis(lease)], false)
            .await
        {
            // The handler's own transaction holds the row (`Claim::respond_in`): nothing can
            // take it over while it does, and the renewal does not wait for it.
            Err(err) if err.kind() == StoreErrorKind::Unavailable && locked(&err) => Ok(()),
            result => result,
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
        let (tenant, token) = (&key.tenant().as_bytes()[..], &token[..]);
        let encoded = response.encode();
        let encoded = &encoded[..];
        let sql = &self.inner.sql.complete;
        self.fenced(
            sql,
            &[&tenant, &key.key(), &token, &encoded, &millis(ttl)],
            true,
        )
        .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let (tenant, token) = (&key.tenant().as_bytes()[..], &token[..]);
        self.fenced(
            &self.inner.sql.release,
            &[&tenant, &key.key(), &token],
            true,
        )
        .await
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        let tenant = &key.tenant().as_bytes()[..];
        let run = async |conn: Conn<'_>| {
            let found = async {
                let statement = conn
                    .prepare_cached(&self.inner.sql.lookup)
                    .await
                    .map_err(pg_error)?;
                let row = conn
                    .query_opt(&statement, &[&tenant, &key.key()])
                    .await
                    .map_err(pg_error)?;
                row.as_ref().map(record_info).transpose()
            }
            .await;
            Inner::hand_back(conn, found)
        };
        let conn = self.inner.shared().await?;
        let shared = conn.is_shared();
        match run(conn).await {
            // A lock on the table (an `ALTER TABLE`, say) held the read up past the shared
            // connection's timeout: it waits on a connection of its own.
            Err(err) if shared && locked(&err) => run(Conn::Own(self.inner.client().await?)).await,
            found => found,
        }
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        let tenant = &key.tenant().as_bytes()[..];
        let client = self.inner.client().await?;
        let forgotten = async {
            let statement = client
                .prepare_cached(&self.inner.sql.forget)
                .await
                .map_err(pg_error)?;
            let mut waits = sql::forget_lock_waits();
            let row = loop {
                match client
                    .query_one(&statement, &[&tenant, &key.key(), &force])
                    .await
                    .map_err(pg_error)
                {
                    Ok(row) => break row,
                    // A statement holds the row for a moment; a transaction that keeps holding
                    // it is alive (see `Sql::forget`).
                    Err(err) if locked(&err) => match waits.next() {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => return Ok(Forget::InFlight),
                    },
                    Err(err) => return Err(err),
                }
            };
            Ok(sql::forget(row.try_get(0).map_err(corrupt)?))
        }
        .await;
        give_back(client, forgotten)
    }

    async fn settle(&self, key: &RecordKey, token: LockToken) -> Result<Settled, StoreError> {
        let token = token_bytes(token);
        let params: [&(dyn ToSql + Sync); 3] =
            [&&key.tenant().as_bytes()[..], &key.key(), &&token[..]];
        let client = self.inner.client().await?;
        let settled = async {
            for statement in [&self.inner.sql.settle, &self.inner.sql.settled] {
                let statement = client.prepare_cached(statement).await.map_err(pg_error)?;
                let row = client
                    .query_one(&statement, &params)
                    .await
                    .map_err(pg_error)?;
                if let Some(settled) = sql::settled(row.try_get(0).map_err(corrupt)?) {
                    return Ok(settled);
                }
            }
            Ok(Settled::Lost)
        }
        .await;
        give_back(client, settled)
    }

    fn claim_target(&self) -> Option<ClaimTarget> {
        Some(self.inner.target.clone())
    }
}

impl sql::MigrationTx for deadpool_postgres::Transaction<'_> {
    async fn execute(&mut self, sql: &str, param: Option<i64>) -> Result<(), StoreError> {
        match param {
            Some(param) => tokio_postgres::Transaction::execute(self, sql, &[&param])
                .await
                .map(drop),
            None => self.batch_execute(sql).await,
        }
        .map_err(pg_error)
    }

    async fn query_bool(&mut self, sql: &str) -> Result<bool, StoreError> {
        let row = self.query_one(sql, &[]).await.map_err(pg_error)?;
        row.try_get(0).map_err(corrupt)
    }

    async fn commit(self) -> Result<(), StoreError> {
        deadpool_postgres::Transaction::commit(self)
            .await
            .map_err(pg_error)
    }
}

/// Reads a row of `lookup`.
fn record_info(row: &Row) -> Result<RecordInfo, StoreError> {
    sql::record_info(
        row.try_get(0).map_err(corrupt)?,
        row.try_get(1).map_err(corrupt)?,
        row.try_get(2).map_err(corrupt)?,
        row.try_get(3).map_err(corrupt)?,
    )
}

/// The outcome and response of a row of `begin` or `peek`.
fn begin_row(row: Option<&Row>) -> Result<BeginRow<'_>, StoreError> {
    row.map(|row| {
        Ok((
            row.try_get(0).map_err(corrupt)?,
            row.try_get(1).map_err(corrupt)?,
        ))
    })
    .transpose()
}

/// The SQLSTATE of the statement that failed with `err`, when the server answered one.
fn sqlstate(err: &StoreError) -> Option<&SqlState> {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<tokio_postgres::Error>())
        .and_then(tokio_postgres::Error::code)
}

/// Whether a statement failed on a row lock it would not wait for (`NOWAIT`).
fn locked(err: &StoreError) -> bool {
    sqlstate(err) == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// Whether PostgreSQL failed a statement as one to run again ([`sql::runs_again`]).
fn runs_again(err: &StoreError) -> bool {
    sqlstate(err).is_some_and(|code| sql::runs_again(code.code()))
}

/// A connection a store call runs its statement on: the pool's, held by this call alone, or
/// shared with other calls' statements, pipelined.
#[allow(clippy::large_enum_variant)] // the pool's connection as it hands it out, as before
enum Conn<'a> {
    Own(Pooled),
    Shared(Lent<'a>),
}

impl Conn<'_> {
    fn is_shared(&self) -> bool {
        matches!(self, Conn::Shared(_))
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        match self {
            Conn::Own(client) => client,
            Conn::Shared(lent) => lent.client(),
        }
    }
}

/// A connection of the pool held by one call, to hand back with [`give_back`]. Dropped before
/// that (its call was dropped: the store's timeout, a request that went away), it is closed,
/// not given back: a statement may still run on it, or wait for a lock, and every statement
/// the pool's next user sent on it would wait behind that one.
struct Pooled(Option<Client>);

impl Pooled {
    /// The connection, to share ([`Filling::fill`](pipeline::Filling::fill)).
    fn into_shared(mut self) -> Client {
        self.0.take().expect("a held connection is taken once")
    }
}

impl std::ops::Deref for Pooled {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.0.as_ref().expect("a held connection is taken once")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("a held connection is taken once")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

/// Hands `client` back to the pool and passes `result` on; a connection that `result`'s
/// failure left of no further use ([`sql::discards_connection`]: a read-only connection, one the
/// server is ending) is closed instead, and the pool opens a new one when it needs it.
fn give_back<T>(mut client: Pooled, result: Result<T, StoreError>) -> Result<T, StoreError> {
    if !discards(&result) {
        // Back to the pool; a discarded one is closed as `client` drops.
        drop(client.0.take());
    }
    result
}

/// Whether `result` is a failure that left its connection of no further use
/// ([`sql::discards_connection`]).
fn discards<T>(result: &Result<T, StoreError>) -> bool {
    result
        .as_ref()
        .is_err_and(|err| sqlstate(err).is_some_and(|code| sql::discards_connection(code.code())))
}

fn pool_error(err: PoolError) -> StoreError {
    StoreError::unavailable(err)
}

/// A failed statement: `Unavailable`, its source kept, described by the server's message and
/// SQLSTATE when the server answered (tokio-postgres's own text is only `db error`).
fn pg_error(err: tokio_postgres::Error) -> StoreError {
    let message = err
        .as_db_error()
        .map(|db| sql::server_message(db.message(), db.code().code()));
    let error = StoreError::unavailable(err);
    match message {
        Some(message) => error.with_message(message),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool that has not connected (nothing connects until the first query).
    fn unconnected() -> Pool {
        unconnected_builder().build().unwrap()
    }

    /// The builder of [`unconnected`]'s pool, to size it.
    fn unconnected_builder() -> deadpool_postgres::PoolBuilder {
        let config: tokio_postgres::Config = "postgres://nobody@127.0.0.1:1/db".parse().unwrap();
        Pool::builder(Manager::new(config, NoTls))
    }

    /// Half of the pool by default, and never more.
    #[test]
    fn the_shared_connections_are_at_most_half_of_the_pool() {
        let sized = |max_size| unconnected_builder().max_size(max_size).build().unwrap();
        let shared = |setting: Option<usize>, max_size: usize| {
            let builder = PostgresStore::builder();
            let builder = match setting {
                Some(count) => builder.pipelined_connections(count),
                None => builder,
            };
            builder
                .build(sized(max_size))
                .unwrap()
                .pipelined_connections()
        };
        assert_eq!(shared(None, 16), 8);
        assert_eq!(shared(None, 6), 3);
        assert_eq!(shared(None, 2), 1);
        assert_eq!(shared(None, 1), 0);
        assert_eq!(shared(Some(0), 16), 0);
        assert_eq!(shared(Some(4), 16), 4);
        assert_eq!(shared(Some(8), 16), 8);
        assert_eq!(shared(Some(8), 10), 5);
        assert_eq!(
            PostgresStore::from_pool(sized(16)).pipelined_connections(),
            8
        );
    }

    #[test]
    fn settings_are_checked_once_and_read_back() {
        let store = PostgresStore::builder()
            .table("billing.idem")
            .cleanup_interval(Duration::from_secs(60))
            .build(unconnected())
            .unwrap();
        assert_eq!(store.inner.table.quoted, "\"billing\".\"idem\"");
        assert!(store.inner.sql.begin.contains("\"billing\".\"idem\""));
        assert!(store.inner.sql.take_over.contains("\"billing\".\"idem\""));
        assert!(store.inner.sql.forget.contains("\"billing\".\"idem\""));
        assert_eq!(store.table(), "billing.idem");
        assert_eq!(store.cleanup_interval(), Some(Duration::from_secs(60)));
        let debug = format!("{store:?}");
        assert!(
            debug.contains("billing") && debug.contains("60s"),
            "{debug}"
        );

        let defaults = PostgresStore::from_pool(unconnected());
        assert_eq!(
            (defaults.table(), defaults.cleanup_interval()),
            (DEFAULT_TABLE, None)
        );
        for bad in [
            PostgresStore::builder().table("no-dashes"),
            PostgresStore::builder().cleanup_interval(Duration::ZERO),
            PostgresStore::builder().cleanup_interval(Duration::MAX),
        ] {
            let err = bad.build(unconnected()).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Other);
        }
    }

    #[test]
    fn server_errors_keep_their_message_and_sqlstate() {
        let text = sql::server_message(
            "schema \"billing\" does not exist",
            SqlState::INVALID_SCHEMA_NAME.code(),
        );
        assert_eq!(text, "schema \"billing\" does not exist (SQLSTATE 3F000)");
        let io = std::io::Error::other("gone");
        let err = StoreError::unavailable(io).with_message(text);
        assert_eq!(
            err.to_string(),
            "idempotency store unavailable: schema \"billing\" does not exist (SQLSTATE 3F000)"
        );
        let source = std::error::Error::source(&err).expect("the source is kept");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }

    #[tokio::test]
    async fn a_pool_of_no_connections_is_refused_before_connecting() {
        let err = PostgresStore::builder()
            .max_connections(0)
            .connect("postgres://nobody@127.0.0.1:1/db")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other);
        assert!(err.to_string().contains("max_connections"), "{err}");
    }
}
