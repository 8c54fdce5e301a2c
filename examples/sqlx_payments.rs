//! Run with: DATABASE_URL=postgres://user:pass@127.0.0.1/db cargo run --example sqlx_payments --features sqlx
//!
//! A payments API on axum and sqlx whose handler writes the payment and its idempotency record
//! in one transaction: both commit, or neither does. A crash after COMMIT leaves the payment and
//! its stored answer, so the retry replays it; a crash before COMMIT leaves nothing, so the
//! retry (once the 30 s lease ends) makes the payment, once.
//!
//! ```sh
//! # Pay: 201, the payment's id.
//! curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: pay-1' -H 'Content-Type: application/json' -d '{"amount":100}'
//! # The retry: the same 201, replayed (idempotent-replayed: true); no second payment.
//! curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: pay-1' -H 'Content-Type: application/json' -d '{"amount":100}'
//! # The same key for another request: 422.
//! curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer alice' \
//!      -H 'Idempotency-Key: pay-1' -H 'Content-Type: application/json' -d '{"amount":999}'
//! # No key: 400 (the route requires one).
//! curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer alice' -d '{"amount":1}'
//! # The payments: one.
//! curl http://127.0.0.1:3000/payments
//! ```

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use sqlx::PgPool;
use tower_idempotency::{Claim, ClaimError, IdempotencyLayer, SqlxStore};

#[derive(Deserialize)]
struct NewPayment {
    amount: i64,
}

/// Makes the payment and completes the idempotency record in one transaction.
async fn create(
    claim: Claim,
    State(pool): State<PgPool>,
    Json(payment): Json<NewPayment>,
) -> Result<Response, AppError> {
    if payment.amount <= 0 {
        // A refusal is not stored: the corrected retry may reuse its key.
        return Ok((StatusCode::UNPROCESSABLE_ENTITY, "amount must be positive").into_response());
    }
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO payments (idempotency_key, amount) VALUES ($1, $2) RETURNING id",
    )
    .bind(claim.key().key())
    .bind(payment.amount)
    .fetch_one(&mut *tx)
    .await?;
    let body = Json(serde_json::json!({ "id": id, "amount": payment.amount }));
    // The record is written in `tx`, fenced by the claim's lock token.
    let response = claim
        .respond_in(&mut *tx, (StatusCode::CREATED, body))
        .await?;
    tx.commit().await?;
    Ok(response)
}

async fn list(State(pool): State<PgPool>) -> Result<Json<Vec<(i64, i64)>>, AppError> {
    let rows = sqlx::query_as("SELECT id, amount FROM payments ORDER BY id")
        .fetch_all(&pool)
        .await?;
    Ok(Json(rows))
}

/// The handler's errors: the database's and the claim's. Returning one drops the transaction,
/// which rolls it back.
enum AppError {
    Database(sqlx::Error),
    Claim(ClaimError),
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        Self::Database(err)
    }
}

impl From<ClaimError> for AppError {
    fn from(err: ClaimError) -> Self {
        Self::Claim(err)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            // A 5xx releases the key: the retry runs again, and nothing was committed.
            Self::Database(err) => {
                (StatusCode::SERVICE_UNAVAILABLE, format!("database: {err}")).into_response()
            }
            Self::Claim(err) => err.into_response(),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://user:pass@127.0.0.1/db")?;
    let pool = PgPool::connect(&url).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS payments (
            id bigserial PRIMARY KEY,
            idempotency_key text NOT NULL,
            amount bigint NOT NULL
        )",
    )
    .execute(&pool)
    .await?;
    let store = SqlxStore::new(pool.clone());
    store.migrate().await?; // the idempotency table, if missing; safe on every start

    let app = Router::new()
        .route("/payments", post(create).get(list))
        .with_state(pool)
        .layer(IdempotencyLayer::new(store).require_key(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
