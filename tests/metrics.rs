//! Metrics (feature `metrics`): known traffic through the layer, counted by `metrics-util`'s
//! debugging recorder. Each test installs a recorder of its own for its thread (the tests run
//! on current-thread runtimes, so the layer's tasks record on that thread too), so tests never
//! see each other's counts.
#![cfg(feature = "metrics")]

#[macro_use]
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::Full;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{Fault, FaultyStore, Op, Reply, Runs, api, post_with_key, send};
use tower::{Service, ServiceExt};
use tower_idempotency::metrics::{
    DETACHED_RUNS, EVICTED_TOTAL, REQUESTS_TOTAL, STORE_CALL_DURATION_SECONDS,
};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Outcome, TenantRejection};

/// What a recorder saw, added up over snapshots (a snapshot drains counters, gauges and
/// histograms).
#[derive(Default)]
struct Seen {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, f64>,
    histograms: HashMap<String, usize>,
}

impl Seen {
    /// Adds what the recorder saw since the last snapshot.
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<_> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let id = format!("{}{{{}}}", key.name(), labels.join(","));
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Gauge(v) => *self.gauges.entry(id).or_default() += v.into_inner(),
                DebugValue::Histogram(samples) => {
                    *self.histograms.entry(id).or_default() += samples.len();
                }
            }
        }
    }

    fn requests(&self, outcome: &str) -> u64 {
        let id = format!("{REQUESTS_TOTAL}{{outcome={outcome}}}");
        self.counters.get(&id).copied().unwrap_or(0)
    }

    fn store_calls(&self, op: &str, result: &str) -> usize {
        let id = format!("{STORE_CALL_DURATION_SECONDS}{{op={op},result={result}}}");
        self.histograms.get(&id).copied().unwrap_or(0)
    }

    fn detached_runs(&self) -> f64 {
        let id = format!("{DETACHED_RUNS}{{}}");
        self.gauges.get(&id).copied().unwrap_or(0.0)
    }

    fn evicted(&self) -> u64 {
        let id = format!("{EVICTED_TOTAL}{{}}");
        self.counters.get(&id).copied().unwrap_or(0)
    }
}

fn layered(store: impl tower_idempotency::IdempotencyStore + Clone, runs: &Runs) -> Router {
    api(runs.clone()).layer(IdempotencyLayer::new(store).shared_scope(true))
}

/// Known traffic: a first run, its replay, a 409, a 422, an invalid key, a
/// missing key (passes through, not counted), and a store that fails (503).
#[tokio::test(start_paused = true)]
async fn requests_are_counted_by_outcome() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = layered(MemoryStore::new(), &runs);
    assert_eq!(
        send(&app, post_with_key("/payments", "k1", "{}"))
            .await
            .status,
        StatusCode::CREATED
    );
    assert!(
        send(&app, post_with_key("/payments", "k1", "{}"))
            .await
            .replayed()
    );
    let reuse = send(&app, post_with_key("/payments", "k1", r#"{"other":1}"#)).await;
    assert_eq!(reuse.status, StatusCode::UNPROCESSABLE_ENTITY);
    let invalid = send(&app, post_with_key("/payments", "two words", "{}")).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    let no_key = Request::post("/payments").body(Body::from("{}")).unwrap();
    assert_eq!(send(&app, no_key).await.status, StatusCode::CREATED);

    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with_key("/slow/1000", "k2", "{}")).await }
    });
    while runs.get() < 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let conflict = send(&app, post_with_key("/slow/1000", "k2", "{}")).await;
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(slow.await.unwrap().status, StatusCode::CREATED);

    let failing = FaultyStore::default();
    failing.fail(true);
    let down = layered(failing, &runs);
    let unavailable = send(&down, post_with_key("/payments", "k3", "{}")).await;
    assert_eq!(unavailable.status, StatusCode::SERVICE_UNAVAILABLE);

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("executed"), 2, "k1 and k2 ran");
    assert_eq!(seen.requests("replayed"), 1);
    assert_eq!(seen.requests("in_progress"), 1);
    assert_eq!(seen.requests("mismatch"), 1);
    assert_eq!(seen.requests("invalid_key"), 1);
    assert_eq!(seen.requests("store_error"), 1);
    let total: u64 = seen
        .counters
        .iter()
        .filter(|(id, _)| id.starts_with(REQUESTS_TOTAL))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        total, 7,
        "the request without a key passed through uncounted: {:?}",
        seen.counters
    );
}

