//! `SqlxStore` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`): the conformance suite, the fleet scenarios, the scenarios
//! both SQL stores run (`support::sql`), and a mixed fleet where `PostgresStore` and
//! `SqlxStore` share one table.

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::shared::sqlx as store;
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, LockToken, PostgresStore, RecordInfo, RecordKey,
    Settled, SqlxStore, StoreError, StoreErrorKind, StoredResponse, TenantId,
};

// The conformance suite, the fleet scenarios every shared store runs, and the scenarios both SQL
// stores run, with `PostgresStore` migrating beside `SqlxStore`.
fleet_scenarios!(store);
sql_scenarios!(SqlxStore, migrating beside PostgresStore);

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
    let pg = support::shared::postgres().await?;
    Some((Mixed::Postgres(pg), Mixed::Sqlx(store().await?)))
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
