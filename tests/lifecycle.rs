//! The life of a record: in flight, completed, expired, released by a drop or a panic, leases
//! renewed and taken over, and what a failing store does.

#[macro_use]
mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use support::{FaultyStore, Runs, api, post_with_key, send};
use tower::ServiceExt;
use tower_idempotency::{
    Begin, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, Outcome, RecordKey,
    StoreErrorKind, TenantId,
};

/// Lets spawned tasks run until `done` holds (paused clock: no time passes).
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

fn spawn_send(app: &Router, request: Request<Body>) -> tokio::task::JoinHandle<support::Reply> {
    let app = app.clone();
    tokio::spawn(async move { send(&app, request).await })
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_in_flight_gets_409_with_retry_after_and_a_different_request_422() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .retry_after(Duration::from_secs(3)),
    );
    let first = spawn_send(&app, post_with_key("/slow/1000", "k", "{}"));
    until(|| runs.get() == 1).await;

    let duplicate = send(&app, post_with_key("/slow/1000", "k", "{}")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.code(), "idempotency_key_in_progress");
    assert_eq!(duplicate.header("retry-after"), Some("3"));
    assert_eq!(duplicate.header("idempotency-key"), Some("k"));
    assert_eq!(duplicate.outcome, Some(Outcome::InProgress));

    let other = send(&app, post_with_key("/slow/1000", "k", "{\"other\":1}")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other.code(), "idempotency_key_reuse");

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let retry = send(&app, post_with_key("/slow/1000", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(runs.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn records_expire_after_the_ttl_counted_from_completion() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .ttl(Duration::from_secs(60)),
    );
    // The handler takes 30 s; the TTL starts when it completes.
    send(&app, post_with_key("/slow/30000", "k", "{}")).await;
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        send(&app, post_with_key("/slow/30000", "k", "{}"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    let after = send(&app, post_with_key("/slow/30000", "k", "{}")).await;
    assert!(!after.replayed());
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);
    // After expiry the key is free for any request, even a different one.
    tokio::time::advance(Duration::from_secs(61)).await;
    let other = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(other.status, StatusCode::CREATED);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_runs_to_its_end_and_its_retry_replays() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new()).shared_scope(true);
    let detached = layer.detached_runs();
    let app = api(runs.clone()).layer(layer);
    let first = spawn_send(&app, post_with_key("/slow/600", "k", "{}"));
    until(|| runs.get() == 1).await;
    first.abort(); // the client went away
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(detached.count(), 1, "the handler runs on, detached");
    let early = send(&app, post_with_key("/slow/600", "k", "{}")).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "still running: 409");
    assert!(early.header("retry-after").is_some());
    assert!(detached.wait_timeout(Duration::from_secs(1)).await);
    let retry = send(&app, post_with_key("/slow/600", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed(), "the first run's response was stored");
    assert_eq!(&retry.body[..], b"slow run 1");
    assert_eq!(runs.get(), 1, "the handler ran once in all");
}

#[tokio::test(start_paused = true)]
async fn without_finish_on_disconnect_a_dropped_request_releases_its_key() {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .finish_on_disconnect(false);
    let detached = layer.detached_runs();
    let app = api(runs.clone()).layer(layer);
    let first = spawn_send(&app, post_with_key("/slow/60000", "k", "{}"));
    until(|| runs.get() == 1).await;
    first.abort(); // the client went away
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(detached.count(), 0, "cancelled, not detached");
    // The release runs in a background task; let it.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let retry = spawn_send(&app, post_with_key("/slow/10", "k", "{}"));
    let retry = retry.await.unwrap();
    assert_eq!(retry.status, StatusCode::CREATED, "not stuck in 409");
    assert!(!retry.replayed());
    assert_eq!(runs.get(), 2);
}

/// Cancelling is for the handler's awaits: once it has answered, its operation ran. A request
/// dropped while the layer reads that answer's body completes its key as not replayable, never
/// releases it.
#[tokio::test(start_paused = true)]
async fn without_finish_on_disconnect_a_request_dropped_after_its_handler_answered_never_runs_again()
 {
    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .finish_on_disconnect(false);
    let app = api(runs.clone()).layer(layer);
    // The handler answers `201` at once; its body comes a minute later.
    let first = spawn_send(&app, post_with_key("/slow-body/60000", "k", "{}"));
    until(|| runs.get() == 1).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    first.abort(); // the client went away
    assert!(first.await.unwrap_err().is_cancelled());
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let retry = send(&app, post_with_key("/slow-body/60000", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert_eq!(retry.outcome, Some(Outcome::NotStored));
    assert_eq!(runs.get(), 1, "the operation ran once");
}

#[tokio::test]
async fn a_panicking_handler_releases_its_key() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));
    for attempt in 1..=2 {
        let app = app.clone();
        let request = post_with_key("/panic", "k", "{}");
        let result = tokio::spawn(async move { app.oneshot(request).await }).await;
        assert!(result.unwrap_err().is_panic());
        assert_eq!(
            runs.get(),
            attempt,
            "the retry ran the handler: the key was not stuck"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_keeps_its_lease_and_is_never_taken_over() {
    let runs = Runs::default();
    let lease = Duration::from_secs(3);
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .lease(lease),
    );
    // The handler runs ten times longer than the lease.
    let first = spawn_send(&app, post_with_key("/slow/30000", "k", "{}"));
    until(|| runs.get() == 1).await;
    for _ in 0..29 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let retry = send(&app, post_with_key("/slow/30000", "k", "{}")).await;
        assert_eq!(retry.status, StatusCode::CONFLICT);
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        send(&app, post_with_key("/slow/30000", "k", "{}"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
}

/// The layer reads the handler's response body before it stores it: a body that takes longer
/// than the lease is read under the lease, renewed as while the handler runs.
#[tokio::test(start_paused = true)]
async fn a_slow_response_body_keeps_its_lease_and_is_never_taken_over() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .lease(Duration::from_secs(3)),
    );
    // The handler answers at once; its body arrives ten times the lease later.
    let first = spawn_send(&app, post_with_key("/slow-body/30000", "k", "{}"));
    until(|| runs.get() == 1).await;
    for _ in 0..29 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let retry = send(&app, post_with_key("/slow-body/30000", "k", "{}")).await;
        assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    }
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "slow body of run 1");
    let replay = send(&app, post_with_key("/slow-body/30000", "k", "{}")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, "slow body of run 1");
    assert_eq!(runs.get(), 1);
}

