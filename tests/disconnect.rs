//! A client that hangs up while its handler runs: the handler runs to its end, once, and the
//! client's retry gets `409` while it runs, then the replay. Through real servers on loopback
//! (`axum::serve`), with clients on raw `TcpStream`s that close their socket, on every store:
//! on the shared stores a client hangs up on one server of two and retries on the other.

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use support::charge::{Effects, serve_behind};
use support::raw::{self, RawReply};
use support::{Runs, Server, unique_key};
use tower_idempotency::{IdempotencyLayer, IdempotencyStore};

/// How long `POST /charge` works after charging.
const CHARGE_WORK: Duration = Duration::from_millis(300);

/// The charging API (`support::charge`): `POST /charge` charges, then works for `CHARGE_WORK`.
/// `POST /charge-then-fail` charges, works 200 ms, then answers 500. `POST /charge-then-panic`
/// does the same but panics on its first run and answers 201 on the others.
/// `POST /charge-then-stream` charges and answers `201` at once, its body 500 ms later.
fn app(effects: &Effects) -> Router {
    async fn charge_then_panic(State(e): State<Effects>) -> impl IntoResponse {
        let n = e.started.bump();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if n == 1 {
            panic!("the first run fails half-way");
        }
        e.finished.bump();
        (StatusCode::CREATED, format!("charge {n}"))
    }
    async fn charge_then_fail(State(e): State<Effects>) -> impl IntoResponse {
        let n = e.started.bump();
        tokio::time::sleep(Duration::from_millis(200)).await;
        e.finished.bump();
        (StatusCode::INTERNAL_SERVER_ERROR, format!("failed {n}"))
    }
    async fn charge_then_stream(State(e): State<Effects>) -> impl IntoResponse {
        let n = e.started.bump();
        e.finished.bump();
        let body = futures_util::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, std::io::Error>(bytes::Bytes::from(format!("charge {n}")))
        });
        (StatusCode::CREATED, axum::body::Body::from_stream(body))
    }
    Router::new()
        .route("/charge-then-stream", post(charge_then_stream))
        .route("/charge-then-panic", post(charge_then_panic))
        .route("/charge-then-fail", post(charge_then_fail))
        .with_state(effects.clone())
        .merge(effects.charge_api())
}

/// Serves `app(effects)` behind `layer` on loopback.
async fn serve<St: IdempotencyStore>(layer: IdempotencyLayer<St>, effects: &Effects) -> Server {
    serve_behind(layer, app(effects)).await
}

