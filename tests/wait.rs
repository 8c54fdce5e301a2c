//! `.wait_for_in_flight(d)`: a duplicate that arrives while the first request with its key runs
//! waits for the first to finish, then gets its replay; `409` past the deadline; when the first
//! is released (a 5xx, a panic, a cancelled run), exactly one waiter runs, once; a first whose
//! server died is taken over once its lease ends. Through `oneshot` and through a real server on
//! loopback, on every store; on the shared stores, a waiter on one server of two sees a run on
//! the other by polling.

mod support;

use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use support::faults::{Fault, FaultyStore, Op};
use support::{Reply, Runs, Transport, Via, eventually, unique_key};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, LockToken, MemoryStore, Outcome,
    RecordKey, StoreError, StoredResponse,
};

/// How the first run of `POST /orders` ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum First {
    /// `201`, stored.
    Created,
    /// `500`: the key is released.
    Fails,
    /// A panic (answered `500` by `CatchPanicLayer` outside): the key is released.
    Panics,
}

/// What the handler does: every run is counted, then waits for the gate to open; the first
/// run then ends as `first` says, the others answer `201`.
#[derive(Clone)]
struct Api {
    runs: Runs,
    gate: Arc<Semaphore>,
    first: First,
}

impl Api {
    fn new(first: First) -> Self {
        Self {
            runs: Runs::default(),
            gate: Arc::new(Semaphore::new(0)),
            first,
        }
    }

    /// Lets every run, waiting or to come, go on.
    fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }
}

/// `POST /orders`: `201` with `Location`, a `Set-Cookie`, `X-Custom` and a body naming the run.
async fn orders(State(api): State<Api>, body: Bytes) -> Response {
    let n = api.runs.bump();
    api.gate.acquire().await.unwrap().forget();
    match api.first {
        First::Fails if n == 1 => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "run 1 failed").into_response();
        }
        First::Panics if n == 1 => panic!("the first run fails half-way"),
        _ => {}
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::LOCATION, format!("/orders/{n}").parse().unwrap());
    headers.insert(header::SET_COOKIE, format!("run={n}").parse().unwrap());
    headers.insert("x-custom", "custom-value".parse().unwrap());
    let body = format!("order {n} for {}", String::from_utf8_lossy(&body));
    (StatusCode::CREATED, headers, body).into_response()
}

/// The caller: its keyed requests are scoped to its own tenant.
const CALLER: &str = "Bearer wait-tests";

/// A keyed `POST /orders` from [`CALLER`].
fn order(key: &str, body: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header(header::AUTHORIZATION, CALLER)
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// The default layer of these tests: duplicates wait up to a minute.
fn waiting<St: IdempotencyStore>(store: St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store).wait_for_in_flight(Duration::from_secs(60))
}

/// One server: `POST /orders` behind `layer`, behind `CatchPanicLayer`.
struct Server<St> {
    via: Via,
    layer: IdempotencyLayer<St>,
    api: Api,
}

async fn start<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    api: &Api,
    transport: Transport,
) -> Server<St> {
    let app = Router::new()
        .route("/orders", post(orders))
        .with_state(api.clone())
        .layer(layer.clone())
        .layer(CatchPanicLayer::new());
    Server {
        via: Via::new(app, transport).await,
        layer,
        api: api.clone(),
    }
}

impl<St> Server<St> {
    /// A keyed `POST /orders` ([`order`]), answered.
    async fn send(&self, key: &str, body: &str) -> Reply {
        self.via.send(order(key, body)).await
    }

    /// A keyed `POST /orders` ([`order`]) on a task of its own.
    fn spawn(&self, key: &str, body: &str) -> JoinHandle<Reply> {
        self.via.spawn(order(key, body))
    }

    /// The first request with `key`, on a task of its own, once its handler runs (the
    /// handler's first run).
    async fn first(&self, key: &str, body: &str) -> JoinHandle<Reply> {
        let first = self.spawn(key, body);
        self.until_runs(1).await;
        first
    }

    /// A duplicate with `key`, on a task of its own, once it waits in this server's layer (the
    /// only one waiting).
    async fn waiter(&self, key: &str, body: &str) -> JoinHandle<Reply> {
        let waiter = self.spawn(key, body);
        self.until_waiting(1).await;
        waiter
    }

