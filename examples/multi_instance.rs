//! Run with: REDIS_URL=redis://127.0.0.1:6379 cargo run --example multi_instance --features redis
//!
//! Two instances of one payments API, on ports 3001 and 3002, share one Redis: a retry that
//! reaches the other instance is replayed, and the handler runs once across the fleet.

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
use tower_idempotency::{IdempotencyLayer, RedisStore};

#[derive(Clone)]
struct Instance {
    name: &'static str,
    /// Payments created by this instance; a shared counter would be a database in real life.
    created: Arc<AtomicUsize>,
}

async fn create_payment(State(instance): State<Instance>, body: Bytes) -> impl IntoResponse {
    // Pretend to charge a card.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = instance.created.fetch_add(1, Ordering::SeqCst) + 1;
    let body = format!(
        "{{\"payment\":{n},\"created_by\":\"{}\",\"request\":{}}}\n",
        instance.name,
        serde_json::to_string(&String::from_utf8_lossy(&body)).unwrap_or_default()
    );
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::LOCATION, format!("/payments/{}-{n}", instance.name)),
        ],
        body,
    )
}

async fn serve(
    name: &'static str,
    port: u16,
    redis_url: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    // Each instance has its own connection, as separate servers would.
    let store = RedisStore::connect(redis_url).await?;
    let app = Router::new()
        .route("/payments", post(create_payment))
        .with_state(Instance {
            name,
            created: Arc::default(),
        })
        .layer(IdempotencyLayer::new(store));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let a = tokio::spawn({
        let url = redis_url.clone();
        async move { serve("a", 3001, &url).await.map_err(|e| e.to_string()) }
    });
    let b = tokio::spawn(async move {
        serve("b", 3002, &redis_url)
            .await
            .map_err(|e| e.to_string())
    });

    println!(
        r#"Instances "a" on http://127.0.0.1:3001 and "b" on http://127.0.0.1:3002 share one Redis.

1. Create a payment on instance a:
   curl -i -X POST http://127.0.0.1:3001/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-123' -d '{{"amount":100}}'
   -> 201 Created, "created_by":"a"

2. Retry it on instance b (a load balancer could send it anywhere):
   curl -i -X POST http://127.0.0.1:3002/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-123' -d '{{"amount":100}}'
   -> the same 201, byte for byte, with Idempotent-Replayed: true; b's handler did not run

3. Reuse the key for a different request:
   curl -i -X POST http://127.0.0.1:3002/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-123' -d '{{"amount":999}}'
   -> 422 idempotency_key_reuse

4. Send two at once, one to each instance, with a new key:
   curl -s -X POST http://127.0.0.1:3001/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-456' -d '{{}}' &
   curl -s -X POST http://127.0.0.1:3002/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: pay-456' -d '{{}}'
   -> one runs (201); the other gets 409 idempotency_key_in_progress with Retry-After

Press Ctrl-C to stop."#
    );

    tokio::select! {
        result = a => result??,
        result = b => result??,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
