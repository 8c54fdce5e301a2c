//! Exactly-once under real concurrency: many tasks on many threads.

#[macro_use]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use support::{Runs, api, post_with_key, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_concurrent_duplicates_run_the_handler_once() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let barrier = Arc::new(tokio::sync::Barrier::new(500));
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, post_with_key("/slow/100", "dup", "{}")).await
            })
        })
        .collect();
    let mut executed = Vec::new();
    let mut replayed = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let reply = task.await.unwrap();
        match reply.status {
            StatusCode::CREATED if reply.replayed() => replayed.push(reply.body),
            StatusCode::CREATED => executed.push(reply.body),
            StatusCode::CONFLICT => {
                assert_eq!(reply.code(), "idempotency_key_in_progress");
                assert!(reply.header("retry-after").is_some());
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(runs.get(), 1, "the handler ran exactly once");
    assert_eq!(executed.len(), 1);
    assert!(replayed.iter().all(|body| *body == executed[0]));
    assert_eq!(executed.len() + replayed.len() + conflicts, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_distinct_keys_in_parallel_each_run_once() {
    let seen = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let handler = |State(seen): State<Arc<Mutex<HashMap<String, usize>>>>, body: String| async move {
        *seen.lock().unwrap().entry(body.clone()).or_default() += 1;
        (StatusCode::CREATED, body)
    };
    let app = Router::new()
        .route("/payments", post(handler))
        .with_state(seen.clone())
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    const KEYS: usize = 4000;
    for round in 0..2 {
        let tasks: Vec<_> = (0..KEYS)
            .map(|i| {
                let app = app.clone();
                tokio::spawn(async move {
                    let request = Request::post("/payments")
                        .header("idempotency-key", format!("key-{i}"))
                        .body(Body::from(format!("payment-{i}")))
                        .unwrap();
                    (i, send(&app, request).await)
                })
            })
            .collect();
        for task in tasks {
            let (i, reply) = task.await.unwrap();
            assert_eq!(reply.status, StatusCode::CREATED);
            assert_eq!(
                reply.body,
                format!("payment-{i}"),
                "no response crosses keys"
            );
            assert_eq!(reply.replayed(), round == 1);
        }
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), KEYS);
    assert!(seen.values().all(|&n| n == 1), "every key ran exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_same_key_different_tenants_each_run_once() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    const TENANTS: usize = 50;
    let tasks: Vec<_> = (0..TENANTS * 4)
        .map(|i| {
            let app = app.clone();
            tokio::spawn(async move {
                let tenant = i % TENANTS;
                let request = Request::post("/payments")
                    .header("idempotency-key", "same-key")
                    .header("authorization", format!("Bearer tenant-{tenant}"))
                    .body(Body::from(format!("{{\"tenant\":{tenant}}}")))
                    .unwrap();
                (tenant, send(&app, request).await)
            })
        })
        .collect();
    let mut bodies: HashMap<usize, Vec<bytes::Bytes>> = HashMap::new();
    for task in tasks {
        let (tenant, reply) = task.await.unwrap();
        if reply.status == StatusCode::CREATED {
            let request = reply.json()["request"].as_str().unwrap().to_owned();
            assert_eq!(
                request,
                format!("{{\"tenant\":{tenant}}}"),
                "no replay across tenants"
            );
            bodies.entry(tenant).or_default().push(reply.body);
        } else {
            assert_eq!(reply.status, StatusCode::CONFLICT);
        }
    }
    assert_eq!(runs.get(), TENANTS, "one run per tenant");
    for (tenant, replies) in &bodies {
        assert!(
            replies.iter().all(|body| *body == replies[0]),
            "tenant {tenant}: every 201 is its one run's response"
        );
    }
}
