//! `SqlxStore` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`): the conformance suite, the fleet scenarios, and a mixed
//! fleet where `PostgresStore` and `SqlxStore` share one table.

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use sqlx::PgPool;
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, LockToken, PostgresStore, RecordInfo, RecordKey,
    Settled, SqlxStore, StoreError, StoreErrorKind, StoredResponse, TenantId,
};

async fn pool() -> Option<PgPool> {
    let url = server_url("POSTGRES_URL", "sqlx")?;
    Some(
        PgPool::connect(&url)
            .await
            .expect("connect to POSTGRES_URL"),
    )
}

async fn store() -> Option<SqlxStore> {
    let store = SqlxStore::new(pool().await?);
    store.migrate().await.expect("migrate");
    Some(store)
}

/// A table name no other test or run uses.
fn table_name(label: &str) -> String {
    let token = LockToken::random().to_string();
    format!("sqlx_{label}_{}{}", &token[..8], &token[26..])
}

async fn count_rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap()
}

// The conformance suite, and the fleet scenarios every shared store runs.
fleet_scenarios!(store);

/// Either store, so that the fleet scenarios run a mixed fleet on one table.
#[derive(Clone)]
enum Mixed {
    Postgres(PostgresStore),
    Sqlx(SqlxStore),
}

macro_rules! each {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            Mixed::Postgres($store) => $call.await,
            Mixed::Sqlx($store) => $call.await,
        }
    };
}

impl IdempotencyStore for Mixed {
    async fn begin(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        each!(self, s => s.begin(key, fp, lease))
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        each!(self, s => s.renew(key, token, lease))
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        each!(self, s => s.complete(key, token, response, ttl))
    }
    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        each!(self, s => s.release(key, token))
    }
    async fn lookup(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        each!(self, s => s.lookup(key))
    }
    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forget, StoreError> {
        each!(self, s => s.forget(key, force))
    }
    async fn settle(&self, key: &RecordKey, token: LockToken) -> Result<Settled, StoreError> {
        each!(self, s => s.settle(key, token))
    }
}

async fn mixed_pair() -> Option<(Mixed, Mixed)> {
    let url = server_url("POSTGRES_URL", "sqlx mixed fleet")?;
    let pg = PostgresStore::connect(&url).await.unwrap();
    pg.migrate().await.unwrap();
    let sqlx = store().await?;
    Some((Mixed::Postgres(pg), Mixed::Sqlx(sqlx)))
}

/// A `PostgresStore` and a `SqlxStore` on one table are one fleet: 500 duplicates over both run
/// the handler once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_fleet_runs_the_handler_once() {
    let Some((a, b)) = mixed_pair().await else {
        return;
    };
    scenario_two_servers(a, b).await;
}

/// A slow handler on one kind of store keeps its lease while the other kind gets 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_fleet_lease_renewal() {
    let Some((a, b)) = mixed_pair().await else {
        return;
    };
    scenario_lease_renewal(b.clone(), a.clone()).await;
    scenario_lease_renewal(a, b).await;
}

/// What one store writes, the other reads, completes, releases and forgets: the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_reads_each_others_records() {
    let Some((Mixed::Postgres(pg), Mixed::Sqlx(sx))) = mixed_pair().await else {
        return;
    };
    let fp = Fingerprint::from_bytes([11; 32]);
    let lease = Duration::from_secs(30);
    let response = StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(b"made"),
    );
    let key = RecordKey::new(TenantId::hashed("mixed"), unique_key("mixed"));
    let Ok(Begin::Acquired(token)) = pg.begin(&key, &fp, lease).await else {
        panic!()
    };
    assert!(matches!(
        sx.begin(&key, &fp, lease).await,
        Ok(Begin::InFlight)
    ));
    sx.renew(&key, token, lease).await.unwrap();
    sx.complete(&key, token, response.clone(), lease)
        .await
        .unwrap();
    assert!(matches!(pg.begin(&key, &fp, lease).await, Ok(Begin::Completed(r)) if r == response));
    assert_eq!(
        pg.lookup(&key).await.unwrap(),
        sx.lookup(&key).await.unwrap()
    );
    assert_eq!(pg.forget(&key, false).await.unwrap(), Forget::Forgotten);
    let Ok(Begin::Acquired(token)) = sx.begin(&key, &fp, lease).await else {
        panic!()
    };
    pg.release(&key, token).await.unwrap();
    assert_eq!(sx.lookup(&key).await.unwrap(), None);
}

