//! Per-route settings over one store: each route has a layer of its own (axum
//! `MethodRouter::layer`, or `Router::route_layer` for a group of routes) with its own TTL,
//! `require_key` and cache policy, and all of them share one store. The path is part of the
//! fingerprint, so a key used on one route and then on another gets `422`, never the other
//! route's answer. Through `oneshot` and a real server on loopback, on every store.

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use support::{Reply, Runs, Transport, Via, eventually, unique_key};
use tokio::sync::Semaphore;
use tower_idempotency::{IdempotencyLayer, IdempotencyStore, MemoryStore};

/// One route's handler: counts its runs; a body `hold` waits for the gate; a body that is a
/// status code answers it; any other body answers `201`. The answer names the route and run.
#[derive(Clone)]
struct Route {
    name: &'static str,
    runs: Runs,
    gate: Arc<Semaphore>,
}

impl Route {
    fn new(name: &'static str, gate: &Arc<Semaphore>) -> Self {
        Self {
            name,
            runs: Runs::default(),
            gate: gate.clone(),
        }
    }
}

async fn handle(State(route): State<Route>, body: String) -> Response {
    let n = route.runs.bump();
    if body == "hold" {
        route.gate.acquire().await.unwrap().forget();
    }
    let status = body
        .parse()
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .unwrap_or(StatusCode::CREATED);
    (status, format!("{} run {n}", route.name)).into_response()
}

/// The routes of the app, each with its handler's runs.
struct Api {
    payments: Route,
    refunds: Route,
    transfers: Route,
    reversals: Route,
    gate: Arc<Semaphore>,
}

impl Api {
    fn new() -> Self {
        let gate = Arc::new(Semaphore::new(0));
        Self {
            payments: Route::new("payments", &gate),
            refunds: Route::new("refunds", &gate),
            transfers: Route::new("transfers", &gate),
            reversals: Route::new("reversals", &gate),
            gate,
        }
    }

    fn open(&self) {
        self.gate.add_permits(1_000);
    }
}

/// Four routes, three layers, one store:
///
/// - `POST /payments`: key required, replayed for a day, the default cache policy (a `404` is
///   an outcome: stored);
/// - `POST /refunds`: key optional, replayed for 10 seconds, only successes stored, and
///   duplicates wait for the first;
/// - `POST /transfers` and `POST /transfers/{id}/reverse`: one layer for the group
///   (`Router::route_layer`), replayed for an hour.
///
/// `/payments` and `/refunds` have clones of one base layer (they share its admission counts);
/// the group has a layer of its own over a clone of the store.
fn app<St: IdempotencyStore + Clone>(store: St, api: &Api) -> Router {
    let transfers = IdempotencyLayer::new(store.clone()).ttl(Duration::from_secs(60 * 60));
    let base = IdempotencyLayer::new(store);
    let payments = base
        .clone()
        .ttl(Duration::from_secs(24 * 60 * 60))
        .require_key(true);
    let refunds = base
        .clone()
        .ttl(Duration::from_secs(10))
        .cache_policy(|status| status.is_success())
        .wait_for_in_flight(Duration::from_secs(30));
    Router::new()
        .route(
            "/payments",
            post(handle)
                .with_state(api.payments.clone())
                .layer(payments),
        )
        .route(
            "/refunds",
            post(handle).with_state(api.refunds.clone()).layer(refunds),
        )
        .merge(
            Router::new()
                .route("/transfers", post(handle).with_state(api.transfers.clone()))
                .route(
                    "/transfers/{id}/reverse",
                    post(handle).with_state(api.reversals.clone()),
                )
                .route_layer(transfers),
        )
}

const CALLER: &str = "Bearer per-route-tests";

fn keyed(path: &str, key: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CALLER)
        .body(Body::from(body))
        .unwrap()
}

fn unkeyed(path: &str, body: &'static str) -> Request<Body> {
    Request::post(path)
        .header(header::AUTHORIZATION, CALLER)
        .body(Body::from(body))
        .unwrap()
}

/// `422 idempotency_key_reuse`, with the key echoed.
fn assert_reuse(reply: &Reply, key: &str) {
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY, "{reply:?}");
    assert_eq!(reply.code(), "idempotency_key_reuse");
    assert_eq!(reply.header("idempotency-key"), Some(key));
}

