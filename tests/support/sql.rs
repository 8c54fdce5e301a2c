//! The scenarios both SQL stores (`PostgresStore`, `SqlxStore`) run against the PostgreSQL at
//! `POSTGRES_URL`: `migrate` from many instances at once, table names and schemas, expired
//! rows deleted by `delete_expired` and by the background cleanup, undecodable rows, tables
//! with and without a `CHECK` on `state`, `begin` racing over many rounds, a forced `forget`
//! racing `complete`, and a PostgreSQL outage. The store-specific parts (pools, builders, raw
//! SQL) are behind [`SqlStore`]; `sql_scenarios!` makes the scenarios tests.

use std::future::Future;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, LockToken, RecordKey, StoreError, StoreErrorKind,
    StoredResponse, TenantId,
};

use super::{Runs, eventually, payment, send, server, server_url, unique_key};

/// A SQL store as the scenarios use it: instances built over a pool on the test database, and
/// raw SQL on that database.
pub trait SqlStore: IdempotencyStore + Clone {
    /// What instances are built over: a pool on the database (for `PostgresStore`, a store
    /// whose pool the others share).
    type Pool: Clone + Send + Sync + 'static;

    /// The first word of the names of the scenarios' tables.
    const PREFIX: &'static str;

    /// A new pool on the database at `POSTGRES_URL`; `None`, after printing that `test` is
    /// skipped, when it is not set.
    fn pool(test: &str) -> impl Future<Output = Option<Self::Pool>> + Send;

    /// A store over `pool`, on `table` (the default table when `None`), cleaning up expired
    /// rows in the background every `cleanup` when given. Invalid table names are refused here.
    fn build(
        pool: &Self::Pool,
        table: Option<&str>,
        cleanup: Option<Duration>,
    ) -> Result<Self, StoreError>;

    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn delete_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The table name the store reports, where it reports one.
    fn table_name(&self) -> Option<&str>;

    /// Runs `sql` (one or more statements).
    fn execute(pool: &Self::Pool, sql: &str) -> impl Future<Output = ()> + Send;

    /// `SELECT count(*) FROM table`.
    fn count_rows(pool: &Self::Pool, table: &str) -> impl Future<Output = i64> + Send;
}

#[cfg(feature = "postgres")]
impl SqlStore for tower_idempotency::PostgresStore {
    type Pool = Self;

    const PREFIX: &'static str = "idem";

    async fn pool(test: &str) -> Option<Self> {
        let url = server_url("POSTGRES_URL", test)?;
        Some(Self::connect(&url).await.expect("connect to POSTGRES_URL"))
    }

    fn build(
        base: &Self,
        table: Option<&str>,
        cleanup: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let mut builder = Self::builder();
        if let Some(table) = table {
            builder = builder.table(table);
        }
        if let Some(interval) = cleanup {
            builder = builder.cleanup_interval(interval);
        }
        builder.build(base.pool().clone())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        Self::migrate(self).await
    }

    async fn delete_expired(&self) -> Result<u64, StoreError> {
        Self::delete_expired(self).await
    }

    fn table_name(&self) -> Option<&str> {
        Some(self.table())
    }

    async fn execute(base: &Self, sql: &str) {
        let client = base.pool().get().await.unwrap();
        client.batch_execute(sql).await.unwrap();
    }

    async fn count_rows(base: &Self, table: &str) -> i64 {
        let client = base.pool().get().await.unwrap();
        let row = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap();
        row.get(0)
    }
}

#[cfg(feature = "sqlx")]
impl SqlStore for tower_idempotency::SqlxStore {
    type Pool = sqlx::PgPool;

    const PREFIX: &'static str = "sqlx";

    async fn pool(test: &str) -> Option<sqlx::PgPool> {
        let url = server_url("POSTGRES_URL", test)?;
        Some(
            sqlx::PgPool::connect(&url)
                .await
                .expect("connect to POSTGRES_URL"),
        )
    }

    fn build(
        pool: &sqlx::PgPool,
        table: Option<&str>,
        cleanup: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let mut builder = Self::builder(pool.clone());
        if let Some(table) = table {
            builder = builder.table(table);
        }
        if let Some(interval) = cleanup {
            builder = builder.cleanup_interval(interval);
        }
        builder.build()
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        Self::migrate(self).await
    }