/// Released keys (5xx, a panic) and requests refused for a missing key are counted too.
#[tokio::test(start_paused = true)]
async fn released_and_missing_keys_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .require_key(true),
    );
    let failed = send(&app, post_with_key("/status/500", "k", "{}")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let missing = Request::post("/payments").body(Body::from("{}")).unwrap();
    assert_eq!(send(&app, missing).await.status, StatusCode::BAD_REQUEST);
    // A handler that panics: its release is counted once, though no response reports it.
    let panicked = AssertUnwindSafe(send(&app, post_with_key("/panic", "p", "{}")))
        .catch_unwind()
        .await;
    assert!(panicked.is_err());

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("released"), 2, "the 500 and the panic");
    assert_eq!(seen.requests("missing_key"), 1);
}

/// A handler that panics while its release takes the store a while, and whose request is then
/// dropped (`finish_on_disconnect(false)`, its client gone): its release is counted once, by
/// the guard that finishes it in the background.
#[tokio::test(start_paused = true)]
async fn a_panic_dropped_while_releasing_is_counted_once() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let (runs, store) = (Runs::default(), FaultyStore::default());
    store.always(Op::Release, Fault::Delay(Duration::from_millis(100)));
    let layer = IdempotencyLayer::new(store.clone())
        .shared_scope(true)
        .finish_on_disconnect(false);
    let mut app = api(runs.clone()).layer(layer);
    let request = post_with_key("/panic", "k", "{}");
    let mut pending = Box::pin(
        ServiceExt::<Request<Body>>::ready(&mut app)
            .await
            .unwrap()
            .call(request),
    );
    let waker = futures_util::task::noop_waker();
    let first = AssertUnwindSafe(|| pending.as_mut().poll(&mut Context::from_waker(&waker)));
    let first = std::panic::catch_unwind(first);
    assert!(
        matches!(first, Ok(Poll::Pending)),
        "the handler panicked; its release is under way"
    );
    drop(pending);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retry = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "the key was released");

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("released"), 1, "{:?}", seen.counters);
}

/// Each store call of one request is timed: `begin` and `complete`, both `ok`; a store that
/// fails records `begin` as an `error`.
#[tokio::test(start_paused = true)]
async fn store_calls_are_timed_by_op_and_result() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = layered(MemoryStore::new(), &runs);
    send(&app, post_with_key("/payments", "k1", "{}")).await;
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.store_calls("begin", "ok"), 1, "{:?}", seen.histograms);
    assert_eq!(
        seen.store_calls("complete", "ok"),
        1,
        "{:?}",
        seen.histograms
    );
    assert_eq!(seen.store_calls("begin", "error"), 0);

    let failing = FaultyStore::default();
    failing.fail(true);
    send(
        &layered(failing, &runs),
        post_with_key("/payments", "k2", "{}"),
    )
    .await;
    seen.take(&snapshotter);
    assert_eq!(
        seen.store_calls("begin", "error"),
        1,
        "{:?}",
        seen.histograms
    );
    assert_eq!(seen.store_calls("begin", "ok"), 1);
}

/// A handler whose client went away runs on, counted by the gauge until it ends.
#[tokio::test(start_paused = true)]
async fn detached_runs_are_gauged() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = layered(MemoryStore::new(), &runs);
    let client = tokio::spawn({
        let app = app.clone();
        async move { app.oneshot(post_with_key("/slow/1000", "k", "{}")).await }
    });
    while runs.get() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.abort();
    let _ = client.await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.detached_runs(), 1.0, "{:?}", seen.gauges);

    tokio::time::sleep(Duration::from_secs(2)).await;
    seen.take(&snapshotter);
    assert_eq!(seen.detached_runs(), 0.0, "the run ended");
    assert_eq!(seen.requests("executed"), 1, "its response was stored");
}

/// A full store drops completed records early to make room, and counts them.
#[tokio::test(start_paused = true)]
async fn early_evictions_are_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = layered(MemoryStore::new().max_entries(2), &runs);
    for key in ["k1", "k2", "k3"] {
        let reply = send(&app, post_with_key("/payments", key, "{}")).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{key}");
    }
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.evicted(), 1, "{:?}", seen.counters);
}

