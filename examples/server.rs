//! Run with: cargo run --example server
//!
//! A small payments API behind `IdempotencyLayer` on the in-memory store. `POST /payments`
//! creates a payment (after ~100 ms of simulated work); `GET /payments/{id}` reads it back.
//! Listens on 127.0.0.1:3000; set `PORT` to change the port.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[derive(Clone, Default)]
struct Payments {
    next_id: Arc<AtomicU64>,
    by_id: Arc<Mutex<HashMap<u64, Value>>>,
}

async fn create_payment(
    State(payments): State<Payments>,
    Json(request): Json<Value>,
) -> impl IntoResponse {
    // Simulated work: talking to a payment processor.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = payments.next_id.fetch_add(1, Ordering::SeqCst) + 1;
    let payment = json!({
        "id": id,
        "amount": request.get("amount").cloned().unwrap_or(Value::Null),
        "currency": request.get("currency").cloned().unwrap_or(json!("eur")),
        "status": "succeeded",
    });
    payments.by_id.lock().unwrap().insert(id, payment.clone());
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/payments/{id}"))],
        Json(payment),
    )
}

async fn get_payment(State(payments): State<Payments>, Path(id): Path<u64>) -> impl IntoResponse {
    match payments.by_id.lock().unwrap().get(&id) {
        Some(payment) => Ok(Json(payment.clone())),
        None => Err(StatusCode::NOT_FOUND),
    }
}

/// The payments API, idempotent on POST and PATCH.
fn app() -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .route("/payments/{id}", get(get_payment))
        .with_state(Payments::default())
        .layer(IdempotencyLayer::new(MemoryStore::new()))
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let base = format!("http://127.0.0.1:{port}");
    println!("payments API on {base}\n");
    println!("Create a payment (run it twice: the second answer is a replay):");
    println!(
        "  curl -i -X POST {base}/payments -H 'Idempotency-Key: order-42' \\\n       -H 'Content-Type: application/json' -d '{{\"amount\":1000,\"currency\":\"eur\"}}'\n"
    );
    println!("Same key, different body: 422 idempotency_key_reuse:");
    println!(
        "  curl -i -X POST {base}/payments -H 'Idempotency-Key: order-42' \\\n       -H 'Content-Type: application/json' -d '{{\"amount\":9999}}'\n"
    );
    println!("Read it back:\n  curl -i {base}/payments/1\n");
    axum::serve(listener, app()).await.expect("server error");
}
