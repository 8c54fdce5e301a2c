//! `RedisStore` as operations meet it, on one Redis server of the test's own
//! (from `REDIS_SERVER_BIN`, on a free loopback port, stopped when the test ends). Requests go
//! through the layer on a real axum server on loopback (hyper client), and handler runs are
//! counted exactly.
//!
//! Tests that depend on timing say so in their doc comment ("TIMING").
//!
//! Run: `scripts/test-services cargo test --all-features --test redis_ops`

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::cluster::{Node, node_command};
use support::*;
use tower_idempotency::{
    Fingerprint, IdempotencyLayer, IdempotencyStore, Operator, RecordKey, RedisStore,
    StoreErrorKind, TenantId,
};

fn bin(test: &str) -> Option<String> {
    server_url("REDIS_SERVER_BIN", test)
}

/// A Redis server of the test's own, started with `flags`, the store on it, and the payments
/// API behind the layer (its handler working `work`, the layer as `configure` makes it) on a
/// real server; `None` without a `redis-server` binary (the test is skipped).
struct Setup {
    node: Node,
    store: RedisStore,
    runs: Runs,
    served: std::sync::Arc<Served>,
}

async fn setup(
    test: &str,
    flags: &[&str],
    work: Duration,
    configure: impl FnOnce(IdempotencyLayer<RedisStore>) -> IdempotencyLayer<RedisStore>,
) -> Option<Setup> {
    let bin = bin(test)?;
    let node = Node::start(&bin, flags);
    let store = RedisStore::connect(&node.url()).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, work, configure);
    let served = std::sync::Arc::new(serve(app).await);
    Some(Setup {
        node,
        store,
        runs,
        served,
    })
}

/// The Redis key of the fleet client's `key` under the default prefix.
fn redis_key(store: &RedisStore, key: &str) -> String {
    let record = Operator::new(store.clone())
        .record_key(client_tenant(), key)
        .unwrap();
    format!("idempotency:{{{}:{}}}", record.tenant(), record.key())
}

async fn cmd(url: &str, args: &[&str]) -> String {
    node_command(url, args).await.unwrap()
}

/// Fills the server with junk until a write is refused (OOM) or `max` values were written.
/// Answers how many were written.
async fn fill(url: &str, prefix: &str, max: usize) -> (usize, Option<String>) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let junk = vec![b'x'; 16 * 1024];
    for i in 0..max {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("{prefix}:{i}"))
            .arg(&junk)
            .query_async(&mut conn)
            .await;
        if let Err(err) = r {
            return (i, Some(err.to_string()));
        }
    }
    (max, None)
}

// ---------------------------------------------------------------------------------------------
// Scripts after SCRIPT FLUSH and restart
// ---------------------------------------------------------------------------------------------