    async fn delete_expired(&self) -> Result<u64, StoreError> {
        Self::delete_expired(self).await
    }

    fn table_name(&self) -> Option<&str> {
        None
    }

    async fn execute(pool: &sqlx::PgPool, sql: &str) {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }

    async fn count_rows(pool: &sqlx::PgPool, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
            .unwrap()
    }
}

/// A table name no other test or run uses: the store's prefix, `label`, and the token's
/// per-process part and its counter.
pub fn table_name<S: SqlStore>(label: &str) -> String {
    let token = LockToken::random().to_string();
    format!("{}_{label}_{}{}", S::PREFIX, &token[..8], &token[26..])
}

/// A store on the default table, migrated; `None` when `POSTGRES_URL` is not set.
async fn migrated<S: SqlStore>(test: &str) -> Option<S> {
    let store = S::build(&S::pool(test).await?, None, None).unwrap();
    store.migrate().await.expect("migrate");
    Some(store)
}

/// A pool, and a migrated store over a table of its own, created for the test.
async fn with_table<S: SqlStore>(test: &str, table: &str) -> Option<(S::Pool, S)> {
    let pool = S::pool(test).await?;
    let store = S::build(&pool, Some(table), None).unwrap();
    store.migrate().await.unwrap();
    Some((pool, store))
}

fn ok_response() -> StoredResponse {
    StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"))
}

/// Acquires `key` for `fp` (failing the test unless the store answers `Acquired`) and completes
/// it with [`ok_response`].
async fn complete_once<S: IdempotencyStore>(store: &S, key: &RecordKey, fp: &Fingerprint) {
    let begun = store.begin(key, fp, Duration::from_secs(30)).await;
    let Ok(Begin::Acquired(token)) = begun else {
        panic!("expected Acquired, got {begun:?}");
    };
    store
        .complete(key, token, ok_response(), Duration::from_secs(60))
        .await
        .unwrap();
}

/// Eight instances of `S`, each on a pool of its own, and one of `Peer` run `migrate` at once
/// on a new table: all succeed, `migrate` runs again, and the table works for both kinds.
pub async fn scenario_migrate_from_many_instances<S: SqlStore, Peer: SqlStore>() {
    let Some(pool) = S::pool("migrate").await else {
        return;
    };
    let table = table_name::<S>("migrate");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = S::build(&S::pool("migrate").await.unwrap(), Some(&table), None).unwrap();
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    let peer = Peer::build(&Peer::pool("migrate").await.unwrap(), Some(&table), None).unwrap();
    tasks.push(tokio::spawn({
        let peer = peer.clone();
        async move { peer.migrate().await }
    }));
    for task in tasks {
        task.await.unwrap().expect("a concurrent migrate failed");
    }
    let store = S::build(&pool, Some(&table), None).unwrap();
    store.migrate().await.expect("migrate again");
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([1; 32]);
    assert!(matches!(
        store.begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        peer.begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::InFlight)
    ));
    S::execute(&pool, &format!("DROP TABLE {table}")).await;
}

/// Names that are not identifiers are refused when the store is built; a schema-qualified,
/// case-kept table works.
pub async fn scenario_table_names_and_schemas<S: SqlStore>() {
    let Some(pool) = S::pool("table names").await else {
        return;
    };
    for bad in ["x; DROP TABLE y", "a.b.c", "1abc", "\"quoted\"", ""] {
        let Err(err) = S::build(&pool, Some(bad), None) else {
            panic!("{bad:?} is refused");
        };
        assert_eq!(err.kind(), StoreErrorKind::Other, "{bad:?}");
    }

    let schema = table_name::<S>("schema");
    S::execute(&pool, &format!("CREATE SCHEMA {schema}")).await;
    let store = S::build(&pool, Some(&format!("{schema}.Records")), None).unwrap();
    if let Some(table) = store.table_name() {
        assert_eq!(table, format!("{schema}.Records"));
    }
    store.migrate().await.unwrap();
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([2; 32]);
    complete_once(&store, &key, &fp).await;
    assert!(
        matches!(store.begin(&key, &fp, Duration::from_secs(30)).await, Ok(Begin::Completed(r)) if r == ok_response())
    );
    assert_eq!(
        S::count_rows(&pool, &format!("{schema}.\"Records\"")).await,
        1,
        "the quoted, case-kept table in the schema holds the record"
    );
    S::execute(&pool, &format!("DROP SCHEMA {schema} CASCADE")).await;
}