    /// `n` duplicates with `key` and the body `{}`, each on a task of its own, once all of them
    /// wait in this server's layer (and no other request does).
    async fn waiters(&self, key: &str, n: usize) -> Vec<JoinHandle<Reply>> {
        let waiters = (0..n).map(|_| self.spawn(key, "{}")).collect();
        self.until_waiting(n).await;
        waiters
    }

    /// Waits until `n` requests wait in this server's layer.
    async fn until_waiting(&self, n: usize) {
        let layer = &self.layer;
        assert!(
            eventually(Duration::from_secs(30), async || layer.waiting_requests()
                == n)
            .await,
            "{n} requests wait (now {})",
            layer.waiting_requests()
        );
    }

    /// Waits until the handler has started `n` runs.
    async fn until_runs(&self, n: usize) {
        let runs = &self.api.runs;
        assert!(
            eventually(Duration::from_secs(30), async || runs.get() == n).await,
            "{n} runs started (now {})",
            runs.get()
        );
    }

    /// Lets the held first run of `key` answer: `201`, which a retry then replays, the handler
    /// having run once.
    async fn first_completes_once(&self, key: &str, first: JoinHandle<Reply>) {
        self.api.open();
        let original = first.await.unwrap();
        assert_eq!(original.status, StatusCode::CREATED);
        self.send(key, "{}").await.assert_replay_of(&original);
        assert_eq!(self.api.runs.get(), 1);
    }

    /// Nothing is left waiting, nor any key in the registry.
    async fn assert_nobody_waits(&self) {
        let layer = &self.layer;
        assert!(
            eventually(Duration::from_secs(30), async || {
                layer.waiting_requests() == 0 && layer.waiting_keys() == 0
            })
            .await,
            "the registry is empty: {} requests, {} keys",
            layer.waiting_requests(),
            layer.waiting_keys()
        );
    }
}

async fn all(tasks: Vec<JoinHandle<Reply>>) -> Vec<Reply> {
    let mut replies = Vec::with_capacity(tasks.len());
    for task in tasks {
        replies.push(task.await.expect("the request's task ends"));
    }
    replies
}

/// The outcome, where the transport shows it (`oneshot`), is `expected`.
fn assert_outcome(reply: &Reply, expected: Outcome) {
    if let Some(outcome) = reply.outcome {
        assert_eq!(outcome, expected, "{reply:?}");
    }
}

/// The first's answer, stored; `waiters` duplicates wait; then all get the replay, and the
/// handler ran once.
async fn waiters_get_the_replay<St: IdempotencyStore>(store: St, transport: Transport) {
    let api = Api::new(First::Created);
    let server = start(waiting(store), &api, transport).await;
    let key = unique_key("replay");
    let first = server.first(&key, "{}").await;
    let waiters = server.waiters(&key, 5).await;
    api.open();
    let original = first.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(!original.replayed());
    for reply in all(waiters).await {
        reply.assert_replay_of(&original);
        assert_outcome(&reply, Outcome::Replayed);
    }
    assert_eq!(api.runs.get(), 1, "the handler ran once");
    server.assert_nobody_waits().await;
}

/// A waiter whose first is still running at its deadline gets `409` with `Retry-After`, then
/// the replay once the first is done.
async fn past_the_deadline_409<St: IdempotencyStore>(store: St, transport: Transport) {
    let api = Api::new(First::Created);
    let layer = IdempotencyLayer::new(store).wait_for_in_flight(Duration::from_millis(150));
    let server = start(layer, &api, transport).await;
    let key = unique_key("deadline");
    let first = server.first(&key, "{}").await;
    // Bounded: a wait past its deadline would last until the first ends, which it does not.
    let late = tokio::time::timeout(Duration::from_secs(10), server.send(&key, "{}"))
        .await
        .expect("the deadline ends the wait");
    late.assert_in_progress();
    assert_outcome(&late, Outcome::InProgress);
    assert_eq!(late.header("idempotency-key"), Some(key.as_str()));
    server.assert_nobody_waits().await;
    server.first_completes_once(&key, first).await;
}

