//! `RedisStore` on a Redis Cluster as operations meet it: a manual failover
//! (`CLUSTER FAILOVER` on a replica) under traffic, connections killed, keys with braces,
//! URLs with a database number. Clusters of the tests' own (`REDIS_SERVER_BIN`,
//! `REDIS_CLI_BIN`) or the shared one (`REDIS_CLUSTER_URLS`).
//!
//! Tests that depend on timing say so in their doc comment ("TIMING").

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use support::cluster::{Cluster, node_command, primaries, primary_of, shared_cluster};
use support::*;
use tower_idempotency::{Operator, RedisStore};

fn redis_key(store: &RedisStore, key: &str) -> String {
    let record = Operator::new(store.clone())
        .record_key(client_tenant(), key)
        .unwrap();
    // As documented: `%` and `}` in the key percent-encoded.
    let escaped = record.key().replace('%', "%25").replace('}', "%7D");
    format!("idempotency:{{{}:{escaped}}}", record.tenant())
}

/// The replica (port) of the primary at `primary`, among `urls`.
async fn replica_of(urls: &[String], primary: u16) -> Option<u16> {
    for url in urls {
        let Ok(info) = node_command(url, &["INFO", "REPLICATION"]).await else {
            continue;
        };
        if info.contains("role:slave") && info.contains(&format!("master_port:{primary}")) {
            return Some(support::cluster::port_of(url));
        }
    }
    None
}