/// `delete_expired` removes expired rows (in flight and completed), over more than one batch,
/// and only those.
/// A `begin` that ran past the store timeout (another session held the table locked) was not
/// lost: the database ran it once the lock went, leaving a record in flight under a token no
/// request holds. That record is released in the background, so the retry of the request that
/// got `503` runs well before the record's lease (30 s) would have ended it.
pub async fn scenario_a_begin_past_its_timeout_leaves_no_record<S: SqlStore>() {
    let table = table_name::<S>("late_begin");
    let Some((pool, store)) = with_table::<S>("a_begin_past_its_timeout", &table).await else {
        return;
    };
    let runs = Runs::default();
    let app = server(store, &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(300))
    });
    // Statements are prepared on the pool's connections before the table is locked (several
    // at once, so that more than one connection has them: the lock takes one).
    let warm = (0..8).map(|i| {
        let app = app.clone();
        async move { send(&app, payment(&format!("warm-{i}"), "{}")).await }
    });
    for warm in futures_util::future::join_all(warm).await {
        assert_eq!(warm.status, StatusCode::CREATED);
    }
    let lock = format!(
        "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(1.5); COMMIT;"
    );
    let locked = tokio::spawn({
        let pool = pool.clone();
        async move { S::execute(&pool, &lock).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = unique_key("late");
    send(&app, payment(&key, "{}"))
        .await
        .assert_store_unavailable();
    locked.await.unwrap();
    let retried = Instant::now();
    let ran = eventually(Duration::from_secs(10), async || {
        send(&app, payment(&key, "{}")).await.status == StatusCode::CREATED
    })
    .await;
    assert!(ran, "the retry ran after {:?}", retried.elapsed());
    assert_eq!(
        runs.get(),
        9,
        "the request that got 503 never ran; its retry ran once"
    );
}

pub async fn scenario_delete_expired<S: SqlStore>() {
    let table = table_name::<S>("cleanup");
    let Some((pool, store)) = with_table::<S>("delete_expired", &table).await else {
        return;
    };
    let fp = Fingerprint::from_bytes([3; 32]);
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(60);
    for i in 0..1500 {
        let key = RecordKey::new(TenantId::shared(), format!("expired-{i}"));
        let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, short).await else {
            panic!()
        };
        if i % 2 == 0 {
            store
                .complete(&key, token, ok_response(), short)
                .await
                .unwrap();
        }
    }
    let live = RecordKey::new(TenantId::shared(), "live");
    let Ok(Begin::Acquired(token)) = store.begin(&live, &fp, long).await else {
        panic!()
    };
    store
        .complete(&live, token, ok_response(), long)
        .await
        .unwrap();
    let in_flight = RecordKey::new(TenantId::shared(), "in-flight");
    assert!(matches!(
        store.begin(&in_flight, &fp, long).await,
        Ok(Begin::Acquired(_))
    ));
    assert_eq!(S::count_rows(&pool, &table).await, 1502);

    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(
        store.delete_expired().await.unwrap(),
        1500,
        "every expired row, over two batches"
    );
    assert_eq!(S::count_rows(&pool, &table).await, 2);
    assert_eq!(store.delete_expired().await.unwrap(), 0);
    assert!(
        matches!(store.begin(&live, &fp, long).await, Ok(Begin::Completed(r)) if r == ok_response())
    );
    assert!(matches!(
        store.begin(&in_flight, &fp, long).await,
        Ok(Begin::InFlight)
    ));
    S::execute(&pool, &format!("DROP TABLE {table}")).await;
}

/// The background cleanup deletes expired rows by itself, and only those; it stops with the
/// store.
pub async fn scenario_background_cleanup<S: SqlStore>() {
    let table = table_name::<S>("background");
    let Some((pool, observer)) = with_table::<S>("background cleanup", &table).await else {
        return;
    };
    let store = S::build(&pool, Some(&table), Some(Duration::from_millis(200))).unwrap();
    let fp = Fingerprint::from_bytes([4; 32]);
    let live = RecordKey::new(TenantId::shared(), "live");
    assert!(matches!(
        observer.begin(&live, &fp, Duration::from_secs(60)).await,
        Ok(Begin::Acquired(_))
    ));
    for i in 0..10 {
        let key = RecordKey::new(TenantId::shared(), format!("k{i}"));
        assert!(matches!(
            store.begin(&key, &fp, Duration::from_millis(100)).await,
            Ok(Begin::Acquired(_))
        ));
    }
    assert_eq!(S::count_rows(&pool, &table).await, 11);
    let emptied = eventually(Duration::from_secs(10), async || {
        S::count_rows(&pool, &table).await == 1
    })
    .await;
    assert!(
        emptied,
        "the background task deleted the expired rows, and only those"
    );

    // Once the store is dropped, its task ends at its next tick: rows stay.
    let after_drop = RecordKey::new(TenantId::shared(), "after-drop");
    assert!(matches!(
        store
            .begin(&after_drop, &fp, Duration::from_millis(50))
            .await,
        Ok(Begin::Acquired(_))
    ));
    drop(store);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        S::count_rows(&pool, &table).await,
        2,
        "no cleanup after the store was dropped"
    );
    S::execute(&pool, &format!("DROP TABLE {table}")).await;
}

