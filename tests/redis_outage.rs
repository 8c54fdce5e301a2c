//! `RedisStore` through a Redis outage: the server dies mid-test, keyed requests get `503`
//! with `Retry-After` and nothing runs; the server comes back and the same store (not rebuilt)
//! works again.
//!
//! The test runs its own `redis-server` (from `REDIS_SERVER_BIN`, which
//! `scripts/test-services` exports) on a free port, so that killing it disturbs no other test.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::cluster::Node;
use support::*;
use tower_idempotency::RedisStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_then_recovers_without_rebuilding_the_store() {
    let Some(bin) = server_url("REDIS_SERVER_BIN", "redis_outage") else {
        return;
    };
    let mut server = Node::start(&bin, &[]);
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let runs = Runs::default();
    let app = support::server(store, &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(300))
    });

    let before = send(&app, payment("before-outage", "{}")).await;
    assert_eq!(before.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);

    // A server that hangs: every store call runs into the store timeout, answered by 503.
    server.signal("STOP");
    for key in ["while-frozen", "before-outage"] {
        let started = Instant::now();
        let reply = send(&app, payment(key, "{}")).await;
        reply.assert_store_unavailable();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(250),
            "the store timeout ran: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(2),
            "a 503 after the store timeout: {elapsed:?}"
        );
    }
    server.signal("CONT");
    let thawed = eventually(Duration::from_secs(30), async || {
        let reply = send(&app, payment("before-outage", "{}")).await;
        reply.status == StatusCode::CREATED && reply.replayed()
    })
    .await;
    assert!(thawed, "the store answers again once the server does");
    assert_eq!(runs.get(), 1, "nothing ran while the server hung");
    // The `begin` of the key that got `503` while the server hung was not lost: the server ran
    // it once it woke, leaving a record in flight under a token no request holds. That record
    // is released in the background, so the retry runs well before its lease (30 s) would
    // have ended it, instead of getting `409` meanwhile.
    let retried = Instant::now();
    let ran = eventually(Duration::from_secs(10), async || {
        send(&app, payment("while-frozen", "{}")).await.status == StatusCode::CREATED
    })
    .await;
    assert!(ran, "the retry ran after {:?}", retried.elapsed());
    assert_eq!(runs.get(), 2);

    // A server that died.
    server.kill();
    for key in ["during-outage", "before-outage", "during-outage", "another"] {
        let started = Instant::now();
        let reply = send(&app, payment(key, "{}")).await;
        reply.assert_store_unavailable();
        assert_eq!(reply.headers["idempotency-key"], key);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a 503 comes at once: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(runs.get(), 2, "nothing ran while the store was down");

    server.restart();
    assert!(
        recovers(&app, "after-outage").await,
        "the store reconnected by itself once Redis was back"
    );
    assert_eq!(runs.get(), 3);

    // Nothing was stored during the outage: the key runs now, once.
    let first = send(&app, payment("during-outage", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, payment("during-outage", "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 4);
}