/// Eight instances run `migrate` at once on a new table, beside a `PostgresStore` doing the
/// same: all succeed, and the table works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_safe_from_many_instances_at_once() {
    let Some(pool) = pool().await else { return };
    let url = std::env::var("POSTGRES_URL").unwrap();
    let table = table_name("migrate");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = SqlxStore::builder(pool.clone())
            .table(&table)
            .build()
            .unwrap();
        tasks.push(tokio::spawn(async move { store.migrate().await }));
    }
    let pg = PostgresStore::builder()
        .table(&table)
        .connect(&url)
        .await
        .unwrap();
    tasks.push(tokio::spawn({
        let pg = pg.clone();
        async move { pg.migrate().await }
    }));
    for task in tasks {
        task.await.unwrap().expect("a concurrent migrate failed");
    }
    let store = SqlxStore::builder(pool.clone())
        .table(&table)
        .build()
        .unwrap();
    store.migrate().await.expect("migrate again");
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([1; 32]);
    assert!(matches!(
        store.begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        pg.begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::InFlight)
    ));
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

/// Table names are validated in `build()`; a schema-qualified, case-kept table works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_and_schemas_work() {
    let Some(pool) = pool().await else { return };
    for bad in ["x; DROP TABLE y", "a.b.c", "1abc", "\"quoted\"", ""] {
        let err = SqlxStore::builder(pool.clone())
            .table(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other, "{bad:?}");
    }
    let schema = table_name("schema");
    sqlx::raw_sql(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .unwrap();
    let store = SqlxStore::builder(pool.clone())
        .table(format!("{schema}.Records"))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([2; 32]);
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await else {
        panic!("expected Acquired");
    };
    let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"));
    store
        .complete(&key, token, response.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        matches!(store.begin(&key, &fp, Duration::from_secs(30)).await, Ok(Begin::Completed(r)) if r == response)
    );
    assert_eq!(count_rows(&pool, &format!("{schema}.\"Records\"")).await, 1);
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

/// `delete_expired` and the background cleanup remove expired rows, and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted() {
    let Some(pool) = pool().await else { return };
    let table = table_name("cleanup");
    let store = SqlxStore::builder(pool.clone())
        .table(&table)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let fp = Fingerprint::from_bytes([3; 32]);
    let short = Duration::from_millis(200);
    for i in 0..1100 {
        let key = RecordKey::new(TenantId::shared(), format!("expired-{i}"));
        assert!(matches!(
            store.begin(&key, &fp, short).await,
            Ok(Begin::Acquired(_))
        ));
    }
    let live = RecordKey::new(TenantId::shared(), "live");
    assert!(matches!(
        store.begin(&live, &fp, Duration::from_secs(60)).await,
        Ok(Begin::Acquired(_))
    ));
    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(
        store.delete_expired().await.unwrap(),
        1100,
        "over two batches"
    );
    assert_eq!(count_rows(&pool, &table).await, 1);

    let cleaning = SqlxStore::builder(pool.clone())
        .table(&table)
        .cleanup_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    for i in 0..10 {
        let key = RecordKey::new(TenantId::shared(), format!("bg-{i}"));
        assert!(matches!(
            cleaning.begin(&key, &fp, Duration::from_millis(100)).await,
            Ok(Begin::Acquired(_))
        ));
    }
    let emptied = eventually(Duration::from_secs(10), async || {
        count_rows(&pool, &table).await == 1
    })
    .await;
    assert!(emptied, "the background task deleted the expired rows");
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

/// A row that cannot be decoded is `Corrupt`, never a panic or a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_corrupt() {
    let Some(pool) = pool().await else { return };
    let table = table_name("corrupt");
    let store = SqlxStore::builder(pool.clone())
        .table(&table)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([5; 32]);
    let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, Duration::from_secs(30)).await else {
        panic!()
    };
    let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"));
    store
        .complete(&key, token, response, Duration::from_secs(60))
        .await
        .unwrap();
    sqlx::raw_sql(&format!("UPDATE {table} SET response = '\\x0100'::bytea"))
        .execute(&pool)
        .await
        .unwrap();
    let err = store
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    let err = store.lookup(&key).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .unwrap();
}