/// A keyed `POST` of `body` to `path`.
fn request(path: &str, key: &str, body: &str) -> String {
    raw::post(
        path,
        &[
            ("Idempotency-Key", key),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

/// Sends a request and hangs up once the handler has started (`started` reaches `at`).
async fn send_and_hang_up(addr: SocketAddr, path: &str, key: &str, started: &Runs, at: usize) {
    let stream = raw::send_only(addr, request(path, key, "{}")).await;
    until(|| started.get() >= at).await;
    drop(stream); // the client gives up
}

/// Sends a whole request and reads the whole response (the server closes the connection).
async fn send(addr: SocketAddr, path: &str, key: &str) -> RawReply {
    raw::exchange(addr, request(path, key, "{}")).await
}

/// Sends the request until its reply is `done` (50 times at most, 20 ms apart), and answers
/// the last reply.
async fn send_until(
    addr: SocketAddr,
    path: &str,
    key: &str,
    done: impl Fn(&RawReply) -> bool,
) -> RawReply {
    let mut reply = send(addr, path, key).await;
    for _ in 0..50 {
        if done(&reply) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        reply = send(addr, path, key).await;
    }
    reply
}

async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting");
}

/// Two servers on one store (for the memory store, two servers in one process sharing it).
async fn pair<St: IdempotencyStore + Clone>(
    store: St,
    effects: &Effects,
    configure: impl Fn(IdempotencyLayer<St>) -> IdempotencyLayer<St>,
) -> (Server, Server) {
    let a = serve(
        configure(IdempotencyLayer::new(store.clone()).shared_scope(true)),
        effects,
    )
    .await;
    let b = serve(
        configure(IdempotencyLayer::new(store).shared_scope(true)),
        effects,
    )
    .await;
    (a, b)
}

fn defaults<St>(layer: IdempotencyLayer<St>) -> IdempotencyLayer<St> {
    layer
}

async fn hang_up_then_retry_later_replays<St: IdempotencyStore + Clone>(store: St) {
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let key = unique_key("later");
    send_and_hang_up(a.addr, "/charge", &key, &effects.started, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = send(b.addr, "/charge", &key).await;
    assert_eq!(retry.status, 201);
    assert!(retry.replayed(), "the retry replays the first run");
    assert_eq!(retry.text(), "charge 1");
    assert_eq!(retry.header("idempotency-key"), Some(key.as_str()));
    assert_eq!(effects.started.get(), 1, "the handler ran once");
    assert_eq!(effects.finished.get(), 1, "and ran to its end");
}

async fn hang_up_then_quick_retry_gets_409_then_the_replay<St: IdempotencyStore + Clone>(
    store: St,
) {
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let key = unique_key("quick");
    send_and_hang_up(a.addr, "/charge", &key, &effects.started, 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let early = send(b.addr, "/charge", &key).await;
    assert_eq!(early.status, 409, "{}", early.text());
    assert!(early.header("retry-after").is_some());
    assert!(early.text().contains("idempotency_key_in_progress"));
    until(|| a.detached.count() == 1).await; // the first run goes on, detached
    assert!(a.detached.wait_timeout(Duration::from_secs(5)).await);
    assert_eq!(
        a.detached.count(),
        0,
        "the wait is over: no run counts as detached"
    );
    let retry = send(b.addr, "/charge", &key).await;
    assert!(retry.replayed());
    assert_eq!(retry.text(), "charge 1");
    assert_eq!(effects.started.get(), 1);
}

async fn a_hundred_clients_hang_up_and_retry_one_run_each<St: IdempotencyStore + Clone>(store: St) {
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let keys: Vec<_> = (0..100).map(|i| unique_key(&format!("many{i}"))).collect();
    let hang_ups = keys.iter().map(|key| {
        let (addr, key, started) = (a.addr, key.clone(), effects.started.clone());
        tokio::spawn(async move {
            let stream = raw::send_only(addr, request("/charge", &key, "{}")).await;
            // Hang up once every handler has started.
            until(|| started.get() >= 100).await;
            drop(stream);
        })
    });
    for hang_up in hang_ups.collect::<Vec<_>>() {
        hang_up.await.unwrap();
    }
    until(|| effects.finished.get() == 100).await;
    assert!(a.detached.wait_timeout(Duration::from_secs(10)).await);
    assert_eq!(
        a.detached.count(),
        0,
        "the wait is over: no run counts as detached"
    );
    assert_eq!(effects.started.get(), 100, "one run per key");
    let retries = keys.iter().map(|key| {
        let (addr, key) = (b.addr, key.clone());
        tokio::spawn(async move { send(addr, "/charge", &key).await })
    });
    for retry in retries.collect::<Vec<_>>() {
        let retry = retry.await.unwrap();
        assert_eq!(retry.status, 201);
        assert!(retry.replayed(), "{}", retry.text());
    }
    assert_eq!(effects.started.get(), 100, "100 runs for 100 keys");
    assert_eq!(effects.finished.get(), 100);
}

async fn a_panic_after_the_hang_up_releases_the_key<St: IdempotencyStore + Clone>(store: St) {
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let key = unique_key("panic");
    send_and_hang_up(a.addr, "/charge-then-panic", &key, &effects.started, 1).await;
    until(|| a.detached.count() == 1).await;
    assert!(a.detached.wait_timeout(Duration::from_secs(5)).await);
    // The release runs in the background: wait for the key to be free.
    let retry = send_until(b.addr, "/charge-then-panic", &key, |r| r.status != 409).await;
    assert_eq!(
        effects.started.get(),
        2,
        "the retry ran: the key was released"
    );
    assert_eq!(retry.status, 201);
    assert_eq!(retry.text(), "charge 2");
    assert!(!retry.replayed());
    // Both servers keep serving.
    let other = unique_key("after-panic");
    assert_eq!(send(a.addr, "/charge", &other).await.status, 201);
}

async fn a_5xx_after_the_hang_up_releases_the_key<St: IdempotencyStore + Clone>(store: St) {
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let key = unique_key("fail");
    send_and_hang_up(a.addr, "/charge-then-fail", &key, &effects.started, 1).await;
    until(|| effects.finished.get() == 1).await; // the run got to its end
    assert!(a.detached.wait_timeout(Duration::from_secs(5)).await);
    let retry = send(b.addr, "/charge-then-fail", &key).await;
    assert_eq!(retry.status, 500, "{}", retry.text());
    assert!(!retry.replayed());
    assert_eq!(retry.text(), "failed 2", "released: the retry ran");
}

async fn a_hang_up_during_the_body_runs_nothing_and_holds_nothing<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, defaults).await;
    let key = unique_key("body");
    let head = format!(
        "POST /charge HTTP/1.1\r\nHost: test\r\nIdempotency-Key: {key}\r\n\
         Content-Length: 100\r\n\r\n{{\"amount\":"
    );
    let stream = raw::send_only(a.addr, head).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream); // gone before the body arrived
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(effects.started.get(), 0, "nothing ran");
    assert_eq!(a.detached.count(), 0);
    let retry = send(b.addr, "/charge", &key).await;
    assert_eq!(retry.status, 201, "nothing held the key: {}", retry.text());
    assert!(!retry.replayed());
    assert_eq!(effects.started.get(), 1);
}

async fn shutdown_waits_for_a_detached_run_and_a_new_server_replays_it<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let effects = Effects::new(CHARGE_WORK);
    let old = serve(
        IdempotencyLayer::new(store.clone()).shared_scope(true),
        &effects,
    )
    .await;
    let key = unique_key("shutdown");
    send_and_hang_up(old.addr, "/charge", &key, &effects.started, 1).await;
    until(|| old.detached.count() == 1).await; // the server saw the hang-up
    assert!(
        old.shut_down(Duration::from_secs(5)).await,
        "the detached run finished within the deadline"
    );
    assert_eq!(effects.finished.get(), 1);
    let new = serve(IdempotencyLayer::new(store).shared_scope(true), &effects).await;
    let retry = send(new.addr, "/charge", &key).await;
    assert!(
        retry.replayed(),
        "the new server replays what the old one stored"
    );
    assert_eq!(retry.text(), "charge 1");
    assert_eq!(effects.started.get(), 1);
}

