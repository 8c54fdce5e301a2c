//! Round trips per request, counted on the servers themselves: Redis commands
//! (`INFO commandstats`) on a Redis server and a Redis Cluster of the test's own, and
//! PostgreSQL statements (`pg_stat_statements`) on a table of the test's own.
//!
//! | request                        | store calls |
//! |--------------------------------|-------------|
//! | fresh key                      | 2: `begin`, `complete` |
//! | replay                         | 1: `begin` (0 from a `ReplayCache`) |
//! | in flight (409), reuse (422)   | 1: `begin` |
//! | lease renewal                  | none on the request's path |
//!
//! With the Redis replica wait, each write adds a `WAIT`: a fresh key takes 4.
//!
//! `SqlxStore` counts as `PostgresStore`. A handler that completes its record in its own
//! transaction (`Claim::respond_in`) takes 3 statements on the table for a fresh key: `begin`,
//! the `UPDATE` inside its transaction, and the layer's `settle`; its replay, 1.
//!
//! Run through `scripts/test-services`; each store is skipped when its variables are not set.

mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use support::cluster::{Cluster, Node, binary};
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, PostgresStore, RecordKey, RedisStore, ReplayCache,
    TenantId,
};

/// Store calls counted on the server, per kind of request.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    fresh: u64,
    replay: u64,
    mismatch: u64,
    in_flight: u64,
    /// Calls during a 1 s handler with a 300 ms lease, and the time the response took past the
    /// handler's.
    slow: u64,
    slow_overhead: Duration,
}

/// Sends each kind of request through layers over `store`, counting the server's calls with
/// `calls` (a running total) around each.
async fn measure<S, F>(label: &str, store: S, calls: F) -> Counts
where
    S: IdempotencyStore + Clone,
    F: AsyncFn() -> u64,
{
    let runs = Runs::default();
    let fast = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let slow = server(store.clone(), &runs, Duration::from_millis(600), |l| l);
    let renewing = server(store, &runs, Duration::from_millis(1000), |l| {
        l.lease(Duration::from_millis(300))
    });
    let key = unique_key(label);
    let mut counts = Counts::default();

    let delta = async |app: &Router, key: &str, body: &str, status: StatusCode| {
        let before = calls().await;
        let reply = send(app, payment(key, body)).await;
        assert_eq!(reply.status, status, "{reply:?}");
        calls().await - before
    };
    counts.fresh = delta(&fast, &key, "{}", StatusCode::CREATED).await;
    counts.replay = delta(&fast, &key, "{}", StatusCode::CREATED).await;
    counts.mismatch = delta(
        &fast,
        &key,
        r#"{"other":1}"#,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;

    let running = unique_key(label);
    let first = tokio::spawn({
        let (app, request) = (slow.clone(), payment(&running, "{}"));
        async move { send(&app, request).await }
    });
    while runs.get() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    counts.in_flight = delta(&fast, &running, "{}", StatusCode::CONFLICT).await;
    assert!(!first.is_finished(), "measured while the first request ran");
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);

    let before = calls().await;
    let started = Instant::now();
    let reply = send(&renewing, payment(&unique_key(label), "{}")).await;
    counts.slow_overhead = started
        .elapsed()
        .saturating_sub(Duration::from_millis(1000));
    assert_eq!(reply.status, StatusCode::CREATED);
    counts.slow = calls().await - before;

    eprintln!("round trips, {label}: {counts:?}");
    counts
}

/// What every store must show: 2, 1, 1, 1; renewals while the handler runs, adding no time.
fn assert_round_trips(counts: &Counts, replay: u64) {
    assert_eq!(counts.fresh, 2, "fresh key: begin, complete");
    assert_eq!(counts.replay, replay, "replay");
    assert_eq!(counts.mismatch, replay, "422");
    assert_eq!(counts.in_flight, 1, "409: begin");
    assert!(
        (4..=14).contains(&counts.slow),
        "a 1 s handler with a 300 ms lease: begin, complete and a renewal every 100 ms: {}",
        counts.slow
    );
    assert!(
        counts.slow_overhead < Duration::from_millis(250),
        "renewals add no time to the response: {:?}",
        counts.slow_overhead
    );
}