/// `describe` gives the recorder each metric's help text and unit.
#[tokio::test]
async fn metrics_are_described() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    tower_idempotency::metrics::describe();
    let runs = Runs::default();
    send(
        &layered(MemoryStore::new(), &runs),
        post_with_key("/payments", "k", "{}"),
    )
    .await;
    let snapshot = snapshotter.snapshot().into_vec();
    let (_, unit, help, _) = snapshot
        .iter()
        .find(|(key, ..)| key.key().name() == REQUESTS_TOTAL)
        .expect("the request was counted");
    assert_eq!(*unit, Some(metrics::Unit::Count));
    assert!(
        help.as_deref().is_some_and(|h| h.contains("by outcome")),
        "{help:?}"
    );
}

/// A failing service under the layer (any tower service may fail, not only answer): no
/// response carries the outcome, so the layer counts it alone, once.
fn failing() -> impl Service<
    Request<tower_idempotency::RequestBody<Full<Bytes>>>,
    Response = axum::http::Response<Full<Bytes>>,
    Error = tower_idempotency::BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(
        |_: Request<tower_idempotency::RequestBody<Full<Bytes>>>| async {
            Err::<axum::http::Response<Full<Bytes>>, tower_idempotency::BoxError>(
                "the service failed".into(),
            )
        },
    )
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

/// A service that fails ran with its key held: the key is released, and counted once so.
#[tokio::test(start_paused = true)]
async fn a_service_that_fails_is_counted_once_as_released() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let svc = tower::Layer::layer(
        &IdempotencyLayer::new(MemoryStore::new()).shared_scope(true),
        failing(),
    );
    assert!(svc.clone().oneshot(keyed("k")).await.is_err());

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("released"), 1, "{:?}", seen.counters);
    assert_eq!(total(&seen), 1, "{:?}", seen.counters);
    assert_eq!(seen.store_calls("release", "ok"), 1);
}

/// Fail-open, the store down: a service that fails ran unprotected, counted once as bypassed.
#[tokio::test(start_paused = true)]
async fn a_bypassed_service_that_fails_is_counted_once() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let store = FaultyStore::default();
    store.fail(true);
    let layer = IdempotencyLayer::new(store)
        .shared_scope(true)
        .fail_open(true);
    let svc = tower::Layer::layer(&layer, failing());
    assert!(svc.oneshot(keyed("k")).await.is_err());

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("bypassed"), 1, "{:?}", seen.counters);
    assert_eq!(total(&seen), 1, "{:?}", seen.counters);
}

/// A request dropped while its response is stored (`finish_on_disconnect(false)`, its client
/// gone): the completion ends in the background, and the request is counted once, as executed.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_completing_is_counted_once() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let (runs, store) = (Runs::default(), FaultyStore::default());
    store.always(Op::Complete, Fault::Delay(Duration::from_millis(200)));
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(store.clone())
            .shared_scope(true)
            .finish_on_disconnect(false),
    );
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with_key("/payments", "k", "{}")).await }
    });
    while runs.get() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Inside the 200 ms of `complete`.
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.abort();
    assert!(client.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retry = send(&app, post_with_key("/payments", "k", "{}")).await;
    assert!(retry.replayed(), "the completion ended in the background");
    assert_eq!(runs.get(), 1);

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("executed"), 1, "{:?}", seen.counters);
    assert_eq!(seen.requests("replayed"), 1, "{:?}", seen.counters);
    assert_eq!(total(&seen), 2, "{:?}", seen.counters);
}

/// Every request counted, whatever its outcome.
fn total(seen: &Seen) -> u64 {
    seen.counters
        .iter()
        .filter(|(id, _)| id.starts_with(REQUESTS_TOTAL))
        .map(|(_, n)| n)
        .sum()
}

/// A keyed `POST` whose body arrives in `chunks`, without a `Content-Length`.
fn streamed(key: &str, chunks: Vec<Result<Bytes, std::io::Error>>) -> Request<Body> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

