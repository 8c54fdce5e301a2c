//! Run with: cargo run --example metrics --features metrics
//!
//! An idempotent `POST /payments` next to `GET /metrics`, which serves the layer's metrics in
//! the Prometheus text format (`metrics-exporter-prometheus`, installed as the process's
//! recorder). Listens on 127.0.0.1:3000; set `PORT` to change the port.

use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower_idempotency::metrics::STORE_CALL_DURATION_SECONDS;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

/// Store calls take about a millisecond on a healthy store, seconds on a failing one.
const STORE_CALL_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

fn install_recorder() -> PrometheusHandle {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STORE_CALL_DURATION_SECONDS.to_owned()),
            STORE_CALL_BUCKETS,
        )
        .expect("the buckets are not empty")
        .install_recorder()
        .expect("no other recorder is installed");
    tower_idempotency::metrics::describe();
    // Histograms are drained into their buckets on upkeep: run it now and then.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        loop {
            interval.tick().await;
            upkeep.run_upkeep();
        }
    });
    handle
}

fn app(metrics: PrometheusHandle) -> Router {
    let payments = Router::new()
        .route(
            "/payments",
            post(|| async { (StatusCode::CREATED, "payment created\n") }),
        )
        .layer(IdempotencyLayer::new(MemoryStore::new()));
    // `/metrics` is outside the layer: it is a GET, and it has nothing to make idempotent.
    payments.route("/metrics", get(move || async move { metrics.render() }))
}

#[tokio::main]
async fn main() {
    let metrics = install_recorder();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let base = format!("http://127.0.0.1:{port}");
    println!("payments API with metrics on {base}\n");
    println!("Send a payment twice (the second answer is a replay):");
    println!(
        "  curl -i -X POST {base}/payments -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: order-42'\n"
    );
    println!("Then read the counts:\n  curl -s {base}/metrics | grep idempotency_\n");
    axum::serve(listener, app(metrics))
        .await
        .expect("server error");
}
