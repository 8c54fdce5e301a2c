//! Run with: cargo run --example admin
//!
//! Support tools as an admin route: look an idempotency key up, and forget it, behind the app's
//! own authentication. The layer exposes nothing by itself; the app decides who may do this.
//!
//! - `POST /payments`: the API, idempotent, for authenticated accounts (`Authorization: Bearer
//!   alice-token` or `bob-token`); keys are scoped by account (`TenantFromExtension`).
//! - `GET /admin/accounts/{account}/idempotency-keys/{key}`: the key's record as JSON (404 when
//!   there is none);
//! - `DELETE` on the same path: forgets a completed record (204; 409 while in flight, 404 when
//!   there is none); `?force=true` forgets an in-flight one too.
//!
//! Admin routes need `Authorization: Bearer $ADMIN_TOKEN`: the example refuses to start
//! without `ADMIN_TOKEN` (at least 16 characters; there is no default, and the token is never
//! printed), e.g. `ADMIN_TOKEN=$(openssl rand -hex 24) cargo run --example admin`. Keys go in
//! the path percent-encoded. Uses the in-memory store, or PostgreSQL when built with
//! `--features postgres` and `POSTGRES_URL` is set. Listens on 127.0.0.1:3000 (`PORT`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use tower_idempotency::{
    Forget, IdempotencyLayer, IdempotencyStore, MemoryStore, Operator, OperatorError,
    StoreErrorKind, TenantFromExtension,
};

/// The principal the app's authentication verified: the tenant of its idempotency keys.
#[derive(Debug, Clone)]
struct Account(String);

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The app's authentication: a token names an account (a real app asks its identity provider).
async fn authenticate(mut request: Request, next: Next) -> Response {
    let account = match bearer(&request) {
        Some("alice-token") => Account("alice".to_owned()),
        Some("bob-token") => Account("bob".to_owned()),
        _ => return StatusCode::UNAUTHORIZED.into_response(),
    };
    request.extensions_mut().insert(account);
    next.run(request).await
}

/// The admin check: only the admin token passes, compared in constant time.
async fn require_admin(State(admin): State<Arc<str>>, request: Request, next: Next) -> Response {
    if !bearer(&request).is_some_and(|token| same_secret(token, &admin)) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    next.run(request).await
}

/// Whether `given` is `expected`, in time that depends on neither: both are hashed to 32 bytes
/// first (so their lengths do not show), then every byte is compared.
fn same_secret(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

async fn create_payment(Extension(account): Extension<Account>) -> impl IntoResponse {
    (
        StatusCode::CREATED,
        Json(json!({ "account": account.0, "status": "succeeded" })),
    )
}

async fn lookup_key<St: IdempotencyStore>(
    State(operator): State<Operator<St>>,
    Path((account, key)): Path<(String, String)>,
) -> Response {
    let tenant = TenantFromExtension::<Account>::scope_for(&Account(account));
    match operator.lookup(tenant, &key).await {
        Ok(Some(report)) => Json(report.to_json()).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => error_response(&err),
    }
}

async fn forget_key<St: IdempotencyStore>(
    State(operator): State<Operator<St>>,
    Path((account, key)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let tenant = TenantFromExtension::<Account>::scope_for(&Account(account));
    let forgotten = if query.get("force").is_some_and(|force| force == "true") {
        operator.forget_in_flight(tenant, &key).await
    } else {
        operator.forget(tenant, &key).await
    };
    match forgotten {
        Ok(Forget::Forgotten) => StatusCode::NO_CONTENT.into_response(),
        Ok(Forget::InFlight) => (
            StatusCode::CONFLICT,
            "a request holds this key; forget it with ?force=true only if its server died\n",
        )
            .into_response(),
        Ok(_) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => error_response(&err),
    }
}

fn error_response(err: &OperatorError) -> Response {
    let status = match err {
        OperatorError::InvalidKey(_) => StatusCode::BAD_REQUEST,
        OperatorError::Store(err) if err.kind() == StoreErrorKind::Unsupported => {
            StatusCode::NOT_IMPLEMENTED
        }
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("{err}\n")).into_response()
}

fn app<St: IdempotencyStore + Clone>(store: St, admin_token: Arc<str>) -> Router {
    let layer = IdempotencyLayer::new(store).tenant(TenantFromExtension::<Account>::new());
    let operator = layer.operator();
    let api = Router::new()
        .route("/payments", post(create_payment))
        // Layers run outside-in: authentication first, so the tenant extension is set.
        .layer(layer)
        .layer(middleware::from_fn(authenticate));
    let admin = Router::new()
        .route(
            "/admin/accounts/{account}/idempotency-keys/{key}",
            get(lookup_key::<St>).delete(forget_key::<St>),
        )
        .with_state(operator)
        .route_layer(middleware::from_fn_with_state(admin_token, require_admin));
    api.merge(admin)
}

async fn serve<St: IdempotencyStore + Clone>(store: St) {
    let admin_token: Arc<str> = match std::env::var("ADMIN_TOKEN") {
        Ok(token) if token.len() >= 16 => token.into(),
        _ => {
            eprintln!(
                "Set ADMIN_TOKEN to a secret of at least 16 characters, e.g.\n  \
                 ADMIN_TOKEN=$(openssl rand -hex 24) cargo run --example admin"
            );
            std::process::exit(2);
        }
    };
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let base = format!("http://127.0.0.1:{port}");
    println!("payments API with an admin route on {base}\n");
    println!("Pay as alice:");
    println!(
        "  curl -i -X POST {base}/payments -H 'Authorization: Bearer alice-token' -H 'Idempotency-Key: order-42'\n"
    );
    println!("Look the key up, then forget it (the next payment with it runs again):");
    let path = format!("{base}/admin/accounts/alice/idempotency-keys/order-42");
    println!("  curl -i {path} -H \"Authorization: Bearer $ADMIN_TOKEN\"");
    println!("  curl -i -X DELETE {path} -H \"Authorization: Bearer $ADMIN_TOKEN\"\n");
    axum::serve(listener, app(store, admin_token))
        .await
        .expect("server error");
}

#[tokio::main]
async fn main() {
    #[cfg(feature = "postgres")]
    if let Ok(url) = std::env::var("POSTGRES_URL") {
        let store = tower_idempotency::PostgresStore::connect(&url)
            .await
            .expect("connect to POSTGRES_URL");
        store.migrate().await.expect("create the table");
        return serve(store).await;
    }
    serve(MemoryStore::new()).await;
}