/// `SCRIPT FLUSH` between requests and while a handler runs (its `complete` then meets
/// `NOSCRIPT`): every request succeeds at once, the replay is exact, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn script_flush_before_and_during_a_request_changes_nothing() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup("script_flush", &[], Duration::from_millis(600), |l| l).await
    else {
        return;
    };

    let first = served.send(payment("flush-1", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    cmd(&node.url(), &["SCRIPT", "FLUSH"]).await;
    // The first request after the flush: begin meets NOSCRIPT, replays.
    served
        .send(payment("flush-1", "{}"))
        .await
        .assert_replay_of(&first);
    // A new key after the flush.
    cmd(&node.url(), &["SCRIPT", "FLUSH"]).await;
    let second = served.send(payment("flush-2", "{}")).await;
    assert_eq!(second.status, StatusCode::CREATED);
    // Flush while a handler runs: its complete (and renewals) meet NOSCRIPT.
    let pending = {
        let req = payment("flush-3", "{}");
        let served = std::sync::Arc::new(served);
        let s2 = served.clone();
        let h = tokio::spawn(async move { s2.send(req).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        cmd(&node.url(), &["SCRIPT", "FLUSH"]).await;
        let r = h.await.unwrap();
        (r, served)
    };
    let (third, served) = pending;
    assert_eq!(third.status, StatusCode::CREATED);
    cmd(&node.url(), &["SCRIPT", "FLUSH"]).await;
    served
        .send(payment("flush-3", "{}"))
        .await
        .assert_replay_of(&third);
    assert_eq!(runs.get(), 3);
}

/// TIMING. Redis restarted (no persistence, so records are gone): once the server has been
/// back for 3 s, the first request is served: the call that finds the connection dead runs
/// again on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_request_after_a_restart_when_the_server_is_long_back() {
    let Some(bin) = bin("restart_first") else {
        return;
    };
    let mut node = Node::start(&bin, &[]);
    let store = RedisStore::connect(&node.url()).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let served = serve(app).await;
    assert_eq!(
        served.send(payment("r-1", "{}")).await.status,
        StatusCode::CREATED
    );
    node.kill();
    node.restart();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = served.send(payment("r-2", "{}")).await;
    eprintln!(
        "first request after restart: {} {:?}",
        first.status, first.body
    );
    assert_eq!(
        first.status,
        StatusCode::CREATED,
        "the first request after Redis has been back for 3 s is served"
    );
}

/// TIMING. Server-side idle timeout (`timeout 1`, as managed Redis, proxies and NAT do with
/// idle connections): the store's one connection is closed while nobody uses it; the next
/// request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_request_after_an_idle_connection_was_closed_by_the_server() {
    let Some(Setup {
        node: _node,
        store: _,
        runs,
        served,
    }) = setup("idle_timeout", &["--timeout", "1"], Duration::ZERO, |l| l).await
    else {
        return;
    };
    assert_eq!(
        served.send(payment("idle-1", "{}")).await.status,
        StatusCode::CREATED
    );
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let next = served.send(payment("idle-2", "{}")).await;
    eprintln!("after idle: {} {:?}", next.status, next.body);
    assert_eq!(
        next.status,
        StatusCode::CREATED,
        "a request after an idle period is served"
    );
    assert_eq!(runs.get(), 2);
}

/// TIMING. The same idle timeout, met by a handler that runs longer than it (no other traffic,
/// lease renewals further apart than the idle timeout): the `complete` is the first call on the
/// connection the server closed. The response is stored, and the retry after the lease
/// replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_longer_than_the_idle_timeout_is_stored_and_never_runs_twice() {
    let Some(bin) = bin("idle_complete") else {
        return;
    };
    let node = Node::start(&bin, &["--timeout", "1"]);
    let store = RedisStore::connect(&node.url()).await.unwrap();
    let runs = Runs::default();
    // Handler 3 s; lease 12 s (renewed every 4 s: never during the handler).
    let app = server(store.clone(), &runs, Duration::from_millis(3000), |l| {
        l.lease(Duration::from_secs(12))
    });
    let served = serve(app).await;
    let first = served.send(payment("idle-long", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let right_after = served.send(payment("idle-long", "{}")).await;
    eprintln!(
        "retry right after: {} replayed={} {:?}",
        right_after.status,
        right_after.replayed(),
        right_after.body
    );
    // Past the lease: a record left in flight has expired by now.
    tokio::time::sleep(Duration::from_secs(13)).await;
    // The retry itself may meet the (again) idle-closed connection: retry past 503s.
    let mut retry = served.send(payment("idle-long", "{}")).await;
    for _ in 0..5 {
        if retry.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        retry = served.send(payment("idle-long", "{}")).await;
    }
    eprintln!(
        "retry after the lease: {} replayed={}",
        retry.status,
        retry.replayed()
    );
    assert_eq!(runs.get(), 1, "the handler ran once");
    retry.assert_replay_of(&first);
}

/// TIMING. `CLIENT KILL` of the store's connection while a handler runs (a proxy reset, a
/// failover of a managed Redis endpoint): the handler's `complete` is the first call on the dead
/// connection. It is stored, and the retry replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_kill_during_a_handler_loses_neither_the_response_nor_runs_twice() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup("client_kill", &[], Duration::from_millis(800), |l| {
        l.lease(Duration::from_secs(3))
    })
    .await
    else {
        return;
    };
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("killed-conn", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = cmd(
        &node.url(),
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    )
    .await;
    eprintln!("killed {killed} connections");
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let retry = served.send(payment("killed-conn", "{}")).await;
    eprintln!("retry: {} replayed={}", retry.status, retry.replayed());
    assert_eq!(runs.get(), 1, "the handler ran once");
    retry.assert_replay_of(&first);
}

