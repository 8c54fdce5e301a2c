//! `SqlxStore` through a PostgreSQL outage (`support::sql::scenario_outage`): the server stops
//! mid-test, keyed requests get `503` with `Retry-After` and nothing runs; the server comes back
//! and the same store (and the application's pool, not rebuilt) works again, with the records
//! written before the outage.
//!
//! It stops and restarts the server at `POSTGRES_URL` with `PG_CTL` (see `postgres_outage.rs`).
//! It is the only test of its binary.

mod support;

use std::time::Duration;

use support::server_url;
use support::sql::scenario_outage;
use tower_idempotency::SqlxStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_then_recovers_without_rebuilding_the_store() {
    let (Some(url), Some(ctl)) = (
        server_url("POSTGRES_URL", "sqlx_outage"),
        server_url("PG_CTL", "sqlx_outage"),
    ) else {
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    let store = SqlxStore::new(pool);
    store.migrate().await.unwrap();
    scenario_outage(store, &ctl).await;
}