/// A row that cannot be decoded is `Corrupt`, for `begin` and `lookup`: never a panic or a
/// replay. Either its response is not one the store encoded, or its state is neither of the two
/// the store writes (the table has no check on the column). `forget`, not forced, clears it.
pub async fn scenario_undecodable_rows<S: SqlStore>() {
    let table = table_name::<S>("corrupt");
    let Some((pool, store)) = with_table::<S>("undecodable rows", &table).await else {
        return;
    };
    let (fp, other) = (
        Fingerprint::from_bytes([5; 32]),
        Fingerprint::from_bytes([7; 32]),
    );
    for (i, corruption) in ["response = '\\x0100'::bytea", "state = 'done'"]
        .into_iter()
        .enumerate()
    {
        let key = RecordKey::new(TenantId::shared(), format!("k{i}"));
        complete_once(&store, &key, &fp).await;
        S::execute(
            &pool,
            &format!("UPDATE {table} SET {corruption} WHERE key = 'k{i}'"),
        )
        .await;
        let err = store
            .begin(&key, &fp, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{corruption}: {err}");
        let err = store.lookup(&key).await.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{corruption}: {err}");
        // Another request with the key: a completed record's fingerprint is read whatever its
        // response (`422`); a record in no state the store knows is not read further.
        let answer = store.begin(&key, &other, Duration::from_secs(30)).await;
        match i {
            0 => assert!(matches!(answer, Ok(Begin::Mismatch)), "{answer:?}"),
            _ => assert!(
                matches!(&answer, Err(err) if err.kind() == StoreErrorKind::Corrupt),
                "{answer:?}"
            ),
        }
        // The operator clears it without forcing (no handler holds it), and the key is new.
        assert!(
            matches!(store.forget(&key, false).await, Ok(Forget::Forgotten)),
            "{corruption}"
        );
        assert!(store.lookup(&key).await.unwrap().is_none(), "{corruption}");
        assert!(
            matches!(
                store.begin(&key, &fp, Duration::from_secs(30)).await,
                Ok(Begin::Acquired(_))
            ),
            "{corruption}"
        );
    }
    S::execute(&pool, &format!("DROP TABLE {table}")).await;
}

/// Fails unless `table` has a check constraint exactly when `expected` (the statement raises an
/// error, which `execute` fails the test on).
async fn assert_check<S: SqlStore>(pool: &S::Pool, table: &str, expected: bool) {
    let not = if expected { "NOT" } else { "" };
    S::execute(
        pool,
        &format!(
            "DO $$ BEGIN
                IF {not} EXISTS (SELECT 1 FROM pg_constraint
                                 WHERE conrelid = '{table}'::regclass AND contype = 'c') THEN
                    RAISE EXCEPTION 'the table {table}: a check constraint expected: {expected}';
                END IF;
            END $$"
        ),
    )
    .await;
}

/// The table `migrate` makes has no `CHECK` on `state`, and a table made with one (as earlier
/// releases made it) works as it is: `migrate` leaves it alone, and a new key, its completion,
/// its replay and a duplicate in flight are answered on it.
pub async fn scenario_tables_with_and_without_the_state_check<S: SqlStore>() {
    let table = table_name::<S>("nocheck");
    let Some((pool, _)) = with_table::<S>("tables with and without the state check", &table).await
    else {
        return;
    };
    assert_check::<S>(&pool, &table, false).await;

    let checked = table_name::<S>("checked");
    S::execute(
        &pool,
        &format!(
            "CREATE TABLE {checked} (
                tenant      bytea       NOT NULL,
                key         text        COLLATE \"C\" NOT NULL,
                state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
                fingerprint bytea       NOT NULL,
                token       bytea       NOT NULL,
                response    bytea,
                expires_at  timestamptz NOT NULL,
                PRIMARY KEY (tenant, key)
            );
            CREATE INDEX {checked}_expires_idx ON {checked} (expires_at)"
        ),
    )
    .await;
    let old = S::build(&pool, Some(&checked), None).unwrap();
    old.migrate().await.unwrap();
    let (key, other) = (
        RecordKey::new(TenantId::shared(), "k"),
        RecordKey::new(TenantId::shared(), "other"),
    );
    let fp = Fingerprint::from_bytes([6; 32]);
    complete_once(&old, &key, &fp).await;
    assert!(
        matches!(old.begin(&key, &fp, Duration::from_secs(30)).await, Ok(Begin::Completed(r)) if r == ok_response())
    );
    assert!(matches!(
        old.begin(&other, &fp, Duration::from_secs(30)).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        old.begin(&other, &fp, Duration::from_secs(30)).await,
        Ok(Begin::InFlight)
    ));
    // `migrate` left the check where it was.
    assert_check::<S>(&pool, &checked, true).await;
    S::execute(&pool, &format!("DROP TABLE {table}; DROP TABLE {checked}")).await;
}