/// `CLIENT KILL` between requests, with traffic: no request fails (each call that finds the
/// connection dead runs again on a new one), and nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_kill_between_requests_recovers_by_itself() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup("client_kill_between", &[], Duration::ZERO, |l| l).await
    else {
        return;
    };
    assert_eq!(
        served.send(payment("ck-0", "{}")).await.status,
        StatusCode::CREATED
    );
    cmd(
        &node.url(),
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    )
    .await;
    let mut failures = 0;
    let mut created = 0;
    for i in 1..=20 {
        let r = served.send(payment(&format!("ck-{i}"), "{}")).await;
        match r.status {
            StatusCode::CREATED => created += 1,
            _ => {
                r.assert_store_unavailable();
                failures += 1
            }
        }
    }
    eprintln!("after CLIENT KILL: {failures} failed, {created} served");
    assert_eq!(runs.get(), 1 + created);
    assert!(
        failures <= 1,
        "only the call that met the dead connection fails"
    );
    assert_eq!(failures, 0, "no request fails when the server is up");
}

// ---------------------------------------------------------------------------------------------
// FLUSHALL while a request is in flight
// ---------------------------------------------------------------------------------------------

/// `FLUSHALL` while a handler runs: the record vanishes, the handler ends, its `complete` finds
/// no record (fenced: LeaseLost). The first client gets its 201. A retry: the record is gone,
/// so it runs again (runs == 2). Documented here as behaviour; the alternative (complete writing
/// the record back when the key is absent) would make the retry a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flushall_while_in_flight_then_retry() {
    let Some(bin) = bin("flushall") else { return };
    let node = Node::start(&bin, &[]);
    let store = RedisStore::connect(&node.url()).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::from_millis(800), |l| l);
    let served = std::sync::Arc::new(serve(app).await);
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("flushed", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cmd(&node.url(), &["FLUSHALL"]).await;
    // While it is still running, a duplicate arrives: the record is gone.
    let dup = served.send(payment("flushed", "{}")).await;
    eprintln!("duplicate during the run after FLUSHALL: {}", dup.status);
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = served.send(payment("flushed", "{}")).await;
    eprintln!(
        "retry after FLUSHALL: {} replayed={} runs={}",
        retry.status,
        retry.replayed(),
        runs.get()
    );
    // Inherent data loss: record what happens (the duplicate ran concurrently, the retry ran
    // again since the completion was refused by the fence).
    assert!(runs.get() >= 2);
}

// ---------------------------------------------------------------------------------------------
// maxmemory and eviction
// ---------------------------------------------------------------------------------------------

/// `allkeys-lru`: completed records are evicted under memory pressure and their retries run
/// again: the hazard README and `RedisStore`'s "Operating Redis" warn about.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allkeys_lru_evicts_completed_records_and_retries_run_again() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup(
        "allkeys_lru",
        &["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"],
        Duration::ZERO,
        |l| l,
    )
    .await
    else {
        return;
    };
    for i in 0..20 {
        assert_eq!(
            served.send(payment(&format!("lru-{i}"), "{}")).await.status,
            StatusCode::CREATED
        );
    }
    let (n, err) = fill(&node.url(), "junk", 2000).await;
    eprintln!("filled {n} junk values, err {err:?}");
    for i in 0..20 {
        served.send(payment(&format!("lru-{i}"), "{}")).await;
    }
    eprintln!("allkeys-lru: runs {} for 20 keys sent twice", runs.get());
    assert!(runs.get() > 20, "some records were evicted and ran again");
}

/// `noeviction`, a Redis that is full: a new key gets `503` and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn noeviction_full_redis_answers_503_for_a_new_key() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup(
        "noeviction_begin",
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
        Duration::ZERO,
        |l| l,
    )
    .await
    else {
        return;
    };
    let done = served.send(payment("full-old", "{}")).await;
    assert_eq!(done.status, StatusCode::CREATED);
    // Full: maxmemory below what is used (deterministic, unlike filling to the edge).
    cmd(&node.url(), &["CONFIG", "SET", "maxmemory", "1"]).await;
    let (_, err) = fill(&node.url(), "junk", 1).await;
    assert!(err.unwrap().contains("OOM"));
    let r = served.send(payment("full-new", "{}")).await;
    r.assert_store_unavailable();
    // The old record still replays.
    served
        .send(payment("full-old", "{}"))
        .await
        .assert_replay_of(&done);
    assert_eq!(runs.get(), 1);
}