/// Waits (Tokio time) until the handlers have started `n` runs.
async fn until_runs(runs: &Runs, n: usize) {
    for _ in 0..10_000 {
        if runs.get() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("{n} runs started (now {})", runs.get());
}

/// Every outcome, one request or two each: each request is counted once, under the snake_case
/// label of the `Outcome` its response carries; a request that passes through carries none and
/// is not counted.
#[tokio::test(start_paused = true)]
async fn every_outcome_is_counted_once_under_the_label_its_response_carries() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_body_bytes(16)
            .max_response_bytes(64),
    );
    let mut answers: Vec<(&str, Reply)> = Vec::new();
    answers.push((
        "executed",
        send(&app, post_with_key("/payments", "k1", "{}")).await,
    ));
    answers.push((
        "replayed",
        send(&app, post_with_key("/payments", "k1", "{}")).await,
    ));
    let reuse = post_with_key("/payments", "k1", r#"{"other":1}"#);
    answers.push(("mismatch", send(&app, reuse).await));
    answers.push((
        "released",
        send(&app, post_with_key("/status/500", "k2", "{}")).await,
    ));
    answers.push((
        "executed",
        send(&app, post_with_key("/big/100", "k3", "{}")).await,
    ));
    answers.push((
        "not_stored",
        send(&app, post_with_key("/big/100", "k3", "{}")).await,
    ));
    answers.push((
        "invalid_key",
        send(&app, post_with_key("/payments", "two words", "{}")).await,
    ));
    let announced = post_with_key("/payments", "k4", "0123456789abcdefghij");
    answers.push(("too_large", send(&app, announced).await));
    let chunk = || Ok(Bytes::from_static(b"0123456789"));
    answers.push((
        "too_large",
        send(&app, streamed("k5", vec![chunk(), chunk()])).await,
    ));
    let cut_off = streamed("k6", vec![chunk(), Err(std::io::Error::other("cut off"))]);
    answers.push(("body_error", send(&app, cut_off).await));

    let strict = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .require_key(true),
    );
    let no_key = Request::post("/payments").body(Body::from("{}")).unwrap();
    answers.push(("missing_key", send(&strict, no_key).await));
    // Without the shared scope, a request without credentials has no tenant.
    let scoped = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()));
    answers.push((
        "tenant_missing",
        send(&scoped, post_with_key("/payments", "k7", "{}")).await,
    ));
    let rejecting = api(runs.clone()).layer(IdempotencyLayer::new(MemoryStore::new()).tenant(
        |_: &axum::http::request::Parts| {
            Err(TenantRejection::new(
                StatusCode::UNAUTHORIZED,
                "who are you",
            ))
        },
    ));
    answers.push((
        "tenant_rejected",
        send(&rejecting, post_with_key("/payments", "k8", "{}")).await,
    ));

    let failing = FaultyStore::default();
    failing.fail(true);
    let closed = layered(failing.clone(), &runs);
    answers.push((
        "store_error",
        send(&closed, post_with_key("/payments", "k9", "{}")).await,
    ));
    let open = api(runs.clone()).layer(
        IdempotencyLayer::new(failing)
            .shared_scope(true)
            .fail_open(true),
    );
    answers.push((
        "bypassed",
        send(&open, post_with_key("/payments", "k10", "{}")).await,
    ));

    // A duplicate while the first runs; a new key past the bound while one runs.
    let before = runs.get();
    let slow = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with_key("/slow/1000", "k11", "{}")).await }
    });
    until_runs(&runs, before + 1).await;
    answers.push((
        "in_progress",
        send(&app, post_with_key("/slow/1000", "k11", "{}")).await,
    ));
    answers.push(("executed", slow.await.unwrap()));
    let bounded = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .max_in_flight(1),
    );
    let before = runs.get();
    let slow = tokio::spawn({
        let bounded = bounded.clone();
        async move { send(&bounded, post_with_key("/slow/1000", "k12", "{}")).await }
    });
    until_runs(&runs, before + 1).await;
    answers.push((
        "overloaded",
        send(&bounded, post_with_key("/payments", "k13", "{}")).await,
    ));
    answers.push(("executed", slow.await.unwrap()));

    let passed = send(
        &app,
        Request::post("/payments").body(Body::from("{}")).unwrap(),
    )
    .await;
    assert_eq!(passed.status, StatusCode::CREATED);
    assert_eq!(
        passed.outcome, None,
        "a request without a key passes through"
    );

    let mut expected: HashMap<String, u64> = HashMap::new();
    for (label, reply) in &answers {
        assert_eq!(
            reply.outcome.map(Outcome::as_str),
            Some(*label),
            "the response's outcome: {reply:?}"
        );
        *expected
            .entry(format!("{REQUESTS_TOTAL}{{outcome={label}}}"))
            .or_default() += 1;
    }
    let mut seen = Seen::default();
    seen.take(&snapshotter);
    let counted: HashMap<String, u64> = seen
        .counters
        .iter()
        .filter(|(id, _)| id.starts_with(REQUESTS_TOTAL))
        .map(|(id, n)| (id.clone(), *n))
        .collect();
    assert_eq!(counted, expected);
    assert_eq!(total(&seen), answers.len() as u64);
}