/// The first run ends without a stored response (`Fails`: 500; `Panics`): exactly one waiter
/// gets the key and runs the handler, once; the others get its replay.
async fn released_first_lets_one_waiter_run<St: IdempotencyStore>(
    store: St,
    transport: Transport,
    how: First,
) {
    let api = Api::new(how);
    let server = start(waiting(store), &api, transport).await;
    let key = unique_key("released");
    let first = server.first(&key, "{}").await;
    let waiters = server.waiters(&key, 5).await;
    api.open();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!first.replayed());
    let replies = all(waiters).await;
    assert_eq!(api.runs.get(), 2, "one waiter ran the handler, once");
    let ran: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(ran.len(), 1, "exactly one waiter ran: {replies:?}");
    let second = ran[0];
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.body.starts_with(b"order 2"), "{second:?}");
    assert_outcome(second, Outcome::Executed);
    for reply in &replies {
        if !std::ptr::eq(reply, second) {
            reply.assert_replay_of(second);
        }
    }
    server.assert_nobody_waits().await;
}

async fn a_5xx_lets_one_waiter_run<St: IdempotencyStore>(store: St, transport: Transport) {
    released_first_lets_one_waiter_run(store, transport, First::Fails).await;
}

async fn a_panic_lets_one_waiter_run<St: IdempotencyStore>(store: St, transport: Transport) {
    released_first_lets_one_waiter_run(store, transport, First::Panics).await;
}

/// 1,000 concurrent requests with one key: one runs; 64 (the most for one key) wait and get its
/// replay; the others get `409` at once; nothing is left in the registry.
async fn a_thousand_duplicates<St: IdempotencyStore>(store: St, transport: Transport) {
    const REQUESTS: usize = 1_000;
    const PER_KEY: usize = 64;
    let api = Api::new(First::Created);
    let layer = waiting(store).max_in_flight_per_tenant(5_000);
    let server = start(layer, &api, transport).await;
    let key = unique_key("thousand");
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| server.spawn(&key, r#"{"amount":1}"#))
        .collect();
    server.until_runs(1).await;
    server.until_waiting(PER_KEY).await;
    let refused = REQUESTS - 1 - PER_KEY;
    assert!(
        eventually(Duration::from_secs(60), async || {
            tasks.iter().filter(|t| t.is_finished()).count() == refused
        })
        .await,
        "every request past the bound got its answer at once"
    );
    api.open();
    let replies = all(tasks).await;
    assert_eq!(api.runs.get(), 1, "the handler ran once");
    let originals: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED && !r.replayed())
        .collect();
    assert_eq!(originals.len(), 1, "one original");
    let (mut conflicts, mut replays) = (0, 0);
    for reply in &replies {
        if std::ptr::eq(reply, originals[0]) {
            continue;
        }
        if reply.status == StatusCode::CONFLICT {
            reply.assert_in_progress();
            conflicts += 1;
        } else {
            reply.assert_replay_of(originals[0]);
            replays += 1;
        }
    }
    assert_eq!((replays, conflicts), (PER_KEY, refused));
    server.assert_nobody_waits().await;
}

/// A waiter whose client hangs up leaves nothing behind; the first run goes on and is stored.
async fn a_hung_up_waiter_leaves_nothing<St: IdempotencyStore>(store: St, transport: Transport) {
    let api = Api::new(First::Created);
    let server = start(waiting(store), &api, transport).await;
    let key = unique_key("hang-up");
    let first = server.first(&key, "{}").await;
    match &server.via {
        Via::Oneshot(_) => {
            let waiter = server.waiter(&key, "{}").await;
            waiter.abort(); // its future is dropped, as hyper drops it
            assert!(waiter.await.unwrap_err().is_cancelled());
        }
        Via::Loopback(served) => {
            let stream = served.send_then_hang_up(order(&key, "{}")).await;
            server.until_waiting(1).await;
            drop(stream);
        }
    }
    server.assert_nobody_waits().await;
    server.first_completes_once(&key, first).await;
}