/// `noeviction`: Redis becomes full while a handler runs, and its `complete` (a `SET`) is
/// refused with OOM. The client gets its 201; the record is kept in flight (`PEXPIRE` needs no
/// memory), so retries get 409 past the lease, never a second run, and once memory is back the
/// completion tried again in the background stores the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn noeviction_full_during_a_handler_never_runs_twice() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup(
        "noeviction_complete",
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
        Duration::from_millis(1500),
        |l| l.lease(Duration::from_secs(2)),
    )
    .await
    else {
        return;
    };
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("oom-complete", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cmd(&node.url(), &["CONFIG", "SET", "maxmemory", "1"]).await;
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let during = served.send(payment("oom-complete", "{}")).await;
    eprintln!(
        "retry during the lease: {} replayed={}",
        during.status,
        during.replayed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The operator frees memory (or keys expired): Redis accepts writes again.
    cmd(&node.url(), &["CONFIG", "SET", "maxmemory", "0"]).await;
    let after = served.send(payment("oom-complete", "{}")).await;
    eprintln!(
        "retry after the lease: {} replayed={} runs={}",
        after.status,
        after.replayed(),
        runs.get()
    );
    assert_eq!(runs.get(), 1, "the handler never runs twice");
    let replayed = eventually(Duration::from_secs(15), async || {
        served.send(payment("oom-complete", "{}")).await.replayed()
    })
    .await;
    assert!(replayed, "the completion tried again stores the response");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// Connection loss mid-call, renewals failing during a long handler
// ---------------------------------------------------------------------------------------------

/// TIMING. Redis frozen (SIGSTOP) for longer than the lease while a handler runs: the renewals
/// time out and the lease lapses on the server's clock. As documented ("renewals keep failing
/// past the lease"), the first client still gets its response, and the retry gets an answer
/// (a replay, or a second run: at most two).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigstop_longer_than_the_lease_during_a_handler() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup("sigstop_lease", &[], Duration::from_millis(3500), |l| {
        l.lease(Duration::from_millis(1500))
            .store_timeout(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("frozen-lease", "{}")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.signal("STOP");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    node.signal("CONT");
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = served.send(payment("frozen-lease", "{}")).await;
    eprintln!(
        "retry: {} replayed={} runs={}",
        retry.status,
        retry.replayed(),
        runs.get()
    );
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(runs.get() <= 2);
}

/// TIMING. A short freeze (SIGSTOP well under the lease) during a long handler: the renewals
/// that time out are not fatal, the response is stored, the retry replays, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_sigstop_during_a_handler_is_harmless() {
    let Some(Setup {
        node,
        store: _,
        runs,
        served,
    }) = setup("sigstop_short", &[], Duration::from_millis(3000), |l| {
        l.lease(Duration::from_secs(3))
            .store_timeout(Duration::from_millis(300))
    })
    .await
    else {
        return;
    };
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("frozen-short", "{}")).await });
    tokio::time::sleep(Duration::from_millis(900)).await;
    node.signal("STOP");
    // A duplicate during the freeze: 503 at once-ish.
    let t = Instant::now();
    let dup = served.send(payment("frozen-short", "{}")).await;
    dup.assert_store_unavailable();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    node.signal("CONT");
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = eventually(Duration::from_secs(5), async || {
        let r = served.send(payment("frozen-short", "{}")).await;
        r.status == StatusCode::CREATED && r.replayed()
    })
    .await;
    assert!(retry, "the retry replays");
    assert_eq!(runs.get(), 1);
}