/// The shutdown of README: the server stops accepting and drains its connections; a client that
/// hangs up during the drain leaves its run to be handed over only as its connection closes,
/// after `serve` returned. Waiting for the detached runs then waits for it too: it stores its
/// response before the process goes on, and a new server replays it.
async fn shutdown_waits_for_a_run_whose_client_hangs_up_during_the_drain<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let effects = Effects::new(Duration::from_millis(600));
    let old = serve(
        IdempotencyLayer::new(store.clone()).shared_scope(true),
        &effects,
    )
    .await;
    let key = unique_key("drain");
    let stream = raw::send_only(old.addr, request("/charge", &key, "{}")).await;
    until(|| effects.started.get() == 1).await;
    let shutting_down = tokio::spawn(old.shut_down(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(stream); // the client's timeout, during the drain
    assert!(
        shutting_down.await.unwrap(),
        "the run finished within the deadline"
    );
    assert_eq!(
        effects.finished.get(),
        1,
        "the shutdown waited for the run whose client hung up during the drain"
    );
    let new = serve(IdempotencyLayer::new(store).shared_scope(true), &effects).await;
    let retry = send(new.addr, "/charge", &key).await;
    assert!(
        retry.replayed(),
        "the new server replays what the old one stored"
    );
    assert_eq!(effects.started.get(), 1);
}

async fn without_finish_on_disconnect_the_handler_is_cancelled<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, |layer| layer.finish_on_disconnect(false)).await;
    let key = unique_key("cancel");
    send_and_hang_up(a.addr, "/charge", &key, &effects.started, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.detached.count(), 0);
    // The release runs in the background: wait for the key to be free.
    let retry = send_until(b.addr, "/charge", &key, |r| r.status != 409).await;
    assert_eq!(retry.status, 201);
    assert!(!retry.replayed());
    assert_eq!(
        retry.text(),
        "charge 2",
        "cancelled and released: the retry ran again"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(effects.finished.get(), 1, "only the retry got to its end");
}

