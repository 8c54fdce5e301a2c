//! `RedisStore` on a Redis Cluster: the shared cluster of `scripts/test-services`
//! (`REDIS_CLUSTER_URLS`, three primaries with a replica each) runs the conformance suite, the
//! fleet scenarios and the cases below; the resharding case builds a cluster of its own
//! (`REDIS_SERVER_BIN`, `REDIS_CLI_BIN`). Each is skipped when its variables are not set.
//!
//! Failovers, which kill primaries, are in `redis_failover.rs`, on clusters of their own.

#[macro_use]
mod support;

use std::collections::HashSet;
use std::time::Duration;

use axum::http::StatusCode;
use support::cluster::{Cluster, keys_on, node_command, primaries, shared_cluster};
use support::*;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyStore, RecordKey, RedisStore, StoreErrorKind, TenantId,
};

async fn store() -> Option<RedisStore> {
    let store = support::shared::redis_cluster().await?;
    assert!(store.is_cluster());
    Some(store)
}

// The conformance suite, and the fleet scenarios every shared store runs.
fleet_scenarios!(store);

/// Records spread over the slots of every primary, each record one key in one slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_on_every_primary() {
    let Some(urls) = shared_cluster("records_land_on_every_primary") else {
        return;
    };
    let prefix = format!("spread-{}:", tower_idempotency::LockToken::random());
    let store = RedisStore::builder()
        .prefix(prefix.clone())
        .connect_cluster(urls.iter().map(String::as_str))
        .await
        .unwrap();
    let fp = Fingerprint::from_bytes([5; 32]);
    for i in 0..60 {
        let key = RecordKey::new(TenantId::shared(), format!("key-{i}"));
        let begin = store.begin(&key, &fp, Duration::from_secs(60)).await;
        assert!(matches!(begin, Ok(Begin::Acquired(_))), "{begin:?}");
    }
    let primaries = primaries(&urls).await;
    assert_eq!(primaries.len(), 3, "three primaries: {primaries:?}");
    let mut total = 0;
    for port in primaries {
        let keys = keys_on(&format!("redis://127.0.0.1:{port}"), &format!("{prefix}*")).await;
        assert!(!keys.is_empty(), "no record on the primary at {port}");
        total += keys.len();
    }
    assert_eq!(total, 60, "each record is one key, on one primary");
}

/// `SCRIPT FLUSH` on every node, while two servers take requests, changes nothing: each node
/// that forgot the scripts gets them again on its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn script_flush_on_every_node_mid_run() {
    let (Some(a), Some(b)) = (store().await, store().await) else {
        return;
    };
    let urls = shared_cluster("script_flush_on_every_node_mid_run").unwrap();
    let runs = Runs::default();
    let servers = [
        server(a, &runs, Duration::ZERO, |l| l),
        server(b, &runs, Duration::ZERO, |l| l),
    ];
    let keys: Vec<String> = (0..40).map(|i| unique_key(&format!("flush-{i}"))).collect();
    let mut originals = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        if i == 20 {
            for url in &urls {
                node_command(url, &["SCRIPT", "FLUSH"]).await.unwrap();
            }
        }
        let first = send(&servers[i % 2], payment(key, "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        originals.push(first);
    }
    for url in &urls {
        node_command(url, &["SCRIPT", "FLUSH"]).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        send(&servers[(i + 1) % 2], payment(key, "{}"))
            .await
            .assert_replay_of(&originals[i]);
    }
    assert_eq!(runs.get(), keys.len(), "each key ran once");
}

