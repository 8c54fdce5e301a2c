//! Exactly once across crashes, with real process crashes on a real PostgreSQL at
//! `POSTGRES_URL` (skipped when it is not set; run through `scripts/test-services`).
//!
//! Each case starts child servers: this test binary again, run as `child_server` with
//! `TOWER_IDEMPOTENCY_CHILD` set, which serves a payments API (axum on 127.0.0.1, a payments
//! table, the layer over `SqlxStore` or `PostgresStore`) until it is killed, or until its handler
//! aborts the process (`std::process::abort`) at the point the case chose. The parent sends real
//! HTTP requests over TCP, then retries on a fresh child, and counts the payments in the table.
//!
//! | handler                                  | crash            | the retry                          | payments |
//! |------------------------------------------|------------------|------------------------------------|----------|
//! | `Claim::respond_in` in its transaction   | after COMMIT     | replays at once, no 409            | 1        |
//! | `Claim::respond_in` in its transaction   | before COMMIT    | runs once, after the lease         | 1        |
//! | `Claim::respond_in`, then a panic        | after COMMIT     | replays                            | 1        |
//! | `Claim::respond_in`, then ROLLBACK       | none             | runs (nothing is replayed)         | 1        |
//! | plain layer (the record after COMMIT)    | after COMMIT     | runs AGAIN after the lease         | **2**    |
//! | plain layer                              | before COMMIT    | runs once, after the lease         | 1        |
//!
//! The fifth line is the window `Claim` closes: the plain layer stores the response after the
//! handler's COMMIT, and a crash between the two leaves a payment whose record is still in
//! flight; once its lease ends, the retry pays again.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use support::child::{ChildServer, announce};
use support::payments::{self, End};
use support::raw::{self, RawReply};
use support::{Runs, eventually, server_url, unique_key};
use tower_idempotency::{IdempotencyLayer, PostgresStore, SqlxStore};

/// The variable that makes `child_server` serve: `<store> <end> <lease ms> <payments table>`.
const CHILD: &str = "TOWER_IDEMPOTENCY_CHILD";