/// Waiters are counted once each: one that gets the first's replay as `replayed`, one past its
/// deadline or past `max_waiters` as `in_progress`; the first as `executed`.
#[tokio::test(start_paused = true)]
async fn waiters_are_counted_once_each() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .shared_scope(true)
        .wait_for_in_flight(Duration::from_secs(2))
        .max_waiters(2);
    let app = api(runs.clone()).layer(layer.clone());
    let spawn = |path: &'static str, key: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { send(&app, post_with_key(path, key, "{}")).await })
    };
    let until_waiting = async |n: usize| {
        for _ in 0..10_000 {
            if layer.waiting_requests() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{n} requests wait (now {})", layer.waiting_requests());
    };

    // The first of "a" answers within the wait: both waiters get its replay; a third
    // duplicate, past `max_waiters`, gets `409` at once.
    let first = spawn("/slow/1000", "a");
    until_runs(&runs, 1).await;
    let waiters = [spawn("/slow/1000", "a"), spawn("/slow/1000", "a")];
    until_waiting(2).await;
    let bounced = send(&app, post_with_key("/slow/1000", "a", "{}")).await;
    bounced.assert_in_progress();
    let original = first.await.unwrap();
    assert_eq!(original.status, StatusCode::CREATED);
    for waiter in waiters {
        waiter.await.unwrap().assert_replay_of(&original);
    }
    // The first of "b" runs past the wait: its waiter gets `409` at its deadline.
    let first = spawn("/slow/5000", "b");
    until_runs(&runs, 2).await;
    let late = send(&app, post_with_key("/slow/5000", "b", "{}")).await;
    late.assert_in_progress();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(runs.get(), 2);

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("executed"), 2, "{:?}", seen.counters);
    assert_eq!(seen.requests("replayed"), 2, "{:?}", seen.counters);
    assert_eq!(seen.requests("in_progress"), 2, "{:?}", seen.counters);
    assert_eq!(total(&seen), 6, "{:?}", seen.counters);
}

/// A handler that runs past its lease renews it, and each renewal is timed with `op=renew`.
#[tokio::test(start_paused = true)]
async fn lease_renewals_are_timed() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .lease(Duration::from_secs(3)),
    );
    let reply = send(&app, post_with_key("/slow/10000", "k", "{}")).await;
    assert_eq!(reply.status, StatusCode::CREATED);

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert!(
        seen.store_calls("renew", "ok") >= 3,
        "a 10 s run under a 3 s lease: {:?}",
        seen.histograms
    );
    assert_eq!(seen.store_calls("renew", "error"), 0);
    assert_eq!(seen.requests("executed"), 1);
}

/// A handler cancelled with its client (`finish_on_disconnect(false)`) is counted once, as
/// released; it never counts as a detached run, and its retry runs.
#[tokio::test(start_paused = true)]
async fn a_handler_cancelled_with_its_client_is_counted_once_as_released() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let runs = Runs::default();
    let app = api(runs.clone()).layer(
        IdempotencyLayer::new(MemoryStore::new())
            .shared_scope(true)
            .finish_on_disconnect(false),
    );
    let client = tokio::spawn({
        let app = app.clone();
        async move { send(&app, post_with_key("/slow/1000", "k", "{}")).await }
    });
    until_runs(&runs, 1).await;
    client.abort(); // its future is dropped, as hyper drops it
    assert!(client.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let retry = send(&app, post_with_key("/slow/1000", "k", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed(), "the key was released: the retry ran");
    assert_eq!(runs.get(), 2);

    let mut seen = Seen::default();
    seen.take(&snapshotter);
    assert_eq!(seen.requests("released"), 1, "{:?}", seen.counters);
    assert_eq!(seen.requests("executed"), 1, "{:?}", seen.counters);
    assert_eq!(total(&seen), 2, "{:?}", seen.counters);
    assert_eq!(
        seen.store_calls("release", "ok"),
        1,
        "{:?}",
        seen.histograms
    );
    assert_eq!(seen.detached_runs(), 0.0, "{:?}", seen.gauges);
}
