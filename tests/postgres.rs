//! `PostgresStore` against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`).

#[macro_use]
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, Forget, IdempotencyStore, PostgresStore, RecordKey, StoreErrorKind,
    StoredResponse, TenantId,
};

async fn store() -> Option<PostgresStore> {
    let url = server_url("POSTGRES_URL", "postgres")?;
    let store = PostgresStore::connect(&url)
        .await
        .expect("connect to POSTGRES_URL");
    store.migrate().await.expect("migrate");
    Some(store)
}

/// A store over a table of its own, created for the test.
async fn store_with_table(table: &str) -> Option<PostgresStore> {
    let url = server_url("POSTGRES_URL", "postgres")?;
    let store = PostgresStore::builder()
        .table(table)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Some(store)
}

/// A table name no other test or run uses: the token's per-process part and its counter.
fn table_name(label: &str) -> String {
    let token = tower_idempotency::LockToken::random().to_string();
    format!("idem_{label}_{}{}", &token[..8], &token[26..])
}

async fn count_rows(store: &PostgresStore, table: &str) -> i64 {
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap();
    row.get(0)
}

async fn drop_table(store: &PostgresStore, table: &str) {
    let client = store.pool().get().await.unwrap();
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .unwrap();
}

// The conformance suite, and the fleet scenarios every shared store runs.
fleet_scenarios!(store);

/// Eight instances run `migrate` at once on a new table: all succeed, and the table works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_is_safe_from_many_instances_at_once() {
    let Some(url) = server_url("POSTGRES_URL", "postgres") else {
        return;
    };
    let table = table_name("migrate");
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(
            PostgresStore::builder()
                .table(&table)
                .connect(&url)
                .await
                .unwrap(),
        );
    }
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|store| tokio::spawn(async move { store.migrate().await }))
        .collect();
    for task in tasks {
        task.await.unwrap().expect("a concurrent migrate failed");
    }
    stores[0].migrate().await.expect("migrate again");
    let key = RecordKey::new(TenantId::shared(), "k");
    let fp = Fingerprint::from_bytes([1; 32]);
    assert!(matches!(
        stores[3].begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::Acquired(_))
    ));
    assert!(matches!(
        stores[5].begin(&key, &fp, Duration::from_secs(30)).await,
        Ok(Begin::InFlight)
    ));
    drop_table(&stores[0], &table).await;
}

/// A schema-qualified table works; names that are not identifiers are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_names_are_validated_and_schemas_work() {
    let Some(url) = server_url("POSTGRES_URL", "postgres") else {
        return;
    };
    let base = PostgresStore::connect(&url).await.unwrap();
    for bad in ["x; DROP TABLE y", "a.b.c", "1abc", "\"quoted\"", ""] {
        let err = PostgresStore::builder()
            .table(bad)
            .build(base.pool().clone())
            .unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Other, "{bad:?}");
    }

    let schema = table_name("schema");
    let client = base.pool().get().await.unwrap();
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let store = PostgresStore::builder()
        .table(format!("{schema}.Records"))
        .build(base.pool().clone())
        .unwrap();
    assert_eq!(store.table(), format!("{schema}.Records"));
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
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.\"Records\""), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 1,
        "the quoted, case-kept table in the schema holds the record"
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// `delete_expired` removes expired rows (in flight and completed), and only those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_expired_removes_only_expired_rows() {
    let table = table_name("cleanup");
    let Some(store) = store_with_table(&table).await else {
        return;
    };
    let fp = Fingerprint::from_bytes([3; 32]);
    let short = Duration::from_millis(200);
    let long = Duration::from_secs(60);
    let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::from_static(b"ok"));
    for i in 0..1500 {
        let key = RecordKey::new(TenantId::shared(), format!("expired-{i}"));
        let Ok(Begin::Acquired(token)) = store.begin(&key, &fp, short).await else {
            panic!()
        };
        if i % 2 == 0 {
            store
                .complete(&key, token, response.clone(), short)
                .await
                .unwrap();
        }
    }
    let live = RecordKey::new(TenantId::shared(), "live");
    let Ok(Begin::Acquired(token)) = store.begin(&live, &fp, long).await else {
        panic!()
    };
    store
        .complete(&live, token, response.clone(), long)
        .await
        .unwrap();
    let in_flight = RecordKey::new(TenantId::shared(), "in-flight");
    assert!(matches!(
        store.begin(&in_flight, &fp, long).await,
        Ok(Begin::Acquired(_))
    ));
    assert_eq!(count_rows(&store, &table).await, 1502);

    tokio::time::sleep(short + Duration::from_millis(300)).await;
    assert_eq!(
        store.delete_expired().await.unwrap(),
        1500,
        "every expired row, over two batches"
    );
    assert_eq!(count_rows(&store, &table).await, 2);
    assert_eq!(store.delete_expired().await.unwrap(), 0);
    assert!(
        matches!(store.begin(&live, &fp, long).await, Ok(Begin::Completed(r)) if r == response)
    );
    assert!(matches!(
        store.begin(&in_flight, &fp, long).await,
        Ok(Begin::InFlight)
    ));
    drop_table(&store, &table).await;
}

/// The background cleanup deletes expired rows by itself, and stops with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_cleanup_deletes_expired_rows() {
    let table = table_name("background");
    let Some(store) = store_with_table(&table).await else {
        return;
    };
    let observer = PostgresStore::builder()
        .table(&table)
        .build(store.pool().clone())
        .unwrap();
    let store = PostgresStore::builder()
        .table(&table)
        .cleanup_interval(Duration::from_millis(200))
        .build(store.pool().clone())
        .unwrap();
    let fp = Fingerprint::from_bytes([4; 32]);
    for i in 0..10 {
        let key = RecordKey::new(TenantId::shared(), format!("k{i}"));
        assert!(matches!(
            store.begin(&key, &fp, Duration::from_millis(100)).await,
            Ok(Begin::Acquired(_))
        ));
    }
    assert_eq!(count_rows(&observer, &table).await, 10);
    let emptied = eventually(Duration::from_secs(10), async || {
        count_rows(&observer, &table).await == 0
    })
    .await;
    assert!(emptied, "the background task deleted the expired rows");

    // Once the store is dropped, its task ends at its next tick: rows stay.
    let weak_check = RecordKey::new(TenantId::shared(), "after-drop");
    assert!(matches!(
        store
            .begin(&weak_check, &fp, Duration::from_millis(50))
            .await,
        Ok(Begin::Acquired(_))
    ));
    drop(store);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        count_rows(&observer, &table).await,
        1,
        "no cleanup after the store was dropped"
    );
    drop_table(&observer, &table).await;
}

/// A row that cannot be decoded is `Corrupt`, never a panic or a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_corrupt() {
    let table = table_name("corrupt");
    let Some(store) = store_with_table(&table).await else {
        return;
    };
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
    let client = store.pool().get().await.unwrap();
    client
        .batch_execute(&format!("UPDATE {table} SET response = '\\x0100'::bytea"))
        .await
        .unwrap();
    let err = store
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Corrupt, "{err}");
    drop_table(&store, &table).await;
}

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

/// Many rounds of 16 callers racing on a fresh key, and on an expired in-flight record: exactly
/// one acquires each time. This drives `begin` through its snapshot race (a row committed after
/// the statement's snapshot), which it settles by running its statement again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_is_atomic_over_many_rounds() {
    let Some(store) = store().await else { return };
    let store = std::sync::Arc::new(store);
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
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forced_forget_racing_complete_leaves_no_record() {
    let Some(store) = store().await else { return };
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