/// The commands the store's scripts run inside Redis: counted by `INFO commandstats`, but not
/// round trips.
const IN_SCRIPTS: [&str; 6] = ["getrange", "get", "set", "pexpire", "del", "pttl"];

/// Counts the commands sent to a Redis server, through one connection of its own (a new
/// connection would count its handshake), `INFO` itself, replication traffic and the commands
/// run inside scripts left out.
struct RedisCalls(redis::aio::MultiplexedConnection);

impl RedisCalls {
    async fn open(url: &str) -> Self {
        let client = redis::Client::open(url).unwrap();
        Self(client.get_multiplexed_async_connection().await.unwrap())
    }

    async fn total(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("COMMANDSTATS")
            .query_async(&mut self.0.clone())
            .await
            .unwrap();
        let mut total = 0;
        for line in info.lines() {
            let Some((name, stats)) = line
                .strip_prefix("cmdstat_")
                .and_then(|line| line.split_once(':'))
            else {
                continue;
            };
            // `REPLCONF` is a replica's acknowledgements, not a client's command.
            if name == "info" || name == "replconf" || IN_SCRIPTS.contains(&name) {
                continue;
            }
            let calls = stats.split("calls=").nth(1).unwrap();
            let calls: u64 = calls.split(',').next().unwrap().parse().unwrap();
            total += calls;
        }
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_round_trips() {
    let Some(bin) = binary("REDIS_SERVER_BIN", "redis_round_trips") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let url = node.url();
    let store = RedisStore::connect(&url).await.unwrap();
    let counter = RedisCalls::open(&url).await;
    let calls = async || counter.total().await;
    let counts = measure("redis", store.clone(), &calls).await;
    assert_round_trips(&counts, 1);

    let counts = measure("redis+cache", ReplayCache::new(store), &calls).await;
    assert_round_trips(&counts, 0);
}

/// With the replica wait, each write is followed by `WAIT`: a fresh key takes 4 round trips;
/// answers that write nothing still take 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_replica_wait_round_trips() {
    let Some(bin) = binary("REDIS_SERVER_BIN", "redis_replica_wait_round_trips") else {
        return;
    };
    let primary = Node::start(&bin, &["--repl-diskless-sync-delay", "0"]);
    let port = primary.port.to_string();
    let replica = Node::start(&bin, &["--replicaof", "127.0.0.1", &port]);
    let synced = eventually(Duration::from_secs(30), async || {
        let info = support::cluster::node_command(&primary.url(), &["INFO", "REPLICATION"])
            .await
            .unwrap();
        info.contains("state=online")
    })
    .await;
    assert!(synced, "the replica of {} synced", replica.url());

    let url = primary.url();
    let store = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(400))
        .connect(&url)
        .await
        .unwrap();
    // On a loaded machine the first waits may time out while the replica settles: warm up until
    // one write is replicated in time, before counting.
    let warm = eventually(Duration::from_secs(30), async || {
        let key = RecordKey::new(TenantId::shared(), unique_key("warm-up"));
        let fingerprint = Fingerprint::from_bytes([0; 32]);
        match store
            .begin(&key, &fingerprint, Duration::from_secs(5))
            .await
        {
            Ok(Begin::Acquired(token)) => store.release(&key, token).await.is_ok(),
            _ => false,
        }
    })
    .await;
    assert!(warm, "a write replicated within the wait");
    let counter = RedisCalls::open(&url).await;
    let counts = measure("redis-replica-wait", store, async || counter.total().await).await;
    assert_eq!(counts.fresh, 4, "begin, WAIT, complete, WAIT");
    assert_eq!(
        (counts.replay, counts.mismatch, counts.in_flight),
        (1, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_round_trips() {
    let Some(cluster) = Cluster::start("redis_cluster_round_trips", 3, 0).await else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    let mut counters = Vec::new();
    for url in &urls {
        counters.push(RedisCalls::open(url).await);
    }
    let calls = async || {
        let mut total = 0;
        for counter in &counters {
            total += counter.total().await;
        }
        total
    };
    let counts = measure("redis-cluster", store, calls).await;
    assert_round_trips(&counts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_round_trips() {
    let Some(url) = server_url("POSTGRES_URL", "postgres_round_trips") else {
        return;
    };
    // A table of its own, so that only this test's statements name it.
    let table = format!("round_trips_{}", tower_idempotency::LockToken::random());
    let store = PostgresStore::builder()
        .table(&table)
        .connect(&url)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let client = store.pool().get().await.unwrap();
    if let Err(err) = client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
    {
        eprintln!("postgres_round_trips: skipped, no pg_stat_statements: {err}");
        return;
    }
    let statement = client
        .prepare(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'",
        )
        .await
        .unwrap();
    let calls = async || {
        let row = client.query_one(&statement, &[&table]).await.unwrap();
        u64::try_from(row.get::<_, i64>(0)).unwrap()
    };
    if let Err(err) = client.query_one(&statement, &[&table]).await {
        eprintln!("postgres_round_trips: skipped, pg_stat_statements is not loaded: {err}");
        return;
    }
    let counts = measure("postgres", store.clone(), &calls).await;
    assert_round_trips(&counts, 1);

    let counts = measure("postgres+cache", ReplayCache::new(store.clone()), &calls).await;
    assert_round_trips(&counts, 0);
    store
        .pool()
        .get()
        .await
        .unwrap()
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

/// Counts the statements that name `table` (`pg_stat_statements`), or `None` when the server
/// does not load it.
#[cfg(feature = "sqlx")]
async fn statement_counter(pool: &sqlx::PgPool, table: &str) -> Option<impl AsyncFn() -> u64> {
    // Another test may be creating it at the same moment: the probe below decides.
    let _ = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await;
    let sql = "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
               WHERE query LIKE '%' || $1 || '%' AND query NOT LIKE '%pg_stat_statements%'";
    let probe = sqlx::query_scalar::<_, i64>(sql)
        .bind(table)
        .fetch_one(pool)
        .await;
    if let Err(err) = probe {
        eprintln!("sqlx_round_trips: skipped, pg_stat_statements is not loaded: {err}");
        return None;
    }
    let (pool, table) = (pool.clone(), table.to_owned());
    Some(async move || {
        let calls: i64 = sqlx::query_scalar(sql)
            .bind(&table)
            .fetch_one(&pool)
            .await
            .unwrap();
        u64::try_from(calls).unwrap()
    })
}

#[cfg(feature = "sqlx")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlx_round_trips() {
    use support::payments::{self, End};
    use tower_idempotency::{IdempotencyLayer, SqlxStore};

    let Some(url) = server_url("POSTGRES_URL", "sqlx_round_trips") else {
        return;
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let table = format!("round_trips_{}", tower_idempotency::LockToken::random());
    let store = SqlxStore::builder(pool.clone())
        .table(&table)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let Some(calls) = statement_counter(&pool, &table).await else {
        return;
    };
    let counts = measure("sqlx", store.clone(), &calls).await;
    assert_round_trips(&counts, 1);
    let counts = measure("sqlx+cache", ReplayCache::new(store.clone()), &calls).await;
    assert_round_trips(&counts, 0);

    // `respond_in`: the record completes in the handler's transaction, the layer settles it.
    let payments_table = payments::new_table(&pool).await;
    let runs = Runs::default();
    let app = payments::api(pool.clone(), &payments_table, runs.clone(), End::Commit)
        .layer(IdempotencyLayer::new(store));
    let key = unique_key("sqlx-claim");
    let before = calls().await;
    let first = send(&app, payments::request("/payments", &key, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let fresh = calls().await - before;
    let before = calls().await;
    send(&app, payments::request("/payments", &key, "{}"))
        .await
        .assert_replay_of(&first);
    let replay = calls().await - before;
    eprintln!("round trips, sqlx with respond_in: fresh {fresh}, replay {replay}");
    assert_eq!(
        fresh, 3,
        "begin, the UPDATE in the handler's transaction, settle"
    );
    assert_eq!(replay, 1, "begin");
    assert_eq!(runs.get(), 1);
    for table in [&table, &payments_table] {
        sqlx::raw_sql(&format!("DROP TABLE \"{table}\""))
            .execute(&pool)
            .await
            .unwrap();
    }
}
