//! `Claim::respond_in` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set;
//! run through `scripts/test-services`): the record completes inside the handler's own
//! transaction, on `SqlxStore` (sqlx) and `PostgresStore` (tokio-postgres, deadpool-postgres).
//! The crash cases are in `exactly_once.rs`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sqlx::PgPool;
use support::payments::{self, End};
use support::*;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tower_idempotency::{
    Claim, ClaimError, Forget, IdempotencyLayer, IdempotencyStore, MemoryStore, Outcome,
    PostgresStore, RecordKey, RecordState, ReplayCache, SqlxStore, TenantId,
};

/// The shared `SqlxStore`, its pool, and a payments table of the test's own.
async fn setup(label: &str) -> Option<(PgPool, SqlxStore, String)> {
    server_url("POSTGRES_URL", label)?;
    let store = support::shared::sqlx().await?;
    let pool = store.pool().clone();
    let table = payments::new_table(&pool).await;
    Some((pool, store, table))
}

fn app<S: IdempotencyStore>(pool: &PgPool, table: &str, runs: &Runs, end: End, store: S) -> Router {
    let layer = IdempotencyLayer::new(store)
        .require_key(true)
        .lease(Duration::from_millis(300));
    payments::api(pool.clone(), table, runs.clone(), end).layer(layer)
}

