//! `PostgresStore` through a PostgreSQL outage (`support::sql::scenario_outage`): the server
//! stops mid-test, keyed requests get `503` with `Retry-After` and nothing runs; the server
//! comes back and the same store (not rebuilt) works again, with the records written before
//! the outage.
//!
//! It stops and restarts the server at `POSTGRES_URL` with `PG_CTL`, a `pg_ctl` wrapper for
//! its data directory that `scripts/test-services` exports. It is the only test of its binary,
//! and `cargo test` runs test binaries one after the other, so no other test sees the outage.

mod support;

use support::server_url;
use support::sql::scenario_outage;
use tower_idempotency::PostgresStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_then_recovers_without_rebuilding_the_store() {
    let (Some(url), Some(ctl)) = (
        server_url("POSTGRES_URL", "postgres_outage"),
        server_url("PG_CTL", "postgres_outage"),
    ) else {
        return;
    };
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    scenario_outage(store, &ctl).await;
}
