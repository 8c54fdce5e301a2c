//! Run with: cargo run --example client --features client
//!
//! The client side against the demo server (start it first: `cargo run --example server`):
//! hyper-util's client behind `IdempotentRetryLayer` creates a payment, prints the key the
//! layer made and how many attempts it took, then sends the same operation again with that key
//! and gets the stored response back, marked as a replay. `PORT` changes the server's port
//! (3000 by default).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tower_idempotency::{IdempotentRetryLayer, RetryBody, RetryOutcome};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let url = format!("http://127.0.0.1:{port}/payments");

    let retries = IdempotentRetryLayer::builder()
        .max_retries(4)
        .deadline(Duration::from_secs(20))
        .build();
    let mut client = ServiceBuilder::new()
        .layer(retries)
        // Each attempt gets 5 s; one that times out is retried with the same key.
        .timeout(Duration::from_secs(5))
        .service(Client::builder(TokioExecutor::new()).build_http::<RetryBody<Full<Bytes>>>());

    let payment = |key: Option<&http::HeaderValue>| {
        let mut request = Request::post(&url)
            .header(header::AUTHORIZATION, "Bearer alice-token-1")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.body(Full::new(Bytes::from_static(
            br#"{"amount":1000,"currency":"eur"}"#,
        )))
    };

    // No key: the layer makes one, and would send it again on every retry.
    let response = client
        .ready()
        .await?
        .call(payment(None)?)
        .await
        .map_err(|e| {
            let cause = e.inner().map(ToString::to_string).unwrap_or_default();
            format!("{e} ({cause}); is the demo server running (cargo run --example server)?")
        })?;
    let outcome = RetryOutcome::of(&response).cloned().ok_or("no outcome")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "POST /payments -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
    println!(
        "  key {}, {} attempt(s), replayed: {}",
        outcome.key().to_str()?,
        outcome.attempts(),
        outcome.replayed()
    );

    // The same operation again, with its key: the server replays the stored response.
    let response = client
        .ready()
        .await?
        .call(payment(Some(outcome.key()))?)
        .await?;
    let again = RetryOutcome::of(&response).cloned().ok_or("no outcome")?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "POST /payments again -> {status}: {}",
        String::from_utf8_lossy(&body)
    );
    println!(
        "  key {}, {} attempt(s), replayed: {}",
        again.key().to_str()?,
        again.attempts(),
        again.replayed()
    );
    Ok(())
}