/// Many rounds of 16 callers racing on a fresh key, and on an expired in-flight record: exactly
/// one acquires each time. This drives `begin` through its snapshot race (a row committed after
/// the statement's snapshot), which it settles by running its statement again.
pub async fn scenario_begin_is_atomic<S: SqlStore>() {
    let Some(store) = migrated::<S>("begin rounds").await else {
        return;
    };
    let store = Arc::new(store);
    let fp = Fingerprint::from_bytes([6; 32]);
    for round in 0..100 {
        let key = RecordKey::new(TenantId::shared(), unique_key(&format!("rounds-{round}")));
        if round % 2 == 1 {
            let first = store.begin(&key, &fp, Duration::from_millis(1)).await;
            assert!(matches!(first, Ok(Begin::Acquired(_))));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { store.begin(&key, &fp, Duration::from_secs(30)).await })
            })
            .collect();
        let mut acquired = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(Begin::Acquired(_)) => acquired += 1,
                Ok(Begin::InFlight) => {}
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(acquired, 1, "round {round}: exactly one caller acquires");
    }
}

/// A forced forget racing the holder's `complete`: whichever the database runs first, the
/// record is forgotten, and `complete` either succeeded before or lost its lease.
pub async fn scenario_forced_forget_racing_complete<S: SqlStore>() {
    let Some(store) = migrated::<S>("forget racing complete").await else {
        return;
    };
    let fp = Fingerprint::from_bytes([7; 32]);
    let (mut completed_first, mut forgotten_first) = (0, 0);
    for round in 0..30 {
        let key = RecordKey::new(TenantId::shared(), unique_key(&format!("race-{round}")));
        let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await
        else {
            panic!("expected Acquired");
        };
        let response = StoredResponse::new(
            StatusCode::CREATED,
            HeaderMap::new(),
            Bytes::from_static(b"x"),
        );
        let complete = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move {
                store
                    .complete(&key, token, response, Duration::from_secs(60))
                    .await
            }
        });
        let forget = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move { store.forget(&key, true).await }
        });
        assert_eq!(forget.await.unwrap().unwrap(), Forget::Forgotten);
        match complete.await.unwrap() {
            Ok(()) => completed_first += 1,
            Err(err) => {
                assert_eq!(err.kind(), StoreErrorKind::LeaseLost, "{err}");
                forgotten_first += 1;
            }
        }
        assert_eq!(store.lookup(&key).await.unwrap(), None, "round {round}");
    }
    eprintln!("complete first: {completed_first}, forget first: {forgotten_first}");
}

