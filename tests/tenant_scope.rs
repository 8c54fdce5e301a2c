//! Scoping keys by who the caller is. Through a real axum `Router` with a small auth layer
//! (`support::auth`) that verifies a bearer token and puts its account (the principal) in the
//! request extensions.

#[macro_use]
mod support;

use std::fmt;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use support::auth::{ALICE_T1, ALICE_T2, Auth, BOB, FORGED_ALICE, Unknown, pay};
use support::{Runs, Transport, Via, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore, TenantFromExtension};

/// The principal that authentication verified.
#[derive(Debug, Clone)]
struct Account(&'static str);

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The account a whole `Authorization` value stands for; `None` for a token that is unknown.
fn verify(authorization: &str) -> Option<Account> {
    match authorization.strip_prefix("Bearer ")? {
        ALICE_T1 | ALICE_T2 => Some(Account("alice")),
        BOB => Some(Account("bob")),
        _ => None,
    }
}

/// `POST /payments`: 201 naming the run, with a session cookie.
fn routes(runs: &Runs) -> Router {
    async fn pay(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        let cookie = format!("session=s{n}; HttpOnly");
        (
            StatusCode::CREATED,
            [(header::SET_COOKIE, cookie)],
            format!("payment {n}"),
        )
    }
    Router::new()
        .route("/payments", post(pay))
        .with_state(runs.clone())
}

/// Keys scoped by the verified account; authentication outside the layer.
fn principal_app(runs: &Runs) -> Router {
    Auth::new(verify, Unknown::Refuse).around(routes(runs).layer(
        IdempotencyLayer::new(MemoryStore::new()).tenant(TenantFromExtension::<Account>::new()),
    ))
}

#[tokio::test]
async fn a_retry_after_a_token_refresh_replays() {
    let runs = Runs::default();
    let app = principal_app(&runs);
    let first = send(&app, pay(Some(ALICE_T1), "order-1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, pay(Some(ALICE_T2), "order-1")).await;
    assert!(retry.replayed(), "same account, new token: a replay");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        retry.header("set-cookie"),
        Some("session=s1; HttpOnly"),
        "inside a tenant's scope the replay is the whole response"
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn two_principals_with_the_same_key_never_meet() {
    let runs = Runs::default();
    let app = principal_app(&runs);
    let alice = send(&app, pay(Some(ALICE_T1), "order-1")).await;
    let bob = send(&app, pay(Some(BOB), "order-1")).await;
    assert!(!bob.replayed());
    assert_eq!(&alice.body[..], b"payment 1");
    assert_eq!(&bob.body[..], b"payment 2");
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_forged_token_never_reaches_another_principals_records() {
    let runs = Runs::default();
    let app = principal_app(&runs);
    send(&app, pay(Some(ALICE_T1), "order-1")).await;
    let forged = send(&app, pay(Some(FORGED_ALICE), "order-1")).await;
    assert_eq!(
        forged.status,
        StatusCode::UNAUTHORIZED,
        "auth refuses it first"
    );
    assert!(!forged.replayed());

    // With the default tenant (a hash of the whole Authorization header), a forged token is a
    // scope of its own: its claims are never read.
    let runs = Runs::default();
    let app = routes(&runs).layer(IdempotencyLayer::new(MemoryStore::new()));
    let alice = send(&app, pay(Some(ALICE_T1), "order-1")).await;
    let forged = send(&app, pay(Some(FORGED_ALICE), "order-1")).await;
    assert!(!forged.replayed(), "never alice's response");
    assert_ne!(forged.body, alice.body);
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn set_cookie_is_not_replayed_in_the_shared_scope() {
    let runs = Runs::default();
    let app = routes(&runs).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    let first = send(&app, pay(None, "cart-1")).await;
    assert_eq!(
        first.header("set-cookie"),
        Some("session=s1; HttpOnly"),
        "the first caller gets it"
    );
    let other_caller = send(&app, pay(None, "cart-1")).await;
    assert!(other_caller.replayed());
    assert_eq!(other_caller.body, first.body);
    assert_eq!(
        other_caller.header("set-cookie"),
        None,
        "never another caller's session"
    );
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn set_cookie_is_replayed_in_the_shared_scope_when_asked() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .replay_cookies_in_shared_scope(true);
    let app = routes(&runs).layer(layer);
    send(&app, pay(None, "cart-1")).await;
    let retry = send(&app, pay(None, "cart-1")).await;
    assert!(retry.replayed());
    assert_eq!(retry.header("set-cookie"), Some("session=s1; HttpOnly"));
}

/// An `Authorization` header without credentials (empty, or a scheme alone) identifies no
/// caller: with the default tenant, such requests are in the shared scope, refused unless the
/// app opted in to it, and never given one another's cookies. Through `oneshot` and a real
/// server (hyper parses the empty value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_without_credentials_is_no_tenant() {
    fn pay_with(authorization: &str, key: &str) -> axum::http::Request<axum::body::Body> {
        let mut request = pay(None, key);
        let value = authorization.parse().unwrap();
        request.headers_mut().insert(header::AUTHORIZATION, value);
        request
    }
    for transport in [Transport::Oneshot, Transport::Loopback] {
        let runs = Runs::default();
        let app = routes(&runs).layer(IdempotencyLayer::new(MemoryStore::new()));
        let via = Via::new(app, transport).await;
        for authorization in ["", "Bearer ", "Basic"] {
            let refused = via.send(pay_with(authorization, "cart-1")).await;
            assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{authorization:?}");
            assert_eq!(refused.code(), "idempotency_tenant_missing");
        }
        assert_eq!(runs.get(), 0);

        let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
        let via = Via::new(routes(&runs).layer(layer), transport).await;
        let first = via.send(pay_with("", "cart-1")).await;
        assert_eq!(first.header("set-cookie"), Some("session=s1; HttpOnly"));
        let other_caller = via.send(pay_with("Bearer ", "cart-1")).await;
        assert!(other_caller.replayed());
        assert_eq!(other_caller.header("set-cookie"), None);
        assert_eq!(runs.get(), 1);
    }
}