/// `/payments` requires a key; `/refunds`, over the same store, does not.
async fn require_key_per_route<St: IdempotencyStore + Clone>(store: St, transport: Transport) {
    let api = Api::new();
    let via = Via::new(app(store, &api), transport).await;
    let missing = via.send(unkeyed("/payments", "{}")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.code(), "idempotency_key_missing");
    assert_eq!(api.payments.runs.get(), 0);
    for n in 1..=2 {
        let passed = via.send(unkeyed("/refunds", "{}")).await;
        assert_eq!(passed.status, StatusCode::CREATED);
        assert_eq!(passed.body, format!("refunds run {n}"));
        assert!(!passed.replayed());
    }
    // The group's layer keeps the default: no key, no protection, every run.
    assert_eq!(via.send(unkeyed("/transfers", "{}")).await.status, 201);
    assert_eq!(via.send(unkeyed("/transfers", "{}")).await.status, 201);
    assert_eq!(api.transfers.runs.get(), 2);
}

/// A `404` is stored on `/payments` (the default policy) and not on `/refunds` (successes
/// only), over the same store.
async fn cache_policy_per_route<St: IdempotencyStore + Clone>(store: St, transport: Transport) {
    let api = Api::new();
    let via = Via::new(app(store, &api), transport).await;
    let key = unique_key("policy-payments");
    let first = via.send(keyed("/payments", &key, "404")).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    via.send(keyed("/payments", &key, "404"))
        .await
        .assert_replay_of(&first);
    assert_eq!(api.payments.runs.get(), 1, "stored: replayed");

    let key = unique_key("policy-refunds");
    for n in 1..=2 {
        let reply = via.send(keyed("/refunds", &key, "404")).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert!(!reply.replayed());
        assert_eq!(reply.body, format!("refunds run {n}"));
    }
    assert_eq!(api.refunds.runs.get(), 2, "not stored: the retry ran");
    let ok = via.send(keyed("/refunds", &key, "200")).await;
    assert_eq!(ok.status, StatusCode::OK, "the key was released: {ok:?}");
    via.send(keyed("/refunds", &key, "200"))
        .await
        .assert_replay_of(&ok);
}

/// A key used on one route, then on another (same body): `422`, never the first route's
/// answer, and the second route's handler does not run. Both ways, after completion and while
/// the first is in flight (where `/refunds` would wait for a duplicate of its own: a request
/// on another route is not one), and across the routes of one `route_layer` group.
async fn a_key_on_another_route_gets_422<St: IdempotencyStore + Clone>(
    store: St,
    transport: Transport,
) {
    let api = Api::new();
    let via = Via::new(app(store, &api), transport).await;

    let key = unique_key("payments-then-refunds");
    let paid = via.send(keyed("/payments", &key, "{}")).await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_reuse(&via.send(keyed("/refunds", &key, "{}")).await, &key);
    assert_reuse(&via.send(keyed("/transfers", &key, "{}")).await, &key);
    via.send(keyed("/payments", &key, "{}"))
        .await
        .assert_replay_of(&paid);

    let key = unique_key("refunds-then-payments");
    let refunded = via.send(keyed("/refunds", &key, "{}")).await;
    assert_eq!(refunded.status, StatusCode::CREATED);
    assert_reuse(&via.send(keyed("/payments", &key, "{}")).await, &key);

    let key = unique_key("in-flight");
    let holding = via.spawn(keyed("/payments", &key, "hold"));
    assert!(
        eventually(Duration::from_secs(30), async || api.payments.runs.get()
            == 2)
        .await
    );
    assert_reuse(&via.send(keyed("/refunds", &key, "hold")).await, &key);
    api.open();
    assert_eq!(holding.await.unwrap().status, StatusCode::CREATED);

    let key = unique_key("group");
    let sent = via.send(keyed("/transfers", &key, "{}")).await;
    assert_eq!(sent.status, StatusCode::CREATED);
    assert_reuse(
        &via.send(keyed("/transfers/7/reverse", &key, "{}")).await,
        &key,
    );
    assert_reuse(&via.send(keyed("/transfers?id=7", &key, "{}")).await, &key);

    assert_eq!(api.payments.runs.get(), 2);
    assert_eq!(api.refunds.runs.get(), 1);
    assert_eq!(api.transfers.runs.get(), 1);
    assert_eq!(api.reversals.runs.get(), 0);
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                mod $case {
                    use super::super::*;

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn oneshot() {
                        $case(MemoryStore::new(), Transport::Oneshot).await;
                    }

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn loopback() {
                        $case(MemoryStore::new(), Transport::Loopback).await;
                    }
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            $(
                mod $case {
                    use super::super::*;

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn oneshot() {
                        if let Some(store) = support::shared::redis().await {
                            $case(store, Transport::Oneshot).await;
                        }
                    }

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn loopback() {
                        if let Some(store) = support::shared::redis().await {
                            $case(store, Transport::Loopback).await;
                        }
                    }
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                mod $case {
                    use super::super::*;

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn oneshot() {
                        if let Some(store) = support::shared::postgres().await {
                            $case(store, Transport::Oneshot).await;
                        }
                    }

                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn loopback() {
                        if let Some(store) = support::shared::postgres().await {
                            $case(store, Transport::Loopback).await;
                        }
                    }
                }
            )*
        }
    };
}

