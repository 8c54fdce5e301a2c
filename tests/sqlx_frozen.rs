//! `SqlxStore` on connections that stop answering without closing (a network path lost, a
//! firewall dropping packets, the old endpoint of a failover) while new connections to the
//! server work: the store's pool goes through a TCP proxy on 127.0.0.1 whose open connections
//! freeze (`support::proxy`). A call the layer's store timeout cuts on such a connection closes
//! it, and its pool slot goes to a new connection; before, sqlx pinged it on its way back to the
//! pool, the ping never answered, and the slot was held for good.
//!
//! Against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run through
//! `scripts/test-services`).

mod support;

use std::time::{Duration, Instant};

use support::frozen::{assert_lease_kept, begins, line};
use support::proxy::{Proxy, host_port, through};
use support::server_url;
use tower_idempotency::SqlxStore;

/// A pool of `max` connections to `url`.
async fn pool(url: &str, max: u32, test_before_acquire: bool) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(max)
        .test_before_acquire(test_before_acquire)
        .connect(url)
        .await
        .unwrap()
}

/// A store on a pool of `max` connections to `url`, whose table exists.
async fn store(url: &str, max: u32, test_before_acquire: bool) -> SqlxStore {
    let store = SqlxStore::new(pool(url, max, test_before_acquire).await);
    store.migrate().await.unwrap();
    store
}

/// Opens every connection of `store`'s pool (4), left idle, as under traffic.
async fn warm(store: &SqlxStore) {
    let warm: Vec<_> = (0..4)
        .map(|_| {
            let pool = store.pool().clone();
            tokio::spawn(async move {
                sqlx::query("SELECT pg_sleep(0.1)")
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for warm in warm {
        warm.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!((store.pool().size(), store.pool().num_idle()), (4, 4));
}

/// With either `test_before_acquire`, a pool of 4 whose connections are all open and idle (as
/// under traffic) freezes: the calls after it fail for a few cuts of the store timeout, then
/// every one succeeds on new connections. With `test_before_acquire(false)` (the setting
/// `SqlxStore`'s docs suggest) the frozen connections took the whole pool in four calls, and
/// every call after them failed (`503`) for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_connection_that_stops_answering_is_replaced() {
    let Some(url) = server_url("POSTGRES_URL", "a_connection_that_stops_answering") else {
        return;
    };
    let mut report = Vec::new();
    for test_before_acquire in [true, false] {
        let proxy = Proxy::start(host_port(&url).to_owned()).await;
        let store = store(&through(&url, &proxy), 4, test_before_acquire).await;
        let before = begins(&store, 4, Duration::from_secs(5)).await;
        assert!(before.iter().all(|acquired| *acquired), "{before:?}");
        warm(&store).await;
        let frozen = proxy.freeze_those_open();
        let started = Instant::now();
        let after = begins(&store, 20, Duration::from_millis(300)).await;
        report.push(format!(
            "test_before_acquire({test_before_acquire}): {} ({frozen} frozen, {} opened, \
             {:?}; pool size {} idle {})",
            line(&after),
            proxy.opened(),
            started.elapsed(),
            store.pool().size(),
            store.pool().num_idle(),
        ));
    }
    assert!(
        report.iter().all(|r| r.contains("1111111111111111 (")),
        "begins after the freeze (1 acquired, . failed), recovered after at most 4: {report:#?}"
    );
}

/// With the default pool, the freeze lands while four calls are under way (a server under load;
/// here another session holds the table, of the test's own, locked, so that they are under way
/// when it comes): the store timeout cuts each, and once the lock is gone the calls after them
/// run on new connections. Before, each of the four held its pool slot for good, and every call
/// after them failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_connections_that_stop_answering_under_load_are_replaced() {
    let Some(url) = server_url("POSTGRES_URL", "connections_that_stop_answering_under_load") else {
        return;
    };
    let table = "sqlx_frozen_in_flight";
    let direct = pool(&url, 2, true).await;
    let migrate = SqlxStore::builder(direct.clone()).table(table).build();
    migrate.unwrap().migrate().await.unwrap();
    let proxy = Proxy::start(host_port(&url).to_owned()).await;
    let proxied = pool(&through(&url, &proxy), 4, true).await;
    let store = SqlxStore::builder(proxied).table(table).build().unwrap();
    let before = begins(&store, 4, Duration::from_secs(5)).await;
    assert!(before.iter().all(|acquired| *acquired), "{before:?}");

    let mut lock = direct.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { begins(&store, 1, Duration::from_millis(1000)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = proxy.freeze_those_open();
    for call in in_flight {
        assert_eq!(call.await.unwrap(), [false]);
    }
    lock.rollback().await.unwrap();

    let started = Instant::now();
    let after = begins(&store, 16, Duration::from_millis(300)).await;
    assert!(
        line(&after).ends_with("11111111"),
        "begins after the freeze: {} ({frozen} frozen, {} opened, {:?}; pool size {} idle {})",
        line(&after),
        proxy.opened(),
        started.elapsed(),
        store.pool().size(),
        store.pool().num_idle(),
    );
}

/// Two servers on one table. Server A's pool of 4 (every connection open and idle, as under
/// traffic) goes through a proxy; A runs a 4 s handler under a 1.5 s lease, and its connections
/// freeze 200 ms in; 2.5 s later the client's retry goes to server B, on a direct pool: it gets
/// `409`, and the handler ran once, with either `test_before_acquire`. With
/// `test_before_acquire(false)`, each renewal cut on a frozen connection held its pool slot for
/// good; after four, the renewals found no connection at all, the lease lapsed, and B ran the
/// handler a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_server_whose_connections_stop_answering_keeps_its_handlers_lease() {
    let Some(url) = server_url("POSTGRES_URL", "a_server_whose_connections_stop_answering") else {
        return;
    };
    for test_before_acquire in [false, true] {
        let proxy = Proxy::start(host_port(&url).to_owned()).await;
        let a = store(&through(&url, &proxy), 4, test_before_acquire).await;
        warm(&a).await;
        let make_b = async || store(&url, 4, true).await;
        let freeze = || {
            proxy.freeze_those_open();
        };
        let context = format!("with test_before_acquire({test_before_acquire})");
        assert_lease_kept(a, make_b, freeze, &context).await;
    }
}