/// The first request's client hangs up: its handler runs on, detached, and its end wakes the
/// waiters, who get its replay.
async fn a_detached_first_run_wakes_its_waiters<St: IdempotencyStore>(
    store: St,
    transport: Transport,
) {
    let api = Api::new(First::Created);
    let server = start(waiting(store), &api, transport).await;
    let key = unique_key("detached");
    match &server.via {
        Via::Oneshot(_) => {
            let first = server.first(&key, "{}").await;
            first.abort(); // its future is dropped: the handler goes on, detached
            assert!(first.await.unwrap_err().is_cancelled());
        }
        Via::Loopback(served) => {
            let stream = served.send_then_hang_up(order(&key, "{}")).await;
            server.until_runs(1).await;
            drop(stream);
        }
    }
    let detached = server.layer.detached_runs();
    assert!(eventually(Duration::from_secs(30), async || detached.count() == 1).await);
    let waiters = server.waiters(&key, 3).await;
    api.open();
    let replies = all(waiters).await;
    assert_eq!(replies[0].status, StatusCode::CREATED);
    assert!(replies[0].replayed(), "{:?}", replies[0]);
    assert!(replies[0].body.starts_with(b"order 1"));
    for reply in &replies[1..] {
        assert_eq!(
            (reply.status, &reply.headers, &reply.body),
            (replies[0].status, &replies[0].headers, &replies[0].body),
            "every waiter gets the same replay"
        );
    }
    assert_eq!(api.runs.get(), 1);
    server.assert_nobody_waits().await;
}

/// With `finish_on_disconnect(false)`, the first request's client hangs up while its handler
/// runs: the handler is cancelled and the key released, which wakes the waiters (long before
/// their deadline); exactly one of them runs the handler, once, and the others get its replay.
async fn a_cancelled_first_run_lets_one_waiter_run<St: IdempotencyStore>(
    store: St,
    transport: Transport,
) {
    let api = Api::new(First::Created);
    let layer = waiting(store).finish_on_disconnect(false);
    let server = start(layer, &api, transport).await;
    let key = unique_key("cancelled");
    let hang_up: Box<dyn FnOnce()> = match &server.via {
        Via::Oneshot(_) => {
            let first = server.first(&key, "{}").await;
            Box::new(move || first.abort()) // its future is dropped, as hyper drops it
        }
        Via::Loopback(served) => {
            let stream = served.send_then_hang_up(order(&key, "{}")).await;
            server.until_runs(1).await;
            Box::new(move || drop(stream))
        }
    };
    let waiters = server.waiters(&key, 3).await;
    hang_up();
    server.until_runs(2).await; // a waiter took the released key and runs
    api.open();
    let replies = all(waiters).await;
    assert_eq!(api.runs.get(), 2, "the cancelled run and one waiter's");
    let ran: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(ran.len(), 1, "exactly one waiter ran: {replies:?}");
    let second = ran[0];
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.body.starts_with(b"order 2"), "{second:?}");
    assert_outcome(second, Outcome::Executed);
    for reply in &replies {
        if !std::ptr::eq(reply, second) {
            reply.assert_replay_of(second);
        }
    }
    server.assert_nobody_waits().await;
}

/// The first's response is too large to store: its waiters get `409
/// idempotency_response_not_stored`, and the handler never runs again.
async fn a_response_too_large_to_store_is_not_replayed<St: IdempotencyStore>(
    store: St,
    transport: Transport,
) {
    let api = Api::new(First::Created);
    let server = start(waiting(store).max_response_bytes(4), &api, transport).await;
    let key = unique_key("too-large");
    let first = server.first(&key, "{}").await;
    let waiter = server.waiter(&key, "{}").await;
    api.open();
    let original = first.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    assert!(
        original.body.starts_with(b"order 1"),
        "the first client gets it whole"
    );
    let waiter = waiter.await.unwrap();
    assert_eq!(waiter.status, StatusCode::CONFLICT, "{waiter:?}");
    assert_eq!(waiter.code(), "idempotency_response_not_stored");
    assert_eq!(api.runs.get(), 1);
    server.assert_nobody_waits().await;
}

/// Past `max_waiters`, a duplicate gets `409` at once; the others still get their replay.
async fn past_max_waiters_409_at_once<St: IdempotencyStore>(store: St, transport: Transport) {
    let api = Api::new(First::Created);
    let server = start(waiting(store).max_waiters(2), &api, transport).await;
    let keys = [0, 1, 2].map(|i| unique_key(&format!("bound-{i}")));
    let firsts: Vec<_> = keys.iter().map(|k| server.spawn(k, "{}")).collect();
    server.until_runs(3).await;
    let waiters: Vec<_> = keys[..2].iter().map(|k| server.spawn(k, "{}")).collect();
    server.until_waiting(2).await;
    let refused = server.send(&keys[2], "{}").await;
    refused.assert_in_progress();
    assert_eq!(server.layer.waiting_requests(), 2);
    api.open();
    let originals = all(firsts).await;
    for (reply, original) in all(waiters).await.iter().zip(&originals) {
        reply.assert_replay_of(original);
    }
    assert_eq!(api.runs.get(), 3);
    server.assert_nobody_waits().await;
}