/// With a replica wait that the cluster can meet (one replica each), writes go through; with
/// one it cannot (two replicas), `begin` fails and frees the key it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_wait_met_and_unmet() {
    let Some(store) = store().await else { return };
    let fp = Fingerprint::from_bytes([6; 32]);
    let lease = Duration::from_secs(30);

    let met = RedisStore::builder()
        .replica_wait(1, Duration::from_millis(400))
        .share(&store);
    let key = RecordKey::new(TenantId::shared(), unique_key("wait-met"));
    let Ok(Begin::Acquired(token)) = met.begin(&key, &fp, lease).await else {
        panic!("acquired with one replica acknowledging");
    };
    let response = tower_idempotency::StoredResponse::omitted(StatusCode::OK);
    met.complete(&key, token, response, Duration::from_secs(60))
        .await
        .unwrap();

    let unmet = RedisStore::builder()
        .replica_wait(2, Duration::from_millis(50))
        .share(&store);
    let key = RecordKey::new(TenantId::shared(), unique_key("wait-unmet"));
    let err = unmet.begin(&key, &fp, lease).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("replicas"), "{err}");
    assert!(
        store.lookup(&key).await.unwrap().is_none(),
        "the record whose wait failed was released"
    );
    // Answers that write nothing do not wait.
    let key = RecordKey::new(TenantId::shared(), unique_key("wait-read"));
    let Ok(Begin::Acquired(_)) = store.begin(&key, &fp, lease).await else {
        panic!("acquired");
    };
    assert!(matches!(
        unmet.begin(&key, &fp, lease).await,
        Ok(Begin::InFlight)
    ));
}

/// Slots move between primaries (`redis-cli --cluster reshard`, keys and all) while two
/// servers take duplicates of many keys: no handler runs twice, and no request gets a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resharding_under_duplicates() {
    let Some(cluster) = Cluster::start("resharding_under_duplicates", 3, 0).await else {
        return;
    };
    let urls = cluster.urls();
    let runs = Runs::default();
    let servers = [
        server(
            RedisStore::connect_cluster(&urls).await.unwrap(),
            &runs,
            Duration::from_millis(20),
            |l| l,
        ),
        server(
            RedisStore::connect_cluster(&urls).await.unwrap(),
            &runs,
            Duration::from_millis(20),
            |l| l,
        ),
    ];

    let traffic = tokio::spawn(async move {
        let mut keys = HashSet::new();
        let mut replies = Vec::new();
        for round in 0..400 {
            // Four duplicates of each key, two to each server, at once, and two retries of
            // the previous key, which completed.
            let key = format!("reshard-{round}");
            let previous = format!("reshard-{}", round.max(1) - 1);
            keys.insert(key.clone());
            let batch: Vec<_> = (0..6)
                .map(|i| {
                    let app = servers[i % 2].clone();
                    let key = if i < 4 { &key } else { &previous };
                    let request = payment(key, r#"{"amount":1}"#);
                    tokio::spawn(async move { send(&app, request).await })
                })
                .collect();
            for reply in batch {
                replies.push(reply.await.unwrap());
            }
        }
        (keys, replies)
    });

    // Move a third of the slots from each primary to the next, three times over.
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for url in &urls {
            ids.push(node_command(url, &["CLUSTER", "MYID"]).await.unwrap());
        }
        ids
    };
    let mut moves = 0;
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let out = tokio::process::Command::new(std::env::var("REDIS_CLI_BIN").unwrap())
            .args(["--cluster", "reshard", &urls[0].replace("redis://", "")])
            .args(["--cluster-from", &ids[from], "--cluster-to", &ids[to]])
            .args(["--cluster-slots", "1800", "--cluster-yes"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "reshard: {out:?}");
        moves += 1;
        if traffic.is_finished() {
            break;
        }
    }
    let (keys, replies) = traffic.await.unwrap();
    assert!(moves >= 2, "the traffic outlasted at least two reshards");
    cluster.wait_until_ready(Duration::from_secs(30)).await;

    assert_eq!(runs.get(), keys.len(), "each key ran once");
    for reply in &replies {
        assert!(
            !reply.status.is_server_error(),
            "no 5xx while slots moved: {reply:?}"
        );
        assert!(
            matches!(reply.status, StatusCode::CREATED | StatusCode::CONFLICT),
            "{reply:?}"
        );
    }
    let replays = replies.iter().filter(|r| r.replayed()).count();
    assert!(replays > 0, "retries of completed keys replayed");
    eprintln!(
        "resharding: {} keys, {} requests, {replays} replays, {moves} reshards",
        keys.len(),
        replies.len()
    );
}

#[tokio::test]
async fn empty_and_invalid_node_lists_fail_clearly() {
    let err = RedisStore::connect_cluster(Vec::<String>::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other, "{err}");
    let err = RedisStore::connect_cluster(["not a url"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Other, "{err}");
    let err = RedisStore::connect_cluster(["redis://127.0.0.1:1"])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Unavailable, "{err}");
}