cases!(
    require_key_per_route,
    cache_policy_per_route,
    a_key_on_another_route_gets_422,
);

/// Each route keeps its own TTL over the one store: a minute later, `/payments` (a day) still
/// replays and `/refunds` (10 seconds) runs again. On Tokio's paused clock, which the memory
/// store reads.
#[tokio::test(start_paused = true)]
async fn ttl_per_route() {
    let api = Api::new();
    let via = Via::new(app(MemoryStore::new(), &api), Transport::Oneshot).await;
    let paid = via.send(keyed("/payments", "ttl-p", "{}")).await;
    let refunded = via.send(keyed("/refunds", "ttl-r", "{}")).await;
    via.send(keyed("/refunds", "ttl-r", "{}"))
        .await
        .assert_replay_of(&refunded);
    tokio::time::advance(Duration::from_secs(60)).await;
    via.send(keyed("/payments", "ttl-p", "{}"))
        .await
        .assert_replay_of(&paid);
    let again = via.send(keyed("/refunds", "ttl-r", "{}")).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed(), "expired after its route's TTL");
    assert_eq!(again.body, "refunds run 2");
    assert_eq!((api.payments.runs.get(), api.refunds.runs.get()), (1, 2));
}

/// One route under two idempotency layers over one store (one on the router, one on the
/// route) is a mistake: the inner layer finds the key held by the outer one and answers `409`,
/// which the outer layer stores as the route's answer. One layer per route.
#[tokio::test]
async fn two_layers_on_one_route_over_one_store_conflict() {
    let api = Api::new();
    let store = MemoryStore::new();
    let app = Router::new()
        .route(
            "/payments",
            post(handle)
                .with_state(api.payments.clone())
                .layer(IdempotencyLayer::new(store.clone())),
        )
        .layer(IdempotencyLayer::new(store));
    let via = Via::new(app, Transport::Oneshot).await;
    let reply = via.send(keyed("/payments", "twice", "{}")).await;
    reply.assert_in_progress();
    let retry = via.send(keyed("/payments", "twice", "{}")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert!(
        retry.replayed(),
        "the outer layer stored the 409: {retry:?}"
    );
    assert_eq!(api.payments.runs.get(), 0, "the handler never runs");
}

/// Behind `Router::nest`, a layer on a nested route sees the path without its prefix: with the
/// `axum` feature the fingerprint takes the path the app was sent (`OriginalUri`), so a key used
/// on `/v1/payments` and then on `/v2/payments` is another request there too, through `oneshot`
/// and a real server.
#[cfg(feature = "axum")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_on_another_nested_route_gets_422() {
    for transport in [Transport::Oneshot, Transport::Loopback] {
        let api = Api::new();
        let store = MemoryStore::new();
        let version = |route: &Route| {
            Router::new().route(
                "/payments",
                post(handle)
                    .with_state(route.clone())
                    .layer(IdempotencyLayer::new(store.clone())),
            )
        };
        let app = Router::new()
            .nest("/v1", version(&api.payments))
            .nest("/v2", version(&api.refunds));
        let via = Via::new(app, transport).await;
        let key = unique_key("nested");
        let first = via.send(keyed("/v1/payments", &key, "{}")).await;
        assert_eq!(first.status, StatusCode::CREATED);
        let other = via.send(keyed("/v2/payments", &key, "{}")).await;
        assert_reuse(&other, &key);
        assert_eq!((api.payments.runs.get(), api.refunds.runs.get()), (1, 0));
        let retry = via.send(keyed("/v1/payments", &key, "{}")).await;
        assert!(retry.replayed(), "{retry:?}");
        assert_eq!(retry.body, "payments run 1");
    }
}