// ---------------------------------------------------------------------------------------------
// connect: URLs, auth, TLS, database number
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_errors_are_clear_and_never_panic() {
    let Some(bin) = bin("connect_errors") else {
        return;
    };
    let node = Node::start(&bin, &["--requirepass", "s3cret-pass"]);
    let port = node.port;
    let cases: Vec<(String, Option<StoreErrorKind>)> = vec![
        ("".into(), Some(StoreErrorKind::Other)),
        ("http://127.0.0.1:6379".into(), Some(StoreErrorKind::Other)),
        ("redis://".into(), None),
        (
            "redis://127.0.0.1:99999".into(),
            Some(StoreErrorKind::Other),
        ),
        (
            format!("rediss://127.0.0.1:{port}"),
            Some(StoreErrorKind::Other),
        ),
        (format!("redis://127.0.0.1:{port}"), None),
        (format!("redis://:wrong@127.0.0.1:{port}"), None),
        (format!("redis://:s3cret-pass@127.0.0.1:{port}/99"), None),
        (
            format!("redis://:s3cret-pass@127.0.0.1:{port}/notanumber"),
            None,
        ),
        ("unix:///nonexistent/redis.sock".into(), None),
    ];
    for (url, want) in cases {
        let t = Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(10), RedisStore::connect(&url)).await;
        match res {
            Err(_) => panic!("connect({url:?}) hung for 10 s"),
            Ok(Ok(_)) => eprintln!("connect({url:?}) -> Ok"),
            Ok(Err(err)) => {
                let text = err.to_string();
                eprintln!(
                    "connect({url:?}) -> {:?} in {:?}: {text}",
                    err.kind(),
                    t.elapsed()
                );
                assert!(
                    !text.contains("s3cret-pass"),
                    "no password in the error: {text}"
                );
                assert!(
                    !format!("{err:?}").contains("s3cret-pass"),
                    "no password in Debug"
                );
                if let Some(want) = want {
                    assert_eq!(err.kind(), want, "{url}: {text}");
                }
            }
        }
    }
    let ok = RedisStore::connect(&format!("redis://:s3cret-pass@127.0.0.1:{port}")).await;
    assert!(ok.is_ok());
    let dbg = format!("{:?}", ok.unwrap());
    assert!(!dbg.contains("s3cret-pass"), "{dbg}");
}

/// Errors of `connect_cluster`: empty list, bad URLs, unreachable nodes, a one-node (not
/// cluster) server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_cluster_errors_are_clear_and_never_panic() {
    let Some(bin) = bin("connect_cluster_errors") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let cases: Vec<Vec<String>> = vec![
        vec![],
        vec!["".into()],
        vec!["not a url".into()],
        vec!["redis://127.0.0.1:1".into()],
        vec![format!("rediss://127.0.0.1:{}", node.port)],
        vec![node.url()],
        vec![format!("{}/3", node.url())],
    ];
    for nodes in cases {
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            RedisStore::connect_cluster(nodes.clone()),
        )
        .await;
        match res {
            Err(_) => panic!("connect_cluster({nodes:?}) hung"),
            Ok(Ok(store)) => {
                eprintln!("connect_cluster({nodes:?}) -> Ok");
                // A store over a non-cluster server: what does a call say?
                let key = RecordKey::new(TenantId::shared(), "x");
                let r = store
                    .begin(
                        &key,
                        &Fingerprint::from_bytes([1; 32]),
                        Duration::from_secs(5),
                    )
                    .await;
                eprintln!("   begin -> {r:?}");
            }
            Ok(Err(err)) => eprintln!("connect_cluster({nodes:?}) -> {:?}: {err}", err.kind()),
        }
    }
}

/// A database number in the URL: records go to that database, and still do after the store
/// reconnected (CLIENT KILL); a password is sent again on reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_number_and_auth_survive_a_reconnect() {
    let Some(bin) = bin("db_number") else { return };
    let node = Node::start(&bin, &["--requirepass", "pw"]);
    let url = format!("redis://:pw@127.0.0.1:{}/5", node.port);
    let store = RedisStore::connect(&url).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let served = serve(app).await;
    assert_eq!(
        served.send(payment("db-1", "{}")).await.status,
        StatusCode::CREATED
    );
    let admin = format!("redis://:pw@127.0.0.1:{}", node.port);
    cmd(
        &admin,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    )
    .await;
    let ok = eventually(Duration::from_secs(5), async || {
        served.send(payment("db-2", "{}")).await.status == StatusCode::CREATED
    })
    .await;
    assert!(ok, "reconnected (with the password)");
    let k1 = redis_key(&store, "db-1");
    let k2 = redis_key(&store, "db-2");
    let db5 = format!("redis://:pw@127.0.0.1:{}/5", node.port);
    for (k, db) in [(&k1, &db5), (&k2, &db5)] {
        assert_eq!(cmd(db, &["EXISTS", k]).await, "1", "{k} in db 5");
        assert_eq!(cmd(&admin, &["EXISTS", k]).await, "0", "{k} not in db 0");
    }
    assert_eq!(runs.get(), 2);
}

