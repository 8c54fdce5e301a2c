//! The demo server of `examples/server.rs` (compiled in here as a module, so that the test
//! runs its very routes): `GET /payments/{id}` answers another account's payment `404`, the
//! same answer as for a payment that does not exist, while the account that made it reads it
//! back with any of its tokens. Through `oneshot` and through a real server on loopback.

// Its `main`, which `cargo run --example server` runs, is not called here.
#[allow(dead_code)]
#[path = "../examples/server.rs"]
mod demo;

mod support;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use support::{Reply, Transport, Via};
use tower_idempotency::MemoryStore;

fn create(token: &str, key: &str) -> Request<Body> {
    Request::post("/payments")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header("idempotency-key", key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"amount":1000,"currency":"eur"}"#))
        .unwrap()
}

fn read(token: &str, path: &str) -> Request<Body> {
    Request::get(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

/// The same answer: status, headers and body.
fn assert_same(a: &Reply, b: &Reply) {
    assert_eq!(
        (a.status, &a.headers, &a.body),
        (b.status, &b.headers, &b.body)
    );
}

async fn another_accounts_payment_is_404(transport: Transport) {
    let (app, _detached) = demo::app(MemoryStore::new(), Default::default());
    let via = Via::new(app, transport).await;

    let alices = via.send(create("alice-token-1", "order-42")).await;
    assert_eq!(alices.status, StatusCode::CREATED, "{alices:?}");
    assert_eq!(alices.header("location"), Some("/payments/1"));
    // The same key from bob is bob's own payment, not a replay of alice's.
    let bobs = via.send(create("bob-token", "order-42")).await;
    assert_eq!(bobs.status, StatusCode::CREATED, "{bobs:?}");
    assert!(!bobs.replayed());
    assert_eq!(bobs.header("location"), Some("/payments/2"));

    // Each account reads its own payment back, with any of its tokens.
    for token in ["alice-token-1", "alice-token-2"] {
        let own = via.send(read(token, "/payments/1")).await;
        assert_eq!(own.status, StatusCode::OK, "{own:?}");
        assert_eq!(own.json(), alices.json());
    }
    let own = via.send(read("bob-token", "/payments/2")).await;
    assert_eq!(own.status, StatusCode::OK, "{own:?}");
    assert_eq!(own.json(), bobs.json());

    // Another account's payment is 404, as one that does not exist.
    let missing = via.send(read("bob-token", "/payments/999")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let alices_for_bob = via.send(read("bob-token", "/payments/1")).await;
    assert_eq!(alices_for_bob.status, StatusCode::NOT_FOUND);
    assert_same(&alices_for_bob, &missing);
    let bobs_for_alice = via.send(read("alice-token-2", "/payments/2")).await;
    assert_eq!(bobs_for_alice.status, StatusCode::NOT_FOUND);
    assert_same(&bobs_for_alice, &missing);

    // Without a known token, authentication answers first.
    let anonymous = via.send(read("forged", "/payments/1")).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn another_accounts_payment_is_404_through_oneshot() {
    another_accounts_payment_is_404(Transport::Oneshot).await;
}

#[tokio::test]
async fn another_accounts_payment_is_404_on_loopback() {
    another_accounts_payment_is_404(Transport::Loopback).await;
}
