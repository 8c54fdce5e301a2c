//! `PostgresStore`'s shared, pipelined connections against a real PostgreSQL at `POSTGRES_URL`
//! (skipped when it is not set; run through `scripts/test-services`): a statement that waits for
//! a lock a transaction holds does not hold up the statements behind it, nor answer otherwise
//! than on a connection of its own; a burst fills the shared connections without opening more
//! than the pool.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use http::HeaderMap;
use support::frozen::{assert_lease_kept, begins, line};
use support::proxy::{Proxy, host_port, through};
use support::{serve, server_url, unique_key};
use tokio::sync::Semaphore;
use tower_idempotency::{
    Begin, Claim, ClaimError, Fingerprint, IdempotencyLayer, IdempotencyStore, PostgresStore,
    RecordKey, StoredResponse, TenantId,
};

fn handler_pool(url: &str) -> deadpool_postgres::Pool {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    deadpool_postgres::Pool::builder(manager)
        .max_size(4)
        .build()
        .unwrap()
}

#[derive(Clone)]
struct Api {
    pool: deadpool_postgres::Pool,
    reached: Arc<Semaphore>,
}

/// Completes its record in its transaction (`respond_in`), then runs one more statement in that
/// transaction: a slow one (a report, a call that waits on a lock of the application's).
async fn slow_after_respond_in(
    State(api): State<Api>,
    claim: Claim,
) -> Result<Response, ClaimError> {
    let mut client = api.pool.get().await.map_err(ClaimError::database)?;
    let tx = client.transaction().await.map_err(ClaimError::database)?;
    let response = claim.respond_in(&tx, (StatusCode::CREATED, "held")).await?;
    api.reached.add_permits(1);
    tx.execute("SELECT pg_sleep(10)", &[])
        .await
        .map_err(ClaimError::database)?;
    tx.commit().await.map_err(ClaimError::database)?;
    Ok(response)
}

async fn plain() -> (StatusCode, &'static str) {
    (StatusCode::CREATED, "plain")
}

fn keyed(path: &str, key: &str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .header("authorization", "Bearer audit-pipeline-client")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap()
}

/// A handler whose request is cancelled (`finish_on_disconnect(false)`, its client went away)
/// while its transaction holds the record it completed with `respond_in` (the transaction's
/// ROLLBACK waits behind the statement it was running). The guard releases the key in the
/// background: its `DELETE` waits for the row lock, past the store's timeout, four times. On the
/// shared connections it waits 100 ms at most (their session's `lock_timeout`) and then runs on
/// a connection of its own, which is closed, not given back to the pool, when the timeout drops
/// the call. Every other key's request meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_handlers_release_holds_up_no_shared_connection() {
    let Some(url) = server_url(
        "POSTGRES_URL",
        "a_cancelled_handlers_release_holds_up_no_shared_connection",
    ) else {
        return;
    };
    let store = PostgresStore::connect(&url).await.unwrap();
    assert_eq!(store.pipelined_connections(), 8);
    others_answer_beside_a_cancelled_held_handler(&url, store).await;
}

/// The same with no shared connection (a connection per call): a release whose call the store's
/// timeout dropped leaves its `DELETE` waiting on its connection, which is closed rather than
/// given back to the pool, where the next calls would queue behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_shared_connection_a_cancelled_handler_holds_up_no_other_key() {
    let Some(url) = server_url(
        "POSTGRES_URL",
        "with_no_shared_connection_a_cancelled_handler_holds_up_no_other_key",
    ) else {
        return;
    };
    let store = PostgresStore::builder()
        .pipelined_connections(0)
        .connect(&url)
        .await
        .unwrap();
    others_answer_beside_a_cancelled_held_handler(&url, store).await;
}

