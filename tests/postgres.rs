//! `PostgresStore` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`): the conformance suite, the fleet scenarios, the scenarios
//! both SQL stores run (`support::sql`), and connecting.

#[macro_use]
mod support;

use support::shared::postgres as store;
use support::*;
use tower_idempotency::{PostgresStore, StoreErrorKind};

// The conformance suite, the fleet scenarios every shared store runs, and the scenarios both SQL
// stores run.
fleet_scenarios!(store);
sql_scenarios!(PostgresStore, migrating beside PostgresStore);

#[tokio::test]
async fn invalid_urls_and_unreachable_servers_fail_clearly() {
    let err = PostgresStore::connect("not a url ===").await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other, "{err}");
    let err = PostgresStore::connect("postgres://nobody@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "the pool's error is kept"
    );
}
