//! Run with: cargo run --example server
//!
//! A small payments API behind `IdempotencyLayer` on the in-memory store, with keys scoped by
//! the account that authentication verified. `POST /payments` creates a payment (after ~100 ms
//! of simulated work) and requires an `Idempotency-Key`; `GET /payments/{id}` reads one of the
//! caller's own payments back (another account's is `404`). Listens on 127.0.0.1:3000; set
//! `PORT` to change the port.
//!
//! Demo credentials: `Bearer alice-token-1` and `Bearer alice-token-2` are two access tokens of
//! the account `alice` (a client that refreshed its token); `Bearer bob-token` is `bob`'s.
//! Ctrl-C stops the server gracefully: it waits up to 30 s for handlers whose client went away,
//! then saves the completed records to a snapshot file (`SNAPSHOT`, by default
//! `tower-idempotency-demo.snapshot` in the system's temporary directory), which the next start
//! reads back: a retry sent after a restart is still a replay. The payments themselves, the
//! app's own data, go at the same moment to a file beside it (`<SNAPSHOT>.payments.json`), so
//! that a replayed answer still names a payment that exists, and new payments go on from the
//! last id (the store's periodic snapshots do not write that file: a demo killed without Ctrl-C
//! may restart with records of payments it no longer has). Delete both files to start afresh.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Extension, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tower_idempotency::{DetachedRuns, IdempotencyLayer, MemoryStore, TenantFromExtension};

/// The principal that authentication verified: the tenant of its idempotency keys.
#[derive(Debug, Clone)]
struct Account(&'static str);

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A tiny authentication middleware: verifies the bearer token and puts its account in the
/// request extensions. A real app verifies a JWT's signature or looks a session up; what
/// matters is that the account comes from what was verified, never from unverified claims.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let account = match token {
        Some("alice-token-1" | "alice-token-2") => Account("alice"),
        Some("bob-token") => Account("bob"),
        _ => return (StatusCode::UNAUTHORIZED, "unknown or missing bearer token").into_response(),
    };
    request.extensions_mut().insert(account);
    next.run(request).await
}

/// The payments, each with the account that made it.
#[derive(Clone, Default)]
pub(crate) struct Payments {
    next_id: Arc<AtomicU64>,
    by_id: Arc<Mutex<HashMap<u64, (String, Value)>>>,
}

impl Payments {
    /// The payments saved at `path` by [`save`](Self::save), if any.
    fn load(path: &std::path::Path) -> Self {
        let payments = Self::default();
        let Ok(saved) = std::fs::read(path) else {
            return payments;
        };
        let saved: Vec<(u64, String, Value)> = serde_json::from_slice(&saved).unwrap_or_default();
        let last = saved.iter().map(|(id, ..)| *id).max().unwrap_or(0);
        payments.next_id.store(last, Ordering::SeqCst);
        let mut by_id = payments.by_id.lock().unwrap();
        by_id.extend(saved.into_iter().map(|(id, owner, p)| (id, (owner, p))));
        drop(by_id);
        payments
    }

    /// Writes every payment to `path`.
    fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        let saved: Vec<(u64, String, Value)> = self
            .by_id
            .lock()
            .unwrap()
            .iter()
            .map(|(id, (owner, p))| (*id, owner.clone(), p.clone()))
            .collect();
        std::fs::write(path, serde_json::to_vec(&saved)?)
    }
}

async fn create_payment(
    State(payments): State<Payments>,
    Extension(account): Extension<Account>,
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
    let owned = (account.0.to_owned(), payment.clone());
    payments.by_id.lock().unwrap().insert(id, owned);
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/payments/{id}"))],
        Json(payment),
    )
}

/// One of the caller's own payments; another account's is `404`, as if it did not exist.
async fn get_payment(
    State(payments): State<Payments>,
    Extension(account): Extension<Account>,
    Path(id): Path<u64>,
) -> impl IntoResponse {
    match payments.by_id.lock().unwrap().get(&id) {
        Some((owner, payment)) if *owner == account.0 => Ok(Json(payment.clone())),
        _ => Err(StatusCode::NOT_FOUND),
    }
}

