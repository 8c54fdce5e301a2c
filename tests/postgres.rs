//! `PostgresStore` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`): the conformance suite, the fleet scenarios, the scenarios
//! both SQL stores run (`support::sql`), and connecting.

#[macro_use]
mod support;

use support::shared::postgres as store;
use support::*;
use tower_idempotency::{IdempotencyStore, PostgresStore, RecordKey, StoreErrorKind, TenantId};

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

#[tokio::test]
async fn the_pool_of_connect_has_the_size_asked_for() {
    // A pool of no connections is refused before connecting: a unit test of the store checks it.
    let Some(url) = server_url("POSTGRES_URL", "the_pool_of_connect_has_the_size_asked_for") else {
        return;
    };
    let store = PostgresStore::builder()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    assert_eq!(store.pool().status().max_size, 2);
    let default = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(default.pool().status().max_size, 16);

    // Twenty keyed requests at once share the two connections: each runs once and is stored.
    let runs = Runs::default();
    let app = server(store, &runs, std::time::Duration::ZERO, |layer| layer);
    let keys: Vec<String> = (0..20).map(|i| unique_key(&format!("pool-{i}"))).collect();
    let replies =
        futures_util::future::join_all(keys.iter().map(|key| send(&app, payment(key, "{}")))).await;
    for reply in &replies {
        assert_eq!(reply.status, http::StatusCode::CREATED);
    }
    assert_eq!(runs.get(), 20);
    let again = send(&app, payment(&keys[0], "{}")).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(runs.get(), 20);
}

/// A store that shares one pipelined connection, once it is open: sixty-four keyed requests at
/// once, then their retries at once, all go over it (the pool opens no other), each key runs
/// once and each retry replays its first response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_share_the_pipelined_connections() {
    let Some(store) = support::shared::postgres_pipelined(8, 1).await else {
        return;
    };
    // The first call opens the shared connection (the calls that came meanwhile would run on
    // connections of their own).
    let key = RecordKey::new(TenantId::shared(), unique_key("opens"));
    assert!(store.lookup(&key).await.unwrap().is_none());
    let runs = Runs::default();
    let app = server(store.clone(), &runs, std::time::Duration::ZERO, |layer| {
        layer
    });
    let keys: Vec<String> = (0..64).map(|i| unique_key(&format!("piped-{i}"))).collect();
    let send_all = || {
        let app = &app;
        futures_util::future::join_all(keys.iter().enumerate().map(move |(i, key)| {
            let (app, request) = (app.clone(), payment(key, &format!("{{\"amount\":{i}}}")));
            tokio::spawn(async move { send(&app, request).await })
        }))
    };
    let firsts: Vec<_> = send_all().await.into_iter().map(Result::unwrap).collect();
    let retries: Vec<_> = send_all().await.into_iter().map(Result::unwrap).collect();
    for (first, retry) in firsts.iter().zip(&retries) {
        assert_eq!(first.status, http::StatusCode::CREATED);
        retry.assert_replay_of(first);
    }
    assert_eq!(runs.get(), 64);
    // The migration's connection, kept since as the shared one: the pool opened no other.
    assert_eq!(store.pool().status().size, 1);
}

/// Two tables whose names share their first 51 characters (PostgreSQL cuts names at 63 bytes,
/// and the index's name is the table's with `_expires_idx`): each gets its own index on
/// `expires_at`, so cleaning either never scans the whole table.
#[tokio::test]
async fn long_table_names_that_share_a_start_each_get_their_index() {
    let Some(url) = server_url("POSTGRES_URL", "long_table_names_each_get_their_index") else {
        return;
    };
    let base = "records_of_the_payments_service_in_region_europe_a_";
    assert_eq!(base.len(), 51);
    let tables = [format!("{base}west_1"), format!("{base}east_1")];
    for table in &tables {
        let store = PostgresStore::builder()
            .table(table.as_str())
            .connect(&url)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store.migrate().await.unwrap();
    }
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for table in &tables {
        let indexes: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE tablename = $1 \
                 AND indexdef LIKE '%(expires_at)%'",
                &[table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(indexes, 1, "{table}");
    }
    for table in &tables {
        client
            .execute(&format!("DROP TABLE \"{table}\""), &[])
            .await
            .unwrap();
    }
}