/// The same through a real server on loopback, in real time.
#[tokio::test]
async fn a_slow_response_body_keeps_its_lease_over_loopback() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .lease(Duration::from_millis(300)),
    );
    let server = std::sync::Arc::new(support::serve(app).await);
    let first = tokio::spawn({
        let server = server.clone();
        async move {
            server
                .send(post_with_key("/slow-body/1500", "k", "{}"))
                .await
        }
    });
    // The first request's body is still on its way, more than two leases after it began.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let retry = server
        .send(post_with_key("/slow-body/1500", "k", "{}"))
        .await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        server
            .send(post_with_key("/slow-body/1500", "k", "{}"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 1);
}

/// A response body that panics while the layer reads it has its key released before the panic
/// goes on: the retry that follows the `500` of a panic-catching layer runs at once.
#[tokio::test]
async fn a_panicking_response_body_releases_its_key_before_the_panic_goes_on() {
    for transport in [support::Transport::Oneshot, support::Transport::Loopback] {
        let runs = Runs::default();
        let app = api(runs.clone())
            .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true))
            .layer(tower_http::catch_panic::CatchPanicLayer::new());
        let via = support::Via::new(app, transport).await;
        let first = via.send(post_with_key("/body-panics", "k", "{}")).await;
        assert_eq!(
            first.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{transport:?}"
        );
        let retry = via.send(post_with_key("/body-panics", "k", "{}")).await;
        assert_eq!(
            retry.status,
            StatusCode::CREATED,
            "{transport:?}: {retry:?}"
        );
        assert_eq!(retry.body, "body of run 2");
        assert_eq!(runs.get(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_holder_is_taken_over_and_cannot_overwrite() {
    let runs = Runs::default();
    let store = MemoryStore::new();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).shared_scope(true));
    // A holder on another "server" acquired the key for the same request, then died.
    let request = Request::post("/payments")
        .header("idempotency-key", "k")
        .body(())
        .unwrap();
    let (parts, ()) = request.into_parts();
    let key = RecordKey::new(TenantId::shared(), "k");
    let fingerprint = Fingerprint::of_request(&parts, b"{}");
    let Begin::Acquired(dead) = store
        .begin(&key, &fingerprint, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("acquired");
    };
    let in_flight = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(in_flight.status, StatusCode::CONFLICT);
    tokio::time::advance(Duration::from_secs(6)).await;

    let taken_over = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(taken_over.status, StatusCode::CREATED);
    assert!(!taken_over.replayed());
    assert_eq!(runs.get(), 1);

    // The dead holder comes back: its token no longer completes or releases anything.
    let stale = tower_idempotency::StoredResponse::new(
        StatusCode::IM_A_TEAPOT,
        Default::default(),
        bytes::Bytes::new(),
    );
    let err = store
        .complete(&key, dead, stale, Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    let err = store.release(&key, dead).await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::LeaseLost);
    let retry = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, taken_over.body);
}

