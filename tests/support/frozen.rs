//! What the tests of a store connection that stops answering share: `begin`s cut as the
//! layer's store timeout cuts them, and a handler that runs while its server's connections
//! freeze, its retry sent to another server.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, RecordKey, TenantId,
};

use super::{serve, unique_key};

/// `count` begins of new keys, one after the other, each cut at `timeout` as the layer's store
/// timeout cuts a call: whether each acquired its key.
pub async fn begins<St: IdempotencyStore>(
    store: &St,
    count: usize,
    timeout: Duration,
) -> Vec<bool> {
    let fp = Fingerprint::from_bytes([5; 32]);
    let mut acquired = Vec::new();
    for _ in 0..count {
        let key = RecordKey::new(TenantId::shared(), unique_key("frozen"));
        let began = tokio::time::timeout(timeout, store.begin(&key, &fp, Duration::from_secs(30)));
        acquired.push(matches!(began.await, Ok(Ok(Begin::Acquired(_)))));
    }
    acquired
}

/// `1` for acquired, `.` for failed, as one line.
pub fn line(acquired: &[bool]) -> String {
    acquired
        .iter()
        .map(|a| if *a { '1' } else { '.' })
        .collect()
}

async fn slow(State(runs): State<Arc<AtomicUsize>>) -> (StatusCode, &'static str) {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    (StatusCode::CREATED, "slow")
}

fn keyed(key: &str) -> Request<Body> {
    Request::post("/slow")
        .header("idempotency-key", key)
        .header("authorization", "Bearer frozen-client")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap()
}

/// A 4 s handler behind the layer, with a 1.5 s lease (renewed every 500 ms) and a 300 ms
/// store timeout.
fn app<St: IdempotencyStore>(store: St, runs: &Arc<AtomicUsize>) -> Router {
    Router::new()
        .route("/slow", post(slow))
        .with_state(runs.clone())
        .layer(
            IdempotencyLayer::new(store)
                .require_key(true)
                .lease(Duration::from_millis(1500))
                .store_timeout(Duration::from_millis(300)),
        )
}

/// Server A (on store `a`, whose connections go through proxies) runs the 4 s handler; `freeze`
/// freezes its connections 200 ms in; 2.5 s later (past the 1.5 s lease) the client's retry
/// goes to server B (on the store `make_b` makes, after the freeze). Asserts that A's renewals
/// kept the lease: B answers `409` and the handler ran once. `context` names the case.
pub async fn assert_lease_kept<A, B, F>(a: A, make_b: F, freeze: impl FnOnce(), context: &str)
where
    A: IdempotencyStore,
    B: IdempotencyStore,
    F: AsyncFnOnce() -> B,
{
    let runs = Arc::new(AtomicUsize::new(0));
    let a = Arc::new(serve(app(a, &runs)).await);
    let key = unique_key("lease");
    let first = tokio::spawn({
        let (a, key) = (a.clone(), key.clone());
        async move { a.send(keyed(&key)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    freeze();
    let b = serve(app(make_b().await, &runs)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let retry = b.send(keyed(&key)).await;
    let answer = (retry.status, runs.load(Ordering::SeqCst));
    first.abort();
    assert_eq!(
        answer,
        (StatusCode::CONFLICT, 1),
        "(B's answer, handler runs) {context}"
    );
}
