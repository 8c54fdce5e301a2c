//! Run with: REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001 cargo run --example redis_cluster --features redis
//!
//! A payments API on http://127.0.0.1:3000 whose idempotency records live on a Redis Cluster:
//! each record in the slot of its key, on one primary, written only once a replica has it
//! (`REPLICA_WAIT=0` turns that off), and replays answered from an in-process cache.
//! `scripts/test-services` starts such a cluster and exports `REDIS_CLUSTER_URLS`:
//! `scripts/test-services cargo run --example redis_cluster --features redis`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use tower_idempotency::{IdempotencyLayer, RedisStore, ReplayCache};

async fn create_payment(State(created): State<Arc<AtomicUsize>>, body: Bytes) -> impl IntoResponse {
    // Pretend to charge a card.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = created.fetch_add(1, Ordering::SeqCst) + 1;
    let body = format!(
        "{{\"payment\":{n},\"request\":{}}}\n",
        serde_json::to_string(&String::from_utf8_lossy(&body)).unwrap_or_default()
    );
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, format!("/payments/{n}")),
        ],
        body,
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let urls =
        std::env::var("REDIS_CLUSTER_URLS").unwrap_or_else(|_| "redis://127.0.0.1:7000".to_owned());
    // Any node will do; the client asks it for the others.
    let nodes: Vec<&str> = urls.split(',').map(str::trim).collect();
    let mut builder = RedisStore::builder().prefix("payments-api:idem:");
    let replica_wait = std::env::var("REPLICA_WAIT").map_or(true, |v| v != "0");
    if replica_wait {
        // `begin` and `complete` return once one replica has the write: a record survives
        // the death of its primary.
        builder = builder.replica_wait(1, Duration::from_millis(100));
    }
    let store = builder.connect_cluster(&nodes).await?;
    // Replays of records this process completed, or already replayed, cost no Redis call for
    // up to 30 s.
    let store = ReplayCache::builder()
        .max_entries(100_000)
        .max_age(Duration::from_secs(30))
        .build(store);

    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Arc::new(AtomicUsize::new(0)))
        .layer(IdempotencyLayer::new(store));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 3000))).await?;

    println!(
        r#"Payments API on http://127.0.0.1:3000, records on the Redis Cluster at {urls}
(replica wait: {}).

1. Create a payment:
   curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-123' -d '{{"amount":100}}'
   -> 201 Created

2. Retry it:
   curl -i -X POST http://127.0.0.1:3000/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-123' -d '{{"amount":100}}'
   -> the same 201 with Idempotent-Replayed: true, from the in-process cache

3. See the record on its primary (and its replica):
   redis-cli --cluster call 127.0.0.1:<port> KEYS 'payments-api:idem:*'

Press Ctrl-C to stop."#,
        if replica_wait { "on, 1 replica" } else { "off" }
    );

    tokio::select! {
        result = axum::serve(listener, app) => result?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
