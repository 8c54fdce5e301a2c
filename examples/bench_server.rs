//! Run with: cargo run --example bench_server
//!
//! (Add `--release` before measuring anything.) The server `scripts/load-test` drives: one
//! payments handler (reads the JSON body, answers `201` with `Location` and a small JSON body,
//! no simulated work) on two routes, so that a load generator measures the layer and nothing
//! else:
//!
//! - `POST /payments`: behind `IdempotencyLayer` on the in-memory store;
//! - `POST /bare/payments`: the same handler without the layer.
//!
//! Listens on 127.0.0.1, on the port in `PORT` or, without it, on a free port; the first line
//! it prints is `listening on 127.0.0.1:PORT`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

async fn create_payment(body: Bytes) -> impl IntoResponse {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let payment = format!(
        r#"{{"id":{id},"amount_bytes":{},"status":"succeeded"}}"#,
        body.len()
    );
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/payments/{id}")),
            (header::CONTENT_TYPE, "application/json".to_owned()),
        ],
        payment,
    )
}

fn app() -> Router {
    // A load test sends far more new keys than a real client would: lift the store's bound so
    // that it never answers 503.
    let store = MemoryStore::new().max_entries(50_000_000);
    let idempotent = Router::new()
        .route("/payments", post(create_payment))
        .layer(IdempotencyLayer::new(store));
    let bare = Router::new().route("/bare/payments", post(create_payment));
    idempotent.merge(bare)
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let addr = listener.local_addr().expect("local address");
    println!("listening on {addr}");
    axum::serve(listener, app()).await.expect("server error");
}