/// Another request with the key while the first runs and others wait: `422` at once, as
/// without waiting; the waiters still get the first's replay.
async fn another_request_with_the_key_gets_422<St: IdempotencyStore>(
    store: St,
    transport: Transport,
) {
    let api = Api::new(First::Created);
    let server = start(waiting(store), &api, transport).await;
    let key = unique_key("reuse");
    let first = server.first(&key, r#"{"amount":1}"#).await;
    let waiter = server.waiter(&key, r#"{"amount":1}"#).await;
    let other = server.send(&key, r#"{"amount":2}"#).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.code(), "idempotency_key_reuse");
    assert_eq!(server.layer.waiting_requests(), 1);
    api.open();
    let original = first.await.unwrap();
    waiter.await.unwrap().assert_replay_of(&original);
    assert_eq!(api.runs.get(), 1);
    server.assert_nobody_waits().await;
}

/// Waiting is off by default: a duplicate gets `409` at once, and the registry is never used.
async fn off_by_default<St: IdempotencyStore>(store: St, transport: Transport) {
    let api = Api::new(First::Created);
    let server = start(IdempotencyLayer::new(store), &api, transport).await;
    let key = unique_key("off");
    let first = server.first(&key, "{}").await;
    let duplicate = server.send(&key, "{}").await;
    duplicate.assert_in_progress();
    assert_eq!(server.layer.waiting_requests(), 0);
    api.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

/// Two servers on one store (on the memory store: two layers over clones of one store, each
/// with its own registry): a waiter on B for a run on A gets the replay by polling the store.
async fn waiter_on_another_server_replays_by_polling<St: IdempotencyStore>(
    a: St,
    b: St,
    transport: Transport,
) {
    let api = Api::new(First::Created);
    let server_a = start(waiting(a), &api, transport).await;
    let server_b = start(waiting(b), &api, transport).await;
    let key = unique_key("fleet");
    let first = server_a.first(&key, "{}").await;
    let waiters = server_b.waiters(&key, 3).await;
    api.open();
    let original = first.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    for reply in all(waiters).await {
        reply.assert_replay_of(&original);
    }
    assert_eq!(
        api.runs.get(),
        1,
        "the handler ran once across both servers"
    );
    server_b.assert_nobody_waits().await;
}

/// Two servers on one store: the first run, on A, fails; one waiter on B sees the key free by
/// polling, runs the handler once, and the other waiters on B get its replay.
async fn released_on_another_server_one_waiter_runs<St: IdempotencyStore>(
    a: St,
    b: St,
    transport: Transport,
) {
    let api = Api::new(First::Fails);
    let server_a = start(waiting(a), &api, transport).await;
    let server_b = start(waiting(b), &api, transport).await;
    let key = unique_key("fleet-released");
    let first = server_a.first(&key, "{}").await;
    let waiters = server_b.waiters(&key, 3).await;
    api.open();
    assert_eq!(
        first.await.unwrap().status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let replies = all(waiters).await;
    assert_eq!(api.runs.get(), 2, "one waiter on B ran, once");
    let ran: Vec<_> = replies.iter().filter(|r| !r.replayed()).collect();
    assert_eq!(ran.len(), 1, "{replies:?}");
    assert_eq!(ran[0].status, StatusCode::CREATED);
    for reply in &replies {
        if !std::ptr::eq(reply, ran[0]) {
            reply.assert_replay_of(ran[0]);
        }
    }
    server_b.assert_nobody_waits().await;
}

/// Instantiates every case for every store and both transports.
macro_rules! cases {
    (one: [$($one:ident),* $(,)?], two: [$($two:ident),* $(,)?]) => {
        mod memory {
            use super::*;

            async fn stores() -> Option<(MemoryStore, MemoryStore)> {
                let store = MemoryStore::new();
                Some((store.clone(), store))
            }

            cases!(@each stores, [$($one),*], [$($two),*]);
        }

        #[cfg(feature = "redis")]
        mod redis {
            use super::*;

            async fn stores() -> Option<(tower_idempotency::RedisStore, tower_idempotency::RedisStore)> {
                Some((support::shared::redis().await?, support::shared::redis().await?))
            }

            cases!(@each stores, [$($one),*], [$($two),*]);
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            use super::*;

            async fn stores() -> Option<(tower_idempotency::PostgresStore, tower_idempotency::PostgresStore)> {
                Some((support::shared::postgres().await?, support::shared::postgres().await?))
            }

            cases!(@each stores, [$($one),*], [$($two),*]);
        }
    };
    (@each $stores:ident, [$($one:ident),*], [$($two:ident),*]) => {
        mod oneshot {
            use super::*;
            cases!(@tests $stores, Transport::Oneshot, [$($one),*], [$($two),*]);
        }

        mod loopback {
            use super::*;
            cases!(@tests $stores, Transport::Loopback, [$($one),*], [$($two),*]);
        }
    };
    (@tests $stores:ident, $transport:expr, [$($one:ident),*], [$($two:ident),*]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $one() {
                if let Some((store, _)) = $stores().await {
                    super::super::$one(store, $transport).await;
                }
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $two() {
                if let Some((a, b)) = $stores().await {
                    super::super::$two(a, b, $transport).await;
                }
            }
        )*
    };
}

cases!(
    one: [
        waiters_get_the_replay,
        past_the_deadline_409,
        a_5xx_lets_one_waiter_run,
        a_panic_lets_one_waiter_run,
        a_thousand_duplicates,
        a_hung_up_waiter_leaves_nothing,
        a_detached_first_run_wakes_its_waiters,
        a_cancelled_first_run_lets_one_waiter_run,
        a_response_too_large_to_store_is_not_replayed,
        past_max_waiters_409_at_once,
        another_request_with_the_key_gets_422,
        off_by_default,
    ],
    two: [
        waiter_on_another_server_replays_by_polling,
        released_on_another_server_one_waiter_runs,
    ]
);

/// A memory store whose `begin` calls with a paused fingerprint wait until it is resumed.
#[derive(Clone)]
struct Pausing {
    inner: MemoryStore,
    last: Arc<Mutex<Option<Fingerprint>>>,
    paused: Arc<watch::Sender<Option<Fingerprint>>>,
}

impl Pausing {
    fn new() -> Self {
        Self {
            inner: MemoryStore::new(),
            last: Arc::default(),
            paused: Arc::new(watch::channel(None).0),
        }
    }

    /// Pauses the `begin` calls of the request whose `begin` came last.
    fn pause_last(&self) {
        let last = *self.last.lock().unwrap();
        self.paused.send_replace(last);
    }

    fn resume(&self) {
        self.paused.send_replace(None);
    }
}

impl IdempotencyStore for Pausing {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        *self.last.lock().unwrap() = Some(*fingerprint);
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| *p != Some(*fingerprint)).await;
        self.inner.begin(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }
}

/// The first run is released, and before the waiter looks again, another request takes the key:
/// the waiter gets `422`, never the other request's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_finds_the_key_bound_to_another_request_gets_422() {
    for transport in [Transport::Oneshot, Transport::Loopback] {
        let store = Pausing::new();
        let api = Api::new(First::Fails);
        let layer = waiting(store.clone()).store_timeout(Duration::from_secs(60));
        let server = start(layer, &api, transport).await;
        let key = unique_key("rebound");
        let first = server.first(&key, r#"{"amount":1}"#).await;
        let waiter = server.waiter(&key, r#"{"amount":1}"#).await;
        store.pause_last(); // the waiter's next look waits
        api.open();
        assert_eq!(
            first.await.unwrap().status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let other = server.send(&key, r#"{"amount":2}"#).await;
        assert_eq!(other.status, StatusCode::CREATED, "{other:?}");
        store.resume();
        let waiter = waiter.await.unwrap();
        assert_eq!(
            waiter.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{transport:?}"
        );
        assert_eq!(waiter.code(), "idempotency_key_reuse");
        assert_eq!(api.runs.get(), 2);
        server.assert_nobody_waits().await;
    }
}

/// `wait_for_in_flight(Duration::ZERO)` turns waiting off again.
#[tokio::test]
async fn a_zero_wait_is_off() {
    let api = Api::new(First::Created);
    let layer = waiting(MemoryStore::new()).wait_for_in_flight(Duration::ZERO);
    let server = start(layer, &api, Transport::Oneshot).await;
    let key = unique_key("zero");
    let first = server.first(&key, "{}").await;
    server.send(&key, "{}").await.assert_in_progress();
    api.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

/// A first request whose server died (its future forgotten: never renewed, never released) is
/// taken over by a waiter once its lease ends, within the wait: the waiter runs the handler.
/// Paused time: the bounds are on Tokio's clock.
#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_taken_over_by_a_waiter_once_its_lease_ends() {
    let api = Api::new(First::Created);
    let lease = Duration::from_secs(1);
    let layer = waiting(MemoryStore::new()).lease(lease);
    let server = start(layer, &api, Transport::Oneshot).await;
    let Via::Oneshot(app) = &server.via else {
        unreachable!("a oneshot server")
    };
    let key = unique_key("dead-holder");
    let mut dead = Box::pin(app.clone().oneshot(order(&key, "{}")));
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        if api.runs.get() == 1 {
            break;
        }
        assert!(dead.as_mut().poll(&mut cx).is_pending());
        tokio::task::yield_now().await;
    }
    assert_eq!(api.runs.get(), 1, "the first request's handler runs");
    std::mem::forget(dead); // its server is gone: no drop, no renewal, no release
    let started = tokio::time::Instant::now();
    let waiter = server.waiter(&key, "{}").await;
    server.until_runs(2).await;
    let took_over = started.elapsed();
    assert!(
        took_over >= lease && took_over < Duration::from_secs(10),
        "taken over once the lease ended, long before the wait's deadline: {took_over:?}"
    );
    api.open();
    let waiter = waiter.await.unwrap();
    assert_eq!(waiter.status, StatusCode::CREATED);
    assert!(!waiter.replayed());
    assert!(waiter.body.starts_with(b"order 2"), "{waiter:?}");
    assert_outcome(&waiter, Outcome::Executed);
    assert_eq!(api.runs.get(), 2);
    server.assert_nobody_waits().await;
}

/// A waiter holds one of its tenant's admission places while it waits; its client hanging up
/// gives the place back: another key of the tenant is then admitted and runs.
#[tokio::test]
async fn a_hung_up_waiter_gives_its_admission_place_back() {
    let api = Api::new(First::Created);
    let layer = waiting(MemoryStore::new()).max_in_flight_per_tenant(2);
    let server = start(layer, &api, Transport::Oneshot).await;
    let key = unique_key("admission");
    let first = server.first(&key, "{}").await;
    let waiter = server.waiter(&key, "{}").await;
    let refused = server.send(&unique_key("admission-full"), "{}").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    assert_eq!(refused.code(), "idempotency_overloaded");
    waiter.abort(); // its future is dropped, as hyper drops it
    assert!(waiter.await.unwrap_err().is_cancelled());
    server.assert_nobody_waits().await;
    let other = server.spawn(&unique_key("admission-free"), "{}");
    server.until_runs(2).await; // admitted: its handler runs
    api.open();
    assert_eq!(other.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(api.runs.get(), 2);
}

#[test]
#[should_panic(expected = "max_waiters must be at least 1")]
fn zero_max_waiters_is_refused() {
    let _ = IdempotencyLayer::new(MemoryStore::new()).max_waiters(0);
}

/// Fail-open never runs a duplicate that waits for a key the store said is held: a store that
/// fails (or hangs past its timeout) while it waits answers `503`, as without fail-open
/// (without waiting, the duplicate had its `409`). The handler runs once.
async fn fail_open_never_runs_a_waiter_past_a_failing_store(fault: Fault) {
    let api = Api::new(First::Created);
    let store = FaultyStore::default();
    let layer = waiting(store.clone())
        .fail_open(true)
        .store_timeout(Duration::from_millis(200));
    let server = start(layer, &api, Transport::Loopback).await;
    let key = unique_key("fail-open-waiter");
    let first = server.first(&key, "{}").await;
    let waiter = server.waiter(&key, "{}").await;
    store.always(Op::Begin, fault);
    // Bounded: a waiter run past the store would wait for the gate, which opens only below.
    let waiter = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter answers without running")
        .unwrap();
    store.heal();
    api.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    waiter.assert_store_unavailable();
    assert!(
        waiter.header("idempotency-bypassed").is_none(),
        "{waiter:?}"
    );
    assert_eq!(api.runs.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_never_runs_a_waiter_whose_store_fails() {
    fail_open_never_runs_a_waiter_past_a_failing_store(Fault::Fail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fail_open_never_runs_a_waiter_whose_store_hangs() {
    fail_open_never_runs_a_waiter_past_a_failing_store(Fault::Hang).await;
}