async fn others_answer_beside_a_cancelled_held_handler(url: &str, store: PostgresStore) {
    store.migrate().await.unwrap();
    let api = Api {
        pool: handler_pool(url),
        reached: Arc::new(Semaphore::new(0)),
    };
    let layer = IdempotencyLayer::new(store.clone())
        .require_key(true)
        .finish_on_disconnect(false)
        .store_timeout(Duration::from_millis(500));
    let app = Router::new()
        .route("/hold", post(slow_after_respond_in))
        .route("/plain", post(plain))
        .with_state(api.clone())
        .layer(layer);

    // A real server on loopback: the client that hangs up is what makes hyper drop the handler.
    let served = serve(app).await;
    let held = served
        .send_then_hang_up(keyed("/hold", &unique_key("held")))
        .await;
    drop(api.reached.acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The client goes away: the handler is dropped, its transaction's ROLLBACK queued behind
    // its pg_sleep; the guard releases the key in the background.
    drop(held);
    // The release's four tries (each cut at 500 ms, 50 to 200 ms apart).
    tokio::time::sleep(Duration::from_millis(2600)).await;

    let started = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let request = keyed("/plain", &unique_key(&format!("other-{i}")));
        statuses.push(served.send(request).await.status);
    }
    let elapsed = started.elapsed();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "other keys' requests while one cancelled handler's transaction holds its row: \
         {statuses:?} in {elapsed:?}"
    );
}

/// The store's own API, on one shared connection: a `complete` of a record that a transaction
/// holds waits for it on a connection of its own (the shared one gives up on the lock after
/// 100 ms), so a new key's `begin` sent after it on the shared connection answers at once; the
/// completion lands once the transaction ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_waiting_for_a_lock_holds_up_no_begin() {
    let Some(url) = server_url(
        "POSTGRES_URL",
        "a_complete_waiting_for_a_lock_holds_up_no_begin",
    ) else {
        return;
    };
    let store = support::shared::postgres_pipelined(4, 1).await.unwrap();
    let fp = Fingerprint::from_bytes([7; 32]);
    let lease = Duration::from_secs(30);
    let held = RecordKey::new(TenantId::shared(), unique_key("held"));
    let token = match store.begin(&held, &fp, lease).await.unwrap() {
        tower_idempotency::Begin::Acquired(token) => token,
        other => panic!("{other:?}"),
    };
    // A transaction of the application's holds the row (as `respond_in`'s UPDATE does).
    let pool = handler_pool(&url);
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM {} WHERE key = $1 FOR UPDATE",
            "idempotency_records"
        ),
        &[&held.key()],
    )
    .await
    .unwrap();

    let completing = tokio::spawn({
        let (store, held) = (store.clone(), held.clone());
        async move {
            let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new());
            store
                .complete(&held, token, response, Duration::from_secs(60))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = RecordKey::new(TenantId::shared(), unique_key("other"));
    let began = tokio::time::timeout(Duration::from_secs(2), store.begin(&other, &fp, lease)).await;
    tx.rollback().await.unwrap();
    completing.await.unwrap().unwrap();
    assert!(
        began.is_ok(),
        "a new key's begin waited behind a complete that waits for a transaction's row lock"
    );
}

/// The URL of the PostgreSQL server (`None` when there is none: the test is skipped), its table
/// made through a store of its own, for a store that reaches it another way (a proxy).
async fn migrated(test: &str) -> Option<String> {
    let url = server_url("POSTGRES_URL", test)?;
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some(url)
}

/// A proxy to the server of `url` whose open connections can be frozen (`support::proxy`),
/// and the `tokio_postgres::Config` to reach the server through it.
async fn proxied(url: &str) -> (tokio_postgres::Config, Proxy) {
    let proxy = Proxy::start(host_port(url).to_owned()).await;
    (through(url, &proxy).parse().unwrap(), proxy)
}

/// A burst of calls on a store whose shared connections are not open yet (its first traffic,
/// or the traffic after the database restarted): one call fills each slot, and the calls that
/// come to a slot meanwhile run on a connection of their own, given back to the pool. A pool
/// of 16 opens at most 16 connections for the burst (a connection taken for a slot that another
/// call filled first would be closed, its session set for sharing, and one opened per call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_empty_shared_slots_opens_no_more_than_the_pool() {
    let Some(url) = migrated("a_burst_on_empty_shared_slots_opens_no_more_than_the_pool").await
    else {
        return;
    };

    let (config, proxy) = proxied(&url).await;
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(16)
        .build()
        .unwrap();
    let store = PostgresStore::from_pool(pool);
    assert_eq!(store.pipelined_connections(), 8);

    let calls: Vec<_> = (0..256)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = RecordKey::new(TenantId::shared(), format!("burst-{i}"));
                store.lookup(&key).await
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let opened = proxy.opened();
    assert!(
        opened <= 16,
        "a pool of 16 opened {opened} connections for one burst of 256 lookups"
    );
}