#[tokio::test]
async fn a_failing_store_answers_503_and_runs_nothing_when_fail_closed() {
    let runs = Runs::default();
    let store = FaultyStore::default();
    let app = api(runs.clone()).layer(IdempotencyLayer::new(store.clone()).shared_scope(true));
    store.fail(true);
    let reply = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.code(), "idempotency_store_unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(reply.header("idempotency-key"), Some("k"));
    assert_eq!(reply.outcome, Some(Outcome::StoreError));
    assert_eq!(runs.get(), 0);
    // Requests without a key never touch the store.
    let calls = store.total_calls();
    let plain = Request::post("/payments").body(Body::from("{}")).unwrap();
    assert_eq!(send(&app, plain).await.status, StatusCode::CREATED);
    assert_eq!(store.total_calls(), calls);
    // It recovers when the store is back.
    store.fail(false);
    assert_eq!(
        send(&app, post_with_key("/payments", "k", "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    assert!(
        send(&app, post_with_key("/payments", "k", "{}"))
            .await
            .replayed()
    );
    assert_eq!(runs.get(), 2);
}

#[tokio::test]
async fn a_failing_store_runs_the_request_unprotected_when_fail_open() {
    let runs = Runs::default();
    let store = FaultyStore::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .fail_open(true),
    );
    store.fail(true);
    let reply = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.header("idempotency-bypassed"),
        Some("store-unavailable")
    );
    assert_eq!(reply.header("idempotency-key"), Some("k"));
    assert_eq!(reply.outcome, Some(Outcome::Bypassed));
    assert_eq!(
        reply.json()["request"],
        "{}",
        "the handler got the whole body"
    );
    assert_eq!(runs.get(), 1);
}

/// A store whose calls never finish, to show the store timeout.
#[derive(Clone, Default)]
struct HangingStore;

