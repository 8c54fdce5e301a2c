//! A payments API on PostgreSQL whose handler writes its payment and completes its idempotency
//! record in one transaction (`Claim::respond_in`), or, for comparison, leaves the record to
//! the layer; each with a chosen way to end the transaction (commit, roll back, crash or panic
//! around the COMMIT, hold it open until told). Used in process and by the crash tests' child
//! servers.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tower_idempotency::{Claim, ClaimError, IdempotencyKey};

use super::Runs;

/// How the handler ends its transaction.
#[derive(Clone, Debug)]
pub enum End {
    /// COMMIT, then answer.
    Commit,
    /// ROLLBACK after `respond_in`, and answer the response anyway.
    Rollback,
    /// `std::process::abort()` right before COMMIT.
    CrashBeforeCommit,
    /// `std::process::abort()` right after COMMIT.
    CrashAfterCommit,
    /// Panic right after COMMIT.
    PanicAfterCommit,
    /// After `respond_in`, add a permit to `reached` and wait for one of `gate`; then COMMIT.
    Hold {
        reached: Arc<Semaphore>,
        gate: Arc<Semaphore>,
    },
}

impl End {
    /// The end named by `name` (`commit`, `rollback`, `crash_before_commit`,
    /// `crash_after_commit`, `panic_after_commit`), as a child server reads it from its
    /// environment.
    pub fn parse(name: &str) -> Self {
        match name {
            "commit" => Self::Commit,
            "rollback" => Self::Rollback,
            "crash_before_commit" => Self::CrashBeforeCommit,
            "crash_after_commit" => Self::CrashAfterCommit,
            "panic_after_commit" => Self::PanicAfterCommit,
            other => panic!("unknown end {other:?}"),
        }
    }
}

#[derive(Clone)]
struct Api {
    pool: PgPool,
    table: Arc<str>,
    runs: Runs,
    end: End,
}

/// The payments table `name`: one row per payment, with the key it was made under.
pub async fn create_table(pool: &PgPool, name: &str) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {name} (
            id bigserial PRIMARY KEY, key text NOT NULL, body text NOT NULL
        )"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// A payments table no other test or run uses, created; its name.
pub async fn new_table(pool: &PgPool) -> String {
    let table = format!("payments_{}", tower_idempotency::LockToken::random());
    create_table(pool, &table).await;
    table
}

/// How many payments were made under `key`.
pub async fn count(pool: &PgPool, table: &str, key: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE key = $1"))
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `POST /payments` (with `Claim`) and `POST /plain` (without: the layer completes the record
/// after the handler's COMMIT), over the payments table `table`. Put the layer on it.
pub fn api(pool: PgPool, table: &str, runs: Runs, end: End) -> Router {
    Router::new()
        .route("/payments", post(claimed))
        .route("/plain", post(plain))
        .with_state(Api {
            pool,
            table: table.into(),
            runs,
            end,
        })
}

/// The response of payment `id`: 201 with `Location`, a cookie and a JSON body.
fn created(id: i64) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, format!("/payments/{id}").parse().unwrap());
    headers.insert(header::SET_COOKIE, format!("paid={id}").parse().unwrap());
    headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    (StatusCode::CREATED, headers, format!(r#"{{"id":{id}}}"#)).into_response()
}

async fn insert(
    api: &Api,
    conn: &mut sqlx::PgConnection,
    key: &str,
    body: &Bytes,
) -> Result<i64, ClaimError> {
    let sql = format!(
        "INSERT INTO {} (key, body) VALUES ($1, $2) RETURNING id",
        api.table
    );
    sqlx::query_scalar(&sql)
        .bind(key)
        .bind(String::from_utf8_lossy(body).into_owned())
        .fetch_one(conn)
        .await
        .map_err(ClaimError::database)
}

async fn claimed(
    State(api): State<Api>,
    claim: Claim,
    body: Bytes,
) -> Result<Response, ClaimError> {
    api.runs.bump();
    let mut tx = api.pool.begin().await.map_err(ClaimError::database)?;
    let id = insert(&api, &mut tx, claim.key().key(), &body).await?;
    let response = claim.respond_in(&mut *tx, created(id)).await?;
    match &api.end {
        End::Rollback => {
            tx.rollback().await.map_err(ClaimError::database)?;
            return Ok(response);
        }
        End::CrashBeforeCommit => std::process::abort(),
        End::Hold { reached, gate } => {
            reached.add_permits(1);
            drop(gate.acquire().await.unwrap());
        }
        _ => {}
    }
    tx.commit().await.map_err(ClaimError::database)?;
    after_commit(&api.end);
    Ok(response)
}

async fn plain(
    State(api): State<Api>,
    key: axum::Extension<IdempotencyKey>,
    body: Bytes,
) -> Result<Response, ClaimError> {
    api.runs.bump();
    let mut tx = api.pool.begin().await.map_err(ClaimError::database)?;
    let id = insert(&api, &mut tx, key.as_str(), &body).await?;
    if matches!(api.end, End::CrashBeforeCommit) {
        std::process::abort();
    }
    tx.commit().await.map_err(ClaimError::database)?;
    after_commit(&api.end);
    Ok(created(id))
}

/// `POST /payments` with `Claim` over a deadpool-postgres pool: the tokio-postgres path of
/// `respond_in`. Put a layer over a `PostgresStore` on it.
#[cfg(feature = "postgres")]
pub fn api_tokio_postgres(
    pool: deadpool_postgres::Pool,
    table: &str,
    runs: Runs,
    end: End,
) -> Router {
    Router::new()
        .route("/payments", post(claimed_tokio_postgres))
        .with_state(TokioPostgres {
            pool,
            table: table.into(),
            runs,
            end,
        })
}

#[cfg(feature = "postgres")]
#[derive(Clone)]
struct TokioPostgres {
    pool: deadpool_postgres::Pool,
    table: Arc<str>,
    runs: Runs,
    end: End,
}

#[cfg(feature = "postgres")]
async fn claimed_tokio_postgres(
    State(api): State<TokioPostgres>,
    claim: Claim,
    body: Bytes,
) -> Result<Response, ClaimError> {
    api.runs.bump();
    let mut client = api.pool.get().await.map_err(ClaimError::database)?;
    let tx = client.transaction().await.map_err(ClaimError::database)?;
    let sql = format!(
        "INSERT INTO {} (key, body) VALUES ($1, $2) RETURNING id",
        api.table
    );
    let body = String::from_utf8_lossy(&body).into_owned();
    let row = tx
        .query_one(&sql, &[&claim.key().key(), &body])
        .await
        .map_err(ClaimError::database)?;
    let response = claim.respond_in(&tx, created(row.get(0))).await?;
    match &api.end {
        End::Rollback => {
            tx.rollback().await.map_err(ClaimError::database)?;
            return Ok(response);
        }
        End::CrashBeforeCommit => std::process::abort(),
        _ => {}
    }
    tx.commit().await.map_err(ClaimError::database)?;
    after_commit(&api.end);
    Ok(response)
}

fn after_commit(end: &End) {
    match end {
        End::CrashAfterCommit => std::process::abort(),
        End::PanicAfterCommit => panic!("the handler panicked after its COMMIT"),
        _ => {}
    }
}

/// The `Authorization` of the payments client: its keys are scoped to its own tenant.
pub const CLIENT: &str = "Bearer payments-client";

/// A keyed `POST` to `path` from [`CLIENT`].
pub fn request(path: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CLIENT)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}
