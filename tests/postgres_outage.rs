//! `PostgresStore` through a PostgreSQL outage: the server stops mid-test, keyed requests get
//! `503` with `Retry-After` and nothing runs; the server comes back and the same store (not
//! rebuilt) works again, with the records written before the outage.
//!
//! It stops and restarts the server at `POSTGRES_URL` with `PG_CTL`, a `pg_ctl` wrapper for
//! its data directory that `scripts/test-services` exports. It is the only test of its binary,
//! and `cargo test` runs test binaries one after the other, so no other test sees the outage.

#[macro_use]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use support::*;
use tower_idempotency::PostgresStore;

fn pg_ctl(pg_ctl: &str, args: &[&str]) {
    let status = Command::new(pg_ctl)
        .args(args)
        .status()
        .expect("run PG_CTL");
    assert!(status.success(), "{pg_ctl} {args:?} failed: {status}");
}

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
        server_url("POSTGRES_URL", "postgres_outage"),
        server_url("PG_CTL", "postgres_outage"),
    ) else {
        return;
    };
    let store = PostgresStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let runs = Runs::default();
    let app = support::server(store, &runs, Duration::ZERO, |l| {
        l.store_timeout(Duration::from_millis(500))
    });
    let (before, during) = (unique_key("before-outage"), unique_key("during-outage"));

    let original = send(&app, payment(&before, "{}")).await;
    assert_eq!(original.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 1);

    pg_ctl(&ctl, &["stop", "-m", "fast", "-w"]);
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
        "the store reconnected by itself once PostgreSQL was back"
    );
    assert_eq!(runs.get(), 2);

    // The record written before the outage survived the server's restart.
    send(&app, payment(&before, "{}"))
        .await
        .assert_replay_of(&original);
    // Nothing was stored during the outage: the key runs now, once.
    let first = send(&app, payment(&during, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    send(&app, payment(&during, "{}"))
        .await
        .assert_replay_of(&first);
    assert_eq!(runs.get(), 3);
}