/// A key reused after its completed record expired, while another transaction holds that row
/// for longer than the shared connection's lock timeout (a cleanup's batch, an operator's
/// purge): the takeover's `ON CONFLICT DO UPDATE` fails there with the error of `NOWAIT`, and
/// `begin` runs again on a connection of its own, which waits for the delete and acquires, as a
/// connection per call does. (Taken for `NOWAIT`, the error would have the row read: `409`,
/// though nothing is in flight.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_held_up_past_the_lock_timeout_still_acquires() {
    let Some(url) = server_url(
        "POSTGRES_URL",
        "a_takeover_held_up_past_the_lock_timeout_still_acquires",
    ) else {
        return;
    };
    let shared = support::shared::postgres_pipelined(4, 1).await.unwrap();
    let own = support::shared::postgres_pipelined(4, 0).await.unwrap();
    let mut answers = Vec::new();
    for store in [&own, &shared] {
        answers.push(reuse_while_the_row_is_being_deleted(&url, store).await);
    }
    assert!(
        answers.iter().all(|b| matches!(b, Begin::Acquired(_))),
        "a connection per call, then one shared connection: {answers:?}"
    );
}

async fn reuse_while_the_row_is_being_deleted(url: &str, store: &PostgresStore) -> Begin {
    let fp = Fingerprint::from_bytes([9; 32]);
    let key = RecordKey::new(TenantId::shared(), unique_key("expired"));
    let Begin::Acquired(token) = store
        .begin(&key, &fp, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("a new key");
    };
    let response = StoredResponse::new(StatusCode::OK, HeaderMap::new(), Bytes::new());
    store
        .complete(&key, token, response, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Another session deletes the expired row, its transaction open for 300 ms (a cleanup's
    // batch that takes that long, or an operator's purge).
    let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let tx = client.transaction().await.unwrap();
    let deleted = tx
        .execute(
            "DELETE FROM idempotency_records WHERE tenant = $1 AND key = $2 \
             AND expires_at <= clock_timestamp()",
            &[&&key.tenant().as_bytes()[..], &key.key()],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let began = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.begin(&key, &fp, Duration::from_secs(30)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.commit().await.unwrap();
    began.await.unwrap().unwrap()
}

/// A pool of `max_size` to the server through `config` (a proxy's).
fn proxied_pool(config: tokio_postgres::Config, max_size: usize) -> deadpool_postgres::Pool {
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    deadpool_postgres::Pool::builder(manager)
        .max_size(max_size)
        .build()
        .unwrap()
}

/// The store's connections stop answering without closing (their network path lost, the old
/// endpoint of a failover), while the server takes new ones: a shared connection whose call the
/// store's timeout dropped is replaced, so the calls after it get a new one. (Left in its slot,
/// it timed out every call that came to it in turn, for as long as TCP kept it open: here, 30
/// of 30.) As with a connection per call, where such a connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_connection_that_stops_answering_is_replaced() {
    for shared in [2, 0] {
        let test = format!("a_shared_connection_that_stops_answering_is_replaced_{shared}");
        let Some(url) = migrated(&test).await else {
            return;
        };
        let (config, proxy) = proxied(&url).await;
        let store = PostgresStore::builder()
            .pipelined_connections(shared)
            .build(proxied_pool(config, 4))
            .unwrap();
        assert_eq!(store.pipelined_connections(), shared);
        let before = begins(&store, 8, Duration::from_secs(5)).await;
        assert!(before.iter().all(|acquired| *acquired), "{before:?}");

        let frozen = proxy.freeze_those_open();
        let after = begins(&store, 30, Duration::from_millis(300)).await;
        assert!(
            after[8..].iter().all(|acquired| *acquired),
            "{shared} shared: after {frozen} connections stopped answering ({} opened in all), \
             begins acquired {}",
            proxy.opened(),
            line(&after)
        );
    }
}

/// Two servers on one table. Server A's connections stop answering while its handler runs (a
/// network path lost), though new ones reach the database: its renewals take connections of
/// their own, and keep the live handler's key from being taken over. The client's retry on
/// server B then gets `409`, and the handler runs once. (On the shared connections, every
/// renewal timed out there, the lease ran out, and B ran the handler a second time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_connections_stop_answering_keeps_its_handlers_lease() {
    let Some(url) =
        migrated("a_server_whose_connections_stop_answering_keeps_its_handlers_lease").await
    else {
        return;
    };
    let (config, proxy) = proxied(&url).await;
    let a = PostgresStore::from_pool(proxied_pool(config, 4));
    assert_eq!(a.pipelined_connections(), 2);
    // A's shared connections are open before the request, as they are under traffic.
    for i in 0..4 {
        let key = RecordKey::new(TenantId::shared(), unique_key(&format!("warm-{i}")));
        a.lookup(&key).await.unwrap();
    }
    let make_b = async || PostgresStore::connect(&url).await.unwrap();
    let freeze = || {
        proxy.freeze_those_open();
    };
    assert_lease_kept(a, make_b, freeze, "on PostgresStore").await;
}

/// Completes its record in a transaction of the application's pool (`respond_in`).
async fn in_a_transaction(
    State(pool): State<deadpool_postgres::Pool>,
    claim: Claim,
) -> Result<Response, ClaimError> {
    let mut client = pool.get().await.map_err(ClaimError::database)?;
    let tx = client.transaction().await.map_err(ClaimError::database)?;
    let response = claim.respond_in(&tx, (StatusCode::CREATED, "paid")).await?;
    tx.commit().await.map_err(ClaimError::database)?;
    Ok(response)
}

/// Two stores on one application pool of 4 (a table each), whose handlers complete in their own
/// transactions on that pool: the stores share 2 of its connections between them, not 2 each,
/// which left none for the handlers (whose `pool.get()` then waited for good: every request
/// after the first few hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_pool_share_half_of_it_between_them() {
    let Some(url) = server_url(
        "POSTGRES_URL",
        "two_stores_on_one_pool_share_half_of_it_between_them",
    ) else {
        return;
    };
    let pool = handler_pool(&url);
    let payments = PostgresStore::from_pool(pool.clone());
    let refunds = PostgresStore::builder()
        .table("two_stores_refunds")
        .build(pool.clone())
        .unwrap();
    payments.migrate().await.unwrap();
    refunds.migrate().await.unwrap();
    let layer = |store: &PostgresStore| {
        IdempotencyLayer::new(store.clone())
            .require_key(true)
            .store_timeout(Duration::from_secs(2))
    };
    let app = Router::new()
        .route("/pay", post(in_a_transaction).layer(layer(&payments)))
        .route("/refund", post(in_a_transaction).layer(layer(&refunds)))
        .with_state(pool.clone());
    let served = serve(app).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        for path in ["/pay", "/refund"] {
            let sent = served.send(keyed(path, &unique_key(&format!("two-stores-{i}"))));
            let status = tokio::time::timeout(Duration::from_secs(5), sent).await;
            statuses.push(status.map(|reply| reply.status.as_u16()).ok());
        }
    }
    assert!(
        statuses.iter().all(|status| *status == Some(201)),
        "{statuses:?} (the pool: {:?})",
        pool.status()
    );
}
