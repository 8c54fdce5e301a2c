//! A handler that completed its record in its own transaction (`Claim::respond_in`) and goes on
//! working after its COMMIT: the record is completed, its lease has nothing left to hold, and
//! the renewal that finds it so is the last, and is not reported as a lost lease, on a request
//! that went right. Against a real PostgreSQL at `POSTGRES_URL` (skipped when it is not set; run
//! through `scripts/test-services`), with a `tracing` subscriber of its own (so the one test of
//! its binary).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use sqlx::PgPool;
use support::payments;
use support::*;
use tower_idempotency::{Claim, IdempotencyLayer, Outcome};

/// The handler: completes its record in its transaction, commits, then works on for 700 ms
/// (more than two renewal periods of a 300 ms lease).
async fn works_on_after_commit(
    State((pool, runs)): State<(PgPool, Runs)>,
    claim: Claim,
) -> Response {
    runs.bump();
    let mut tx = pool.begin().await.unwrap();
    let response = claim
        .respond_in(&mut *tx, (StatusCode::CREATED, "paid"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    response
}

/// What the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// After a committed `respond_in`, no store failure is reported for a renewal while the handler
/// works on, and the retry replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_renewal_failure_after_a_committed_claim() {
    if server_url("POSTGRES_URL", "claim_renewals").is_none() {
        return;
    }
    let Some(store) = support::shared::sqlx().await else {
        return;
    };
    let pool = store.pool().clone();
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init()
        .unwrap();
    let runs = Runs::default();
    let app = Router::new()
        .route("/payments", post(works_on_after_commit))
        .with_state((pool, runs.clone()))
        .layer(
            IdempotencyLayer::new(store)
                .require_key(true)
                .lease(Duration::from_millis(300)),
        );
    let key = unique_key("renew-after-commit");
    let first = send(&app, payments::request("/payments", &key, "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.outcome, Some(Outcome::Executed));
    let logged = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        !logged.contains("call=\"renew\""),
        "a committed claim's renewals were reported as failures:\n{logged}"
    );
    let retry = send(&app, payments::request("/payments", &key, "{}")).await;
    retry.assert_replay_of(&first);
    assert_eq!(runs.get(), 1);
}
