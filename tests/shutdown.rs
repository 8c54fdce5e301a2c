//! The shutdown README shows (stop accepting, drain the connections, wait for the runs with
//! `DetachedRuns::wait_timeout`, let the process go) with work its runs leave to finish in the
//! background: a completion tried again after the store failed it, and the completion, as not
//! replayable, of a run cancelled after its handler answered. The wait covers both, so the
//! record is stored before the process goes: the retry on the next process never runs the
//! handler again. Each old process is a runtime dropped as a process ends; its store, shared,
//! outlives it.

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::routing::post;
use support::charge::{Effects, serve_behind};
use support::raw;
use support::{Fault, FaultyStore, Op, Runs};
use tower_idempotency::IdempotencyLayer;

/// A store's `complete` failed once (a Redis failover, a PostgreSQL restart), and the layer
/// tries it again in the background 100 ms later: the shutdown waits for that try.
#[test]
fn shutdown_waits_for_a_completion_tried_again_in_the_background() {
    shutdown_with_a_failed_completion();
}

/// `finish_on_disconnect(false)`: a client that hangs up during the drain after its handler
/// answered, while the layer reads the response body. The key completes as not replayable in
/// the background, so that a retry never runs the operation again: the shutdown waits for it.
#[test]
fn shutdown_waits_for_the_completion_of_an_answered_run_cancelled_in_the_drain() {
    answered_run_cancelled_in_the_drain();
}

fn charge(key: &str) -> String {
    raw::post(
        "/charge",
        &[
            ("Idempotency-Key", key),
            ("Content-Type", "application/json"),
        ],
        "{}",
    )
}

async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting");
}

fn shutdown_with_a_failed_completion() {
    let store = FaultyStore::default(); // a shared store: it outlives the old server's process
    store.times(Op::Complete, Fault::Fail, 1);
    let effects = Effects::new(Duration::from_millis(300));
    let lease = Duration::from_millis(400);
    let old = tokio::runtime::Runtime::new().unwrap();
    old.block_on(async {
        let layer = IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .lease(lease);
        let server = serve_behind(layer, effects.charge_api()).await;
        let stream = raw::send_only(server.addr, charge("bg")).await;
        until(|| effects.started.get() == 1).await;
        let shutting_down = tokio::spawn(server.shut_down(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream); // the client gives up during the drain
        assert!(shutting_down.await.unwrap(), "wait_timeout: no run left");
        assert_eq!(effects.finished.get(), 1);
    });
    drop(old); // the process exits
    std::thread::sleep(lease * 3);
    let new = tokio::runtime::Runtime::new().unwrap();
    new.block_on(async {
        let layer = IdempotencyLayer::new(store.clone()).shared_scope(true);
        let server = serve_behind(layer, effects.charge_api()).await;
        let retry = raw::exchange(server.addr, charge("bg")).await;
        assert_eq!(
            effects.started.get(),
            1,
            "the handler ran again: the completion tried in the background was cut off \
             (retry: {} {})",
            retry.status,
            retry.text()
        );
        assert!(retry.replayed());
    });
}

fn answered_run_cancelled_in_the_drain() {
    let store = FaultyStore::default();
    store.always(Op::Complete, Fault::Delay(Duration::from_millis(50)));
    let runs = Runs::default();
    let app = {
        let runs = runs.clone();
        Router::new().route(
            "/charge",
            post(move || {
                let runs = runs.clone();
                async move {
                    runs.bump();
                    // The operation ran; its body comes slowly.
                    let chunks = futures_util::stream::unfold(0, |i| async move {
                        if i == 3 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((Ok::<_, std::io::Error>(bytes::Bytes::from("x")), i + 1))
                    });
                    (StatusCode::CREATED, Body::from_stream(chunks))
                }
            }),
        )
    };
    let lease = Duration::from_millis(400);
    let old = tokio::runtime::Runtime::new().unwrap();
    old.block_on(async {
        let layer = IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .finish_on_disconnect(false)
            .lease(lease);
        let server = serve_behind(layer, app.clone()).await;
        let stream = raw::send_only(server.addr, charge("answered")).await;
        until(|| runs.get() == 1).await;
        let shutting_down = tokio::spawn(server.shut_down(Duration::from_secs(5)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream); // the client gives up during the drain, its handler answered
        assert!(shutting_down.await.unwrap(), "wait_timeout: no run left");
    });
    drop(old); // the process exits
    std::thread::sleep(lease * 3);
    let new = tokio::runtime::Runtime::new().unwrap();
    new.block_on(async {
        store.heal();
        let layer = IdempotencyLayer::new(store.clone()).shared_scope(true);
        let server = serve_behind(layer, app).await;
        let retry = raw::exchange(server.addr, charge("answered")).await;
        assert_eq!(
            runs.get(),
            1,
            "the operation ran again (retry: {} {})",
            retry.status,
            retry.text()
        );
    });
}