/// The payments API, idempotent on POST and PATCH, keys scoped by account. Authentication sits
/// outside the idempotency layer: a `401` never reaches it, and the account is in the
/// extensions when it runs.
///
/// The key is required here: a payment sent without one could not be retried safely. (The
/// layer's default leaves it optional, so that adding the layer to an API breaks no client that
/// does not send keys yet.) `route_layer` keeps requests to routes that do not exist from
/// storing anything.
///
/// `tests/example_server.rs` compiles this file in and calls this function.
pub(crate) fn app(store: MemoryStore, payments: Payments) -> (Router, DetachedRuns) {
    let idempotency = IdempotencyLayer::new(store)
        .tenant(TenantFromExtension::<Account>::new())
        .require_key(true);
    let detached = idempotency.detached_runs();
    let app = Router::new()
        .route("/payments", post(create_payment))
        .route("/payments/{id}", get(get_payment))
        .with_state(payments)
        .route_layer(idempotency)
        .layer(middleware::from_fn(authenticate));
    (app, detached)
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
    // The address bound, so that `PORT=0` (a free port) prints the port it got.
    let addr = listener.local_addr().expect("the listener's address");
    let base = format!("http://{addr}");
    let post = |token: &str, body: &str| {
        format!(
            "  curl -i -X POST {base}/payments -H 'Authorization: Bearer {token}' \\\n       \
             -H 'Idempotency-Key: order-42' -H 'Content-Type: application/json' -d '{body}'\n"
        )
    };
    let body = r#"{"amount":1000,"currency":"eur"}"#;
    println!("payments API on {base}\n");
    println!("Create a payment (run it twice: the second answer is a replay):");
    println!("{}", post("alice-token-1", body));
    println!("The same retry after a token refresh is still a replay (same account):");
    println!("{}", post("alice-token-2", body));
    println!("Another account with the same key gets its own payment:");
    println!("{}", post("bob-token", body));
    println!("Same key, different body: 422 idempotency_key_reuse:");
    println!("{}", post("alice-token-1", r#"{"amount":9999}"#));
    println!(
        "Read it back (bob gets 404 for alice's payment):\n  curl -i {base}/payments/1 -H 'Authorization: Bearer alice-token-1'\n"
    );
    println!(
        "Without a key: 400 idempotency_key_missing:\n  curl -i -X POST {base}/payments -H 'Authorization: Bearer alice-token-1' -H 'Content-Type: application/json' -d '{body}'\n"
    );

    let snapshot = std::env::var_os("SNAPSHOT").map_or_else(
        || std::env::temp_dir().join("tower-idempotency-demo.snapshot"),
        std::path::PathBuf::from,
    );
    let store = MemoryStore::builder().snapshot(&snapshot).build();
    if let Some(status) = store.snapshot_status() {
        println!("snapshot {}: {:?}\n", snapshot.display(), status.load());
    }
    let mut saved = snapshot.clone().into_os_string();
    saved.push(".payments.json");
    let saved = std::path::PathBuf::from(saved);
    let payments = Payments::load(&saved);
    let (app, detached) = app(store.clone(), payments.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .expect("server error");
    // Connections are closed; handlers whose client went away may still be running: give them
    // time to finish and store their responses. A run still going keeps its key's lease.
    if !detached.wait_timeout(Duration::from_secs(30)).await {
        eprintln!(
            "{} handlers still running; their keys are taken over once their lease ends",
            detached.running()
        );
    }
    // Then the completed records go to the snapshot, for the next start.
    match store.save_snapshot().await {
        Ok(n) => println!("{n} completed records saved to {}", snapshot.display()),
        Err(e) => eprintln!("cannot save the snapshot to {}: {e}", snapshot.display()),
    }
    if let Err(e) = payments.save(&saved) {
        eprintln!("cannot save the payments to {}: {e}", saved.display());
    }
}