/// The handler's payment and its record commit together: one payment, one run, the replay
/// identical, the record completed by the handler's transaction (the layer stores nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_in_completes_with_the_handlers_commit() {
    let Some((pool, store, table)) = setup("respond_in_completes").await else {
        return;
    };
    let runs = Runs::default();
    let app = app(&pool, &table, &runs, End::Commit, store.clone());
    let key = unique_key("commit");
    let first = send(&app, payments::request("/payments", &key, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(first.outcome, Some(Outcome::Executed));
    assert_eq!(first.header("idempotency-key"), Some(key.as_str()));
    assert!(first.header("set-cookie").is_some());
    let retry = send(&app, payments::request("/payments", &key, "{}")).await;
    retry.assert_replay_of(&first);
    assert_eq!(retry.outcome, Some(Outcome::Replayed));
    assert_eq!(runs.get(), 1);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
    let tenant = tower_idempotency::DefaultTenant::scope_for(payments::CLIENT);
    let record = tower_idempotency::Operator::new(store.clone())
        .record_key(tenant, &key)
        .unwrap();
    let info = store.lookup(&record).await.unwrap().unwrap();
    assert!(
        matches!(info.state, RecordState::Completed { status, replayable: true, .. } if status == StatusCode::CREATED)
    );
}

/// A handler that rolls back after `respond_in` and still returns the response: the layer
/// releases the key, so the retry runs (the effect that did not happen is never replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_respond_in_releases_the_key() {
    let Some((pool, store, table)) = setup("rollback").await else {
        return;
    };
    let runs = Runs::default();
    let rolling_back = app(&pool, &table, &runs, End::Rollback, store.clone());
    let committing = app(&pool, &table, &runs, End::Commit, store);
    let key = unique_key("rollback");
    let first = send(&rolling_back, payments::request("/payments", &key, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(Outcome::Released));
    assert_eq!(payments::count(&pool, &table, &key).await, 0);
    let retry = send(&committing, payments::request("/payments", &key, "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the rolled-back run was not replayed");
    assert_eq!(runs.get(), 2);
    send(&committing, payments::request("/payments", &key, "{}"))
        .await
        .assert_replay_of(&retry);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
}

/// While the handler's transaction holds its completed record (between `respond_in` and
/// COMMIT), with the lease long past: duplicates on other servers, on both kinds of store, get
/// 409 at once (no take-over, no wait for the lock), the renewal does not block the handler,
/// and after COMMIT the retry replays. One payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_takeover_under_an_open_transaction() {
    let Some((pool, store, table)) = setup("open_transaction").await else {
        return;
    };
    let url = std::env::var("POSTGRES_URL").unwrap();
    let pg = PostgresStore::connect(&url).await.unwrap();
    let runs = Runs::default();
    let other = app(
        &pool,
        &table,
        &runs,
        End::Commit,
        SqlxStore::new(pool.clone()),
    );
    let other_pg = app(&pool, &table, &runs, End::Commit, pg);
    let key = unique_key("open-tx");
    let (first, gate) = first_held((&pool, &table, &runs), store.clone(), &key).await;
    // Well past the 300 ms lease: renewals cannot extend a row the transaction holds.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (i, app) in [&other, &other_pg, &other, &other_pg]
        .into_iter()
        .enumerate()
    {
        let started = std::time::Instant::now();
        let duplicate = send(app, payments::request("/payments", &key, "{}")).await;
        eprintln!(
            "duplicate {i}: {} after {:?}",
            duplicate.status,
            started.elapsed()
        );
        duplicate.assert_in_progress();
    }
    assert!(!first.is_finished(), "the transaction is still open");
    assert_eq!(runs.get(), 1, "no duplicate ran");
    // An operator's forget, forced or not, on either store: in flight at once. Waiting for
    // the lock would delete the record the transaction is about to commit.
    // The record's tenant, read without waiting for the row's lock.
    let (tenant,): (Vec<u8>,) =
        sqlx::query_as("SELECT tenant FROM idempotency_records WHERE key = $1")
            .bind(&key)
            .fetch_one(&pool)
            .await
            .unwrap();
    let tenant = TenantId::from_bytes(tenant.try_into().unwrap());
    let record = RecordKey::new(tenant, key.clone());
    let pg_store = PostgresStore::connect(&url).await.unwrap();
    for force in [false, true] {
        assert_eq!(
            store.forget(&record, force).await.unwrap(),
            Forget::InFlight
        );
        assert_eq!(
            pg_store.forget(&record, force).await.unwrap(),
            Forget::InFlight
        );
    }
    assert!(!first.is_finished(), "the transaction is still open");

    gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(Outcome::Executed));
    for app in [&other, &other_pg] {
        send(app, payments::request("/payments", &key, "{}"))
            .await
            .assert_replay_of(&first);
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
}

/// Sends `key`'s first request to an app on `store` whose handler keeps its transaction open
/// after `respond_in` (`End::Hold`), and waits until that transaction holds the completed record;
/// the handler commits once the semaphore returned gets a permit.
async fn first_held<S: IdempotencyStore>(
    (pool, table, runs): (&PgPool, &str, &Runs),
    store: S,
    key: &str,
) -> (JoinHandle<Reply>, Arc<Semaphore>) {
    let (reached, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let end = End::Hold {
        reached: reached.clone(),
        gate: gate.clone(),
    };
    let holding = app(pool, table, runs, end, store);
    let request = payments::request("/payments", key, "{}");
    let first = tokio::spawn(async move { send(&holding, request).await });
    drop(reached.acquire().await.unwrap());
    (first, gate)
}

#[derive(Clone)]
struct Ctx {
    pool: PgPool,
    runs: Runs,
}

/// Answers the kind of the error `respond_in` returned, or the response.
fn outcome(result: Result<Response, ClaimError>) -> Response {
    match result {
        Ok(response) => response,
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{:?}", err.kind()),
        )
            .into_response(),
    }
}

/// The claim is forgotten (forced) before `respond_in`: it fails with `LeaseLost`.
async fn lost(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let store = SqlxStore::new(ctx.pool.clone());
    assert_eq!(
        store.forget(claim.key(), true).await.unwrap(),
        Forget::Forgotten
    );
    let mut tx = ctx.pool.begin().await.unwrap();
    outcome(claim.respond_in(&mut *tx, StatusCode::CREATED).await)
}

/// `respond_in` twice: the second fails with `AlreadyUsed`.
async fn twice(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let mut tx = ctx.pool.begin().await.unwrap();
    let first = claim
        .clone()
        .respond_in(&mut *tx, StatusCode::CREATED)
        .await;
    assert!(first.is_ok());
    let second = claim.respond_in(&mut *tx, StatusCode::CREATED).await;
    tx.commit().await.unwrap();
    outcome(second)
}

/// `respond_in` on a response the layer does not store (422): nothing is written, the response
/// comes back as it is.
async fn refused(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let mut tx = ctx.pool.begin().await.unwrap();
    let response = claim
        .respond_in(&mut *tx, (StatusCode::UNPROCESSABLE_ENTITY, "invalid"))
        .await;
    tx.commit().await.unwrap();
    outcome(response)
}

/// A response over the layer's response cap: completed, not replayable.
async fn large(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let mut tx = ctx.pool.begin().await.unwrap();
    let response = claim
        .respond_in(&mut *tx, (StatusCode::CREATED, vec![b'x'; 4096]))
        .await;
    tx.commit().await.unwrap();
    outcome(response)
}

/// `respond_in`, then a later step fails: the error drops the transaction, which rolls back.
async fn fails_after(State(ctx): State<Ctx>, claim: Claim) -> Result<Response, ClaimError> {
    ctx.runs.bump();
    let mut tx = ctx.pool.begin().await.map_err(ClaimError::database)?;
    claim.respond_in(&mut *tx, StatusCode::CREATED).await?;
    sqlx::query("SELECT 1/0")
        .execute(&mut *tx)
        .await
        .map_err(ClaimError::database)?;
    unreachable!("division by zero fails");
}

/// `respond_in` on a pooled connection outside any transaction (the same type as `&mut *tx`):
/// refused with `NotInTransaction`, nothing written.
async fn outside(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let mut conn = ctx.pool.acquire().await.unwrap();
    outcome(claim.respond_in(&mut *conn, StatusCode::CREATED).await)
}

/// `respond_in` inside a transaction begun with SQL rather than sqlx's `begin`: accepted.
async fn begun_with_sql(State(ctx): State<Ctx>, claim: Claim) -> Response {
    ctx.runs.bump();
    let mut conn = ctx.pool.acquire().await.unwrap();
    sqlx::Executor::execute(&mut *conn, "BEGIN").await.unwrap();
    let response = claim.respond_in(&mut *conn, StatusCode::CREATED).await;
    sqlx::Executor::execute(&mut *conn, "COMMIT").await.unwrap();
    outcome(response)
}

/// Whether the request has a claim, and what it says.
async fn optional(State(ctx): State<Ctx>, claim: Option<Claim>) -> String {
    ctx.runs.bump();
    match claim {
        Some(claim) => format!("claim {} in {:?}", claim.key().key(), claim.table()),
        None => "no claim".to_owned(),
    }
}

async fn required(_claim: Claim) -> StatusCode {
    StatusCode::CREATED
}

fn routes(pool: &PgPool, runs: &Runs) -> Router {
    Router::new()
        .route("/lost", post(lost))
        .route("/twice", post(twice))
        .route("/refused", post(refused))
        .route("/large", post(large))
        .route("/optional", post(optional))
        .route("/outside", post(outside))
        .route("/begun-with-sql", post(begun_with_sql))
        .route("/fails-after", post(fails_after))
        .route("/required", post(required))
        .with_state(Ctx {
            pool: pool.clone(),
            runs: runs.clone(),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_and_edge_cases_are_clear_errors() {
    let Some((pool, store, _)) = setup("misuse").await else {
        return;
    };
    let runs = Runs::default();
    let app = routes(&pool, &runs).layer(IdempotencyLayer::new(store).max_response_bytes(1024));
    let request = |path: &str, key: &str| payments::request(path, key, "{}");

    let reply = send(&app, request("/lost", &unique_key("lost"))).await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"LeaseLost"[..])
    );

    let key = unique_key("twice");
    let reply = send(&app, request("/twice", &key)).await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"AlreadyUsed"[..])
    );
    // The first use completed the record: the 500 is not stored over it.
    let retry = send(&app, request("/twice", &key)).await;
    assert!(
        retry.replayed() && retry.status == StatusCode::CREATED,
        "{retry:?}"
    );

    let key = unique_key("refused");
    let reply = send(&app, request("/refused", &key)).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.outcome, Some(Outcome::Released));
    let before = runs.get();
    assert!(!send(&app, request("/refused", &key)).await.replayed());
    assert_eq!(
        runs.get(),
        before + 1,
        "a refusal is not stored: the retry runs"
    );

    let key = unique_key("large");
    let reply = send(&app, request("/large", &key)).await;
    assert_eq!(
        (reply.status, reply.body.len()),
        (StatusCode::CREATED, 4096),
        "the client gets it whole"
    );
    let retry = send(&app, request("/large", &key)).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.code(), "idempotency_response_not_stored");

    let key = unique_key("fails-after");
    let reply = send(&app, request("/fails-after", &key)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(
        reply.outcome,
        Some(Outcome::Released),
        "the dropped transaction rolled back"
    );
    let before = runs.get();
    assert_eq!(
        send(&app, request("/fails-after", &key)).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(runs.get(), before + 1, "the retry ran");

    // Outside a transaction the record would commit whatever became of the handler's effects.
    let key = unique_key("outside");
    let reply = send(&app, request("/outside", &key)).await;
    assert_eq!(
        (reply.status, &reply.body[..]),
        (StatusCode::INTERNAL_SERVER_ERROR, &b"NotInTransaction"[..])
    );
    assert_eq!(
        reply.outcome,
        Some(Outcome::Released),
        "nothing was written"
    );
    let before = runs.get();
    assert!(!send(&app, request("/outside", &key)).await.replayed());
    assert_eq!(runs.get(), before + 1, "the retry ran");

    let key = unique_key("begun-with-sql");
    let reply = send(&app, request("/begun-with-sql", &key)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    let retry = send(&app, request("/begun-with-sql", &key)).await;
    assert!(retry.replayed(), "{retry:?}");

    let key = unique_key("optional");
    let reply = send(&app, request("/optional", &key)).await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    assert!(text.starts_with(&format!("claim {key} in Some(")), "{text}");
    let keyless = axum::http::Request::post("/optional")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(&send(&app, keyless).await.body[..], b"no claim");
    let keyless = axum::http::Request::post("/required")
        .body(axum::body::Body::empty())
        .unwrap();
    let reply = send(&app, keyless).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(String::from_utf8_lossy(&reply.body).contains("no idempotency claim"));
}

/// On stores whose records live elsewhere, `respond_in` fails with `Unsupported` and writes
/// nothing; the handler's error releases the key, so the retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_that_cannot_complete_in_a_transaction_refuse() {
    let Some((pool, _, table)) = setup("unsupported").await else {
        return;
    };
    async fn check<S: IdempotencyStore>(pool: &PgPool, table: &str, store: S) {
        let runs = Runs::default();
        let app = app(pool, table, &runs, End::Commit, store);
        let key = unique_key("unsupported");
        let reply = send(&app, payments::request("/payments", &key, "{}")).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(
            String::from_utf8_lossy(&reply.body).contains("cannot complete records"),
            "{reply:?}"
        );
        assert_eq!(reply.outcome, Some(Outcome::Released));
        send(&app, payments::request("/payments", &key, "{}")).await;
        assert_eq!(runs.get(), 2, "the key was released: the retry ran");
        // The handler's error dropped its transaction: no payment.
        assert_eq!(payments::count(pool, table, &key).await, 0);
    }
    check(&pool, &table, MemoryStore::new()).await;
    check(&pool, &table, ReplayCache::new(MemoryStore::new())).await;
    // Over a store that can, the cache forwards the claim.
    let runs = Runs::default();
    let cached = app(
        &pool,
        &table,
        &runs,
        End::Commit,
        ReplayCache::new(SqlxStore::new(pool.clone())),
    );
    let key = unique_key("cached");
    let first = send(&cached, payments::request("/payments", &key, "{}")).await;
    assert_eq!(first.outcome, Some(Outcome::Executed));
    send(&cached, payments::request("/payments", &key, "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
}

#[derive(Clone)]
struct Pg {
    pool: deadpool_postgres::Pool,
    table: String,
    runs: Runs,
    rollback: bool,
}

/// The tokio-postgres path: a deadpool-postgres transaction (`&tx`), or the tokio-postgres
/// transaction under it (`&*tx`) for odd runs.
async fn pg_pay(State(pg): State<Pg>, claim: Claim) -> Result<Response, ClaimError> {
    let run = pg.runs.bump();
    let mut client = pg.pool.get().await.map_err(ClaimError::database)?;
    let tx = client.transaction().await.map_err(ClaimError::database)?;
    let sql = format!(
        "INSERT INTO {} (key, body) VALUES ($1, '') RETURNING id",
        pg.table
    );
    let id: i64 = tx
        .query_one(&sql, &[&claim.key().key()])
        .await
        .map_err(ClaimError::database)?
        .get(0);
    let response = (StatusCode::CREATED, format!("payment {id}"));
    let response = if run % 2 == 1 {
        claim.respond_in(&tx, response).await?
    } else {
        claim.respond_in(&*tx, response).await?
    };
    if pg.rollback {
        tx.rollback().await.map_err(ClaimError::database)?;
    } else {
        tx.commit().await.map_err(ClaimError::database)?;
    }
    Ok(response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_in_a_tokio_postgres_transaction() {
    let Some((pool, _, table)) = setup("tokio_postgres").await else {
        return;
    };
    let url = std::env::var("POSTGRES_URL").unwrap();
    let store = PostgresStore::connect(&url).await.unwrap();
    let runs = Runs::default();
    let router = |rollback: bool| {
        let state = Pg {
            pool: store.pool().clone(),
            table: table.clone(),
            runs: runs.clone(),
            rollback,
        };
        Router::new()
            .route("/pg", post(pg_pay))
            .with_state(state)
            .layer(IdempotencyLayer::new(store.clone()).require_key(true))
    };
    let (committing, rolling_back) = (router(false), router(true));
    for _ in 0..2 {
        // Once through `&tx`, once through `&*tx`.
        let key = unique_key("pg");
        let first = send(&committing, payments::request("/pg", &key, "{}")).await;
        assert_eq!(
            (first.status, first.outcome),
            (StatusCode::CREATED, Some(Outcome::Executed))
        );
        send(&committing, payments::request("/pg", &key, "{}"))
            .await
            .assert_replay_of(&first);
        assert_eq!(payments::count(&pool, &table, &key).await, 1);
    }
    let key = unique_key("pg-rollback");
    let first = send(&rolling_back, payments::request("/pg", &key, "{}")).await;
    assert_eq!(first.outcome, Some(Outcome::Released));
    let retry = send(&committing, payments::request("/pg", &key, "{}")).await;
    assert!(!retry.replayed());
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
    assert_eq!(runs.get(), 4);
}

/// A `PostgresStore` whose statements share one pipelined connection, while a handler's
/// transaction holds its completed record past its lease: the renewals, a duplicate's `begin`
/// and takeover (`409` at once) and twenty other keys' statements (run, then replayed) all go
/// over that connection, and none waits for the transaction. After its COMMIT, the retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_transaction_holds_up_no_statement_on_the_shared_connection() {
    let Some((pool, _, table)) = setup("open_transaction_shared_connection").await else {
        return;
    };
    let store = support::shared::postgres_pipelined(4, 1).await.unwrap();
    let runs = Runs::default();
    let other = app(&pool, &table, &runs, End::Commit, store.clone());
    let key = unique_key("held-shared");
    let (first, gate) = first_held((&pool, &table, &runs), store.clone(), &key).await;
    // Past the 300 ms lease: the renewals ran, and the duplicate's `begin` takes over.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let others: Vec<String> = (0..20)
        .map(|i| unique_key(&format!("beside-{i}")))
        .collect();
    let while_held = async {
        let duplicate = send(&other, payments::request("/payments", &key, "{}"));
        let firsts = futures_util::future::join_all(
            others
                .iter()
                .map(|k| send(&other, payments::request("/payments", k, "{}"))),
        );
        let (duplicate, firsts) = tokio::join!(duplicate, firsts);
        let replays = futures_util::future::join_all(
            others
                .iter()
                .map(|k| send(&other, payments::request("/payments", k, "{}"))),
        )
        .await;
        (duplicate, firsts, replays)
    };
    let (duplicate, firsts, replays) = tokio::time::timeout(Duration::from_secs(20), while_held)
        .await
        .expect("no statement waits for the open transaction");
    duplicate.assert_in_progress();
    for (first, replay) in firsts.iter().zip(&replays) {
        assert_eq!(first.status, StatusCode::CREATED);
        replay.assert_replay_of(first);
    }
    assert!(!first.is_finished(), "the transaction is still open");
    assert_eq!(runs.get(), 21, "each key ran once, the held one included");

    gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(Outcome::Executed));
    send(&other, payments::request("/payments", &key, "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 21);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);
}
