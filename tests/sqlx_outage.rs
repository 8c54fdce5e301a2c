//! `SqlxStore` through a PostgreSQL outage: the server stops mid-test, keyed requests get `503`
//! with `Retry-After` and nothing runs; the server comes back and the same store (and the
//! application's pool, not rebuilt) works again, with the records written before the outage.
//!
//! It stops and restarts the server at `POSTGRES_URL` with `PG_CTL` (see `postgres_outage.rs`).
//! It is the only test of its binary.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::*;
use tower_idempotency::SqlxStore;

/// Starts the server again when dropped, should the test fail while it is stopped.
struct Stopped<'a>(&'a str);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.0).args(["start", "-w"]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_answers_503_then_recovers_without_rebuilding_the_store() {
    let (Some(url), Some(ctl)) = (
        server_url("POSTGRES_URL", "sqlx_outage"),
        server_url("PG_CTL", "sqlx_outage"),
    ) else {
        return;
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect(&url)
        .await
        .unwrap();
    let store = SqlxStore::new(pool);
    store.migrate().await.unwrap();
    let runs = Runs::default();
    let app = server(store, &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(500))
    });
    let (before, during) = (unique_key("before-outage"), unique_key("during-outage"));

    let original = send(&app, payment(&before, "{}")).await;
    assert_eq!(original.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);

    let status = Command::new(&ctl)
        .args(["stop", "-m", "fast", "-w"])
        .status()
        .unwrap();
    assert!(status.success(), "{ctl} stop: {status}");
    let guard = Stopped(&ctl);
    for key in [&during, &before, &during] {
        let started = Instant::now();
        let reply = send(&app, payment(key, "{}")).await;
        reply.assert_store_unavailable();
        assert_eq!(reply.headers["idempotency-key"], key.as_str());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a 503 comes at once: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(runs.get(), 1, "nothing ran while the store was down");

    drop(guard); // starts the server again
    let after = unique_key("after-outage");
    let recovered = eventually(Duration::from_secs(30), async || {
        let reply = send(&app, payment(&after, "{}")).await;
        match reply.status {
            StatusCode::CREATED => true,
            _ => {
                reply.assert_store_unavailable();
                false
            }
        }
    })
    .await;
    assert!(
        recovered,
        "the pool reconnected by itself once PostgreSQL was back"
    );
    assert_eq!(runs.get(), 2);

    send(&app, payment(&before, "{}"))
        .await
        .assert_replay_of(&original);
    let first = send(&app, payment(&during, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, payment(&during, "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 3);
}