/// TIMING. `CLUSTER FAILOVER` (a graceful, manual failover: no acknowledged write is lost) on
/// the replica of a primary, while 4 servers' worth of clients send keys whose handlers take
/// 300 ms and retry each key until it is answered. Every key runs exactly once; every retry
/// after the answer is an exact replay; answers are 201, 409 or 503 only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_failover_under_traffic_runs_each_key_once() {
    let Some(cluster) = Cluster::start("manual_failover", 3, 1).await else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::from_millis(300), |l| {
        l.store_timeout(Duration::from_secs(2))
    });
    let served = Arc::new(serve(app).await);

    let keys: Vec<String> = (0..60).map(|i| format!("mf-{i}")).collect();
    // The primary of the first key fails over.
    let victim = primary_of(&urls[0], &redis_key(&store, &keys[0])).await;
    let replica = replica_of(&urls, victim).await.expect("a replica");
    let on_victim = {
        let mut n = 0;
        for k in &keys {
            if primary_of(&urls[0], &redis_key(&store, k)).await == victim {
                n += 1;
            }
        }
        n
    };
    eprintln!("victim {victim}, replica {replica}, {on_victim} keys on it");

    let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, key) in keys.iter().cloned().enumerate() {
        let served = served.clone();
        let statuses = statuses.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            // Two concurrent copies of the request, then retries until an answer.
            let dup = {
                let s = served.clone();
                let k = key.clone();
                tokio::spawn(async move { s.send(payment(&k, "{}")).await })
            };
            let mut answer = None;
            for _ in 0..100 {
                let r = served.send(payment(&key, "{}")).await;
                statuses.lock().unwrap().push(r.status);
                if r.status == StatusCode::CREATED {
                    answer = Some(r);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let d = dup.await.unwrap();
            statuses.lock().unwrap().push(d.status);
            (key, answer.expect("answered within 10 s"))
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let replica_url = format!("redis://127.0.0.1:{replica}");
    let out = node_command(&replica_url, &["CLUSTER", "FAILOVER"]).await;
    eprintln!("CLUSTER FAILOVER -> {out:?}");
    // The failover ends on its own time: the replica catches up with its primary, then the
    // primaries vote. A manual failover that did not end within its own timeout (5 s, on a
    // loaded machine) did nothing, and is asked for again.
    let took_over = async || primaries(&urls).await.contains(&replica);
    let mut promoted = eventually(Duration::from_secs(10), took_over).await;
    if !promoted {
        let out = node_command(&replica_url, &["CLUSTER", "FAILOVER"]).await;
        eprintln!("CLUSTER FAILOVER again -> {out:?}");
        promoted = eventually(Duration::from_secs(20), took_over).await;
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    eprintln!("primaries after: {:?}", primaries(&urls).await);
    assert!(promoted, "the replica took over");
    for (key, answer) in &answers {
        let mut retry = served.send(payment(key, "{}")).await;
        for _ in 0..50 {
            if retry.status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            retry = served.send(payment(key, "{}")).await;
        }
        if answer.replayed() {
            assert_eq!(retry.body, answer.body, "{key}");
        } else {
            retry.assert_replay_of(answer);
        }
    }
    let statuses = statuses.lock().unwrap().clone();
    let distinct: HashSet<_> = statuses.iter().copied().collect();
    eprintln!("statuses seen: {distinct:?}; runs {}", runs.get());
    for s in &distinct {
        assert!(
            [
                StatusCode::CREATED,
                StatusCode::CONFLICT,
                StatusCode::SERVICE_UNAVAILABLE
            ]
            .contains(s),
            "{s}"
        );
    }
    assert_eq!(runs.get(), keys.len(), "each key ran exactly once");
}

/// TIMING. `CLIENT KILL` on every node of the cluster while a handler runs: its `complete` meets
/// dead connections. On the cluster the client retries and reconnects: stored, replayed, once.
/// On a cluster of its own: the kill ends every client's connections, the other tests' too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_client_kill_during_a_handler_runs_once() {
    let Some(cluster) = Cluster::start("cluster_client_kill", 3, 0).await else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::from_millis(800), |l| {
        l.lease(Duration::from_secs(3))
    });
    let served = Arc::new(serve(app).await);
    let key = unique_key("cluster-kill");
    let s = served.clone();
    let k = key.clone();
    let pending = tokio::spawn(async move { s.send(payment(&k, "{}")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for url in &urls {
        let _ = node_command(url, &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).await;
    }
    let first = pending.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let retry = served.send(payment(&key, "{}")).await;
    eprintln!("retry: {} replayed={}", retry.status, retry.replayed());
    assert_eq!(runs.get(), 1);
    retry.assert_replay_of(&first);

    // Between requests: no 503 after the connections died.
    for url in &urls {
        let _ = node_command(url, &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]).await;
    }
    let next = served.send(payment(&unique_key("after-kill"), "{}")).await;
    eprintln!("after kill: {}", next.status);
    assert_eq!(next.status, StatusCode::CREATED);
}

/// Keys with braces, of many tenants, on the cluster: each record is one Redis key whose hash
/// tag is the whole (tenant, key), so the records spread over the primaries (no key pins
/// others to one slot) and each replays exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brace_keys_spread_and_replay_on_the_cluster() {
    let Some(urls) = shared_cluster("brace_keys_cluster") else {
        return;
    };
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);
    let served = serve(app).await;
    let tag = unique_key("pin");
    let mut owners = HashSet::new();
    let mut slots = HashSet::new();
    for i in 0..30 {
        let key = format!("{{{tag}}}-{i}}}{{");
        let first = served.send(payment(&key, "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{key}");
        served
            .send(payment(&key, "{}"))
            .await
            .assert_replay_of(&first);
        let rk = redis_key(&store, &key);
        let exists = node_command(
            &format!("redis://127.0.0.1:{}", primary_of(&urls[0], &rk).await),
            &["EXISTS", &rk],
        )
        .await
        .unwrap();
        assert_eq!(exists, "1", "the record is the one key {rk}");
        let slot = node_command(&urls[0], &["CLUSTER", "KEYSLOT", &rk])
            .await
            .unwrap();
        slots.insert(slot);
        owners.insert(primary_of(&urls[0], &rk).await);
    }
    eprintln!("{} slots, {} primaries", slots.len(), owners.len());
    assert_eq!(runs.get(), 30);
    assert!(
        owners.len() >= 2,
        "records with a shared brace group spread"
    );
}

/// `connect_cluster` with a database number in a URL (Redis Cluster has only database 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_url_with_a_database_number() {
    let Some(urls) = shared_cluster("cluster_db") else {
        return;
    };
    let with_db: Vec<String> = urls.iter().map(|u| format!("{u}/3")).collect();
    // Either a clear error at once, or a store that works (the number ignored): never a panic,
    // never a store that fails every request.
    match RedisStore::connect_cluster(&with_db).await {
        Ok(store) => {
            let runs = Runs::default();
            let app = server(store, &runs, Duration::ZERO, |l| l);
            let r = send(&app, payment(&unique_key("db3"), "{}")).await;
            assert_eq!(r.status, StatusCode::CREATED);
            assert_eq!(runs.get(), 1);
        }
        Err(err) => assert!(!err.to_string().is_empty(), "{err:?}"),
    }
}

/// TIMING. With `replica_wait(1, ..)`, a primary is killed while a handler for one of its keys
/// runs. The in-flight record is on the replica (the wait saw to that); the handler ends during
/// the failover and its `complete` fails (the primary is dead). The replica is promoted with
/// the record in flight, and the completion, tried again in the background, stores the response
/// on the new primary: the client's retry gets the replay, and the handler ran once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_while_a_handler_runs_is_not_run_twice() {
    let Some(mut cluster) = Cluster::start("primary_killed_mid_handler", 3, 1).await else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(300))
        .connect_cluster(&urls)
        .await
        .unwrap();
    let runs = Runs::default();
    // A lease long enough for a slow failover: the record must still be in flight when the
    // replica takes over, or the test would see the lapsed lease's `503`s instead of `409`.
    let app = server(store.clone(), &runs, Duration::from_millis(1500), |l| {
        l.lease(Duration::from_secs(20))
    });
    let served = Arc::new(serve(app).await);
    let key = "mid-handler-0";
    let victim = primary_of(&urls[0], &redis_key(&store, key)).await;
    // Warm up: the replicas keep up within the wait.
    let warm = eventually(Duration::from_secs(30), async || {
        served.send(payment(&unique_key("warm"), "{}")).await.status == StatusCode::CREATED
    })
    .await;
    assert!(warm);
    let runs_before = runs.get();
    let s = served.clone();
    let pending = tokio::spawn(async move { s.send(payment(key, "{}")).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.node(victim).kill();
    let first = pending.await.unwrap();
    eprintln!("first: {}", first.status);
    assert_eq!(first.status, StatusCode::CREATED);
    // The replica took over (its slots answer 409: the record is in flight there). With the
    // replica wait, the new primary needs a replica for any new write: the operator brings the
    // dead node back, and it rejoins as the new primary's replica.
    // Or, on a machine slow to poll, the completion tried again in the background has already
    // reached the new primary (its write applied though no replica could confirm it): then the
    // retry is the replay.
    let mut during = Vec::new();
    let mut replayed = None;
    let promoted = eventually(Duration::from_secs(30), async || {
        let reply = served.send(payment(key, "{}")).await;
        during.push(reply.status.as_u16());
        let status = reply.status;
        if status == StatusCode::CREATED {
            replayed = Some(reply);
        }
        status == StatusCode::CONFLICT || status == StatusCode::CREATED
    })
    .await;
    during.dedup();
    assert!(
        promoted,
        "the replica took over with the record in flight (answers while failing over: {during:?})"
    );
    if let Some(reply) = replayed {
        eprintln!("answers while failing over: {during:?}");
        assert_eq!(runs.get() - runs_before, 1, "the handler ran once");
        reply.assert_replay_of(&first);
        return;
    }
    cluster.node(victim).restart();
    // Retry every 500 ms for 40 s, as a client would, until it is not a 503/409.
    let mut last = None;
    let mut seen = Vec::new();
    for _ in 0..80 {
        let r = served.send(payment(key, "{}")).await;
        seen.push(r.status.as_u16());
        if r.status == StatusCode::CREATED {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("retries saw {seen:?}; runs {}", runs.get() - runs_before);
    let last = last.expect("answered");
    assert_eq!(runs.get() - runs_before, 1, "the handler ran once");
    last.assert_replay_of(&first);
}

/// `connect_cluster` with an unreachable node listed first: the others are asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_cluster_skips_an_unreachable_node() {
    let Some(urls) = shared_cluster("cluster_unreachable_first") else {
        return;
    };
    let mut nodes = vec!["redis://127.0.0.1:1".to_owned()];
    nodes.extend(urls);
    let store = RedisStore::connect_cluster(&nodes).await.unwrap();
    let runs = Runs::default();
    let app = server(store, &runs, Duration::ZERO, |l| l);
    let r = send(&app, payment(&unique_key("skip"), "{}")).await;
    assert_eq!(r.status, StatusCode::CREATED);
}
