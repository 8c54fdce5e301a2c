//! The default tenant's warnings: a bearer token shaped like a JWT, or a cookie session without
//! `Authorization`, each warned about once per process. A binary of its own, so that no other
//! test fires the warnings first.
#![cfg(feature = "tracing")]

#[macro_use]
mod support;

use std::fmt;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use support::auth::{ALICE_T1, ALICE_T2, BOB, pay};
use support::{Runs, send};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

fn routes(runs: &Runs) -> Router {
    async fn pay(State(runs): State<Runs>) -> impl IntoResponse {
        let n = runs.bump();
        (StatusCode::CREATED, format!("payment {n}"))
    }
    Router::new()
        .route("/payments", post(pay))
        .with_state(runs.clone())
}

/// Messages of the `tower_idempotency` warnings, captured.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let meta = event.metadata();
        if meta.target() == "tower_idempotency" && *meta.level() == tracing::Level::WARN {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_default_tenant_with_rotating_tokens_runs_twice_and_warns_once() {
    use tracing_subscriber::layer::SubscriberExt;

    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let runs = Runs::default();
    let app = routes(&runs).layer(IdempotencyLayer::new(MemoryStore::new()));

    let first = send(&app, pay(Some(ALICE_T1), "order-1")).await;
    let retry = send(&app, pay(Some(ALICE_T2), "order-1")).await;
    assert!(
        !retry.replayed(),
        "the documented pitfall: a new token is a new scope"
    );
    assert_ne!(retry.body, first.body);
    assert_eq!(runs.get(), 2, "the handler ran twice");
    send(&app, pay(Some(BOB), "order-2")).await;
    let seen = warnings.0.lock().unwrap().clone();
    let jwt: Vec<_> = seen.iter().filter(|m| m.contains("JWT")).collect();
    assert_eq!(jwt.len(), 1, "once per process: {seen:?}");
    assert!(jwt[0].contains("TenantFromExtension"), "it names the fix");

    // A cookie session without Authorization: the shared scope, and a warning, once.
    let with_cookie = || {
        let mut request = pay(None, "cart-7");
        request
            .headers_mut()
            .insert(header::COOKIE, "session=abc".parse().unwrap());
        request
    };
    send(&app, with_cookie()).await;
    send(&app, with_cookie()).await;
    let seen = warnings.0.lock().unwrap().clone();
    let cookie: Vec<_> = seen.iter().filter(|m| m.contains("Cookie")).collect();
    assert_eq!(cookie.len(), 1, "{seen:?}");
    // A static API key draws no warning.
    send(&app, pay(Some("sk_live_4f1c2a"), "order-3")).await;
    assert_eq!(warnings.0.lock().unwrap().len(), 2);
}
