//! `RedisStore` through Redis Cluster failovers. Each test builds a cluster of its own
//! (three primaries, one replica each, from `REDIS_SERVER_BIN` and `REDIS_CLI_BIN`) and kills
//! or freezes its nodes, so that no other test sees it. Skipped without those variables.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::cluster::{Cluster, primary_of};
use support::*;
use tower_idempotency::{Operator, RedisStore};

/// The Redis key of `key` under the default prefix, as the fleet scenarios' client sends it
/// (the documented layout, `idempotency:{<tenant hex>:<key>}`; the keys here need no escaping).
fn redis_key(store: &RedisStore, key: &str) -> String {
    let record = Operator::new(store.clone())
        .record_key(client_tenant(), key)
        .unwrap();
    format!("idempotency:{{{}:{}}}", record.tenant(), record.key())
}

/// A primary dies: requests for its slots get `503` within the store timeout and run nothing,
/// the other primaries keep serving, and once a replica took over, the same store (not
/// rebuilt) serves the dead primary's slots again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_503_then_recovery() {
    let Some(mut cluster) = Cluster::start("primary_killed_503_then_recovery", 3, 1).await else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::connect_cluster(&urls).await.unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(1000))
    });

    // Thirty keys over the three primaries; the one holding the first key dies.
    let keys: Vec<String> = (0..30).map(|i| format!("failover-{i}")).collect();
    let mut owners = Vec::new();
    for key in &keys {
        assert_eq!(
            send(&app, payment(key, "{}")).await.status,
            StatusCode::CREATED
        );
        owners.push(primary_of(&urls[0], &redis_key(&store, key)).await);
    }
    let victim = owners[0];
    let (on_victim, elsewhere): (Vec<_>, Vec<_>) = keys
        .iter()
        .zip(&owners)
        .partition(|(_, owner)| **owner == victim);
    assert!(!elsewhere.is_empty(), "keys spread over several primaries");
    // Without the replica wait a failover loses what the replica had not yet received: let it
    // catch up first, so that this test is about the outage, not about that loss.
    let victim_url = cluster.node(victim).url();
    let caught_up = eventually(Duration::from_secs(30), async || {
        let info = support::cluster::node_command(&victim_url, &["INFO", "REPLICATION"])
            .await
            .unwrap_or_default();
        replica_caught_up(&info)
    })
    .await;
    assert!(caught_up, "the victim's replica caught up");
    cluster.node(victim).kill();

    for (key, _) in &on_victim {
        let started = Instant::now();
        let reply = send(&app, payment(&format!("{key}-new"), "{}")).await;
        // A new key may hash elsewhere; one on the dead primary's slots is a 503.
        if reply.status != StatusCode::CREATED {
            reply.assert_store_unavailable();
            assert!(
                started.elapsed() < Duration::from_millis(2500),
                "{:?}",
                started.elapsed()
            );
        }
        let retry = send(&app, payment(key, "{}")).await;
        if !retry.replayed() {
            retry.assert_store_unavailable();
        }
    }
    for (key, _) in &elsewhere {
        let reply = send(&app, payment(key, "{}")).await;
        assert!(
            reply.replayed(),
            "the other primaries keep serving: {reply:?}"
        );
    }

    // The replica takes over; the store finds it by itself.
    let recovered = eventually(Duration::from_secs(30), async || {
        let reply = send(&app, payment(on_victim[0].0, "{}")).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            reply.assert_store_unavailable();
            return false;
        }
        true
    })
    .await;
    assert!(
        recovered,
        "the dead primary's slots are served again after the failover"
    );
    let runs_before = runs.get();
    for (key, _) in &on_victim {
        let reply = send(&app, payment(&format!("{key}-after"), "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    }
    assert_eq!(runs.get(), runs_before + on_victim.len());
}

/// With the replica wait on, a completed record is on the replica before the response
/// leaves: the primary dies right after, the replica takes over, and every retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_wait_keeps_completed_records_through_failover() {
    let Some(mut cluster) = Cluster::start(
        "replica_wait_keeps_completed_records_through_failover",
        3,
        1,
    )
    .await
    else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(400))
        .connect_cluster(&urls)
        .await
        .unwrap();
    let runs = Runs::default();
    let app = server(store.clone(), &runs, Duration::ZERO, |l| l);

    let victim = primary_of(&urls[0], &redis_key(&store, "wait-0")).await;
    // `wait-0` last: its primary is killed the moment its response is out, so only the
    // replica wait can have put it on the replica in time.
    let keys: Vec<String> = (0..30).rev().map(|i| format!("wait-{i}")).collect();
    let mut originals = Vec::new();
    for key in &keys {
        // A cluster just built may not replicate within the wait at first: such a request gets
        // 503 and runs nothing, and its retry runs once the replicas keep up.
        let mut reply = send(&app, payment(key, r#"{"amount":3}"#)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reply.status == StatusCode::SERVICE_UNAVAILABLE
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply = send(&app, payment(key, r#"{"amount":3}"#)).await;
        }
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        originals.push(reply);
    }
    cluster.node(victim).kill();
    let last = originals.last().unwrap();
    assert_eq!(runs.get(), keys.len());

    let replayed = eventually(Duration::from_secs(30), async || {
        let reply = send(&app, payment("wait-0", r#"{"amount":3}"#)).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            return false;
        }
        reply.assert_replay_of(last);
        true
    })
    .await;
    assert!(replayed, "the retry replays after the failover");
    for (key, original) in keys.iter().zip(&originals) {
        send(&app, payment(key, r#"{"amount":3}"#))
            .await
            .assert_replay_of(original);
    }
    assert_eq!(runs.get(), keys.len(), "no handler ran twice");
}

/// With the replica wait on and every replica frozen, a new key gets `503` and its handler
/// does not run; the key is left free, so once the replicas are back, the retry runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_wait_unmet_answers_503_without_running() {
    let Some(cluster) =
        Cluster::start("replica_wait_unmet_answers_503_without_running", 3, 1).await
    else {
        return;
    };
    let urls = cluster.urls();
    let store = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(100))
        .connect_cluster(&urls)
        .await
        .unwrap();
    let runs = Runs::default();
    let app = server(store, &runs, Duration::ZERO, |l| l);
    let primaries = support::cluster::primaries(&urls).await;
    let replicas: Vec<_> = cluster
        .nodes
        .iter()
        .filter(|n| !primaries.contains(&n.port))
        .collect();
    assert_eq!(replicas.len(), 3);

    for replica in &replicas {
        replica.signal("STOP");
    }
    for i in 0..5 {
        let reply = send(&app, payment(&format!("frozen-{i}"), "{}")).await;
        reply.assert_store_unavailable();
    }
    assert_eq!(
        runs.get(),
        0,
        "no handler ran without its record replicated"
    );
    for replica in &replicas {
        replica.signal("CONT");
    }
    let back = eventually(Duration::from_secs(30), async || {
        let reply = send(&app, payment("frozen-0", "{}")).await;
        assert_ne!(
            reply.status,
            StatusCode::CONFLICT,
            "the key was left in flight"
        );
        reply.status == StatusCode::CREATED
    })
    .await;
    assert!(
        back,
        "once the replicas are back, the key runs: it was not left in flight"
    );
    // The replicas may take a moment more to catch up: a key still refused is refused with
    // 503, never left in flight, and runs once they have.
    for i in 1..5 {
        let key = format!("frozen-{i}");
        let ran = eventually(Duration::from_secs(30), async || {
            let reply = send(&app, payment(&key, "{}")).await;
            assert_ne!(
                reply.status,
                StatusCode::CONFLICT,
                "{key} was left in flight"
            );
            reply.status == StatusCode::CREATED
        })
        .await;
        assert!(ran, "{key} runs once the replicas are back");
    }
    assert_eq!(runs.get(), 5, "each key ran once");
}

/// Whether `INFO REPLICATION` of a primary shows a replica online at the primary's offset.
fn replica_caught_up(info: &str) -> bool {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(',')
            .find_map(|part| part.trim().strip_prefix(name)?.parse().ok())
    };
    let Some(offset) = info.lines().find_map(|line| {
        line.trim()
            .strip_prefix("master_repl_offset:")?
            .parse::<u64>()
            .ok()
    }) else {
        return false;
    };
    info.lines()
        .filter(|line| line.starts_with("slave"))
        .any(|line| line.contains("state=online") && field(line, "offset=") == Some(offset))
}