/// An unreachable server is `Unavailable`, with the pool's error kept.
#[tokio::test]
async fn unreachable_servers_fail_clearly() {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://nobody@127.0.0.1:1/db")
        .unwrap();
    let store = SqlxStore::new(pool);
    let key = RecordKey::new(TenantId::shared(), "k");
    let err = store
        .begin(
            &key,
            &Fingerprint::from_bytes([0; 32]),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(
        store.migrate().await.unwrap_err().kind(),
        StoreErrorKind::Unavailable
    );
}

/// A row that a transaction holds (as a handler between `Claim::respond_in` and its COMMIT
/// does) is in flight for both stores, even with its lease run out: never taken over, never
/// waited for; the renewal lets it be. After COMMIT it replays; another fingerprint is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_by_a_transaction_is_in_flight() {
    let Some((Mixed::Postgres(pg), Mixed::Sqlx(sx))) = mixed_pair().await else {
        return;
    };
    let pool = sx.pool().clone();
    let (fp, other) = (
        Fingerprint::from_bytes([12; 32]),
        Fingerprint::from_bytes([13; 32]),
    );
    let key = RecordKey::new(TenantId::hashed("held"), unique_key("held"));
    let Ok(Begin::Acquired(token)) = sx.begin(&key, &fp, Duration::from_millis(100)).await else {
        panic!()
    };
    let response = StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(b"held"),
    );
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE idempotency_records SET state = 'completed', response = $3,
                expires_at = clock_timestamp() + interval '1 minute'
         WHERE tenant = $1 AND key = $2",
    )
    .bind(&key.tenant().as_bytes()[..])
    .bind(key.key())
    .bind(&response.encode()[..])
    .execute(&mut *tx)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the lease ran out
    for store in [&Mixed::Sqlx(sx.clone()), &Mixed::Postgres(pg.clone())] {
        let begin = tokio::time::timeout(
            Duration::from_secs(5),
            store.begin(&key, &fp, Duration::from_secs(30)),
        )
        .await
        .expect("begin does not wait for the transaction");
        assert!(matches!(begin, Ok(Begin::InFlight)), "{begin:?}");
        let begin = store.begin(&key, &other, Duration::from_secs(30)).await;
        assert!(
            matches!(begin, Ok(Begin::InFlight)),
            "expired and locked: in flight, {begin:?}"
        );
        let renew = tokio::time::timeout(
            Duration::from_secs(5),
            store.renew(&key, token, Duration::from_secs(30)),
        )
        .await
        .expect("renew does not wait for the transaction");
        assert!(renew.is_ok(), "{renew:?}");
    }
    // An instance starting meanwhile migrates without waiting for the transaction, and
    // without queueing the other statements on the table behind it.
    let wait = Duration::from_secs(5);
    tokio::time::timeout(wait, sx.migrate())
        .await
        .expect("sqlx migrate waited")
        .unwrap();
    tokio::time::timeout(wait, pg.migrate())
        .await
        .expect("postgres migrate waited")
        .unwrap();
    let fresh = RecordKey::new(TenantId::hashed("held"), unique_key("fresh"));
    let begin = tokio::time::timeout(wait, sx.begin(&fresh, &fp, wait))
        .await
        .unwrap();
    assert!(matches!(begin, Ok(Begin::Acquired(_))), "{begin:?}");
    tx.commit().await.unwrap();
    for store in [&Mixed::Sqlx(sx.clone()), &Mixed::Postgres(pg.clone())] {
        let begin = store.begin(&key, &fp, Duration::from_secs(30)).await;
        assert!(
            matches!(&begin, Ok(Begin::Completed(r)) if *r == response),
            "{begin:?}"
        );
        assert!(matches!(
            store.begin(&key, &other, Duration::from_secs(30)).await,
            Ok(Begin::Mismatch)
        ));
        assert_eq!(store.settle(&key, token).await.unwrap(), Settled::Completed);
    }
}

/// `begin` answers a live record from a read: it takes no row lock, so a transaction that holds
/// a completed row (here `SELECT … FOR UPDATE`; concurrent replays of one key, each a `begin`,
/// hold nothing) never makes a replay or a reused key wait, on either store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_record_is_answered_without_a_lock() {
    let Some((Mixed::Postgres(pg), Mixed::Sqlx(sx))) = mixed_pair().await else {
        return;
    };
    let pool = sx.pool().clone();
    let (fp, other) = (
        Fingerprint::from_bytes([14; 32]),
        Fingerprint::from_bytes([15; 32]),
    );
    let key = RecordKey::new(TenantId::hashed("unlocked"), unique_key("unlocked"));
    let Ok(Begin::Acquired(token)) = pg.begin(&key, &fp, Duration::from_secs(30)).await else {
        panic!()
    };
    let response = StoredResponse::new(
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(b"unlocked"),
    );
    pg.complete(&key, token, response.clone(), Duration::from_secs(60))
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM idempotency_records WHERE tenant = $1 AND key = $2 FOR UPDATE")
        .bind(&key.tenant().as_bytes()[..])
        .bind(key.key())
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let wait = Duration::from_secs(5);
    for store in [&Mixed::Sqlx(sx.clone()), &Mixed::Postgres(pg.clone())] {
        for _ in 0..3 {
            let begin = tokio::time::timeout(wait, store.begin(&key, &fp, wait))
                .await
                .expect("a replay does not wait for the row's lock");
            assert!(
                matches!(&begin, Ok(Begin::Completed(r)) if *r == response),
                "{begin:?}"
            );
        }
        let begin = tokio::time::timeout(wait, store.begin(&key, &other, wait))
            .await
            .expect("a reused key does not wait for the row's lock");
        assert!(matches!(begin, Ok(Begin::Mismatch)), "{begin:?}");
    }
    tx.rollback().await.unwrap();
}
