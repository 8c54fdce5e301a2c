//! What `.wait_for_in_flight` costs a request that does not wait: nothing. A first request and
//! a replay make the same allocations with the option on as with it off (counted by a global
//! allocator, so in a test binary of its own, on one thread).

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::post;
use http_body_util::BodyExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use support::most_frequent;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Allocations so far, in the whole process: this binary's one test runs on one thread, and the
/// harness's thread only waits for it.
fn allocations() -> usize {
    GLOBAL.stats().allocations
}

fn request(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, "Bearer cost")
        .body(Body::from("{\"amount\":1}"))
        .unwrap()
}

async fn send(app: &Router, key: &str) -> StatusCode {
    let response = app.clone().oneshot(request(key)).await.unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

/// The allocations of a first request, then of a replay: the most frequent count over
/// `rounds` keys (a map that grows now and then adds one to a few requests).
async fn count(app: &Router, label: &str, rounds: usize) -> (usize, usize) {
    let keys: Vec<_> = (0..rounds).map(|i| format!("{label}-{i:06}")).collect();
    let mut firsts = Vec::with_capacity(rounds);
    let mut replays = Vec::with_capacity(rounds);
    for key in &keys {
        let before = allocations();
        assert_eq!(send(app, key).await, StatusCode::CREATED);
        firsts.push(allocations() - before);
    }
    for key in &keys {
        let before = allocations();
        assert_eq!(send(app, key).await, StatusCode::CREATED);
        replays.push(allocations() - before);
    }
    (most_frequent(&firsts), most_frequent(&replays))
}

fn app(layer: IdempotencyLayer<MemoryStore>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(|| async { (StatusCode::CREATED, "created") }),
        )
        .layer(layer)
}

#[test]
fn a_request_that_does_not_wait_costs_the_same_with_waiting_on() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let off = app(IdempotencyLayer::new(MemoryStore::new()));
        let on =
            app(IdempotencyLayer::new(MemoryStore::new())
                .wait_for_in_flight(Duration::from_secs(5)));
        // Warm up: lazily built state (the stores' clocks, the process's keys).
        count(&off, "warm-off", 10).await;
        count(&on, "warm-on-", 10).await;
        let off = count(&off, "off", 200).await;
        let on = count(&on, "on-", 200).await;
        assert_eq!(
            on, off,
            "allocations of (a first request, a replay) with waiting on vs off"
        );
    });
}