/// Prefixes: braces refused (panic with a clear message), an empty prefix works; a key with
/// braces and percent signs is one Redis key, replayed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefixes_and_brace_keys_on_one_node() {
    let Some(bin) = bin("prefix") else { return };
    let node = Node::start(&bin, &[]);
    let panicked = std::panic::catch_unwind(|| {
        let _ = RedisStore::builder().prefix("a{b}");
        // The check is when the store is made.
    });
    assert!(
        panicked.is_ok(),
        "setting the prefix does not panic by itself"
    );
    let store = RedisStore::builder()
        .prefix("")
        .connect(&node.url())
        .await
        .unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let served = serve(app).await;
    for key in ["{a}", "a}b{", "%7D", "}", "{}", "{{{"] {
        let first = served.send(payment(key, "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}");
        served
            .send(payment(key, "{}"))
            .await
            .assert_replay_of(&first);
    }
    assert_eq!(runs.get(), 6);
    let keys = cmd(&node.url(), &["KEYS", "*"]).await;
    eprintln!("keys:\n{keys}");
    assert_eq!(keys.lines().count(), 6);
}

/// A Redis full under `noeviction` (OOM) is a full store, as a `MemoryStore` full of in-flight
/// records is (`CapacityExceeded`): with `fail_open(true)`, a new key must still get `503`, so
/// that a flood that fills Redis does not turn protection off for everyone (the layer's
/// `fail_open` docs). The OOM error is mapped to `Unavailable` instead, and the request runs
/// unprotected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_redis_is_a_full_store_even_failing_open() {
    let Some(Setup {
        node,
        store,
        runs,
        served,
    }) = setup(
        "oom_fail_open",
        &["--maxmemory-policy", "noeviction"],
        Duration::ZERO,
        |l| l.fail_open(true),
    )
    .await
    else {
        return;
    };
    cmd(&node.url(), &["CONFIG", "SET", "maxmemory", "1"]).await;
    let r = served.send(payment("oom-open", "{}")).await;
    eprintln!(
        "full Redis, fail_open: {} bypassed={:?}",
        r.status,
        r.header("idempotency-bypassed")
    );
    // What the store itself says.
    let key = RecordKey::new(TenantId::shared(), "direct");
    let err = store
        .begin(
            &key,
            &Fingerprint::from_bytes([1; 32]),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    eprintln!("begin on a full Redis: {:?}: {err}", err.kind());
    assert_eq!(err.kind(), StoreErrorKind::CapacityExceeded);
    r.assert_store_unavailable();
    assert_eq!(runs.get(), 0, "nothing ran unprotected");
}

/// TIMING. The same `CLIENT KILL` during a handler, with the connection on RESP3
/// (`?protocol=resp3`), where the `redis` crate's manager is told of the disconnect and
/// reconnects before the next call: the complete gets through, and the retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_kill_during_a_handler_on_resp3() {
    let Some(bin) = bin("client_kill_resp3") else {
        return;
    };
    let node = Node::start(&bin, &[]);
    let store = RedisStore::connect(&format!("{}?protocol=resp3", node.url()))
        .await
        .unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::from_millis(800), |l| {
        l.lease(Duration::from_secs(3))
    });
    let served = std::sync::Arc::new(serve(app).await);
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("killed-resp3", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cmd(
        &node.url(),
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    )
    .await;
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let retry = served.send(payment("killed-resp3", "{}")).await;
    eprintln!(
        "resp3 retry: {} replayed={} runs={}",
        retry.status,
        retry.replayed(),
        runs.get()
    );
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(runs.get(), 1);
}