/// Runs `pg_ctl` (the `PG_CTL` wrapper for the test server's data directory) with `args`.
fn pg_ctl(pg_ctl: &str, args: &[&str]) {
    let status = Command::new(pg_ctl)
        .args(args)
        .status()
        .expect("run PG_CTL");
    assert!(status.success(), "{pg_ctl} {args:?} failed: {status}");
}

/// Starts the server again when dropped, should the test fail while it is stopped.
struct Stopped<'a>(&'a str);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.0).args(["start", "-w"]).status();
    }
}

/// A PostgreSQL outage under `store` (already migrated): the server at `POSTGRES_URL` stops
/// (with `PG_CTL`), keyed requests get `503` with `Retry-After` at once and nothing runs; the
/// server comes back and the same store, not rebuilt, works again, with the records written
/// before the outage.
pub async fn scenario_outage<S: IdempotencyStore>(store: S, ctl: &str) {
    let runs = Runs::default();
    let app = server(store, &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(500))
    });
    let (before, during) = (unique_key("before-outage"), unique_key("during-outage"));

    let original = send(&app, payment(&before, "{}")).await;
    assert_eq!(original.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);

    pg_ctl(ctl, &["stop", "-m", "fast", "-w"]);
    let guard = Stopped(ctl);
    for key in [&during, &before, &during] {
        let started = Instant::now();
        let reply = send(&app, payment(key, "{}")).await;
        reply.assert_store_unavailable();
        assert_eq!(reply.headers["idempotency-key"], key.as_str());
        // Bounded by the layer's store timeout (500 ms), not by the pool's own waits (30 s
        // or more); the margin is for a busy machine.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "a 503 comes within the store timeout: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(runs.get(), 1, "nothing ran while the store was down");

    drop(guard); // starts the server again
    let after = unique_key("after-outage");
    assert!(
        super::fleet::recovers(&app, &after).await,
        "the store (and its pool) reconnected by itself once PostgreSQL was back"
    );
    assert_eq!(runs.get(), 2);

    // The record written before the outage survived the server's restart.
    send(&app, payment(&before, "{}"))
        .await
        .assert_replay_of(&original);
    // Nothing was stored during the outage: the key runs now, once.
    let first = send(&app, payment(&during, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, payment(&during, "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 3);
}

/// The scenarios above as tests over the SQL store `$store`, whose concurrent `migrate` runs
/// beside an instance of `$peer` (another SQL store, or `$store` itself).
macro_rules! sql_scenarios {
    ($store:ty, migrating beside $peer:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn migrate_is_safe_from_many_instances_at_once() {
            crate::support::sql::scenario_migrate_from_many_instances::<$store, $peer>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn table_names_are_validated_and_schemas_work() {
            crate::support::sql::scenario_table_names_and_schemas::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_begin_past_its_timeout_leaves_no_record() {
            crate::support::sql::scenario_a_begin_past_its_timeout_leaves_no_record::<$store>()
                .await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn delete_expired_removes_only_expired_rows() {
            crate::support::sql::scenario_delete_expired::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn background_cleanup_deletes_expired_rows() {
            crate::support::sql::scenario_background_cleanup::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn undecodable_rows_are_corrupt() {
            crate::support::sql::scenario_undecodable_rows::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tables_with_and_without_the_state_check_work() {
            crate::support::sql::scenario_tables_with_and_without_the_state_check::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn begin_is_atomic_over_many_rounds() {
            crate::support::sql::scenario_begin_is_atomic::<$store>().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn forced_forget_racing_complete_leaves_no_record() {
            crate::support::sql::scenario_forced_forget_racing_complete::<$store>().await;
        }
    };
}
