//! A charging API whose handlers record their side effects: `started` counts the charges
//! (runs that began), `finished` the runs that got to their end. For the tests where clients
//! hang up while a handler runs.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

use super::{Runs, Server};

/// What the handlers did: `started` counts runs that began (the side effect: a charge),
/// `finished` runs that got to their end.
#[derive(Clone, Default)]
pub struct Effects {
    pub started: Runs,
    pub finished: Runs,
    /// How long `POST /charge` works after charging.
    work: Duration,
}

impl Effects {
    /// No effect yet; `POST /charge` works for `work` after charging.
    pub fn new(work: Duration) -> Self {
        Self {
            work,
            ..Self::default()
        }
    }

    /// `POST /charge`: charges (counted in `started`), works for the time given to
    /// [`new`](Self::new), then answers `201` `charge <n>` (counted in `finished`).
    pub fn charge_api(&self) -> Router {
        async fn charge(State(e): State<Effects>) -> impl IntoResponse {
            let n = e.started.bump();
            tokio::time::sleep(e.work).await;
            e.finished.bump();
            (StatusCode::CREATED, format!("charge {n}"))
        }
        Router::new()
            .route("/charge", post(charge))
            .with_state(self.clone())
    }
}

/// Serves `app` behind `layer` on loopback; shutting the server down waits for the layer's
/// detached runs.
pub async fn serve_behind<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    app: Router,
) -> Server {
    let detached = layer.detached_runs();
    Server::start(app.layer(layer), detached).await
}