/// `volatile-lru`: every record carries an expiry, so under memory pressure (junk without one)
/// the records are what Redis evicts, an in-flight one included: a duplicate then runs while the
/// first run goes on, the hazard README and `RedisStore`'s "Operating Redis" warn about.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn volatile_lru_evicts_an_in_flight_record_and_a_duplicate_runs_concurrently() {
    let Some(Setup {
        node,
        store,
        runs,
        served,
    }) = setup(
        "volatile_lru",
        &["--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru"],
        Duration::from_millis(1500),
        |l| l,
    )
    .await
    else {
        return;
    };
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment("volatile", "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (n, err) = fill(&node.url(), "junk", 2000).await;
    eprintln!("filled {n}, err {err:?}");
    let exists = cmd(&node.url(), &["EXISTS", &redis_key(&store, "volatile")]).await;
    // Room for the duplicate's record: at `maxmemory`, with nothing left to evict, Redis would
    // refuse its write as any other (`OOM`: `503`), however little memory it needs.
    cmd(
        &node.url(),
        &["DEL", "junk:0", "junk:1", "junk:2", "junk:3"],
    )
    .await;
    let dup = served.send(payment("volatile", "{}")).await;
    eprintln!(
        "record exists after the fill: {exists}; duplicate: {}",
        dup.status
    );
    let _ = pending.await.unwrap();
    assert_eq!(exists.trim(), "0", "the in-flight record was evicted");
    assert_eq!(dup.status, StatusCode::CREATED, "the duplicate ran");
    assert_eq!(runs.get(), 2);
}

/// TIMING. The store's reconnection fails with a server error rather than an I/O error (here:
/// the password was rotated on the server and rotated back, as an operator's mistake is
/// undone; a server still loading its dataset, or refusing `AUTH`, does the same). Once the
/// server accepts the store's credentials again, the store recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnect_that_failed_with_a_server_error_recovers_when_the_server_is_back() {
    let Some(bin) = bin("reconnect_auth") else {
        return;
    };
    let node = Node::start(&bin, &["--requirepass", "pw"]);
    let admin = format!("redis://:pw@127.0.0.1:{}", node.port);
    let store = RedisStore::connect(&admin).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let served = serve(app).await;
    assert_eq!(
        served.send(payment("auth-0", "{}")).await.status,
        StatusCode::CREATED
    );
    // Rotate the password, drop the store's connection: its reconnection is refused.
    let client = redis::Client::open(admin.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("other")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut conn)
        .await
        .unwrap();
    for i in 0..5 {
        let r = served.send(payment(&format!("auth-x{i}"), "{}")).await;
        eprintln!("while the password is wrong: {}", r.status);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Rotate it back.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("pw")
        .query_async(&mut conn)
        .await
        .unwrap();
    let t = Instant::now();
    let back = eventually(Duration::from_secs(20), async || {
        served.send(payment("auth-1", "{}")).await.status == StatusCode::CREATED
    })
    .await;
    eprintln!("recovered={back} after {:?}", t.elapsed());
    assert!(
        back,
        "the store recovers by itself once the server accepts it again"
    );
}

/// TIMING. As above, with the reconnection refused because Redis is at `maxclients` (a
/// connection storm, another service leaking connections), then room again: the store
/// recovers by itself. Run with and without a password (`AUTH` is the first command of a
/// connection that has one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnect_refused_at_maxclients_recovers_when_there_is_room() {
    let Some(bin) = bin("reconnect_maxclients") else {
        return;
    };
    let mut stuck = Vec::new();
    for password in [None, Some("pw")] {
        let args: Vec<&str> = match password {
            Some(p) => vec!["--requirepass", p],
            None => vec![],
        };
        let node = Node::start(&bin, &args);
        let url = match password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", node.port),
            None => node.url(),
        };
        let store = RedisStore::connect(&url).await.unwrap();
        let runs = Runs::default();
        let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
        let served = serve(app).await;
        assert_eq!(
            served.send(payment("mc-0", "{}")).await.status,
            StatusCode::CREATED
        );
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let set = async |conn: &mut redis::aio::MultiplexedConnection, n: &str| {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxclients")
                .arg(n)
                .query_async(conn)
                .await
                .unwrap();
        };
        set(&mut conn, "1").await;
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut conn)
            .await
            .unwrap();
        for i in 0..5 {
            let r = served.send(payment(&format!("mc-x{i}"), "{}")).await;
            eprintln!("{password:?} at maxclients: {}", r.status);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        set(&mut conn, "10000").await;
        let t = Instant::now();
        let back = eventually(Duration::from_secs(15), async || {
            served.send(payment("mc-1", "{}")).await.status == StatusCode::CREATED
        })
        .await;
        eprintln!("{password:?}: recovered={back} after {:?}", t.elapsed());
        if !back {
            stuck.push(password);
        }
    }
    assert!(stuck.is_empty(), "stuck for good: {stuck:?}");
}