/// Cancelling stops the handler's awaits; a handler that has answered has done its operation.
/// Its client hanging up while the body streams completes the key as not replayable: the retry
/// gets `409`, never a second run.
async fn without_finish_on_disconnect_an_answered_request_is_never_run_again<St>(store: St)
where
    St: IdempotencyStore + Clone,
{
    let effects = Effects::new(CHARGE_WORK);
    let (a, b) = pair(store, &effects, |layer| layer.finish_on_disconnect(false)).await;
    let key = unique_key("answered");
    send_and_hang_up(a.addr, "/charge-then-stream", &key, &effects.finished, 1).await;
    // The completion runs in the background: wait for the key to leave its lease.
    let retry = send_until(b.addr, "/charge-then-stream", &key, |r| {
        r.text().contains("idempotency_response_not_stored")
    })
    .await;
    assert_eq!(retry.status, 409, "{retry:?}");
    assert!(
        retry.text().contains("idempotency_response_not_stored"),
        "{retry:?}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(effects.started.get(), 1, "charged once");
}

/// Instantiates every case for every store.
/// A wait for detached runs returns once none is counted: the run's task, counted until it is
/// dropped, is dropped a moment after its guard ended the run (which is what a wait saw before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_wait_is_over_no_run_counts_as_detached() {
    for round in 0..20 {
        let effects = Effects::new(Duration::from_millis(20));
        let layer = IdempotencyLayer::new(tower_idempotency::MemoryStore::new()).shared_scope(true);
        let server = serve(layer, &effects).await;
        let key = unique_key("wait-count");
        send_and_hang_up(server.addr, "/charge", &key, &effects.started, 1).await;
        until(|| server.detached.count() == 1).await;
        assert!(server.detached.wait_timeout(Duration::from_secs(5)).await);
        assert_eq!(effects.finished.get(), 1);
        assert_eq!(
            server.detached.count(),
            0,
            "round {round}: the wait is over, and a run still counts as detached"
        );
    }
}

macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(tower_idempotency::MemoryStore::new()).await;
                }
            )*
        }

        #[cfg(feature = "redis")]
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(store) = crate::support::shared::redis().await {
                        super::$case(store).await;
                    }
                }
            )*
        }

        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(store) = crate::support::shared::postgres().await {
                        super::$case(store).await;
                    }
                }
            )*
        }
    };
}

cases!(
    hang_up_then_retry_later_replays,
    hang_up_then_quick_retry_gets_409_then_the_replay,
    a_hundred_clients_hang_up_and_retry_one_run_each,
    a_panic_after_the_hang_up_releases_the_key,
    a_5xx_after_the_hang_up_releases_the_key,
    a_hang_up_during_the_body_runs_nothing_and_holds_nothing,
    shutdown_waits_for_a_detached_run_and_a_new_server_replays_it,
    shutdown_waits_for_a_run_whose_client_hangs_up_during_the_drain,
    without_finish_on_disconnect_the_handler_is_cancelled,
    without_finish_on_disconnect_an_answered_request_is_never_run_again,
);