/// The child server. Without `TOWER_IDEMPOTENCY_CHILD` (in a normal test run) it does nothing.
#[test]
fn child_server() {
    let Ok(config) = std::env::var(CHILD) else {
        return;
    };
    let parts: Vec<&str> = config.split(' ').collect();
    let [store, end, lease, table] = parts[..] else {
        panic!("{CHILD}={config:?}: expected `<store> <end> <lease ms> <table>`");
    };
    let lease = Duration::from_millis(lease.parse().unwrap());
    let end = End::parse(end);
    let url = std::env::var("POSTGRES_URL").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let pool = PgPool::connect(&url).await.unwrap();
        let runs = Runs::default();
        let app = match store {
            "sqlx" => {
                let store = SqlxStore::new(pool.clone());
                store.migrate().await.unwrap();
                let layer = IdempotencyLayer::new(store).require_key(true).lease(lease);
                payments::api(pool, table, runs, end).layer(layer)
            }
            "postgres" => {
                let store = PostgresStore::connect(&url).await.unwrap();
                store.migrate().await.unwrap();
                let deadpool = store.pool().clone();
                let layer = IdempotencyLayer::new(store).require_key(true).lease(lease);
                payments::api_tokio_postgres(deadpool, table, runs, end).layer(layer)
            }
            other => panic!("unknown store {other:?}"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        announce(listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

/// A child server (`child_server`) over `store`, its handler ending as `end` says; its
/// standard error (the crashes' and panics' words) discarded.
fn child(store: &str, end: &str, lease_ms: u64, table: &str) -> ChildServer {
    let config = format!("{store} {end} {lease_ms} {table}");
    ChildServer::start_quiet("child_server", CHILD, config)
}

/// Waits for the child to end by itself, and asserts that it crashed.
fn assert_crashed(mut child: ChildServer) {
    let status = child.wait();
    assert!(!status.success(), "the child crashed: {status}");
}

/// Sends a keyed `POST` over a new TCP connection; `None` when the server closed the
/// connection without answering (it crashed, or its handler panicked).
async fn post(addr: SocketAddr, path: &str, key: &str) -> Option<RawReply> {
    let request = raw::post(
        path,
        &[
            ("Idempotency-Key", key),
            ("Authorization", payments::CLIENT),
            ("Content-Type", "application/json"),
        ],
        r#"{"amount":100}"#,
    );
    raw::try_exchange(addr, request).await
}

/// The database, and a payments table of the test's own.
async fn setup(test: &str) -> Option<(PgPool, String)> {
    let url = server_url("POSTGRES_URL", test)?;
    let pool = PgPool::connect(&url).await.unwrap();
    let table = payments::new_table(&pool).await;
    Some((pool, table))
}

/// Retries until the answer is not `409` (the lease of the crashed holder is still running).
async fn retry_past_the_lease(addr: SocketAddr, path: &str, key: &str) -> RawReply {
    let mut answer = None;
    let done = eventually(Duration::from_secs(20), async || {
        let reply = post(addr, path, key).await.expect("the server answers");
        if reply.status == 409 {
            return false;
        }
        answer = Some(reply);
        true
    })
    .await;
    assert!(done, "the lease ended and the retry got an answer");
    answer.unwrap()
}

/// Crash right after COMMIT: the payment and its record committed together, so the retry on a
/// fresh server replays at once (with a 30 s lease, a record left in flight would answer 409).
async fn crash_after_commit_replays_at_once(store: &str) {
    let Some((pool, table)) = setup("crash_after_commit").await else {
        return;
    };
    let key = unique_key("after-commit");
    let crashing = child(store, "crash_after_commit", 30_000, &table);
    assert!(post(crashing.addr, "/payments", &key).await.is_none());
    assert_crashed(crashing);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);

    let fresh = child(store, "commit", 30_000, &table);
    let retry = post(fresh.addr, "/payments", &key).await.unwrap();
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.replayed(), "the retry replays at once: {retry:?}");
    // The replay is the crashed run's answer: the payment it made.
    let id: i64 = sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE key = $1"))
        .bind(&key)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(retry.body, format!(r#"{{"id":{id}}}"#).into_bytes());
    assert_eq!(retry.header("location"), Some(&*format!("/payments/{id}")));
    let again = post(fresh.addr, "/payments", &key).await.unwrap();
    assert_eq!(again.body, retry.body);
    assert_eq!(payments::count(&pool, &table, &key).await, 1, "paid once");
}

/// Crash right before COMMIT: nothing happened; once the lease ends the retry runs, once.
async fn crash_before_commit_runs_once(store: &str, path: &str) {
    let Some((pool, table)) = setup("crash_before_commit").await else {
        return;
    };
    let key = unique_key("before-commit");
    let crashing = child(store, "crash_before_commit", 1000, &table);
    assert!(post(crashing.addr, path, &key).await.is_none());
    assert_crashed(crashing);
    assert_eq!(
        payments::count(&pool, &table, &key).await,
        0,
        "nothing happened"
    );

    let fresh = child(store, "commit", 1000, &table);
    let retry = retry_past_the_lease(fresh.addr, path, &key).await;
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(!retry.replayed());
    let again = post(fresh.addr, path, &key).await.unwrap();
    assert!(again.replayed() && again.body == retry.body, "{again:?}");
    assert_eq!(payments::count(&pool, &table, &key).await, 1, "paid once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_crash_after_commit_replays_at_once() {
    crash_after_commit_replays_at_once("sqlx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_crash_before_commit_runs_once() {
    crash_before_commit_runs_once("sqlx", "/payments").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_crash_after_commit_replays_at_once() {
    crash_after_commit_replays_at_once("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_crash_before_commit_runs_once() {
    crash_before_commit_runs_once("postgres", "/payments").await;
}

/// A panic after COMMIT is a crash after COMMIT: the connection closes unanswered, and the
/// retry, on the same server or a fresh one, replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_after_commit_replays() {
    let Some((pool, table)) = setup("panic_after_commit").await else {
        return;
    };
    let key = unique_key("panic");
    let panicking = child("sqlx", "panic_after_commit", 30_000, &table);
    assert!(post(panicking.addr, "/payments", &key).await.is_none());
    let retry = post(panicking.addr, "/payments", &key).await.unwrap();
    assert_eq!(retry.status, 201, "{retry:?}");
    assert!(retry.replayed(), "{retry:?}");
    let fresh = child("sqlx", "commit", 30_000, &table);
    let again = post(fresh.addr, "/payments", &key).await.unwrap();
    assert!(again.replayed() && again.body == retry.body, "{again:?}");
    assert_eq!(payments::count(&pool, &table, &key).await, 1, "paid once");
}

/// A handler that rolls back after `respond_in` yet returns the response: nothing happened, so
/// nothing is replayed; the retry runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_respond_in_is_never_replayed() {
    let Some((pool, table)) = setup("rollback").await else {
        return;
    };
    let key = unique_key("rollback");
    let rolling_back = child("sqlx", "rollback", 30_000, &table);
    let first = post(rolling_back.addr, "/payments", &key).await.unwrap();
    assert_eq!(first.status, 201);
    assert_eq!(payments::count(&pool, &table, &key).await, 0);
    let fresh = child("sqlx", "commit", 30_000, &table);
    let retry = post(fresh.addr, "/payments", &key).await.unwrap();
    assert_eq!(retry.status, 201);
    assert!(!retry.replayed(), "the rolled-back answer is not replayed");
    assert!(
        post(fresh.addr, "/payments", &key)
            .await
            .unwrap()
            .replayed()
    );
    assert_eq!(payments::count(&pool, &table, &key).await, 1, "paid once");
}

/// 50 concurrent duplicates on one server process: one payment, one original answer; the
/// others are 409 or replays of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_duplicates_make_one_payment() {
    let Some((pool, table)) = setup("fifty").await else {
        return;
    };
    let key = unique_key("fifty");
    let server = child("sqlx", "commit", 30_000, &table);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (addr, key) = (server.addr, key.clone());
            tokio::spawn(async move { post(addr, "/payments", &key).await.unwrap() })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    let originals: Vec<_> = replies
        .iter()
        .filter(|r| r.status == 201 && !r.replayed())
        .collect();
    assert_eq!(originals.len(), 1, "{replies:?}");
    for reply in &replies {
        match reply.status {
            409 => assert!(reply.header("retry-after").is_some()),
            201 => assert_eq!(reply.body, originals[0].body),
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    assert_eq!(payments::count(&pool, &table, &key).await, 1, "paid once");
}

/// The plain layer (no `Claim`) stores the response after the handler's COMMIT. A crash
/// between the two leaves the payment made and the record in flight: once the lease ends, the
/// retry runs the handler again and pays twice. This is the window `Claim` closes (compare
/// `sqlx_crash_after_commit_replays_at_once`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layer_crash_after_commit_pays_twice() {
    let Some((pool, table)) = setup("plain_after_commit").await else {
        return;
    };
    let key = unique_key("plain-after-commit");
    let crashing = child("sqlx", "crash_after_commit", 1000, &table);
    assert!(post(crashing.addr, "/plain", &key).await.is_none());
    assert_crashed(crashing);
    assert_eq!(payments::count(&pool, &table, &key).await, 1);

    let fresh = child("sqlx", "commit", 1000, &table);
    let retry = retry_past_the_lease(fresh.addr, "/plain", &key).await;
    assert_eq!(retry.status, 201);
    assert!(!retry.replayed(), "nothing was stored to replay");
    assert_eq!(
        payments::count(&pool, &table, &key).await,
        2,
        "without Claim, a crash after COMMIT pays twice"
    );
}

/// The plain layer and a crash before COMMIT: nothing happened, the retry runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_layer_crash_before_commit_runs_once() {
    crash_before_commit_runs_once("sqlx", "/plain").await;
}