impl IdempotencyStore for HangingStore {
    async fn begin(
        &self,
        _: &RecordKey,
        _: &Fingerprint,
        _: Duration,
    ) -> Result<Begin, tower_idempotency::StoreError> {
        std::future::pending().await
    }
    async fn renew(
        &self,
        _: &RecordKey,
        _: tower_idempotency::LockToken,
        _: Duration,
    ) -> Result<(), tower_idempotency::StoreError> {
        std::future::pending().await
    }
    async fn complete(
        &self,
        _: &RecordKey,
        _: tower_idempotency::LockToken,
        _: tower_idempotency::StoredResponse,
        _: Duration,
    ) -> Result<(), tower_idempotency::StoreError> {
        std::future::pending().await
    }
    async fn release(
        &self,
        _: &RecordKey,
        _: tower_idempotency::LockToken,
    ) -> Result<(), tower_idempotency::StoreError> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_call_past_its_timeout_answers_503() {
    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(HangingStore)
            .shared_scope(true)
            .store_timeout(Duration::from_millis(250)),
    );
    let started = tokio::time::Instant::now();
    let reply = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.code(), "idempotency_store_unavailable");
    assert_eq!(started.elapsed(), Duration::from_millis(250));
    assert_eq!(runs.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_lease_renewal_does_not_hold_up_the_handler() {
    use support::{Fault, Op};
    let runs = Runs::default();
    let store = FaultyStore::default();
    // Renewals every 2 s, each taking 3 s (within the 5 s store timeout).
    store.always(Op::Renew, Fault::Delay(Duration::from_secs(3)));
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .lease(Duration::from_secs(6))
            .store_timeout(Duration::from_secs(5)),
    );
    let started = tokio::time::Instant::now();
    let reply = send(&app, post_with_key("/slow/2500", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(2500),
        "answered when the handler was done"
    );
    assert_eq!(store.calls(Op::Renew), 1);
    assert!(
        send(&app, post_with_key("/slow/2500", "k", "{}"))
            .await
            .replayed()
    );
}

/// A handler that answered `201` (its operation ran) with a body that fails part-way: its client
/// gets what came and then the failure, and the key completes as not replayable, so the retry
/// is `409 idempotency_response_not_stored`, never a second run; through `oneshot` and a real
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_fails_part_way_is_never_run_again() {
    use http_body_util::BodyExt;

    let runs = Runs::default();
    let failing = axum::routing::post({
        let runs = runs.clone();
        move || {
            let runs = runs.clone();
            async move {
                runs.bump();
                let chunks = futures_util::stream::iter([
                    Ok(bytes::Bytes::from_static(b"{\"id\":")),
                    Err(std::io::Error::other("the upstream went away")),
                ]);
                (StatusCode::CREATED, Body::from_stream(chunks))
            }
        }
    });
    let app = Router::new()
        .route("/fails", failing)
        .layer(IdempotencyLayer::new(MemoryStore::new()).shared_scope(true));

    // Through `oneshot`: the head, what came of the body, then its error.
    let response = app
        .clone()
        .oneshot(post_with_key("/fails", "oneshot", "{}"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"{\"id\":");
    assert!(body.frame().await.unwrap().is_err(), "the failure goes on");
    let retry = send(&app, post_with_key("/fails", "oneshot", "{}")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert_eq!(retry.code(), "idempotency_response_not_stored");
    assert_eq!(runs.get(), 1);

    // Through a real server: the first client's response breaks off; its retry runs nothing.
    let server = support::serve(app).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Body>();
    let request = post_with_key("/fails", "loopback", "{}");
    let (mut parts, body) = request.into_parts();
    parts.uri = format!("http://{}/fails", server.addr).parse().unwrap();
    let first = match client.request(Request::from_parts(parts, body)).await {
        Ok(response) => response.into_body().collect().await.map(|_| ()).is_ok(),
        Err(_) => false,
    };
    assert!(!first, "the first client does not get a whole response");
    let retry = server.send(post_with_key("/fails", "loopback", "{}")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{retry:?}");
    assert_eq!(retry.code(), "idempotency_response_not_stored");
    assert_eq!(runs.get(), 2, "one run per key");

    // On the wire: the head and what came reach the client before the connection breaks off.
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = "POST /fails HTTP/1.1\r\nHost: t\r\nIdempotency-Key: wire\r\n\
                   Content-Length: 2\r\n\r\n{}";
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut came = Vec::new();
    let mut buf = [0; 1024];
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    {
        came.extend_from_slice(&buf[..n]);
    }
    let came = String::from_utf8_lossy(&came);
    assert!(came.starts_with("HTTP/1.1 201"), "{came:?}");
    assert!(came.contains("{\"id\":"), "what came of the body: {came:?}");
    assert_eq!(runs.get(), 3);
}
