//! Run with: cargo run --example hyper
//!
//! The layer on a plain hyper server, without axum: a `tower::ServiceBuilder` around a
//! `service_fn`, served by hyper's HTTP/1 connection builder. Listens on 127.0.0.1:3001 (`PORT`
//! overrides).
//!
//! ```sh
//! curl -i -X POST http://127.0.0.1:3001/orders -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: o-1' -d 'two coffees'
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_idempotency::{IdempotencyLayer, MemoryStore, RequestBody};

/// Creates an order: answers 201 with the order number and the request body.
async fn create_order(
    orders: Arc<AtomicU64>,
    request: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Ok(body) = request.into_body().collect().await else {
        let mut response = Response::new(Full::new(Bytes::from_static(b"unreadable body")));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(response);
    };
    let n = orders.fetch_add(1, Ordering::SeqCst) + 1;
    let text = format!("order {n}: {}\n", String::from_utf8_lossy(&body.to_bytes()));
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3001);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("orders API on http://127.0.0.1:{port}");
    println!(
        "  curl -i -X POST http://127.0.0.1:{port}/orders -H 'Authorization: Bearer sk_test_1' -H 'Idempotency-Key: o-1' -d 'two coffees'"
    );

    let orders = Arc::new(AtomicU64::new(0));
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()))
        .service_fn(move |request| create_order(orders.clone(), request));

    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = connection.await {
                eprintln!("connection error: {err}");
            }
        });
    }
}
